"""The sampling loop, written once for every scheduler and every denoiser.

diffusers' DDPMPipeline calls `scheduler.step` but never `scale_model_input` or
`init_noise_sigma`, so the sigma-based samplers (Euler, Heun, DPM with Karras sigmas)
come out wrong through it. This loop does the three calls every scheduler expects.
"""

from __future__ import annotations

import inspect
from typing import Callable, Iterator

import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from difftrain.errors import DifftrainError
from difftrain.sampling.images import to_pil
from difftrain.sampling.schedulers import make_scheduler

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def denoise(
    model: Denoiser,
    scheduler,
    shape: tuple[int, ...],
    steps: int,
    generator: torch.Generator | list[torch.Generator],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Run `scheduler` from pure noise for `steps` steps; returns samples clamped to [-1, 1]. `generator`: one
    for the whole batch, or one per sample (an ancestral sampler's noise then comes from each sample's own too)."""
    scheduler.set_timesteps(steps, device=device)
    if hasattr(scheduler, "set_begin_index"):
        # Without it a scheduler finds its place by looking the first timestep up, and a
        # schedule that repeats a timestep starts one step late and runs off the end.
        scheduler.set_begin_index(0)
    home = (generator[0] if isinstance(generator, list) else generator).device
    x = randn_tensor(shape, generator=generator, device=home, dtype=torch.float32).to(device)
    x = x * scheduler.init_noise_sigma
    accepted = inspect.signature(scheduler.step).parameters
    extra = {"generator": generator} if "generator" in accepted else {}
    if hasattr(scheduler, "noise_sampler_seed"):  # DPM++ SDE's Brownian noise: from a random seed without it
        # (one tree per sample, each from its generator's seed, so a batch draws what its images draw alone)
        scheduler.noise_sampler_seed = ([g.initial_seed() for g in generator] if isinstance(generator, list)
                                        else generator.initial_seed())
    if "use_clipped_model_output" in accepted:
        # DDIM clips its predicted x0 (clip_sample, on in DDPM-trained configs) but by default steps
        # with the noise of the unclipped one. Guidance pushes x0 past [-1, 1], and the two then
        # disagree: the demo's recipe drew 4 % clean shapes that way, 65 % with the noise re-derived
        # (benchmarks/shapes_quality.py --scheduler ddim; Euler 70 %).
        extra["use_clipped_model_output"] = True
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t).to(dtype)
        prediction = model(model_input, t).float()
        x = scheduler.step(prediction, t, x, **extra).prev_sample
    return x.clamp(-1, 1)


def unet_denoiser(unet, labels: torch.Tensor | None = None, guidance_scale: float = 1.0) -> Denoiser:
    """A pixel UNet as a denoiser; with class `labels`, classifier-free guided towards them.

    A class-conditional UNet's last class embedding is "no class" (what training drops labels
    to), so guidance is u + w (c - u) with u its prediction for that class, both halves in one
    batch. At `guidance_scale` 1 that is the conditional prediction alone, computed alone.
    """
    if labels is None:
        return lambda x, t: unet(x, t).sample
    if guidance_scale == 1:
        return lambda x, t: unet(x, t, class_labels=labels).sample
    both = torch.cat([labels, torch.full_like(labels, unet.config.num_class_embeds - 1)])

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        conditional, unconditional = unet(torch.cat([x, x]), t, class_labels=both).sample.chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)

    return guided


def sample_unet(
    unet, scheduler_config: dict, num_images: int, scheduler: str, steps: int, seed: int,
    labels: list[int] | None = None, guidance_scale: float = 1.0,
) -> list[Image.Image]:
    """`num_images` from a pixel-space UNet2DModel, image i from a generator of its own seeded `seed + i` (so
    from the same seed however the images are batched), of class `labels[i]` when the UNet is class-conditional."""
    device = next(unet.parameters()).device
    generator = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(num_images)]
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    shape = (num_images, unet.config.in_channels, *size)
    label_tensor = None if labels is None else torch.tensor(labels, device=device)
    denoiser = unet_denoiser(unet, label_tensor, guidance_scale)
    images = denoise(denoiser, make_scheduler(scheduler, scheduler_config), shape, steps, generator, device)
    return to_pil(images)


def sample_unet_batched(
    unet, scheduler_config: dict, num_images: int, scheduler: str, steps: int, seed: int, batch_size: int,
    progress: bool = False, labels: list[int] | None = None, guidance_scale: float = 1.0,
) -> list[Image.Image]:
    """`num_images` in batches of `batch_size`, image i from seed + i: the same images whatever the batch size."""
    return [image for batch in sample_unet_batches(unet, scheduler_config, num_images, scheduler, steps, seed,
                                                   batch_size, progress, labels, guidance_scale) for image in batch]


def sample_unet_batches(
    unet, scheduler_config: dict, num_images: int, scheduler: str, steps: int, seed: int, batch_size: int,
    progress: bool = False, labels: list[int] | None = None, guidance_scale: float = 1.0,
) -> Iterator[list[Image.Image]]:
    """sample_unet_batched's images a batch at a time, for a caller that writes them out rather than holds them."""
    from tqdm.auto import tqdm

    with tqdm(total=num_images, desc="sampling", unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, num_images, batch_size):
            count = min(batch_size, num_images - start)
            chunk = None if labels is None else labels[start:start + count]
            yield sample_unet(unet, scheduler_config, count, scheduler, steps, seed + start, chunk, guidance_scale)
            bar.update(count)


class UnknownClass(DifftrainError):
    pass


def class_draw(classes: list[str], count: int, guidance_scale: float, wanted: list[str] | None = None) -> dict:
    """sample_unet's labels and guidance for `count` images of a class-conditional model: the
    `wanted` class names (default: every class) in turn."""
    wanted = wanted or classes
    unknown = [name for name in wanted if name not in classes]
    if unknown:
        raise UnknownClass(f"no class {', '.join(map(repr, unknown))}; this model's classes: "
                           f"{', '.join(map(repr, classes))}")
    return {"labels": [classes.index(wanted[i % len(wanted)]) for i in range(count)], "guidance_scale": guidance_scale}
