"""DreamBooth's class images: images/s of difftrain's generation (fixed batches of
dreambooth.class_batch_size, under the run's autocast) against one fp32 image at a time (what it
did before, and what diffusers' script does with --prior_generation_precision fp32 and
--sample_batch_size 1), in one process on the same model, alternating.

    .venv/bin/python benchmarks/class_images.py [--images 8] [--steps 10] [--size 128] [--batch 4]
        [--precision fp32|bf16|fp16] [--sd15]

Default precision: fp16 on a CUDA GPU (diffusers' default there), fp32 on a CPU. The model is the
SD-quarter one of the other step benchmarks, or with --sd15 SD 1.5's shape (random weights: the
images are noise, which costs what a real model's do).
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import torch
from _common import alternate, device_name, print_rates, workspace

from difftrain.config import parse_config
from difftrain.methods import build_method
from difftrain.methods.dreambooth import class_image_batches

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="sampling steps per image")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4, help="dreambooth.class_batch_size")
    parser.add_argument("--precision", choices=list(DTYPES))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sd15", action="store_true", help="SD 1.5's shape instead of the quarter-width one")
    args = parser.parse_args()
    space = workspace(args.size, 1, sd15=args.sd15)
    precision = args.precision or ("fp16" if space.device.type == "cuda" else "fp32")
    method = build_method(parse_config({
        "output_dir": str(space.work / "run"), "method": "dreambooth", "model": {"base": str(space.model_dir)},
        "data": {"path": str(space.data_dir), "resolution": args.size},
        "dreambooth": {"instance_prompt": "a photo of sks dog", "class_prompt": "a photo of a dog",
                       "class_data": str(space.work / "class"), "num_class_images": args.images,
                       "class_steps": args.steps},
    }))
    before, now = "one at a time, fp32", f"batches of {args.batch}, {precision}"
    print(f"device: {device_name(space.device)}; {'SD 1.5 shape' if args.sd15 else 'SD quarter width'} at "
          f"{args.size} px, {args.images} class images of {args.steps} steps with guidance")

    def rate(batch: int, dtype: torch.dtype, folder: Path) -> float:
        batches = class_image_batches(list(range(args.images)), args.images, batch)
        if space.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        method.generate_class_images(folder, batches, space.device, dtype, progress=False)
        return args.images / (time.perf_counter() - start)

    rate(args.batch, DTYPES[precision], space.work / "warm-up")  # first-use costs (kernels, allocator) off the clock
    results = alternate({before: partial(rate, 1, torch.float32), now: partial(rate, args.batch, DTYPES[precision])},
                        space, rounds=args.rounds)
    print_rates(results, before, unit="images/s", memory=False)

if __name__ == "__main__":
    main()
