"""Resize, crop and flip an image into a training tensor of a given (width, height).

Randomness comes from a `random.Random` the caller seeds per (epoch, record), so the same
sample gets the same crop whichever worker process loads it and whether or not the run
was resumed in between. The square case (`prepare_image`) is the bucketed case with
width == height: one code path for both.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class CropPlan:
    """What prepare_image_for_size does to an image, decided from its size and the rng alone.

    `box` is (left, top, right, bottom) in the resized, unflipped image: SDXL's crop
    conditioning is (top, left), and box + flipped + resized is a complete cache key.
    """

    resized: tuple[int, int]
    box: tuple[int, int, int, int]
    flipped: bool


# Covering a target with more than this many times its pixels happens only at extreme aspect ratios
# (an ordinary photo covers at most ~2x): apply_plan then resizes the cropped part alone.
EXTREME_COVER = 16


def covering_size(image_size: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """The smallest resize of `image_size`, keeping its aspect ratio, that covers `size`."""
    (width, height), (w, h) = image_size, size
    scale = max(w / width, h / height)
    # max() guards the covered side against rounding below the target by a pixel.
    return max(w, round(width * scale)), max(h, round(height * scale))


def resize_to_cover(image: Image.Image, size: tuple[int, int],
                    resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
    target = covering_size(image.size, size)
    if target == image.size:
        return image
    shrinking = target[0] < image.width or target[1] < image.height
    gap = 3.0 if shrinking and resample != Image.Resampling.NEAREST else None
    return image.resize(target, resample, reducing_gap=gap)


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    return resize_to_cover(image, (size, size))


def plan_crop(
    image_size: tuple[int, int], size: tuple[int, int], crop: str, flip: bool, rng: random.Random
) -> CropPlan:
    # The rng is drawn in a fixed order (left, top, then flip), so outputs stay the same
    # as long as the caller seeds it the same way.
    resized = covering_size(image_size, size)
    (width, height), (w, h) = resized, size
    if crop == "center":
        left, top = (width - w) // 2, (height - h) // 2
    else:
        left, top = rng.randint(0, width - w), rng.randint(0, height - h)
    flipped = flip and rng.random() < 0.5
    return CropPlan(resized, (left, top, left + w, top + h), flipped)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 HWC RGB -> float CHW in [-1, 1], the range diffusion models are trained in."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def prepare_image_for_size(
    image: Image.Image, size: tuple[int, int], crop: str, flip: bool, rng: random.Random
) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Cover (width, height) keeping the aspect ratio, crop to it exactly, maybe flip.

    Returns the CHW tensor in [-1, 1] and the crop box (left, top, right, bottom) in the
    resized image, before any flip (see CropPlan).
    """
    plan = plan_crop(image.size, size, crop, flip, rng)
    return to_tensor(apply_plan(image, size, plan)), plan.box


def apply_plan(image: Image.Image, size: tuple[int, int], plan: CropPlan,
               resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
    """Resize to cover, crop and flip as `plan` says. A companion image of its image's size
    (a ControlNet condition) goes through this with its image's plan and lands on the same pixels."""
    if plan.resized[0] * plan.resized[1] > EXTREME_COVER * size[0] * size[1]:
        # An extreme aspect ratio (a 3000x4 divider covering 512x512 resizes to 384000x512, 0.6 GB, and a
        # 5000x1 one to 3.9 GB, enough to kill a worker): resize only the part the crop keeps.
        image = resample_box(image, source_box(image.size, plan), size, resample)
    else:
        image = resize_to_cover(image, size, resample).crop(plan.box)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if plan.flipped else image


def source_box(image_size: tuple[int, int], plan: CropPlan) -> tuple[float, float, float, float]:
    """A plain crop's box (in the cover-resized image) in the source image's pixels."""
    scale_x, scale_y = plan.resized[0] / image_size[0], plan.resized[1] / image_size[1]
    left, top, right, bottom = plan.box
    return left / scale_x, top / scale_y, right / scale_x, bottom / scale_y


def resample_box(image: Image.Image, box: tuple[float, float, float, float], size: tuple[int, int],
                 resample: Image.Resampling) -> Image.Image:
    """`box` of `image` resized to `size` in one antialiased resize (as resize_to_cover does)."""
    shrinking = box[2] - box[0] > size[0] or box[3] - box[1] > size[1]
    gap = 3.0 if shrinking and resample != Image.Resampling.NEAREST else None
    return image.resize(size, resample, box=box, reducing_gap=gap)


def center_crop(image: Image.Image, size: tuple[int, int],
                resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
    """Cover `size` keeping the aspect ratio, then cut out its middle: training's centre crop (and
    A1111's "Crop and Resize" for control images)."""
    plan = plan_crop(image.size, size, "center", False, random.Random(0))  # (a centre crop draws nothing)
    return apply_plan(image, size, plan, resample)


def prepare_image(image: Image.Image, resolution: int, crop: str, flip: bool, rng: random.Random) -> torch.Tensor:
    return prepare_image_for_size(image, (resolution, resolution), crop, flip, rng)[0]
