"""AdamW step time on an SD-shaped UNet: torch's default (per-tensor on CPU), foreach, and fused,
which difftrain uses. One process, same parameters and gradients.

    .venv/bin/python benchmarks/optimizer_step.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from difftrain.models.tiny_sd import tiny_sd_components

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # SD 1.5's UNet at a quarter of its width (54M parameters), as in text2image_step.py.
    unet = tiny_sd_components(unet_channels=(80, 160, 320, 320), layers_per_block=2, text_hidden=192,
                              sample_size=128)["unet"].to(device)
    for p in unet.parameters():
        p.grad = torch.randn_like(p)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}; "
          f"{sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M parameters")
    results = {}
    for name, options in [("default", {}), ("foreach", {"foreach": True}), ("fused (difftrain)", {"fused": True})]:
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, **options)
        optimizer.step()  # state allocation is not a step
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(args.repeats):
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        results[name] = (time.perf_counter() - started) / args.repeats
    base = results["default"]
    for name, seconds in results.items():
        print(f"{name:20s} {seconds * 1000:8.1f} ms/step   x{base / seconds:5.2f} faster than default")


if __name__ == "__main__":
    main()
