"""The compiled, cached text2image training step on a CPU with inductor's layout optimization off (what
difftrain's `training.compile` sets on a CPU) against on (torch's default), in one benchmark run.

    .venv/bin/python benchmarks/compile_layout.py [--steps 60] [--batch 4] [--size 128] [--precision bf16]
        [--rounds 2]

With the optimization inductor runs a CPU model's convolutions in channels_last, so their 3x3
weight gradients come out channels_last and autograd copies each into its parameter's contiguous
layout every step (`profile_step.py --cache --compile model` shows the copies under
AccumulateGrad). Each run is a fresh process through the real Trainer (SD 1.5's shape at a
quarter width, cached latents and text, EMA and clipping off), its first step (the compile) left
out; the first run of each variant compiles cold unless its kernels are in the cache (~4 min each
on 2 cores).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from _common import alternate, device_name, print_rates, step_arguments, workspace
from text2image_step import difftrain_text2image


def compiled_step(out: Path, layout_optimization: bool, **run) -> float:
    """text2image_step.py's difftrain run, cached and compiled whole, with or without the optimization."""
    from difftrain.training import optim

    if layout_optimization:  # inductor's own default: no options of ours
        optim._training_compile_options = lambda model: {}
    return difftrain_text2image(out, cache=True, compile_scope="model", **run)


def main() -> None:
    parser = step_arguments(__doc__.splitlines()[0])
    parser.set_defaults(steps=60)
    parser.add_argument("--precision", choices=("no", "bf16"), default="bf16")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each variant, in alternating order")
    args = parser.parse_args()
    space = workspace(args.size, args.batch)
    print(f"device: {device_name(space.device)}; {args.steps} steps of batch {args.batch} at {args.size} px, "
          f"precision {args.precision}, cached, compiled whole")
    shared = dict(model_dir=space.model_dir, data_dir=space.data_dir, steps=args.steps, batch=args.batch,
                  size=args.size, precision=args.precision)
    baseline = "layout optimization on (torch's default)"
    variants = {baseline: partial(compiled_step, layout_optimization=True, **shared),
                "layout optimization off (difftrain's)": partial(compiled_step, layout_optimization=False, **shared)}
    print_rates(alternate(variants, space, rounds=args.rounds, fresh_processes=True), baseline, memory=False)
    print("(each run in a fresh process, its first step left out)")


if __name__ == "__main__":
    main()
