"""A1111's variation seeds: each image's starting noise slerped toward the noise of a second seed.

As A1111 draws them with its "RNG: CPU" option (modules/rng.py): image i's noise is the first draw of its
seed's generator, the variation noise the first draw of a generator of its subseed (subseed + i), and the
mix `slerp(strength, noise, subnoise)`; the seed's generator goes on to feed an ancestral sampler, as it
does without a variation. img2img (and the hires fix's second pass) mixes the noise it adds the same way.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Variation:
    subseeds: list[int]  # one per image
    strength: float  # 0: the seed's noise; 1: the subseed's

    def mix(self, noise: torch.Tensor) -> torch.Tensor:
        """A batch of seed noise (B, C, H, W), each image slerped toward its subseed's."""
        mixed = []
        for image_noise, subseed in zip(noise, self.subseeds):
            subnoise = torch.randn(image_noise.shape, generator=torch.Generator().manual_seed(subseed))
            mixed.append(slerp(self.strength, image_noise.float().cpu(), subnoise))
        return torch.stack(mixed).to(noise)


def slerp(value: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's slerp on one image's (C, H, W) noise, as it is written: the norms run over dim 1 (the rows), and
    the nearly-parallel fallback weighs `low` by `value`."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * value + high * (1 - value)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return ((torch.sin((1.0 - value) * omega) / so).unsqueeze(1) * low
            + (torch.sin(value * omega) / so).unsqueeze(1) * high)


def first_noise(pipe, generators: list[torch.Generator], width: int, height: int, variation: Variation) -> torch.Tensor:
    """The starting latents of a text-to-image draw (before the scheduler's init_noise_sigma), each seed's generator
    advanced past its draw as the pipeline's own draw would leave it."""
    cell = pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, height // cell, width // cell)
    noise = torch.cat([torch.randn(shape, generator=generator) for generator in generators])
    return variation.mix(noise)


@contextlib.contextmanager
def mixing_added_noise(scheduler, variation: Variation):
    """img2img: the noise the pipeline draws from each seed's generator and adds to the image latents, mixed."""
    had_own, original = "add_noise" in scheduler.__dict__, scheduler.add_noise

    def add_noise(samples, noise, timesteps):
        return original(samples, variation.mix(noise), timesteps)

    scheduler.add_noise = add_noise
    try:
        yield
    finally:
        if had_own:
            scheduler.add_noise = original
        else:
            del scheduler.add_noise  # (the class's method again)
