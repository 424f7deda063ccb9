"""Resize, crop and flip an image into a training tensor.

Randomness comes from a `random.Random` the caller seeds per (epoch, record), so the same
sample gets the same crop whichever worker process loads it and whether or not the run
was resumed in between.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    if scale == 1:
        return image
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    return image.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=3.0 if scale < 1 else None)


def crop_square(image: Image.Image, size: int, mode: str, rng: random.Random) -> Image.Image:
    width, height = image.size
    if mode == "center":
        left, top = (width - size) // 2, (height - size) // 2
    else:
        left, top = rng.randint(0, width - size), rng.randint(0, height - size)
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 HWC RGB -> float CHW in [-1, 1], the range diffusion models are trained in."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def prepare_image(image: Image.Image, resolution: int, crop: str, flip: bool, rng: random.Random) -> torch.Tensor:
    image = crop_square(resize_shorter_side(image, resolution), resolution, crop, rng)
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(image)
