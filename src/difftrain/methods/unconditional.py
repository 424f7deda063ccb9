"""Unconditional pixel-space diffusion: a UNet2DModel learns to denoise the images themselves."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMPipeline
from PIL import Image

from difftrain.generate.sampling import denoise, to_pil, unet_denoiser
from difftrain.generate.schedulers import make_scheduler
from difftrain.methods.base import Method
from difftrain.models.unet import build_unet
from difftrain.training.losses import build_noise_scheduler, denoising_loss


class Unconditional(Method):
    name = "unconditional"

    def __init__(self, config):
        super().__init__(config)
        self.unet = build_unet(config.model, config.data.resolution)
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

    def save_model(self, modules, out_dir: Path) -> None:
        DDPMPipeline(unet=modules["unet"], scheduler=self.noise_scheduler).save_pretrained(out_dir)


def sample_unet(unet, scheduler_config, num_images: int, scheduler: str, steps: int, seed: int) -> list[Image.Image]:
    device = next(unet.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    shape = (num_images, unet.config.in_channels, *size)
    images = denoise(unet_denoiser(unet), make_scheduler(scheduler, scheduler_config), shape, steps, generator, device)
    return to_pil(images)
