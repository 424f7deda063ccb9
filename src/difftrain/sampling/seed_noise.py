"""A1111's noise options per image: variation seeds and the eta noise seed delta (ENSD).

As A1111 draws with its "RNG: CPU" option (modules/rng.py, ImageRNG): image i's starting noise is
the first draw of its seed's generator. A variation mixes it with the first draw of a generator of
its variation seed, `slerp(strength, noise, subnoise)`. What a sampler draws after that (an
ancestral sampler's noise) comes from the seed's generator, going on, or with an ENSD from a fresh
generator of seed + ENSD. img2img (and the hires fix's second pass) draws the noise it adds the same
way.
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

    def mix(self, noise: torch.Tensor) -> torch.Tensor:
        """A batch of seed noise (B, C, H, W), each image slerped toward its variation seed's."""
        if not self.strength:
            return noise
        mixed = []
        for image_noise, subseed in zip(noise, self.subseeds):
            subnoise = torch.randn(image_noise.shape, generator=torch.Generator().manual_seed(subseed))
            mixed.append(slerp(self.strength, image_noise.float().cpu(), subnoise))
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
        return self.mix(noise), self.sampler_generators(seeds, generators)

    @contextlib.contextmanager
    def added_noise(self, scheduler, seeds: list[int], generators: list[torch.Generator]):
        """img2img: the noise the pipeline adds to the image latents (its draw from `generators`, the ones it
        samples with) made A1111's: each seed's first draw, mixed; under an ENSD the generators are rewound to
        seed + ENSD for the sampler, as A1111 makes them after its first draw."""
        had_own, original = "add_noise" in scheduler.__dict__, scheduler.add_noise

        def add_noise(samples, noise, timesteps):
            if self.ensd:  # the pipeline drew from the seed + ENSD generators: the seeds' own draw instead
                noise = torch.cat([torch.randn((1, *noise.shape[1:]), generator=torch.Generator().manual_seed(seed))
                                   for seed in seeds]).to(noise)
                for generator, seed in zip(generators, seeds):
                    generator.manual_seed(seed + self.ensd)
            return original(samples, self.mix(noise), timesteps)

        scheduler.add_noise = add_noise
        try:
            yield
        finally:
            if had_own:
                scheduler.add_noise = original
            else:
                del scheduler.add_noise  # (the class's method again)


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
