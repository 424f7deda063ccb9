"""DeepCache's speed/quality trade-off: `generate --deepcache N` against the plain UNet, in one process.

    .venv/bin/python benchmarks/deepcache.py [--model DIR ...] [--steps 20] [--size 256] [--intervals 2,3,5]

For each model, images/s at each interval and the PSNR of its images to the plain ones (same
prompts and seeds, DPM++ 2M Karras, CFG 7). Without --model: the tiny SD and a model of SD
1.5's shape (random weights: the speed is real, the PSNR says little); give a trained model
(runs/mini-sd after `make mini-sd`, or a real SD) for a quality figure that means something.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROMPTS = ("a red circle", "a blue square", "a green triangle")


def run(model: str, interval: int, steps: int, size: int | None) -> tuple[float, list]:
    from difftrain.generate.text2image import Drawer, GenerateOptions

    drawer = Drawer(model, GenerateOptions(prompt="", steps=steps, width=size, height=size, deepcache=interval),
                    progress=False)
    drawer.draw(PROMPTS[0], "", [99])  # warm-up
    started = time.perf_counter()
    images = [image for prompt in PROMPTS for image in drawer.draw(prompt, "", [0])]
    return len(images) / (time.perf_counter() - started), images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="models to measure (default: tiny SD and SD 1.5's shape)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, help="image side for the --model models (default: their native size)")
    parser.add_argument("--intervals", default="2,3,5")
    args = parser.parse_args()
    from difftrain.export.quality import psnr

    models = [(m, args.size) for m in args.model or ()]
    if not models:
        from _common import scratch, sd15_shaped

        from difftrain.models.tiny_sd import write_tiny_sd

        work = scratch("difftrain-deepcache-")
        sd15_shaped().save_pretrained(work / "sd15", safe_serialization=True)
        models = [(str(write_tiny_sd(work / "tiny")), args.size), (str(work / "sd15"), args.size or 256)]
    print(f"{args.steps} steps, DPM++ 2M Karras, CFG 7, {len(PROMPTS)} images per setting, CPU")
    print(f"{'model':28s} {'px':>4s} {'DeepCache':>9s} {'images/s':>9s} {'x plain':>8s} {'PSNR dB':>8s}")
    for model, size in models:
        base_rate, base_images = run(model, 0, args.steps, size)
        side = base_images[0].size[0]
        print(f"{Path(model).name[:28]:28s} {side:4d} {'off':>9s} {base_rate:9.3f} {1.0:8.2f} {'-':>8s}", flush=True)
        for interval in (int(i) for i in args.intervals.split(",")):
            rate, images = run(model, interval, args.steps, size)
            quality = min(psnr(a, b) for a, b in zip(base_images, images))
            print(f"{Path(model).name[:28]:28s} {side:4d} {interval:9d} {rate:9.3f} {rate / base_rate:8.2f} "
                  f"{quality:8.1f}", flush=True)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    main()
