"""Does a mask ControlNet put the shape where its mask is? The shapes-mask demo's measure.

    .venv/bin/python benchmarks/controlnet_control.py runs/mini-controlnet [--cases 12] [--seeds 2]

Draws each of `--cases` held-out masks (shapes the data never had: seed 123), with the prompt of
its colour and shape, through `difftrain generate`'s code twice: with the ControlNet run (the
mask as its control image) and with its base alone. Prints the mask IoU of each (the drawn
foreground against the mask) and their means; the masks and both images go to --out.
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from difftrain.cli import quiet_libraries

    quiet_libraries()  # `make mini-controlnet` runs this after the CLI: the same quiet output (no torchvision notices)
    from difftrain.data.shapes import COLOURS, SHAPES, draw_shape_and_mask
    from difftrain.evaluate.control import control_study

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a controlnet run folder (or its model folder)")
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--out", default="runs/controlnet-control")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(123)
    pairs = [(colour, shape) for shape in SHAPES for colour in COLOURS]
    cases = []
    for index in range(args.cases):
        colour, shape = pairs[index % len(pairs)]
        _, mask = draw_shape_and_mask(rng, args.size, colour, shape)
        mask.save(out / f"mask-{index:02d}.png")
        cases.append((str(out / f"mask-{index:02d}.png"), f"a {colour} {shape}"))
    study = control_study(args.run, cases, seeds=list(range(args.seeds)), steps=args.steps, size=args.size, out=out)
    print(f"{'prompt':20s} {'IoU with':>9s} {'without':>8s}")
    for case in study["cases"]:
        print(f"{case['prompt']:20s} {case['with']:9.3f} {case['without']:8.3f}")
    print(f"{'mean':20s} {study['with']:9.3f} {study['without']:8.3f}   ({args.cases} masks x {args.seeds} seeds, "
          f"{args.steps} steps; IoU of the mask and the drawn foreground)")


if __name__ == "__main__":
    main()
