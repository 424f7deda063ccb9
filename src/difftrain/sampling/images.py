"""Images out of tensors, and many images as one picture."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] NCHW -> list of RGB images."""
    array = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return [Image.fromarray(a) for a in array]


def make_grid(images: list[Image.Image], columns: int | None = None, scale: int | None = None) -> Image.Image:
    """Tile images into one picture, `columns` wide (square-ish by default), with a 2 px gutter.

    Small images are enlarged (nearest neighbour) to at least 128 px unless `scale` is given,
    so a 32 px sample is visible without zooming.
    """
    columns = columns or math.ceil(math.sqrt(len(images)))
    scale = scale or max(1, 128 // images[0].size[0])
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    width, height = width * scale, height * scale
    gutter = 2
    grid = Image.new("RGB", (columns * (width + gutter) + gutter, rows * (height + gutter) + gutter), (255, 255, 255))
    for i, image in enumerate(images):
        if scale != 1:
            image = image.resize((width, height), Image.Resampling.NEAREST)
        grid.paste(image, (gutter + (i % columns) * (width + gutter), gutter + (i // columns) * (height + gutter)))
    return grid
