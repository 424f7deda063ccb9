"""Unconditional pixel-space diffusion: a UNet2DModel learns to denoise the images themselves."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMPipeline
from PIL import Image

from difftrain.methods.base import Method
from difftrain.models.manifest import Manifest
from difftrain.models.noise import trained_settings
from difftrain.models.unet import build_unet
from difftrain.sampling.loop import sample_unet, sample_unet_batched
from difftrain.training.losses import build_noise_scheduler, denoising_loss


class Unconditional(Method):
    name = "unconditional"

    def __init__(self, config):
        super().__init__(config)
        self.unet = build_unet(
            config.model.preset, config.model.unet_config, config.model.channels, config.data.resolution
        )
        self.noise_scheduler = build_noise_scheduler(config.noise)

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet}

    def loss(self, modules, batch, generator):
        unet = modules["unet"]
        return denoising_loss(
            batch["pixel_values"], lambda x, t: unet(x, t).sample, self.noise_scheduler, self.config.noise, generator
        )

    def sample(self, modules, num_images, scheduler, steps, seed) -> list[Image.Image]:
        unet = modules["unet"]
        return sample_unet(unet, self.noise_scheduler.config, num_images, scheduler, steps, seed)

    def evaluation_images(self, modules, prompts, seed, scheduler, steps, guidance_scale, batch_size) -> list[Image.Image]:
        return sample_unet_batched(modules["unet"], self.noise_scheduler.config, len(prompts), scheduler, steps, seed,
                                   batch_size)

    def save_model(self, modules, out_dir: Path) -> None:
        DDPMPipeline(unet=modules["unet"], scheduler=self.noise_scheduler).save_pretrained(out_dir)

    def manifest(self) -> Manifest:
        return Manifest(
            "unconditional", self.name, scheduler="scheduler",
            noise=trained_settings(self.noise_scheduler.config),
            conditioning={"resolution": self.config.data.resolution},
            architecture={"unet": dict(self.unet.config), "scheduler": dict(self.noise_scheduler.config)},
            trained={"steps": self.config.training.max_steps},
        )

