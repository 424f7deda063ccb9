"""A1111's noise options per image: variation seeds and the eta noise seed delta (ENSD).

As A1111 draws with its "RNG: CPU" option (modules/rng.py, ImageRNG): image i's starting noise is
the first draw of its seed's generator. A variation mixes it with the first draw of a generator of
its variation seed, `slerp(strength, noise, subnoise)`. What a sampler draws after that (an
ancestral sampler's noise) comes from the seed's generator, going on, or with an ENSD from a fresh
generator of seed + ENSD. img2img (and the hires fix's second pass) draws the noise it adds the same
way. "Seed resize from" draws the seed's (and variation seed's) noise at another size, from fresh
generators, and puts its centre on the centre of the seed's noise at this size: the composition a seed
gave at one size, kept at another.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SeedNoise:
    subseeds: list[int]  # each image's variation seed
    strength: float = 0.0  # 0: the seed's noise; 1: the variation seed's
    ensd: int = 0  # A1111's eta noise seed delta: the sampler's own noise from seed + this
    resize_from: tuple[int, int] | None = None  # "Seed resize from": the (rows, columns) of latents it was drawn at

    def mix(self, noise: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """A batch of seed noise (B, C, H, W), each image's drawn at `resize_from` and centred where one is
        given, and slerped toward its variation seed's."""
        if not self.strength and self.resize_from in (None, tuple(noise.shape[2:])):
            return noise
        mixed = []
        for image_noise, seed, subseed in zip(noise, seeds, self.subseeds):
            image_noise = image_noise.float().cpu()
            shape = image_noise.shape if self.resize_from is None else (image_noise.shape[0], *self.resize_from)
            own = image_noise if shape == image_noise.shape else _randn(shape, seed)
            if self.strength:
                own = slerp(self.strength, own, _randn(shape, subseed))
            mixed.append(own if shape == image_noise.shape else centred(own, image_noise))
        return torch.stack(mixed).to(noise)

    def sampler_generators(self, seeds: list[int], generators: list[torch.Generator]) -> list[torch.Generator]:
        """What the sampler draws from once the starting noise is drawn: the seeds' own generators, going on, or
        under an ENSD fresh ones of seed + ENSD."""
        return [torch.Generator().manual_seed(seed + self.ensd) for seed in seeds] if self.ensd else generators

    def first_noise(self, pipe, seeds: list[int], width: int, height: int) -> tuple[torch.Tensor, list]:
        """Text to image: the starting latents (before the scheduler's init_noise_sigma) and the generators the
        pipeline then samples with."""
        cell = pipe.vae_scale_factor
        shape = (1, pipe.unet.config.in_channels, height // cell, width // cell)
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        noise = torch.cat([torch.randn(shape, generator=generator) for generator in generators])
        return self.mix(noise, seeds), self.sampler_generators(seeds, generators)

    @contextlib.contextmanager
    def added_noise(self, scheduler, seeds: list[int], generators: list[torch.Generator]):
        """img2img: the noise the pipeline adds to the image latents (its draw from `generators`, the ones it
        samples with) made A1111's: each seed's first draw, mixed; under an ENSD the generators are rewound to
        seed + ENSD for the sampler, as A1111 makes them after its first draw."""
        had_own, original = "add_noise" in scheduler.__dict__, scheduler.add_noise

        def add_noise(samples, noise, timesteps):
            if self.ensd:  # the pipeline drew from the seed + ENSD generators: the seeds' own draw instead
                noise = torch.cat([_randn((1, *noise.shape[1:]), seed) for seed in seeds]).to(noise)
                for generator, seed in zip(generators, seeds):
                    generator.manual_seed(seed + self.ensd)
            return original(samples, self.mix(noise, seeds), timesteps)

        scheduler.add_noise = add_noise
        try:
            yield
        finally:
            if had_own:
                scheduler.add_noise = original
            else:
                del scheduler.add_noise  # (the class's method again)


def _randn(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def centred(small: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """`noise` (C, H, W) with `small`'s centre over its centre, as A1111 writes it (modules/rng.py): its floor
    division leaves the last row or column of `noise` its own where `small` is larger by an odd number."""
    noise = noise.clone()
    dy, dx = (noise.shape[1] - small.shape[1]) // 2, (noise.shape[2] - small.shape[2]) // 2
    h = small.shape[1] if dy >= 0 else small.shape[1] + 2 * dy
    w = small.shape[2] if dx >= 0 else small.shape[2] + 2 * dx
    ty, tx, dy, dx = max(dy, 0), max(dx, 0), max(-dy, 0), max(-dx, 0)
    noise[:, ty:ty + h, tx:tx + w] = small[:, dy:dy + h, dx:dx + w]
    return noise


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
