"""Sampling schedulers by short name, built from the noise schedule a model was trained with.

Each entry is a diffusers scheduler class plus the settings that make it the sampler
users know by that name. `make_scheduler` starts from the model's own scheduler config
(betas, prediction type, timestep count), so a sampler can never disagree with training.
diffusers is imported only when a scheduler is built, so validating a config stays instant.
"""

from __future__ import annotations

import inspect
import math

from difftrain.errors import DifftrainError

# name -> (diffusers class name, settings)
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
}


# Lowest log-SNR / 2 a sampler starts from: lambda = -5.1 is sigma_max = e^5.1 ~ 164, the
# clip diffusers recommends for the cosine schedule.
LAMBDA_MIN = -5.1


class UnknownScheduler(DifftrainError):
    pass


def clamped_terminal_betas(base_config: dict) -> list[float] | None:
    """Betas whose cumulative alpha never falls below the sigma_max the samplers can handle.

    Cosine betas end at 0.999, so the last timestep's sigma is ~20,000. Heun's second-order
    correction across that first interval overshoots by orders of magnitude, and Karras
    sigmas spend most of their steps above sigma 1,000 where nothing happens. Capping sigma
    changes nothing a model can see (SNR 4e-5 and 2e-9 are both pure noise). None when the
    schedule never goes that far (linear, scaled_linear).
    """
    import diffusers
    import torch

    reference = diffusers.DDPMScheduler.from_config(base_config)
    alphas_cumprod = reference.alphas_cumprod.double()
    floor = 1.0 / (1.0 + math.exp(-2 * LAMBDA_MIN))
    if float(alphas_cumprod.min()) >= floor:
        return None
    clamped = alphas_cumprod.clamp(min=floor)
    previous = torch.cat([torch.ones(1, dtype=torch.float64), clamped[:-1]])
    return (1 - clamped / previous).tolist()


def scheduler_settings(name: str, base_config: dict) -> tuple[type, dict]:
    import diffusers

    if name not in SCHEDULERS:
        raise UnknownScheduler(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    class_name, settings = SCHEDULERS[name]
    if class_name == "EulerAncestralDiscreteScheduler" and base_config.get("prediction_type") == "sample":
        raise UnknownScheduler(
            f"{name} cannot sample a model trained with prediction_type=sample (diffusers does not implement it); "
            "use euler, ddpm or dpm++_2m"
        )
    settings = dict(settings)
    if class_name != "DDPMScheduler" and (betas := clamped_terminal_betas(base_config)) is not None:
        settings["trained_betas"] = betas
    return getattr(diffusers, class_name), settings


def make_scheduler(name: str, base_config: dict):
    cls, settings = scheduler_settings(name, dict(base_config))
    accepted = set(inspect.signature(cls.__init__).parameters)
    return cls.from_config(dict(base_config), **{k: v for k, v in settings.items() if k in accepted})
