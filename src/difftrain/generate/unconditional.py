"""Sampling a pixel-space model: from a run folder, its latest checkpoint, or any diffusers folder."""

from __future__ import annotations

from pathlib import Path

from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image, ImageDraw

from difftrain.errors import DifftrainError
from difftrain.generate.sampling import make_grid
from difftrain.generate.schedulers import CORE_SCHEDULERS
from difftrain.methods.unconditional import sample_unet
from difftrain.training.checkpoint import CheckpointStore, load_tensors, read_config, split_modules


class ModelNotFound(DifftrainError):
    pass


def _refuse_text_to_image(path: Path) -> None:
    """`sample` draws pixel-space models; a Stable Diffusion folder or run needs prompts."""
    index = path / "model_index.json"
    if (path / "text_encoder").is_dir() or (path / "vae").is_dir() or (
        index.is_file() and "StableDiffusion" in index.read_text()
    ):
        raise ModelNotFound(
            f"{path} is a text-to-image (Stable Diffusion) model; difftrain sample draws unconditional models. "
            f'Use: difftrain generate {path} --prompt "..."'
        )


def _from_diffusers_folder(path: Path) -> tuple[UNet2DModel, dict]:
    _refuse_text_to_image(path)
    unet = UNet2DModel.from_pretrained(path, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    return unet, dict(scheduler.config)


def _from_checkpoint(run_dir: Path, use_ema: bool) -> tuple[UNet2DModel, dict]:
    from difftrain.methods import build_method

    checkpoint = CheckpointStore(run_dir / "checkpoints").latest()
    if checkpoint is None:
        raise ModelNotFound(f"{run_dir}: a run folder with neither a final model nor a checkpoint yet")
    method = build_method(read_config(checkpoint))
    source = "ema.safetensors" if use_ema and (checkpoint / "ema.safetensors").is_file() else "model.safetensors"
    weights = split_modules(load_tensors(checkpoint / source))["unet"]
    method.unet.load_state_dict(weights, strict=source == "model.safetensors")
    return method.unet, dict(method.noise_scheduler.config)


def load_unconditional(path: str | Path, use_ema: bool = True) -> tuple[UNet2DModel, dict]:
    """(unet, scheduler config) from a diffusers folder, a run folder, or a run's checkpoint."""
    path = Path(path)
    if (path / "unet").is_dir() and (path / "scheduler").is_dir():
        return _from_diffusers_folder(path)
    if (path / "config.yaml").is_file():  # a run folder
        import yaml

        method = (yaml.safe_load((path / "config.yaml").read_text()) or {}).get("method", "unconditional")
        if method != "unconditional":
            raise ModelNotFound(
                f"{path} is a {method} run; difftrain sample draws unconditional models. "
                + (f'Use: difftrain generate {path} --prompt "..."' if method != "vae" else
                   "A VAE run has nothing to sample: use it as model.vae of a text2image run.")
            )
        final = path / ("model" if use_ema else "model-no-ema")
        if not final.is_dir():
            final = path / "model"
        if (final / "unet").is_dir():
            return _from_diffusers_folder(final)
        return _from_checkpoint(path, use_ema)
    raise ModelNotFound(
        f"{path}: not a diffusers model folder (unet/ and scheduler/) nor a difftrain run folder (config.yaml)"
    )


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
