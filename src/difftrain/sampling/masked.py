"""Sampling that keeps the init image's latents outside a mask (A1111's inpainting blend), for any sampler.

A1111 blends each denoised estimate with the init latents (CFGDenoiser: denoised x nmask + init x mask). The
diffusers schedulers take the UNet's prediction, not an estimate, so the blend is done on the prediction: where
the init is kept, the UNet answers the prediction whose estimate is the init latents (keeping_unmasked). Soft
inpainting's blend (sampling/soft_inpaint.py) is not linear, so it is done on the guided estimate, as A1111 does.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from difftrain.sampling.soft_inpaint import SoftInpainting, composite_masks, latent_blend, step_mask
from difftrain.sampling.unet_forward import replaced_forward


@dataclass
class LatentMask:
    """What img2img redraws: `redraw` is 1 there and 0 where the init latents stay, (1, 1, h, w) at the latents'
    size; `fill` is A1111's masked content (generate/inpaint.py)."""
    redraw: torch.Tensor
    fill: str = "original"
    conditioning: torch.Tensor | None = None  # an inpainting model's (sampling/text2image.image_conditioning)
    soft: SoftInpainting | None = None  # soft inpainting: `redraw` keeps the mask's greys

    def start(self, latents: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        return start_latents(latents, 1 - self.redraw.to(latents), self.fill, seeds)

    def blend(self, latents: torch.Tensor, init: torch.Tensor) -> torch.Tensor:
        """A1111's last blend of the sampled latents with the init ones (none under soft inpainting: its composite
        is done on the pixels)."""
        if self.soft is not None:
            return latents
        redraw = self.redraw.to(latents)
        return latents * redraw + init.to(latents) * (1 - redraw)

    def composite_masks(self, latents: torch.Tensor, image: torch.Tensor, seeds: list[int]):
        """Soft inpainting's overlay mask of each image sampled from `image`'s latents (sampling/soft_inpaint.py);
        None for hard inpainting, whose overlay is the painted mask."""
        if self.soft is None:
            return None
        return composite_masks(self.soft, self.redraw, self.start(image, seeds), latents)


def start_latents(latents: torch.Tensor, keep: torch.Tensor, fill_mode: str, seeds: list[int]) -> torch.Tensor:
    """The init latents of each seed's image: "latent noise" puts the seed's noise in the redrawn area (A1111's
    create_random_tensors), "latent nothing" zeros; `keep` is 1 outside the mask."""
    if fill_mode == "latent nothing":
        return latents * keep
    if fill_mode == "latent noise":
        noise = torch.stack([torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(seed))
                             for seed in seeds])
        return latents * keep + noise.to(latents) * (1 - keep)
    return latents


def _sigma_now(scheduler, timestep) -> torch.Tensor:
    """The noise level (sigma, k-diffusion's) of the sample the UNet is given now, as the scheduler scaled it.

    A scheduler that steps in sigma space (Euler, Heun, LMS, DPM2, DPM++ SDE: its init_noise_sigma is above 1)
    divides its sample by sqrt(sigma^2 + 1) for the UNet: that scale is read back from it, which holds for the
    second call of a two-call step too (DPM2 a's interpolated sigma, DPM++ SDE's midpoint). One that steps in the
    UNet's own space (DPM++ 2M, UniPC, DEIS) keeps its sigma of each step; before its first step that is the
    one img2img began at; DDIM and PLMS have only timesteps."""
    if float(getattr(scheduler, "init_noise_sigma", 1.0)) > 1.0:
        scale = float(scheduler.scale_model_input(torch.ones(1), timestep).flatten()[0])
        return torch.tensor(max(1 / scale ** 2 - 1, 0.0), dtype=torch.float64).sqrt()
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas):
        index = getattr(scheduler, "step_index", None)
        if index is None:  # (img2img sets where it begins; without it, the timestep's alpha below is the same sigma)
            index = getattr(scheduler, "begin_index", None)
        if index is not None:
            return torch.as_tensor(sigmas[index], dtype=torch.float64)
    alpha = scheduler.alphas_cumprod[int(torch.as_tensor(timestep).flatten()[0])].double()
    return ((1 - alpha) / alpha).sqrt()


@contextlib.contextmanager
def keeping_unmasked(pipe, init: torch.Tensor, redraw: torch.Tensor, soft: SoftInpainting | None = None):
    """The UNet, for one draw, answers so that every denoised estimate is `init` where `redraw` is 0. The sample it
    is given is the scheduler's x / sqrt(sigma^2 + 1) (alpha-scaled, whatever the sampler), so an estimate x0 comes
    from an epsilon e as (sample - s e) / a, with a = 1 / sqrt(sigma^2 + 1) and s = sigma a; the prediction that
    gives x0 = init is (sample - a init) / s (v: (a sample - init) / s). Guidance is affine in the two halves'
    predictions, so replacing each half's gives the guided prediction replaced the same way.

    `soft`: the guided estimate is blended with `init` by soft inpainting's rule instead, and both halves answer
    the blended prediction, which guidance leaves as it is (u + w (c - u) with u = c)."""
    scheduler, kind = pipe.scheduler, pipe.scheduler.config.get("prediction_type", "epsilon")

    def wrap(original):
        def forward(sample, timestep, *args, return_dict: bool = True, **kwargs):
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            predicted = original(sample, timestep, *args, return_dict=False, **kwargs)[0]
            sigma = _sigma_now(scheduler, timestep)
            a = float(1 / (sigma ** 2 + 1).sqrt())
            s = float(sigma) * a
            if soft is not None:
                result = _softly_blended(pipe, soft, predicted, sample, init, redraw, kind, (a, s, sigma))
            else:
                target = init.to(sample).repeat(sample.shape[0] // init.shape[0], 1, 1, 1)
                mask = redraw.to(sample)
                result = predicted * mask + _prediction(kind, target, sample, a, s) * (1 - mask)
            return (result,) if not return_dict else UNet2DConditionOutput(sample=result)
        return forward

    with replaced_forward(pipe.unet, wrap):
        yield


def _estimate(kind: str, prediction: torch.Tensor, sample: torch.Tensor, a: float, s: float) -> torch.Tensor:
    """The denoised estimate x0 of a UNet prediction of the sample a x0 + s noise."""
    return {"epsilon": lambda: (sample - s * prediction) / a, "v_prediction": lambda: a * sample - s * prediction,
            "sample": lambda: prediction}[kind]()


def _prediction(kind: str, estimate: torch.Tensor, sample: torch.Tensor, a: float, s: float) -> torch.Tensor:
    """The UNet prediction whose estimate is `estimate` (_estimate turned round)."""
    return {"epsilon": lambda: (sample - a * estimate) / s, "v_prediction": lambda: (a * sample - estimate) / s,
            "sample": lambda: estimate}[kind]()


def _softly_blended(pipe, soft: SoftInpainting, predicted: torch.Tensor, sample: torch.Tensor, init: torch.Tensor,
                    redraw: torch.Tensor, kind: str, noise: tuple) -> torch.Tensor:
    """The prediction (both halves under guidance) whose estimate is the guided one soft-blended with `init`."""
    a, s, sigma = noise
    halves = getattr(pipe, "do_classifier_free_guidance", False) and predicted.shape[0] == 2 * init.shape[0]
    if halves:  # (the pipeline's own guidance: u + w (c - u))
        uncond, cond = predicted.chunk(2)
        predicted, sample = uncond + pipe.guidance_scale * (cond - uncond), sample.chunk(2)[0]
    estimate = _estimate(kind, predicted, sample, a, s)
    blended = latent_blend(soft, init.to(estimate), estimate, step_mask(soft, redraw.to(estimate), sigma))
    result = _prediction(kind, blended, sample, a, s)
    return torch.cat([result, result]) if halves else result


def is_inpainting_unet(unet, latent_channels: int) -> bool:
    """A UNet that takes the latents, the mask and the masked image's latents (sd-v1-5-inpainting's 9 channels)."""
    return unet.config.in_channels == 2 * latent_channels + 1 and unet.config.out_channels == latent_channels


@contextlib.contextmanager
def with_image_conditioning(unet, conditioning: torch.Tensor):
    """An inpainting model's UNet, for one draw, given `conditioning` (mask and masked-image latents, one row for
    every image) after the latents on every call, as A1111 concatenates its c_concat."""
    def wrap(original):
        def forward(sample, *args, **kwargs):
            extra = conditioning.to(sample).expand(sample.shape[0], -1, -1, -1)
            return original(torch.cat([sample, extra], dim=1), *args, **kwargs)
        return forward

    with replaced_forward(unet, wrap):
        yield
