"""The training noise schedule, from a base model's scheduler config and the settings on top of it."""

from __future__ import annotations

from diffusers import DDPMScheduler

from difftrain.sampling.schedulers import plain_config

BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
PIXEL_DEFAULTS = {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "epsilon"}
# The keys of a scheduler config that say how a model was trained (the rest say how to sample).
TRAINED_KEYS = ("num_train_timesteps", "beta_schedule", "prediction_type", "rescale_betas_zero_snr", "timestep_spacing")


def noise_scheduler(
    base: dict | None = None,
    num_train_timesteps: int | None = None,
    beta_schedule: str | None = None,
    prediction_type: str | None = None,
    zero_terminal_snr: bool = False,
) -> DDPMScheduler:
    """The base model's schedule (pixel models: 1000 linear epsilon steps), with each given setting on top.

    Whatever is set here is also written into the saved model's scheduler config, so
    whoever loads the model samples the way it was trained.
    """
    settings = plain_config(base or PIXEL_DEFAULTS)
    if num_train_timesteps is not None:
        settings["num_train_timesteps"] = num_train_timesteps
    if beta_schedule is not None:
        settings["beta_schedule"] = BETA_SCHEDULES[beta_schedule]
        settings.pop("trained_betas", None)
    if prediction_type is not None:
        settings["prediction_type"] = prediction_type
    if zero_terminal_snr:
        settings["rescale_betas_zero_snr"] = True
        settings["timestep_spacing"] = "trailing"  # so sampling starts at the pure-noise step
    return DDPMScheduler.from_config(settings)


def trained_settings(scheduler_config) -> dict:
    """The part of a scheduler config a model was trained with, for the manifest."""
    return {key: scheduler_config[key] for key in TRAINED_KEYS if key in scheduler_config}
