"""Text-to-image sampling with a diffusers Stable Diffusion pipeline, from encoded prompts.

Training previews and `difftrain generate` both draw through `draw`, so a preview is the
image the command gives for the same prompt, seed, sampler and steps (tested).
"""

from __future__ import annotations

import sys
from typing import Iterator

import torch
from PIL import Image


def prompt_batches(prompts: list, batch_size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each run of equal consecutive prompts, cut at `batch_size`: one batch each."""
    start = 0
    while start < len(prompts):
        end = start + 1
        while end < len(prompts) and prompts[end] == prompts[start] and end - start < batch_size:
            end += 1
        yield start, end
        start = end


@torch.no_grad()
def draw(
    pipe,
    positive: torch.Tensor,
    negative: torch.Tensor,
    seeds: list[int],
    steps: int,
    guidance_scale: float,
    autocast: torch.dtype | None = None,
    **extra,
) -> list[Image.Image]:
    """One image per seed from conditioning [1, tokens, dim] (each image i starts from seed i's noise).

    `extra` goes to the pipeline (width/height, or image/strength for img2img). `autocast`
    runs the UNet under that dtype (training previews under mixed precision, where frozen
    parts are half precision and the UNet fp32); the VAE decodes outside it, in its own dtype.
    """
    if hasattr(pipe.scheduler, "noise_sampler_seed"):
        # DPM++ SDE draws its Brownian noise from this seed, not from the generators.
        pipe.scheduler.noise_sampler_seed = seeds if len(seeds) > 1 else seeds[0]
    dtype = pipe.unet.dtype
    call = dict(
        prompt_embeds=positive.to(dtype).repeat(len(seeds), 1, 1),
        negative_prompt_embeds=negative.to(dtype).repeat(len(seeds), 1, 1),
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=[torch.Generator(device="cpu").manual_seed(seed) for seed in seeds],
        output_type="latent",
        **extra,
    )
    with torch.autocast(pipe._execution_device.type, dtype=autocast, enabled=autocast not in (None, torch.float32)):
        latents = pipe(**call).images
    pixels = decode(pipe.vae, latents)
    pipe.maybe_free_model_hooks()  # under --cpu-offload the VAE our decode moved to the GPU goes back
    return pipe.image_processor.postprocess(pixels.float(), output_type="pil")


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] from latents. A half-precision decoder that overflows (NaN or inf pixels, as
    SD's VAE does on some images and SDXL's on most) moves to fp32 for good and decodes again, as
    A1111 does. Only the decoding half moves: img2img still encodes in the pipeline's dtype."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    scaled = latents / vae.config.scaling_factor + shift
    decoding = [part for part in (getattr(vae, "post_quant_conv", None), getattr(vae, "decoder", None))
                if isinstance(part, torch.nn.Module)]  # an ONNX Runtime VAE has none: its dtype is fixed
    dtype = next(decoding[-1].parameters()).dtype if decoding else vae.dtype
    pixels = vae.decode(scaled.to(dtype)).sample
    if dtype == torch.float16 and decoding and not torch.isfinite(pixels).all() and torch.isfinite(latents).all():
        print("the VAE overflowed in fp16 (NaN or inf pixels): it decodes in fp32 from here on", file=sys.stderr)
        for part in decoding:
            part.to(torch.float32)
        pixels = vae.decode(scaled.float()).sample
    return pixels
