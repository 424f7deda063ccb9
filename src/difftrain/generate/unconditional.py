"""Sampling a pixel-space model: from a run folder, its latest checkpoint, or any diffusers folder."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from diffusers import UNet2DModel
from PIL import Image, ImageDraw

from difftrain.generate.loader import ModelNotFound, build_pipeline, locate
from difftrain.sampling.images import make_grid
from difftrain.errors import DifftrainError
from difftrain.sampling.loop import UnknownClass, class_draw, sample_unet
from difftrain.sampling.schedulers import CORE_SCHEDULERS, available_schedulers


class PixelModel(NamedTuple):
    unet: UNet2DModel
    scheduler_config: dict
    classes: list[str] | None  # a class-conditional model's class names, from its manifest
    guidance_scale: float  # the guidance it was previewed with in training (1: none)


def load_unconditional(path: str | Path, use_ema: bool = True) -> PixelModel:
    """A pixel-space model: a run, its latest checkpoint, or a diffusers folder."""
    if not Path(path).exists():
        raise ModelNotFound(f"{path}: no such run folder or diffusers model folder")
    if Path(path).is_file():  # (any file was "a text-to-image model", a PNG or a LoRA too)
        raise ModelNotFound(f"{path} is a file; difftrain sample draws pixel models from a run folder or a diffusers "
                            "folder (a Stable Diffusion single file: difftrain generate)")
    located = locate(path, use_ema)
    if located.manifest is None or located.manifest.kind not in ("unconditional", "vae"):  # the loader refuses a VAE
        raise ModelNotFound(
            f"{path} is a text-to-image (Stable Diffusion) model; difftrain sample draws unconditional models. "
            f'Use: difftrain generate {path} --prompt "..."'
        )
    pipe = build_pipeline(located)
    conditioning = located.manifest.conditioning
    classes = conditioning.get("classes")
    embeddings = pipe.unet.config.num_class_embeds
    if embeddings and not classes:
        raise ModelNotFound(f"{path}: its UNet is class-conditional, but no difftrain.json beside it names the "
                            "classes (conditioning.classes), so nothing says which label draws what")
    if classes and embeddings != len(classes) + 1:
        raise ModelNotFound(f"{path}: difftrain.json names {len(classes)} classes, which needs a UNet with "
                            f"{len(classes) + 1} class embeddings (the last: no class); its UNet has {embeddings or 0}")
    return PixelModel(pipe.unet, dict(pipe.scheduler.config), classes, conditioning.get("guidance_scale", 1.0))


def draw_settings(model: PixelModel, count: int, classes: list[str] | None = None,
                  guidance_scale: float | None = None) -> dict:
    """sample_unet's labels and guidance for `count` images: the `classes` asked for (default every
    class) in turn, guided at `guidance_scale` (default: as in training's previews)."""
    if model.classes is None:
        if classes or guidance_scale is not None:
            asked = f"--class {classes[0]}" if classes else f"--cfg {guidance_scale}"
            raise UnknownClass(f"{asked}: this model draws without classes, so there is nothing to ask for or guide "
                               "towards (train one with model.classes)")
        return {}
    if guidance_scale is not None and guidance_scale < 0:
        raise DifftrainError(f"--cfg {guidance_scale}: guidance is 0 (no class) or more (1: the class alone, 3 usual)")
    return class_draw(model.classes, count, model.guidance_scale if guidance_scale is None else guidance_scale, classes)


def sample_grid(
    model: str | Path,
    num_images: int = 16,
    scheduler: str = "dpm++_2m",
    steps: int = 25,
    seed: int = 0,
    out: str | Path | None = None,
    use_ema: bool = True,
    scale: int | None = None,
    classes: list[str] | None = None,
    guidance_scale: float | None = None,
) -> tuple[Image.Image, list[Image.Image]]:
    """Generate `num_images` at `seed` and return (grid, images); the grid is saved to `out` if given.

    A class-conditional model draws the `classes` named (default: all) in turn, each image's
    class in its `info["class"]`.
    """
    loaded = load_unconditional(model, use_ema)
    loaded.unet.eval()
    settings = draw_settings(loaded, num_images, classes, guidance_scale)
    images = sample_unet(loaded.unet, loaded.scheduler_config, num_images, scheduler, steps, seed, **settings)
    for image, label in zip(images, settings.get("labels", ())):
        image.info["class"] = loaded.classes[label]
    grid = make_grid(images, scale=scale)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        grid.save(out)
    return grid, images


def scheduler_sheet(
    model: str | Path,
    num_images: int = 8,
    steps: int = 25,
    seed: int = 0,
    out: str | Path | None = None,
    use_ema: bool = True,
    classes: list[str] | None = None,
    guidance_scale: float | None = None,
) -> tuple[Image.Image, list[str]]:
    """One labelled row per sampler, same seed and steps: to see at a glance which suits a model. Returns the
    sheet and the samplers it drew (those the model's prediction type allows)."""
    loaded = load_unconditional(model, use_ema)
    loaded.unet.eval()
    settings = draw_settings(loaded, num_images, classes, guidance_scale)
    label_width, rows = 120, []
    drawn = [name for name in CORE_SCHEDULERS if name in available_schedulers(loaded.scheduler_config)]
    for name in drawn:
        images = sample_unet(loaded.unet, loaded.scheduler_config, num_images, name, steps, seed, **settings)
        row = make_grid(images, columns=num_images, scale=max(1, 64 // images[0].size[0]))
        labelled = Image.new("RGB", (row.width + label_width, row.height), "white")
        labelled.paste(row, (label_width, 0))
        ImageDraw.Draw(labelled).text((6, row.height // 2 - 6), f"{name}\n{steps} steps", fill=(0, 0, 0))
        rows.append(labelled)
    sheet = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), "white")
    for i, row in enumerate(rows):
        sheet.paste(row, (0, i * row.height))
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        sheet.save(out)
    return sheet, drawn
