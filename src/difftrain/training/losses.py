"""The diffusion objective, shared by every method: noise a clean sample, predict, weight.

Pixel models and latent models differ only in what `x0` is; this module never knows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from difftrain.config import NoiseConfig
from difftrain.models.noise import noise_scheduler


def build_noise_scheduler(noise: NoiseConfig, base: dict | None = None) -> DDPMScheduler:
    """The training noise schedule: the base model's (if any), with the config's `noise:` settings on top."""
    return noise_scheduler(
        base, noise.num_train_timesteps, noise.beta_schedule, noise.prediction_type, noise.zero_terminal_snr
    )


def noisy_inputs(
    x0: torch.Tensor,
    scheduler: DDPMScheduler,
    generator: torch.Generator,
    noise_offset: float = 0.0,
    input_perturbation: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw noise and timesteps from `generator` and return (noisy x, noise, timesteps)."""
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    if noise_offset:
        # A per-channel constant shift teaches the model to change overall brightness
        # (Guttenberg's offset noise), which plain white noise never asks of it.
        offset = torch.randn(x0.shape[:2] + (1,) * (x0.dim() - 2), generator=generator, device=x0.device)
        noise = noise + noise_offset * offset.to(x0.dtype)
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator, device=x0.device
    )
    input_noise = noise
    if input_perturbation:
        # Ning et al. 2023: perturb what the model sees but not what it must predict,
        # which narrows the gap between training inputs and its own sampling errors.
        extra = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        input_noise = noise + input_perturbation * extra
    return scheduler.add_noise(x0, input_noise, timesteps), noise, timesteps


def denoising_loss(
    x0: torch.Tensor,
    predict,
    scheduler: DDPMScheduler,
    noise: NoiseConfig,
    generator: torch.Generator,
    sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The whole objective for one batch: noise `x0`, call `predict(noisy, timesteps)`, weigh the error."""
    noisy, drawn, timesteps = noisy_inputs(x0, scheduler, generator, noise.noise_offset, noise.input_perturbation)
    prediction = predict(noisy, timesteps)
    target = prediction_target(x0, drawn, timesteps, scheduler)
    return diffusion_loss(prediction, target, timesteps, scheduler, noise.snr_gamma, sample_weights)


def prediction_target(
    x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, scheduler: DDPMScheduler
) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    if kind == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {kind!r}")


def snr_weights(timesteps: torch.Tensor, scheduler: DDPMScheduler, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023), expressed for the scheduler's prediction type.

    The paper's weight min(SNR, gamma) is for an x0 loss; an epsilon loss equals the x0 loss
    times SNR, a v loss the x0 loss times SNR + 1, so those divide it out.
    """
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return clipped / snr.clamp(min=1e-8)
    if kind == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def diffusion_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler,
    snr_gamma: float | None = None,
    sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error per sample, optionally min-SNR weighted, averaged over the batch.

    `sample_weights` (summing to the batch's total weight) replace the plain mean: DreamBooth
    weighs its class half by prior_loss_weight this way, whatever the batch size.
    """
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=tuple(range(1, per_sample.dim())))
    if snr_gamma is not None:
        per_sample = per_sample * snr_weights(timesteps, scheduler, snr_gamma).to(per_sample.device)
    if sample_weights is not None:
        return (per_sample * sample_weights.to(per_sample.device)).sum()
    return per_sample.mean()
