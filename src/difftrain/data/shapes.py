"""The synthetic "shapes" set: one filled shape per image, captioned `a {colour} {shape}`.

It is the demo's data and the tests' data: small, deterministic by seed, and easy to
judge by eye (a model that learned it draws clean coloured shapes; one that did not
draws blobs).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
}
SHAPES = ("circle", "square", "triangle")
PROMPTS = [f"a {colour} {shape}" for shape in SHAPES for colour in COLOURS]


def draw_shape(rng: random.Random, size: int, colour: str, shape: str) -> Image.Image:
    """One image: a light plain background and one filled shape of random size and place."""
    return draw_shape_and_mask(rng, size, colour, shape)[0]


def draw_shape_and_mask(rng: random.Random, size: int, colour: str, shape: str) -> tuple[Image.Image, Image.Image]:
    """The image, and its shape's mask (white on black): what a mask ControlNet is trained on."""
    background = tuple(rng.randint(225, 250) for _ in range(3))
    # The shape spans 40-75% of the side: big enough to read at 32 px, small enough to move.
    extent = rng.uniform(0.40, 0.75) * size
    margin = 0.06 * size
    cx = rng.uniform(margin + extent / 2, size - margin - extent / 2)
    cy = rng.uniform(margin + extent / 2, size - margin - extent / 2)
    image = Image.new("RGB", (size, size), background)
    mask = Image.new("RGB", (size, size), (0, 0, 0))
    _fill(ImageDraw.Draw(image), shape, cx, cy, extent, COLOURS[colour])
    _fill(ImageDraw.Draw(mask), shape, cx, cy, extent, (255, 255, 255))
    return image, mask


def _fill(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, extent: float, fill) -> None:
    half = extent / 2
    if shape == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif shape == "triangle":
        # Upright equilateral triangle inscribed in the same box.
        height = extent * math.sqrt(3) / 2
        top = cy - height / 2
        draw.polygon([(cx, top), (cx - half, top + height), (cx + half, top + height)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def write_shapes_dataset(out_dir: str | Path, num_images: int = 2000, size: int = 32, seed: int = 0,
                         masks: bool = False) -> Path:
    """Write `num_images` PNGs and a `metadata.jsonl` (`file_name`, `text`) into `out_dir`.

    Colour and shape cycle through all twelve pairs, so every pair is equally common. With
    `masks`, each image's mask goes to `conditioning/` under the same name, named by the
    `conditioning_image` column (the layout diffusers' ControlNet data sets use).
    """
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if masks:
        (out / "conditioning").mkdir(exist_ok=True)
    rng = random.Random(seed)
    pairs = [(c, s) for s in SHAPES for c in COLOURS]
    lines = []
    for index in range(num_images):
        colour, shape = pairs[index % len(pairs)]
        name = f"{index:06d}.png"
        image, mask = draw_shape_and_mask(rng, size, colour, shape)
        image.save(out / name)
        entry = {"file_name": name, "text": f"a {colour} {shape}"}
        if masks:
            mask.save(out / "conditioning" / name)
            entry["conditioning_image"] = f"conditioning/{name}"
        lines.append(json.dumps(entry))
    # Written last, so a folder with metadata.jsonl is a complete one.
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return out
