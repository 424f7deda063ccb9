"""What a model upscaler costs here: Real-ESRGAN's two networks at their release sizes, through A1111's tiles.

    .venv/bin/python benchmarks/upscalers.py [--size 256] [--device cpu]

Random weights at RealESRGAN_x4plus's sizes (RRDBNet: 23 blocks of 64 features) and
realesr-general-x4v3's (SRVGGNetCompact: 32 convolutions of 64), a SIZE x SIZE image to 4x its
size the way `difftrain upscale`, the hires fix and the server run it (192 px tiles overlapping
by 8); then the compact network against the whole image at once, so the tiles' cost shows.
Seconds of one run each, and each row's time over the RRDBNet's.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from difftrain.generate.upscale import ImageUpscaler
from difftrain.models.upscalers import RRDBNet, SRVGGNetCompact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8))
    rows = [("RRDBNet (RealESRGAN_x4plus), tiles", RRDBNet(), 192),
            ("SRVGGNetCompact (realesr-general-x4v3), tiles", SRVGGNetCompact(64, 32, 4), 192),
            ("SRVGGNetCompact, whole image", SRVGGNetCompact(64, 32, 4), 0)]
    print(f"{args.size}x{args.size} -> {4 * args.size}x{4 * args.size} on {args.device}, "
          f"{torch.get_num_threads()} threads, fp32")
    base = None
    for name, network, tile in rows:
        upscaler = ImageUpscaler(name, network.eval().requires_grad_(False).to(args.device))
        started = time.perf_counter()
        out = upscaler.enlarge(image, 4, tile=tile)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        base = base or seconds
        print(f"{name:48s} {seconds:7.1f} s  x{seconds / base:.3f} the RRDBNet's  {out.size[0]}x{out.size[1]}")


if __name__ == "__main__":
    main()
