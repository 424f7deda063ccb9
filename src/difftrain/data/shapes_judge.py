"""Is a picture a clean shapes-set image? Colour and fill statistics that read a sample grid for us.

A model that learned the shapes set draws, on a light plain background, one solid shape in
one of the palette's colours; one that did not draws blobs, speckles, two-tone smears or
nothing. Each check below is a number a person would eyeball: how much of the cell the shape
covers, whether it is one piece, how far its pixels stray from one colour, and how well it
overlaps a square, a circle or a triangle drawn into its bounding box, which names the shape.
The thresholds pass all of `write_shapes_dataset`'s own images (tested) and fail noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from difftrain.data.shapes import COLOURS

# Intersection over union with the ideal shape drawn into the same box: the set's own images
# score 0.92 or more at 32 px, a slightly uneven but plain triangle ~0.8. A wobbly blob scores
# 0.75-0.88 with two shapes at once (a rounded square is circle 0.82 and square 0.79), hence
# the margin the best shape must keep over the next.
MIN_OVERLAP = 0.80
MIN_MARGIN = 0.10
HOLES = 0.03  # the share of a shape's filled outline that may be background inside it (noise)


@dataclass
class Verdict:
    clean: bool
    shape: str | None  # the shape its outline overlaps best, if clearly one
    colour: str | None  # the nearest palette colour, if near enough
    problems: list[str]

    def describe(self) -> str:
        name = " ".join(filter(None, (self.colour, self.shape))) or "?"
        return name if self.clean else f"{name} ({'; '.join(self.problems)})"


def background_and_foreground(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The median colour of the picture's 2-pixel border, and which pixels differ from it by more
    than 60 in some channel: what is drawn on a plain background."""
    ring = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                           pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    background = np.median(ring, axis=0)
    return background, np.abs(pixels - background).max(axis=-1) > 60


def judge_image(image: Image.Image) -> Verdict:
    pixels = np.asarray(image.convert("RGB").resize((32, 32), Image.Resampling.BOX), dtype=np.float32)
    background, shape_mask = background_and_foreground(pixels)
    problems = []
    if background.min() < 190:
        problems.append(f"background not light ({_rgb(background)})")
    cover = shape_mask.mean()
    if not 0.04 <= cover <= 0.65:
        problems.append(f"shape covers {cover:.0%} of the image (training shapes cover 5-60%)")
        return Verdict(False, None, None, problems)
    pieces, count = ndimage.label(shape_mask)
    sizes = np.bincount(pieces.ravel())[1:]
    if sizes.max() < 0.92 * shape_mask.sum():
        problems.append(f"{count} separate pieces")
    shape_pixels = pixels[shape_mask]
    colour_value = np.median(shape_pixels, axis=0)
    uniform = (np.abs(shape_pixels - colour_value).max(axis=-1) < 70).mean()
    if uniform < 0.85:
        problems.append(f"not one colour (only {uniform:.0%} of the shape near its median)")
    colour, distance = min(((name, float(np.linalg.norm(colour_value - rgb))) for name, rgb in COLOURS.items()),
                           key=lambda item: item[1])
    if distance > 70:
        problems.append(f"colour {_rgb(colour_value)} is not a palette colour")
        colour = None
    main_piece = pieces == 1 + np.argmax(sizes)
    filled = ndimage.binary_fill_holes(main_piece)
    holes = 1 - main_piece.sum() / filled.sum()  # (a ring or a frame overlaps its solid shape by 0.8 and more)
    if holes > HOLES:
        problems.append(f"hollow ({holes:.0%} of it holes)")
    rows, columns = np.nonzero(main_piece)
    height, width = np.ptp(rows) + 1, np.ptp(columns) + 1
    overlaps = shape_overlaps(main_piece[rows.min():rows.max() + 1, columns.min():columns.max() + 1])
    (shape, best), (runner_up, second) = sorted(overlaps.items(), key=lambda item: -item[1])[:2]
    if not 0.7 <= height / width <= 1.3:
        problems.append(f"box {width}x{height} px is not square")
        shape = None
    elif best < MIN_OVERLAP:
        problems.append(f"no clear shape (closest: {shape}, overlap {best:.2f} < {MIN_OVERLAP})")
    elif best - second < MIN_MARGIN:
        problems.append(f"between shapes ({shape} {best:.2f}, {runner_up} {second:.2f})")
    return Verdict(not problems, shape, colour, problems)


def shape_overlaps(box: np.ndarray) -> dict[str, float]:
    """IoU of a boolean mask (cropped to its bounding box) with each shape drawn into that box."""
    height, width = box.shape
    y, x = np.mgrid[0:height, 0:width] + 0.5
    ideal = {
        "square": np.ones_like(box),
        "circle": ((x - width / 2) / (width / 2)) ** 2 + ((y - height / 2) / (height / 2)) ** 2 <= 1,
        "triangle": np.abs(x - width / 2) <= y / height * width / 2,  # apex up, base at the bottom
    }
    return {name: float((box & shape).sum() / (box | shape).sum()) for name, shape in ideal.items()}


def split_grid(grid: Image.Image, columns: int, rows: int, gutter: int = 2) -> list[Image.Image]:
    """The cells of a `make_grid` picture, row by row."""
    width = (grid.width - gutter) // columns - gutter
    height = (grid.height - gutter) // rows - gutter
    return [grid.crop((gutter + c * (width + gutter), gutter + r * (height + gutter),
                       gutter + c * (width + gutter) + width, gutter + r * (height + gutter) + height))
            for r in range(rows) for c in range(columns)]


def judge_grid(path: str | Path, columns: int = 4, rows: int = 4) -> list[Verdict]:
    return [judge_image(cell) for cell in split_grid(Image.open(path), columns, rows)]


def _rgb(value: np.ndarray) -> str:
    return "rgb(" + ", ".join(str(int(round(v))) for v in value) + ")"
