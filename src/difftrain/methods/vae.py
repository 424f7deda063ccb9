"""Train an AutoencoderKL: the part of Stable Diffusion that maps pixels to latents and back.

With this, a whole Stable Diffusion can be trained here from nothing: first the VAE on
the images, then a text-conditioned UNet on its latents. The loss is Stable Diffusion's
minus its GAN and LPIPS terms (which need pretrained networks): L1 + L2 reconstruction
plus a small KL pull towards N(0, 1).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from difftrain.errors import ConfigError
from difftrain.methods.base import Method, model_config
from difftrain.models.manifest import Manifest
from difftrain.models.sd import load_vae
from difftrain.sampling.images import to_pil

PREVIEW_IMAGES = 64  # also the images the latent scale is measured on


class Autoencode(torch.nn.Module):
    """encode -> sample -> decode as one forward, so DDP sees (and syncs) the whole computation."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(pixels).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator, device=pixels.device)
        kl = dist.kl().mean() / dist.mean[0].numel()  # per latent element, so the weight is size-independent
        return self.vae.decode(z).sample, kl


class VaeTraining(Method):
    name = "vae"

    def __init__(self, config):
        super().__init__(config)
        self.vae = load_vae(config.model.vae, config.model.base)
        check_vae_fits(self.vae.config, config.model.vae or f"{config.model.base}'s vae", config.data.resolution)
        self.vae.requires_grad_(True)
        self.autoencode = Autoencode(self.vae)
        self.previews: torch.Tensor | None = None

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"autoencoder": self.autoencode}

    def speed_modules(self) -> dict[str, torch.nn.Module]:
        return {"vae": self.vae}  # the trained module is a thin wrapper around it

    def model_configs(self) -> dict[str, dict]:
        return {"vae": model_config(self.vae)}  # (the trained module is the wrapper around it)

    def preview_columns(self, count: int) -> int:
        return 2 * math.ceil(math.sqrt(count / 2))  # even: each original beside its reconstruction

    def setup(self, accelerator, weight_dtype, dataset, progress) -> None:
        self.device = accelerator.device
        count = min(max(PREVIEW_IMAGES, self.config.sample.num_images), len(dataset))
        self.previews = torch.stack([dataset.plain_pixels(i) for i in range(count)])

    def loss(self, modules, batch, generator):
        pixels = batch["pixel_values"]
        reconstruction, kl = modules["autoencoder"](pixels, generator)
        error = F.l1_loss(reconstruction.float(), pixels) + F.mse_loss(reconstruction.float(), pixels)
        return error + self.config.vae.kl_weight * kl

    @torch.no_grad()
    def sample(self, modules, num_images, scheduler, steps, seed) -> list[Image.Image]:
        """Originals and their reconstructions, in alternating columns."""
        vae = modules["autoencoder"].vae
        originals = self.previews[:num_images].to(self.device)
        reconstructions = vae.decode(vae.encode(originals).latent_dist.mean).sample
        pairs = torch.stack([originals, reconstructions.clamp(-1, 1)], dim=1).flatten(0, 1)
        return to_pil(pairs)

    def manifest(self) -> Manifest:
        return Manifest("vae", self.name, conditioning={"resolution": self.config.data.resolution},
                        trained={"steps": self.config.training.max_steps})

    @torch.no_grad()
    def save_model(self, modules, out_dir: Path) -> None:
        vae = modules["autoencoder"].vae
        if str(self.config.model.vae or "").endswith(".json"):
            # Stable Diffusion scales latents to unit variance (SD 1.x: 0.18215); a VAE trained
            # from nothing has its own spread, measured on the preview images, so a UNet trained
            # on its latents sees unit variance too. A fine-tuned VAE keeps its base's factor:
            # the UNets it plugs into were trained with that one.
            measured = self.previews[:PREVIEW_IMAGES].split(8)
            latents = torch.cat([vae.encode(chunk.to(self.device)).latent_dist.mean for chunk in measured])
            vae.register_to_config(scaling_factor=float(1.0 / latents.std().clamp(min=1e-6)))
        vae.save_pretrained(out_dir, safe_serialization=True)


def check_vae_fits(config, name: str, resolution: int) -> None:
    """Refuse, naming the key, an AutoencoderKL the data cannot go through: images are RGB, and each of its
    blocks but the last halves them (an odd size came back a pixel short, a traceback at the first step)."""
    if config.in_channels != 3 or config.out_channels != 3:
        raise ConfigError(f"model.vae: {name} takes {config.in_channels} channels in and gives {config.out_channels} "
                          "out; images are read as RGB: set in_channels and out_channels to 3")
    factor = 2 ** (len(config.block_out_channels) - 1)
    if resolution % factor:
        raise ConfigError(f"data.resolution = {resolution}: {name} halves an image {factor.bit_length() - 1} times "
                          f"(x1/{factor}); give a multiple of {factor}")
