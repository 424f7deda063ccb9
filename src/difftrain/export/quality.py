"""The int8 quality gate: a quantised export draws the same prompts and seeds as its fp32 graphs.

The images are compared through `difftrain generate`'s own drawing code (the Drawer), so
the gate measures what users get. PSNR is taken on the 8-bit images, per image; the gate
holds the worst one to the floor, since one prompt that breaks is what a user would see.
Given a CLIP, the gate also scores both image sets against their prompts (evaluate's CLIP
score, 0-100) and holds the int8 set's mean to at most `max_clip_drop` points below fp32's:
PSNR says the pictures moved, CLIP score says whether they still show the prompt.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

PROMPTS = ("a red circle", "a blue square on a white background", "a green triangle, (detailed:1.2)",
           "a photo of a small yellow star")
SEEDS = (0, 1)
STEPS = 12
DEFAULT_MIN_PSNR = 22.0  # dB on the final 8-bit images; see the README's table for what int8 gives
DEFAULT_MAX_CLIP_DROP = 1.0  # CLIP score points (0-100 scale) int8 may lose against fp32, when a CLIP is given


IDENTICAL = 99.0  # dB given to identical images, so the worst and the mean stay finite numbers


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio of two 8-bit images, in dB (IDENTICAL when they are)."""
    x, y = (np.asarray(image, dtype=np.float64) for image in (a, b))
    mse = float(np.mean((x - y) ** 2))
    return IDENTICAL if mse == 0 else min(IDENTICAL, 10 * math.log10(255.0**2 / mse))


def gate_drawer(model: Path, steps: int = STEPS, size: int | None = None):
    """`generate`'s Drawer for `model` with the gate's sampler, steps and size."""
    from difftrain.generate.text2image import Drawer, GenerateOptions

    options = GenerateOptions(prompt="", steps=steps, scheduler="DPM++ 2M Karras", width=size, height=size)
    return Drawer(model, options, progress=False)


def draw_set(drawer, label: str, progress: bool = False) -> list:
    """The gate's prompts x seeds, drawn by `drawer` (see gate_drawer)."""
    from tqdm import tqdm

    images = []
    for prompt in tqdm(PROMPTS, desc=f"quality gate: {label}", unit="prompt", disable=not progress):
        images += drawer.draw(prompt, "", list(SEEDS))
    return images


def quality_gate(reference, candidate: Path, min_psnr: float | None = None, steps: int = STEPS,
                 size: int | None = None, progress: bool = False, clip: str | None = None,
                 max_clip_drop: float | None = None) -> dict:
    """PSNR of `candidate`'s images to `reference`'s over the fixed prompts and seeds (and, with a `clip`
    model, the drop of their CLIP score), and the verdict. `reference` is the fp32 model's gate_drawer (the
    export calibrates the int8 UNet with it first: one load for both).

    `size`: the images' side (default generate's: the size the model was trained at; a smaller one makes the gate of a
    large model affordable on a CPU, at the cost of measuring at a size it is not used at).
    """
    floor = DEFAULT_MIN_PSNR if min_psnr is None else float(min_psnr)
    originals = draw_set(reference, "fp32", progress)
    quantised = draw_set(gate_drawer(candidate, steps, size), Path(candidate).name, progress)
    scores = [psnr(a, b) for a, b in zip(originals, quantised)]
    worst = min(scores)
    gate = {"metric": "psnr_db", "psnr_min": round(worst, 2),
            "psnr_mean": round(float(np.mean(scores)), 2), "min_psnr": floor, "images": len(scores),
            "prompts": list(PROMPTS), "seeds": list(SEEDS), "steps": steps, "size": size, "sampler": "DPM++ 2M Karras",
            "passed": worst >= floor}
    if clip is not None:
        gate.update(clip_gate(clip, originals, quantised, max_clip_drop))
        gate["passed"] = gate["passed"] and gate["clip_passed"]
    return gate


def clip_gate(clip: str, originals: list, quantised: list, max_drop: float | None) -> dict:
    """Mean CLIP score of each set against its prompts (in draw_set's order), and whether int8 kept it."""
    from difftrain.evaluate.clip_score import ClipScorer
    from difftrain.evaluate.scores import plain_text

    allowed = DEFAULT_MAX_CLIP_DROP if max_drop is None else float(max_drop)
    scorer = ClipScorer(clip)
    prompts = [plain_text(prompt) for prompt in PROMPTS for _ in SEEDS]  # as eval scores them: without A1111's syntax
    before, after = (scorer.score(images, prompts) for images in (originals, quantised))
    return {"clip_model": str(clip), "clip_score_fp32": round(before, 3), "clip_score_int8": round(after, 3),
            "clip_drop": round(before - after, 3), "max_clip_drop": allowed, "clip_passed": before - after <= allowed}
