"""The demo's training step under each speed lever, against the step as configs/demo.yaml runs it.

    .venv/bin/python benchmarks/demo_levers.py [--steps 12] [--compile]

One step = the UNet's forward and backward on a batch of 32 px images plus fused AdamW, the
part that is ~95 % of the demo's step (benchmarks/profile_step.py). Each lever is measured
alone, in this process, alternating with the baseline: bf16 autocast (pays only where the
CPU has bf16 instructions, e.g. AVX512-BF16 or AMX), channels_last, larger batches (as
images/s: the number that decides how long a fixed number of training images takes), the
other UNet presets, one thread instead of the process's (how the step scales with cores), and
with --compile torch.compile (inductor), whose compile time is printed apart from its step
time; then the base step's FLOPs and the rate it computes them at. Last, the demo's own
training loop (the real Trainer on configs/demo.yaml, --loop-steps steps, data, EMA and
clipping included) in fp32 against `training.mixed_precision: auto`, alternating, as its run
summary times it; then with the UNet preset it had before ("small") against its own ("mini"), and with the
optimizer it had before (AdamW) against its own (Muon, whose Newton-Schulz matmuls cost time);
then that loop with `training.keep_host_memory` off and on, each run in a fresh process (the
setting is process-wide and one-way).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
from _common import Rates, alternate, print_rates

from difftrain.config import TrainingConfig
from difftrain.data.shapes import write_shapes_dataset
from difftrain.models.unet import build_unet

ROOT = Path(__file__).resolve().parents[1]


def step_time(preset: str = "mini", batch: int = 16, bf16: bool = False, channels_last: bool = False,
              compile: bool = False, threads: int | None = None, steps: int = 12) -> tuple[float, float]:
    """(seconds per step, seconds of the first two steps: compiling when compile is on).
    `threads`: torch's intra-op threads for this measurement (default: the process's)."""
    if threads:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return step_time(preset, batch, bf16, channels_last, compile, None, steps)
        finally:
            torch.set_num_threads(before)
    torch.manual_seed(0)
    unet = build_unet(preset, None, 3, 32)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=True)
    x = torch.randn(batch, 3, 32, 32)
    t = torch.randint(0, 1000, (batch,))
    if channels_last:
        unet.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model = torch.compile(unet) if compile else unet

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x, t).sample
        (out.float() - x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    started = time.perf_counter()
    step(), step()
    first = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps, first


def step_flops(batch: int = 16) -> float:
    """FLOPs of the demo UNet's forward and backward on one batch, as torch's FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = build_unet("mini", None, 3, 32)
    with FlopCounterMode(display=False) as counter:
        unet(torch.randn(batch, 3, 32, 32), torch.randint(0, 1000, (batch,))).sample.pow(2).mean().backward()
    return counter.get_total_flops()


def loop_rate(overrides: list[str], steps: int, out: Path) -> float:
    """Steps/s of the demo's training loop over `steps` steps, with `overrides` (KEY=VALUE) on configs/demo.yaml."""
    from difftrain.config import load_config
    from difftrain.training.trainer import Trainer

    config = load_config(ROOT / "configs" / "demo.yaml", [
        f"output_dir={out}", f"data.path={ROOT / 'data' / 'shapes'}", f"training.max_steps={steps}",
        "sample.every_steps=100000", "checkpoint.every_steps=100000", *overrides])
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = Trainer(config, progress=False)
        trainer.save_checkpoint = lambda: None  # the final checkpoint is I/O, not a step
        result = trainer.run()
    return steps / result.loop_seconds


def alternate_loops(variants: dict[str, list[str]], steps: int,
                    fresh_processes: bool = False) -> dict[str, Rates]:
    """The demo's loop under each variant's overrides, two runs each, alternating: {name: its Rates}."""
    if not (ROOT / "data" / "shapes" / "metadata.jsonl").is_file():
        write_shapes_dataset(ROOT / "data" / "shapes", num_images=2400)
    with tempfile.TemporaryDirectory() as work:
        # alternate() reads only .work and .device: two runs each, alternating, so neither profits from going second.
        space = SimpleNamespace(work=Path(work), device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        return alternate({name: partial(loop_rate, overrides, steps) for name, overrides in variants.items()}, space,
                         fresh_processes=fresh_processes)


def compare_loops(key: str, values: tuple[str, ...], steps: int, note: str, fresh_processes: bool = False) -> None:
    """The demo's loop at each value of the config `key`, alternating, as print_rates' table against the first."""
    print(f"\ndemo training loop, {steps} steps a run, {key} ({note}):")
    results = alternate_loops({value: [f"{key}={value}"] for value in values}, steps, fresh_processes)
    print_rates(results, values[0], memory=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--compile", action="store_true", help="also torch.compile (minutes of compiling on a CPU)")
    parser.add_argument("--loop-steps", type=int, default=150, help="steps per run of the demo's loop (0: skip it)")
    args = parser.parse_args()
    cpu_flags = open("/proc/cpuinfo").read() if torch.cuda.device_count() == 0 else ""
    print(f"CPU, {torch.get_num_threads()} threads; bf16 instructions: "
          f"{'yes' if 'avx512_bf16' in cpu_flags or 'amx_bf16' in cpu_flags else 'no'}")

    levers = {
        "bf16 autocast": dict(bf16=True),
        "channels_last": dict(channels_last=True),
        "batch 32": dict(batch=32),
        "batch 64": dict(batch=64),
        "batch 32 + bf16": dict(batch=32, bf16=True),
        "preset small": dict(preset="small"),
        "preset tiny": dict(preset="tiny"),
        # How the step scales with cores: two one-thread runs side by side (a sweep) each get about this rate.
        **({"one thread": dict(threads=1)} if torch.get_num_threads() > 1 else {}),
        **({"torch.compile": dict(compile=True), "bf16 + torch.compile": dict(bf16=True, compile=True)}
           if args.compile else {}),
    }
    print(f"\n{'lever':20s} {'ms/step':>8s} {'images/s':>9s} {'x base':>7s}   (base: preset mini, batch 16, fp32)")
    for name, options in levers.items():
        # The baseline is re-measured beside each lever: this machine's speed drifts by ±10 %.
        base, _ = step_time(steps=args.steps)
        seconds, first = step_time(steps=args.steps, **options)
        batch = options.get("batch", 16)
        ratio = (batch / seconds) / (16 / base)
        note = f"   first two steps {first:.0f} s (compiling)" if options.get("compile") else ""
        print(f"{name:20s} {seconds * 1000:8.0f} {batch / seconds:9.0f} {ratio:7.2f}   base {base * 1000:.0f} ms{note}")
    print("(x base: images/s against the baseline measured just before; 'preset small' is the demo's before, "
          "'preset tiny' the test model, for scale)")
    flops, (base, _) = step_flops(), step_time(steps=args.steps)
    print(f"base step: {flops / 1e9:.1f} GFLOP (forward + backward, FlopCounterMode), "
          f"{flops / base / 1e9:.0f} GFLOP/s over the whole step (optimizer included)")
    if not args.loop_steps:
        return
    from difftrain.training.optim import resolve_precision

    auto = resolve_precision(TrainingConfig(mixed_precision="auto"))
    compare_loops("training.mixed_precision", ("no", "auto"), args.loop_steps, f"no is fp32, auto is {auto} here")
    compare_loops("model.preset", ("small", "mini"), args.loop_steps, "small: the demo's before; mini: the demo's")
    compare_loops("training.optimizer", ("adamw", "muon"), args.loop_steps,
                  "adamw: the demo's before; muon: the demo's")
    compare_loops("training.keep_host_memory", ("false", "true"), args.loop_steps,
                  "each run in a fresh process; false: freed memory returned to the OS, glibc's default",
                  fresh_processes=True)

if __name__ == "__main__":
    main()
