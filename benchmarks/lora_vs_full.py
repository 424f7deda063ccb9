"""LoRA against full fine-tuning of the UNet: trainable parameters, steps/s and peak memory, side by side,
in one process, on the same SD-shaped model, data and batch, through difftrain's own trainer.

    .venv/bin/python benchmarks/lora_vs_full.py [--steps 20] [--batch 4] [--size 128] [--rank 8]

Latents and text embeddings are cached for both, so the step is the UNet's forward, backward
and optimizer update: exactly the part LoRA changes. Peak memory: CUDA peak allocation on a GPU;
on a CPU, resident-set growth while the variant ran (indicative only: see _common.PeakMemory).
"""

from __future__ import annotations

from pathlib import Path

import torch
from _common import alternate, device_name, difftrain_run, print_rates, step_arguments, workspace


def main() -> None:
    parser = step_arguments(__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    space = workspace(args.size, args.batch)
    cache = {"cache": {"latents": True, "text": True, "dir": str(space.work / "cache")}}
    print(f"device: {device_name(space.device)}; {args.steps} steps of batch {args.batch} at {args.size} px, "
          f"LoRA rank {args.rank} on to_q/to_k/to_v/to_out.0")

    def run(extra: dict, sizes: dict):
        def call(out: Path) -> float:
            rate, trainer = difftrain_run(space.model_dir, space.data_dir, out, args.steps, args.batch, args.size,
                                          data=cache, **extra)
            sizes["trainable"] = sum(p.numel() for p in trainer.parameters)
            sizes["state"] = sum(t.numel() for s in trainer.optimizer.state.values() for t in s.values()
                                 if torch.is_tensor(t))
            return rate
        return call

    # Fill the shared cache once, untimed, so neither variant pays for it.
    difftrain_run(space.model_dir, space.data_dir, space.work / "warm", 2, args.batch, args.size, data=cache)
    sizes = {"full fine-tune": {}, f"LoRA r={args.rank}": {}}
    results = alternate({
        "full fine-tune": run({}, sizes["full fine-tune"]),
        f"LoRA r={args.rank}": run({"lora": {"enabled": True, "rank": args.rank}}, sizes[f"LoRA r={args.rank}"]),
    }, space)

    print_rates(results, "full fine-tune", columns={
        "trainable": {name: f"{size['trainable']:,d}" for name, size in sizes.items()},
        "optimizer state": {name: f"{size['state']:,d}" for name, size in sizes.items()}})


if __name__ == "__main__":
    main()
