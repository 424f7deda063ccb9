"""Train an AutoencoderKL: the part of Stable Diffusion that maps pixels to latents and back.

With this, a whole Stable Diffusion can be trained here from nothing: first the VAE on
the images, then a text-conditioned UNet on its latents. The loss is Stable Diffusion's
minus its GAN and LPIPS terms (which need pretrained networks): L1 + L2 reconstruction
plus a small KL pull towards N(0, 1).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from difftrain.methods.base import Method
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
        self.vae.requires_grad_(True)
        self.autoencode = Autoencode(self.vae)
        self.previews: torch.Tensor | None = None

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"autoencoder": self.autoencode}

    def speed_modules(self) -> dict[str, torch.nn.Module]:
        return {"vae": self.vae}  # the trained module is a thin wrapper around it

    def setup(self, accelerator, weight_dtype, dataset, progress) -> None:
        self.device = accelerator.device
        count = min(PREVIEW_IMAGES, len(dataset))
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
            latents = torch.cat([vae.encode(chunk.to(self.device)).latent_dist.mean for chunk in self.previews.split(8)])
            vae.register_to_config(scaling_factor=float(1.0 / latents.std().clamp(min=1e-6)))
        vae.save_pretrained(out_dir, safe_serialization=True)
