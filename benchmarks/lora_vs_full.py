"""LoRA against full fine-tuning of the UNet: trainable parameters, steps/s and peak memory, side by side,
in one process, on the same SD-shaped model, data and batch, through difftrain's own trainer.

    .venv/bin/python benchmarks/lora_vs_full.py [--steps 20] [--batch 4] [--size 128] [--rank 8]

Latents and text embeddings are cached for both, so the step is the UNet's forward, backward
and optimizer update: exactly the part LoRA changes. Peak memory: CUDA peak allocation on a GPU;
on a CPU, resident-set growth while the variant ran (indicative only: see _common.PeakMemory).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _common import PeakMemory, device_name, difftrain_run, sd_quarter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    from difftrain.data.shapes import write_shapes_dataset

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(tempfile.mkdtemp(prefix="difftrain-bench-"))
    model_dir = sd_quarter(work, args.size)
    data_dir = write_shapes_dataset(work / "data", num_images=8 * args.batch, size=args.size)
    cache = {"cache": {"latents": True, "text": True, "dir": str(work / "cache")}}
    print(f"device: {device_name(device)}; {args.steps} steps of batch {args.batch} at {args.size} px, "
          f"LoRA rank {args.rank} on to_q/to_k/to_v/to_out.0")
    # Fill the shared cache once, untimed, so neither variant pays for it.
    difftrain_run(model_dir, data_dir, work / "warm", 2, args.batch, args.size, data=cache)

    variants = {
        "full fine-tune": {},
        f"LoRA r={args.rank}": {"lora": {"enabled": True, "rank": args.rank}},
    }
    results = {}
    for round_ in range(2):
        for name, extra in (variants.items() if round_ == 0 else reversed(variants.items())):
            with PeakMemory(device) as memory:
                rate, trainer = difftrain_run(model_dir, data_dir, work / f"{round_}-{len(results)}-{name[:4]}",
                                              args.steps, args.batch, args.size, data=cache, **extra)
            trainable = sum(p.numel() for p in trainer.parameters)
            state = sum(t.numel() for s in trainer.optimizer.state.values() for t in s.values() if torch.is_tensor(t))
            previous = results.get(name, (0.0, 0, 0, 0))
            results[name] = (previous[0] + rate / 2, max(previous[1], memory.peak), trainable, state)

    base = results["full fine-tune"]
    print(f"\n{'variant':16s} {'trainable':>12s} {'optimizer state':>16s} {'steps/s':>8s} {'x full':>7s} "
          f"{'peak MiB':>9s} {'x full':>7s}")
    for name, (rate, peak, trainable, state) in results.items():
        print(f"{name:16s} {trainable:12,d} {state:16,d} {rate:8.2f} {rate / base[0]:7.2f} "
              f"{peak / 2**20:9.0f} {peak / max(base[1], 1):7.2f}")
    print("(steps/s: mean of two runs each, alternating order; peak: the larger of the two)")


if __name__ == "__main__":
    main()
