"""Every sampler name must land on the data, for every noise schedule and prediction type.

The denoiser is exact (see oracle.py), so a failure here is the scheduler's configuration,
not a model's quality: this is what catches solvers that diverge on the cosine schedule.
"""

import pytest
import torch

from difftrain.config import NoiseConfig
from difftrain.generate import schedulers
from difftrain.generate.sampling import denoise
from difftrain.generate.schedulers import SCHEDULERS, UnknownScheduler, make_scheduler
from difftrain.training.losses import build_noise_scheduler
from oracle import MixtureOracle

MEANS = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


def distance_to_data(name: str, beta_schedule: str, prediction_type: str, steps: int = 20) -> float:
    train_scheduler = build_noise_scheduler(NoiseConfig(beta_schedule=beta_schedule, prediction_type=prediction_type))
    oracle = MixtureOracle(MEANS, train_scheduler.alphas_cumprod, prediction_type, spread=0.1)
    sampler = make_scheduler(name, train_scheduler.config)
    samples = denoise(oracle, sampler, (8, 3, 8, 8), steps, torch.Generator().manual_seed(0))
    rms = ((samples[:, None].double() - MEANS[None].double()) ** 2).flatten(2).mean(-1).sqrt()
    return float(rms.min(dim=1).values.max())  # the worst sample's distance to its nearest mode


def supported(name: str, prediction_type: str) -> bool:
    return not (name == "euler_a" and prediction_type == "sample")


CASES = [
    (name, schedule, kind)
    for name in SCHEDULERS
    for schedule in ("linear", "scaled_linear", "cosine")
    for kind in ("epsilon", "v_prediction", "sample")
    if supported(name, kind)
]


@pytest.mark.parametrize("name, beta_schedule, prediction_type", CASES)
def test_every_sampler_lands_on_the_data(name, beta_schedule, prediction_type):
    distance = distance_to_data(name, beta_schedule, prediction_type)
    # Samples are N(mode, 0.1^2) ideally; a diverged solver is off by 0.5 or more (or NaN).
    assert distance < 0.3, f"{name} on {beta_schedule}/{prediction_type}: worst sample is {distance:.3f} from the data"


def test_without_the_terminal_clamp_heun_diverges_on_cosine(monkeypatch):
    """The check above can fail: undo the sigma_max clamp and Heun overshoots."""
    monkeypatch.setattr(schedulers, "clamped_terminal_betas", lambda config: None)
    assert distance_to_data("heun", "cosine", "epsilon") > 0.4


def test_without_a_begin_index_karras_runs_off_the_schedule(monkeypatch):
    """Repeated timesteps (Karras sigmas on cosine) need the begin index that denoise() sets."""
    import diffusers

    monkeypatch.setattr(schedulers, "clamped_terminal_betas", lambda config: None)
    monkeypatch.setattr(diffusers.DPMSolverMultistepScheduler, "set_begin_index", lambda self, index=0: None)
    with pytest.raises(IndexError):
        distance_to_data("dpm++_2m_karras", "cosine", "epsilon")


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(UnknownScheduler, match="choose one of: ddpm, ddim, euler"):
        make_scheduler("dpm2", build_noise_scheduler(NoiseConfig()).config)


def test_euler_a_refuses_sample_prediction_clearly():
    config = build_noise_scheduler(NoiseConfig(prediction_type="sample")).config
    with pytest.raises(UnknownScheduler, match="euler_a cannot sample a model trained with prediction_type=sample"):
        make_scheduler("euler_a", config)


def test_sampler_keeps_the_models_prediction_type():
    config = build_noise_scheduler(NoiseConfig(prediction_type="v_prediction")).config
    for name in SCHEDULERS:
        assert make_scheduler(name, config).config.prediction_type == "v_prediction"
