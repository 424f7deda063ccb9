"""How well an image obeys its ControlNet condition: the number training shows beside the pictures.

For a mask, the IoU between the mask and the generated image's foreground (the pixels far
from the colour of its border, as the shapes judge finds them); for canny edges, the F1 of the generated image's own edges
against the condition's, each edge pixel counted as matched within a small distance. Other
conditions (depth, pose, segmentation colours) have no preprocessor-free measure here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from difftrain.data.conditioning import Preprocess, canny

EDGE_TOLERANCE = 2  # pixels: an edge this close to a condition edge matches it


def foreground(image: Image.Image) -> np.ndarray:
    """What is drawn on the image's plain background (the shapes judge's own test)."""
    from difftrain.data.shapes_judge import background_and_foreground

    return background_and_foreground(np.asarray(image.convert("RGB"), dtype=np.float32))[1]


def mask_of(condition: Image.Image) -> np.ndarray:
    return np.asarray(condition.convert("L")) > 127


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _near(edges: np.ndarray, tolerance: int) -> np.ndarray:
    """`edges` grown by `tolerance` pixels in every direction (a square neighbourhood)."""
    import cv2

    kernel = np.ones((2 * tolerance + 1, 2 * tolerance + 1), np.uint8)
    return cv2.dilate(edges.astype(np.uint8), kernel).astype(bool)


def edge_f1(condition_edges: np.ndarray, image_edges: np.ndarray, tolerance: int = EDGE_TOLERANCE) -> float:
    if not condition_edges.any() and not image_edges.any():
        return 1.0
    precision = (image_edges & _near(condition_edges, tolerance)).sum() / max(image_edges.sum(), 1)
    recall = (condition_edges & _near(image_edges, tolerance)).sum() / max(condition_edges.sum(), 1)
    return float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0


def agreement(preprocess: Preprocess, condition: Image.Image, image: Image.Image) -> tuple[str, float] | None:
    """(measure name, value in [0, 1]) for a generated `image` and the condition it was drawn from."""
    if image.size != condition.size:
        image = image.resize(condition.size, Image.Resampling.BICUBIC)
    if preprocess.name == "mask":
        return "control_mask_iou", iou(mask_of(condition), foreground(image))
    if preprocess.name == "canny":
        edges = np.asarray(canny(image, preprocess.low_threshold, preprocess.high_threshold).convert("L")) > 127
        return "control_edge_f1", edge_f1(mask_of(condition), edges)
    return None


def control_study(model: str, cases: list[tuple[str, str]], seeds: list[int], steps: int = 25,
                  scheduler: str = "dpm++_2m", guidance_scale: float = 4.0, size: int | None = None,
                  base: str | None = None, out: str | Path | None = None, progress: bool = False) -> dict:
    """Does a mask ControlNet put the shape where its mask is? Each (mask file, prompt) case is
    drawn at each seed by `difftrain generate`'s code twice: by the ControlNet model (the mask
    as its control image) and by its base model alone (`base`, default the manifest's). Returns
    the mean mask IoU of both and the per-case values; with `out`, a picture per case there:
    the mask, then each seed's image with and without the ControlNet."""
    from difftrain.data.conditioning import condition_image
    from difftrain.data.images import load_image
    from difftrain.generate.controlnet import ControlUnit
    from difftrain.generate.loader import locate
    from difftrain.generate.text2image import Drawer, GenerateOptions

    located = locate(model)
    if base is None:
        base = ((located.manifest.base if located.manifest else None) or {}).get("model")
    common = dict(steps=steps, scheduler=scheduler, guidance_scale=guidance_scale, width=size, height=size,
                  compose=False)  # (captions: a trailing ":30" is a time, not a weight)
    plain = Drawer(base, GenerateOptions(prompt="", **common), progress=progress)
    results = {"with": [], "without": []}
    for number, (mask_path, prompt) in enumerate(cases):
        unit = ControlUnit(model=None, image=mask_path, scale=None, preprocess=None)
        drawer = Drawer(located, GenerateOptions(prompt=prompt, controlnets=[unit], **common), progress=progress)
        condition = condition_image(load_image(mask_path), (drawer.width, drawer.height), Preprocess("mask"))
        drawn = {"with": drawer.draw(prompt, "", seeds), "without": plain.draw(prompt, "", seeds)}
        for key, images in drawn.items():
            results[key].append(float(np.mean([iou(mask_of(condition), foreground(image)) for image in images])))
        if out is not None:
            row = [condition, *[image for pair in zip(drawn["with"], drawn["without"]) for image in pair]]
            strip = Image.new("RGB", (drawer.width * len(row), drawer.height))
            for place, image in enumerate(row):
                strip.paste(image, (place * drawer.width, 0))
            Path(out).mkdir(parents=True, exist_ok=True)
            strip.save(Path(out) / f"case-{number:02d}.png")
    return {"with": float(np.mean(results["with"])), "without": float(np.mean(results["without"])),
            "cases": [{"mask": m, "prompt": p, "with": w, "without": wo}
                      for (m, p), w, wo in zip(cases, results["with"], results["without"])]}
