"""Text-to-image sampling with a diffusers Stable Diffusion pipeline, from encoded prompts.

Training previews and `difftrain generate` both draw through `draw`, so a preview is the
image the command gives for the same prompt, seed, sampler and steps (tested).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import weakref
from typing import Iterator

import torch
from PIL import Image

from difftrain.sampling.masked import LatentMask, is_inpainting_unet, keeping_unmasked, with_image_conditioning
from difftrain.sampling.prompt_schedule import ScheduledConditioning
from difftrain.sampling.prompts import PromptError
from difftrain.sampling.seed_noise import SeedNoise
from difftrain.sampling.unet_forward import replaced_forward

log = logging.getLogger(__name__)


def prompt_batches(prompts: list, batch_size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each run of equal consecutive prompts, cut at `batch_size`: one batch each."""
    start = 0
    while start < len(prompts):
        end = start + 1
        while end < len(prompts) and prompts[end] == prompts[start] and end - start < batch_size:
            end += 1
        yield start, end
        start = end


def draw(pipe, *args, **kwargs) -> list[Image.Image]:
    """One image per seed from encoded prompts (prompt_schedule.encode_schedule): `sample(pipe, ...)`'s latents
    decoded."""
    return to_images(pipe, sample(pipe, *args, **kwargs))


@torch.no_grad()
def sample(
    pipe,
    conditioning: ScheduledConditioning,
    seeds: list[int],
    steps: int,
    guidance_scale: float,
    autocast: torch.dtype | None = None,
    noise: SeedNoise | None = None,
    mask: LatentMask | None = None,
    **extra,
) -> torch.Tensor:
    """The latents of one image per seed from encoded prompts (each image i starts from seed i's noise).

    `extra` goes to the pipeline (width/height, or image/strength for img2img). `autocast`
    runs the UNet under that dtype (training previews under mixed precision, where frozen
    parts are half precision and the UNet fp32); the VAE decodes outside it, in its own dtype.
    The pipeline is given the first span; each later span (A1111 prompt editing) replaces it after the step
    the one before it ends, and AND parts are composed in the UNet's place (_composing_parts). `noise`:
    A1111's variation seeds and ENSD (sampling/seed_noise.py), for text-to-image and img2img (`strength` in
    `extra`). `mask`: img2img redraws only there (inpainting, sampling/masked.py).
    """
    if hasattr(pipe.scheduler, "noise_sampler_seed"):
        # DPM++ SDE draws its Brownian noise from this seed, not from the generators.
        pipe.scheduler.noise_sampler_seed = seeds if len(seeds) > 1 else seeds[0]
    dtype = pipe.unet.dtype
    positives, negative = conditioning.pairs[0]
    positive = positives[:1]  # (the first AND part: composing replaces it anyway)
    composing = contextlib.nullcontext()
    if conditioning.composable:
        composing = _composing_parts(pipe, conditioning, guidance_scale)  # (it takes every span's conditioning)
        positive = negative  # a placeholder of the negative's shape: the parts may be of another length
    elif len(conditioning.pairs) > 1:
        extra = _swapping_spans(pipe, conditioning, len(seeds), dtype, extra)
    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
    if torch.is_tensor(extra.get("image")) and "strength" in extra and len(extra["image"]) == 1 < len(seeds):
        # img2img's start latents for every image (diffusers repeats one with a FutureWarning)
        extra = {**extra, "image": extra["image"].expand(len(seeds), -1, -1, -1)}
    masking = contextlib.nullcontext()
    if mask is not None:
        init = mask.start(extra["image"], seeds)
        extra, masking = {**extra, "image": init}, keeping_unmasked(pipe, init, mask.redraw, mask.soft)
    noise_mixing = contextlib.nullcontext()
    if noise is not None and "strength" in extra:
        generators = noise.sampler_generators(seeds, generators)
        noise_mixing = noise.added_noise(pipe.scheduler, seeds, generators)
    elif noise is not None:
        latents, generators = noise.first_noise(pipe, seeds, extra["width"], extra["height"])
        extra = {**extra, "latents": latents.to(pipe._execution_device, dtype)}
    conditioned = contextlib.nullcontext()
    if is_inpainting_model(pipe):
        extra, conditioned = _conditioning_inpainting_model(pipe, seeds, generators, dtype, mask, extra)
    call = dict(
        prompt_embeds=positive.to(dtype).repeat(len(seeds), 1, 1),
        negative_prompt_embeds=negative.to(dtype).repeat(len(seeds), 1, 1),
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=generators,
        output_type="latent",
        **extra,
    )
    # (the conditioning innermost: composing and the blend call the UNet with latents alone)
    with conditioned, composing, masking, noise_mixing, torch.autocast(
            pipe._execution_device.type, dtype=autocast, enabled=autocast not in (None, torch.float32)):
        latents = pipe(**call).images
    return latents if mask is None else mask.blend(latents, init)


def is_inpainting_model(pipe) -> bool:
    """sd-v1-5-inpainting's kind: a UNet that takes the mask and the masked image's latents beside the latents."""
    return is_inpainting_unet(pipe.unet, pipe.vae.config.latent_channels)


def _conditioning_inpainting_model(pipe, seeds: list[int], generators: list, dtype: torch.dtype,
                                   mask: LatentMask | None, extra: dict) -> tuple[dict, object]:
    """An inpainting model's image conditioning on every UNet call: its mask's (inpainting), else the whole image
    masked, as A1111 gives it in text-to-image and img2img. In text-to-image the pipeline would size its noise by the
    UNet's input channels: the latents' noise is drawn here as it draws it for the latents alone."""
    if "strength" in extra:
        size = tuple(extra["image"].shape[-2:])
    else:
        size = (extra["height"] // pipe.vae_scale_factor, extra["width"] // pipe.vae_scale_factor)
        if "latents" not in extra:
            from diffusers.utils.torch_utils import randn_tensor

            shape = (len(seeds), pipe.vae.config.latent_channels, *size)
            extra = {**extra, "latents": randn_tensor(shape, generator=generators, device=pipe._execution_device,
                                                       dtype=dtype)}
    conditioning = mask.conditioning if mask is not None and mask.conditioning is not None else \
        image_conditioning(pipe, size)
    return extra, with_image_conditioning(pipe.unet, conditioning)


@torch.no_grad()
def to_latents(pipe, images: list[Image.Image]) -> torch.Tensor:
    """The latents img2img starts from: the VAE posterior's mean. diffusers' img2img samples the posterior with the
    seed's generator, so the noise it then adds is that generator's second draw; A1111 adds its first (and samples
    the posterior with its unseeded global generator)."""
    return encode_pixels(pipe, pipe.image_processor.preprocess(images))


@torch.no_grad()
def encode_pixels(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """Latents (the posterior's mean, scaled) of pixels in [-1, 1], (n, 3, H, W)."""
    vae = pipe.vae
    encoded = vae.encode(pixels.to(pipe._execution_device, vae.dtype)).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (encoded - shift) * vae.config.scaling_factor


_GREY_CONDITIONING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # VAE -> {(size, dtype, device): ..}


def image_conditioning(pipe, size: tuple[int, int], pixels: torch.Tensor | None = None,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """What an inpainting model takes beside the latents (A1111's inpainting_image_conditioning): the mask at the
    latents' `size` (nearest) and the latents of `pixels` ([-1, 1], 1 x 3 x H x W) with the masked area zeroed.
    Without a mask (text-to-image, img2img) the whole image is masked: a mask of ones and a grey image's latents,
    encoded once per VAE, size and dtype (every draw of a batch loop would otherwise encode it again)."""
    height, width = size
    if mask is None:
        cached = _GREY_CONDITIONING.setdefault(pipe.vae, {})
        key = (size, pipe.vae.dtype, str(pipe._execution_device))
        if key not in cached:
            grey = torch.zeros(1, 3, height * pipe.vae_scale_factor, width * pipe.vae_scale_factor)
            cached[key] = image_conditioning(pipe, size, grey, torch.ones(1, 1, *grey.shape[-2:]))
        return cached[key]
    latents = encode_pixels(pipe, pixels * (1 - mask))
    small = torch.nn.functional.interpolate(mask, size=size).to(latents)
    return torch.cat([small, latents], dim=1)



@torch.no_grad()
def to_images(pipe, latents: torch.Tensor) -> list[Image.Image]:
    pixels = decode(pipe.vae, latents)
    pipe.maybe_free_model_hooks()  # under --cpu-offload the VAE our decode moved to the GPU goes back
    return pipe.image_processor.postprocess(pixels.float(), output_type="pil")


def _swapping_spans(pipe, schedule: ScheduledConditioning, count: int, dtype: torch.dtype, extra: dict) -> dict:
    """`extra` with a step-end callback that puts the next span's conditioning in the pipeline's place (after the
    caller's own callback, if any), laid out as the pipeline lays it out: [negative, positive] when guided."""
    import inspect

    if "callback_on_step_end" not in inspect.signature(pipe.__call__).parameters:
        log.warning("prompt editing and alternation need diffusers' callback_on_step_end, which %s lacks: the prompt "
                    "is drawn as it reads at step 1", type(pipe).__name__)
        return extra
    outer, current = extra.get("callback_on_step_end"), [0]

    def step_end(pipeline, step, timestep, values):
        values = outer(pipeline, step, timestep, values) if outer is not None else values
        index = schedule.index_at(step + 1)
        if index != current[0]:
            current[0] = index
            _refresh_feature_cache(pipeline.unet)
            positive, negative = (side.to(pipeline._execution_device, dtype).repeat(count, 1, 1)
                                  for side in schedule.pairs[index])
            values["prompt_embeds"] = (torch.cat([negative, positive]) if pipeline.do_classifier_free_guidance
                                       else positive)
        return values

    return {**extra, "callback_on_step_end": step_end}


def _refresh_feature_cache(unet) -> None:
    """A cache of deep features across steps (generate's DeepCache) made from one conditioning is not the next's."""
    if (cache := getattr(unet, "feature_cache", None)) is not None:
        cache.refresh()


@contextlib.contextmanager
def _composing_parts(pipe, schedule: ScheduledConditioning, guidance_scale: float):
    """The UNet, for one draw, as A1111's composable diffusion: each call runs the uncond half and every AND part,
    and answers [uncond, uncond + sum(w_i x (cond_i - uncond))], which the pipeline's guidance turns into
    uncond + cfg x sum(w_i x (cond_i - uncond)). Every call is a step (A1111 counts so), and takes its span's
    conditioning from `schedule` itself."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    why = ("it needs classifier-free guidance (--cfg above 1)" if guidance_scale <= 1
           or pipe.unet.config.get("time_cond_proj_dim") is not None else
           "a ControlNet or T2I-Adapter adds its residuals to two halves only"
           if hasattr(pipe, "controlnet") or hasattr(pipe, "adapter") else None)
    if why:
        raise PromptError(f"AND or a prompt weight ({', '.join(f'{w:g}' for w in schedule.weights)}) composes "
                          f"prompts, and {why}; drop the AND, or the ':weight' at the prompt's end")
    unet, calls = pipe.unet, [0]
    weights = torch.tensor(schedule.weights)

    def wrap(original):
        def forward(sample, timestep, encoder_hidden_states, *args, return_dict: bool = True, **kwargs):
            half = sample.shape[0] // 2
            index = schedule.index_at(calls[0])
            if calls[0] and index != schedule.index_at(calls[0] - 1):
                _refresh_feature_cache(unet)
            calls[0] += 1
            positives, negative = (side.to(encoder_hidden_states) for side in schedule.pairs[index])
            parts = len(positives)
            batched = torch.is_tensor(timestep) and timestep.ndim > 0  # (SD's pipelines give one timestep for all)

            def run(rows: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
                """The UNet on these rows of the pipeline's batch: the uncond half's, or the text half's again."""
                return original(sample[rows], timestep[rows] if batched else timestep, conditioning, *args,
                                return_dict=False, **kwargs)[0]

            uncond_rows, text_rows = torch.arange(half), torch.arange(half, 2 * half).repeat(parts)  # part by part
            uncond_z, text_z = negative.expand(half, -1, -1), positives.repeat_interleave(half, dim=0)
            if negative.shape[1] == positives.shape[1]:  # one batch
                predicted = run(torch.cat([uncond_rows, text_rows]), torch.cat([uncond_z, text_z]))
                uncond, conds = predicted[:half], predicted[half:]
            else:  # of two lengths: apart, as A1111 runs them without "Pad conds"
                uncond, conds = run(uncond_rows, uncond_z), run(text_rows, text_z)
            conds = conds.unflatten(0, (parts, half))
            shape = (parts,) + (1,) * (conds.ndim - 1)
            text = uncond + (weights.to(conds).view(shape) * (conds - uncond)).sum(0)
            result = torch.cat([uncond, text])
            return (result,) if not return_dict else UNet2DConditionOutput(sample=result)
        return forward

    with replaced_forward(unet, wrap):
        yield


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
