"""Sampling a pixel-space model: from a run folder, its latest checkpoint, or any diffusers folder."""

from __future__ import annotations

from pathlib import Path

from diffusers import UNet2DModel
from PIL import Image, ImageDraw

from difftrain.generate.loader import ModelNotFound, build_pipeline, locate
from difftrain.sampling.images import make_grid
from difftrain.sampling.loop import sample_unet
from difftrain.sampling.schedulers import CORE_SCHEDULERS


def load_unconditional(path: str | Path, use_ema: bool = True) -> tuple[UNet2DModel, dict]:
    """(unet, scheduler config) of a pixel-space model: a run, its latest checkpoint, or a diffusers folder."""
    if not Path(path).exists():
        raise ModelNotFound(f"{path}: no such run folder or diffusers model folder")
    located = locate(path, use_ema)
    if located.manifest is None or located.manifest.kind not in ("unconditional", "vae"):  # the loader refuses a VAE
        raise ModelNotFound(
            f"{path} is a text-to-image (Stable Diffusion) model; difftrain sample draws unconditional models. "
            f'Use: difftrain generate {path} --prompt "..."'
        )
    pipe = build_pipeline(located)
    return pipe.unet, dict(pipe.scheduler.config)


def sample_grid(
    model: str | Path,
    num_images: int = 16,
    scheduler: str = "dpm++_2m",
    steps: int = 25,
    seed: int = 0,
    out: str | Path | None = None,
    use_ema: bool = True,
    scale: int | None = None,
) -> tuple[Image.Image, list[Image.Image]]:
    """Generate `num_images` at `seed` and return (grid, images); the grid is saved to `out` if given."""
    unet, scheduler_config = load_unconditional(model, use_ema)
    unet.eval()
    images = sample_unet(unet, scheduler_config, num_images, scheduler, steps, seed)
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
) -> Image.Image:
    """One labelled row per sampler, same seed and steps: to see at a glance which suits a model."""
    unet, scheduler_config = load_unconditional(model, use_ema)
    unet.eval()
    label_width, rows = 120, []
    for name in CORE_SCHEDULERS:
        images = sample_unet(unet, scheduler_config, num_images, name, steps, seed)
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
    return sheet
