"""Generation speed: difftrain generate's default settings against diffusers' plain pipeline defaults,
same components, scheduler, steps and prompt, in one process. Images/s and per-step latency for the
tiny SD and for a model of Stable Diffusion 1.5's shape (random weights: timing only).

    .venv/bin/python benchmarks/generate_speed.py [--steps 4] [--skip-sd15] [--compile]

diffusers' baseline is its documented use: fp16 weights on a GPU, fp32 on a CPU, SDPA attention.
difftrain's defaults add, on a GPU, a channels_last UNet and fused QKV projections; `--compile` adds
a row for `difftrain generate --compile` (UNet and VAE decoder through inductor, CUDA graphs on a GPU),
whose first generation (the warm-up, compile included) is printed apart. On a CPU the first two rows
run the same kernels, so their ratio is ~1.0.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import device_name, sd15_shaped


def timed(call, steps: int, device) -> tuple[float, float, float]:
    """images/s and s/step of a generation after a warm-up one (first-call allocations, kernel choice,
    compiling), and the warm-up's seconds."""
    started = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    warm_up = time.perf_counter() - started
    started = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return 1.0 / seconds, seconds / steps, warm_up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--skip-sd15", action="store_true")
    parser.add_argument("--compile", action="store_true", help="add a --compile row (minutes of compiling on a CPU)")
    args = parser.parse_args()
    from difftrain.generate.text2image import GenerateOptions, configure_pipeline
    from difftrain.models.tiny_sd import tiny_sd_components
    from difftrain.sampling.schedulers import make_scheduler

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {device_name(device)}; {args.steps} steps, DPM++ 2M Karras, CFG 7, batch 1")
    models = {"tiny SD (32 px)": (lambda: _pipe(tiny_sd_components()), 32)}
    if not args.skip_sd15:
        models["SD 1.5 shape (512 px)"] = (sd15_shaped, 512)
    print(f"\n{'model':22s} {'settings':22s} {'images/s':>9s} {'it/s':>7s} {'x diffusers':>11s} {'warm-up s':>9s}")
    rows = {"diffusers defaults": None, "difftrain defaults": GenerateOptions(prompt="a red circle")}
    if args.compile:
        rows["difftrain --compile"] = GenerateOptions(prompt="a red circle", compile=True)
    for label, (build, size) in models.items():
        results = {}
        for settings, options in rows.items():
            pipe = build()
            pipe.scheduler = make_scheduler("DPM++ 2M Karras", dict(pipe.scheduler.config))
            pipe.set_progress_bar_config(disable=True)
            if options is not None:
                configure_pipeline(pipe, options, device)
            else:
                pipe.to(device, torch.float16 if device.type == "cuda" else torch.float32)
            call = lambda pipe=pipe: pipe("a red circle", num_inference_steps=args.steps, guidance_scale=7.0, width=size,
                                height=size, generator=torch.Generator().manual_seed(0))
            results[settings] = timed(call, args.steps, device)
            del pipe
        base = results["diffusers defaults"][0]
        for settings, (rate, per_step, warm_up) in results.items():
            print(f"{label:22s} {settings:22s} {rate:9.3f} {1 / per_step:7.2f} {rate / base:11.2f} {warm_up:9.1f}")


def _pipe(components):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


if __name__ == "__main__":
    main()
