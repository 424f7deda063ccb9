"""The sampling loop, written once for every scheduler and every denoiser.

diffusers' DDPMPipeline calls `scheduler.step` but never `scale_model_input` or
`init_noise_sigma`, so the sigma-based samplers (Euler, Heun, DPM with Karras sigmas)
come out wrong through it. This loop does the three calls every scheduler expects.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

import numpy as np
import torch
from PIL import Image

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def denoise(
    model: Denoiser,
    scheduler,
    shape: tuple[int, ...],
    steps: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Run `scheduler` from pure noise for `steps` steps; returns samples clamped to [-1, 1]."""
    scheduler.set_timesteps(steps, device=device)
    if hasattr(scheduler, "set_begin_index"):
        # Without it a scheduler finds its place by looking the first timestep up, and a
        # schedule that repeats a timestep starts one step late and runs off the end.
        scheduler.set_begin_index(0)
    x = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(device)
    x = x * scheduler.init_noise_sigma
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    extra = {"generator": generator} if takes_generator else {}
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t).to(dtype)
        prediction = model(model_input, t).float()
        x = scheduler.step(prediction, t, x, **extra).prev_sample
    return x.clamp(-1, 1)


def unet_denoiser(unet) -> Denoiser:
    return lambda x, t: unet(x, t).sample


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
