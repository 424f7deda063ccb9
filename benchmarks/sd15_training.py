"""Stable Diffusion 1.5-shaped text-to-image training on a GPU: steps/s and peak memory of difftrain
(without and with the cache) against the loop diffusers' scripts write, for each batch, precision and
full fine-tune or LoRA, in one process on the same model, data and batch.

    .venv/bin/python benchmarks/sd15_training.py [--batches 1,4] [--precisions bf16,fp16]
        [--methods full,lora] [--rank 8] [--steps 30] [--size 512] [--compile [blocks,model]]
        [--workers N] [--quarter]

The model is SD 1.5's UNet, VAE and CLIP-L text encoder with random weights (timing only: nothing
is judged). Rates leave out each run's first step (cuDNN autotuning, allocator growth, compiling);
peak memory is the CUDA peak allocation over the run, model loading included. The cache is filled
once per precision before the first row, so no row's time or memory holds the fill. `--compile`
adds a row for difftrain with `training.compile: true` on the cached step per
`training.compile_scope` listed (bare: both; `blocks`, SD's transformer blocks alone, compiles in a
quarter of the time on a CPU); `--workers N` one for the uncached step with `data.num_workers: N`
(the default 0 loads each batch in the training process, between the step's kernel launches, as the plain loop and diffusers' scripts do; on a CPU
the workers' memory is not in the row's peak). Under fp16 the plain loop casts the VAE to fp16 as
the scripts do, while difftrain keeps it in fp32 (SD's VAE overflows in fp16), so uncached fp16
rows compare a little more work against less. On a CPU (no fp16 there)
`--quarter --size 64` runs the same code on SD's quarter-width shape, as a check that it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
from functools import partial
from pathlib import Path

import torch
from _common import PeakMemory, add_compile_option, compile_settings, device_name, difftrain_run, workspace
from text2image_step import seeds_style_loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--precisions", default="bf16,fp16")
    parser.add_argument("--methods", default="full,lora")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=512)
    add_compile_option(parser, "difftrain's cached run")
    parser.add_argument("--workers", type=int, default=0,
                        help="add difftrain without the cache and with this many data loader processes")
    parser.add_argument("--quarter", action="store_true", help="SD's quarter-width shape instead of SD 1.5's")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be 2 or more: the first step is left out of the rates")
    if not torch.cuda.is_available() and "fp16" in args.precisions:
        parser.error("fp16 needs a CUDA GPU: give --precisions bf16 on a CPU")
    batches = [int(b) for b in args.batches.split(",")]
    precisions = args.precisions.split(",")
    space = workspace(args.size, max(batches), sd15=not args.quarter)
    print(f"device: {device_name(space.device)}; {'SD quarter width' if args.quarter else 'SD 1.5 shape'} at "
          f"{args.size} px, {args.steps} steps per run (rates leave out the first), LoRA rank {args.rank}")
    for precision in precisions:  # the cache filled once, untimed: no row pays for it
        with contextlib.redirect_stdout(io.StringIO()):
            difftrain_run(space.model_dir, space.data_dir, space.work / f"fill-{precision}", 2, max(batches),
                          args.size, **data_sections(space, precision, True), training={"mixed_precision": precision})
    print(f"\n{'batch':>5s} {'precision':9s} {'method':6s} {'variant':34s} {'steps/s':>8s} {'x plain':>7s} "
          f"{'peak MiB':>9s} {'x plain':>7s}", flush=True)
    for batch in batches:
        for precision in precisions:
            for method in args.methods.split(","):
                rows = measure(space, args, batch, precision, method)
                base_rate, base_peak = rows["plain loop (diffusers' script)"]
                for variant, (rate, peak) in rows.items():
                    print(f"{batch:5d} {precision:9s} {method:6s} {variant:34s} {rate:8.2f} {rate / base_rate:7.2f} "
                          f"{peak / 2**20:9.0f} {peak / max(base_peak, 1):7.2f}", flush=True)


def data_sections(space, precision: str, cache: bool, workers: int = 0) -> dict:
    return {"data": {"cache": {"latents": cache, "text": cache, "dir": str(space.work / f"cache-{precision}")},
                     "num_workers": workers}}


def measure(space, args, batch: int, precision: str, method: str) -> dict[str, tuple[float, int]]:
    """Each variant once, in a fixed order, where text2image_step.py alternates two rounds: a GPU's
    rates are expected to be steadier than this CPU's (not yet measured: rerun a row to check)."""
    lora = {"lora": {"enabled": True, "rank": args.rank}} if method == "lora" else {}

    def difftrain(out: Path, cache: bool, compile_scope: str | None = None, workers: int = 0) -> float:
        if compile_scope:
            torch._dynamo.reset()  # a fresh compile per row, as in a process of its own
        training = {"mixed_precision": precision, **compile_settings(compile_scope)}
        return difftrain_run(space.model_dir, space.data_dir, out, args.steps, batch, args.size,
                             after_first_step=True, **data_sections(space, precision, cache, workers),
                             training=training, **lora)[0]

    variants = {
        "plain loop (diffusers' script)": lambda out: seeds_style_loop(
            space.model_dir, space.data_dir, args.steps, batch, args.size, space.device, precision,
            args.rank if method == "lora" else 0, after_first_step=True),
        "difftrain, no cache": lambda out: difftrain(out, cache=False),
        **({f"difftrain, no cache, {args.workers} workers": lambda out: difftrain(out, cache=False, workers=args.workers)}
           if args.workers else {}),
        "difftrain, cached latents + text": lambda out: difftrain(out, cache=True),
    }
    for scope in args.compile:
        variants[f"difftrain, cached + compiled {scope}"] = partial(difftrain, cache=True, compile_scope=scope)
    results = {}
    for number, (name, run) in enumerate(variants.items()):
        gc.collect()  # the last run's model, or its memory counts in this run's start
        with PeakMemory(space.device) as memory, contextlib.redirect_stdout(io.StringIO()):
            rate = run(space.work / f"run-{batch}-{precision}-{method}-{number}")
        results[name] = (rate, memory.peak)
    return results


if __name__ == "__main__":
    main()
