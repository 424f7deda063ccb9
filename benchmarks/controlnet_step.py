"""ControlNet training steps/s and peak memory against a plain text2image step, in one process, on
the same SD-shaped model, data (shapes with their masks) and batch, latents and text cached in both.

    .venv/bin/python benchmarks/controlnet_step.py [--steps 20] [--batch 4] [--size 128]

A ControlNet step runs the ControlNet (a copy of the UNet's encoder and middle) and the frozen
UNet forward, and backward through both, but computes no UNet weight gradients and updates
only the ControlNet's weights. Peak memory as in text2image_step.py (CUDA allocation, or RSS
growth on a CPU).
"""

from __future__ import annotations

from _common import alternate, device_name, difftrain_run, print_rates, step_arguments, workspace


def main() -> None:
    args = step_arguments(__doc__.splitlines()[0]).parse_args()
    space = workspace(args.size, args.batch, masks=True)
    cached = {"cache": {"latents": True, "text": True}}
    control = {"preprocess": "mask"}

    def run(out, method, **sections):
        return difftrain_run(space.model_dir, space.data_dir, out, args.steps, args.batch, args.size, method,
                             data=cached, **sections)[0]

    baseline = "text2image (UNet trains)"
    variants = {
        baseline: lambda out: run(out, "text2image"),
        "controlnet (ControlNet trains)": lambda out: run(out, "controlnet", controlnet=control),
        "controlnet + grad. checkpointing": lambda out: run(out, "controlnet", controlnet=control,
                                                           training={"gradient_checkpointing": True}),
    }
    print(f"device: {device_name(space.device)}; {args.steps} steps of batch {args.batch} at {args.size} px")
    run(space.work / "warm-up", "controlnet", controlnet=control)  # first-use costs paid by no variant
    print_rates(alternate(variants, space), baseline)
    print("(the run summary's steps alone; peak: model loading included)")


if __name__ == "__main__":
    main()
