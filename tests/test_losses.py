import pytest
import torch

from difftrain.config import NoiseConfig
from difftrain.training.losses import (
    build_noise_scheduler,
    diffusion_loss,
    noisy_inputs,
    prediction_target,
    snr_weights,
)


def scheduler(**kw):
    return build_noise_scheduler(NoiseConfig(**kw))


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_noisy_inputs_follow_the_forward_process(schedule):
    s = scheduler(beta_schedule=schedule)
    x0 = torch.rand(6, 3, 4, 4) * 2 - 1
    noisy, noise, t = noisy_inputs(x0, s, torch.Generator().manual_seed(0))
    ab = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, ab.sqrt() * x0 + (1 - ab).sqrt() * noise)
    again = noisy_inputs(x0, s, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], noisy)  # all randomness from the generator


def test_targets_per_prediction_type():
    x0, noise = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    t = torch.tensor([0, 10, 500, 999])
    assert torch.equal(prediction_target(x0, noise, t, scheduler()), noise)
    assert torch.equal(prediction_target(x0, noise, t, scheduler(prediction_type="sample")), x0)
    s = scheduler(prediction_type="v_prediction")
    ab = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(prediction_target(x0, noise, t, s), ab.sqrt() * noise - (1 - ab).sqrt() * x0)


def test_min_snr_weights_match_the_paper():
    t = torch.tensor([5, 300, 900])
    for kind, expected in [
        ("epsilon", lambda snr: torch.clamp(snr, max=5) / snr),
        ("v_prediction", lambda snr: torch.clamp(snr, max=5) / (snr + 1)),
        ("sample", lambda snr: torch.clamp(snr, max=5)),
    ]:
        s = scheduler(prediction_type=kind)
        ab = s.alphas_cumprod[t]
        snr = ab / (1 - ab)
        torch.testing.assert_close(snr_weights(t, s, 5.0), expected(snr))
    w = snr_weights(t, scheduler(), 5.0)
    assert w[0] < 1e-2 and w[-1] == 1  # low-noise steps down-weighted, high-noise untouched


def test_loss_is_weighted_mse():
    prediction, target = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    s = scheduler()
    t = torch.tensor([5, 900])
    assert diffusion_loss(prediction, target, t, s).item() == pytest.approx(1.0)
    weighted = diffusion_loss(prediction, target, t, s, snr_gamma=5.0)
    assert weighted.item() == pytest.approx(snr_weights(t, s, 5.0).mean().item())


def test_noise_offset_shifts_channel_means():
    x0 = torch.zeros(256, 3, 8, 8)
    s = scheduler()
    _, plain, _ = noisy_inputs(x0, s, torch.Generator().manual_seed(0))
    _, offset, _ = noisy_inputs(x0, s, torch.Generator().manual_seed(0), noise_offset=0.5)
    assert plain.mean(dim=(2, 3)).std() < 0.2
    assert offset.mean(dim=(2, 3)).std() > 0.35


def test_zero_terminal_snr_makes_the_last_step_pure_noise_and_needs_v_prediction():
    from difftrain.config import ConfigError, parse_config

    s = build_noise_scheduler(NoiseConfig(zero_terminal_snr=True, prediction_type="v_prediction"))
    assert float(s.alphas_cumprod[-1]) < 1e-6 and s.config.timestep_spacing == "trailing"
    assert float(build_noise_scheduler(NoiseConfig()).alphas_cumprod[-1]) > 1e-5
    with pytest.raises(ConfigError, match="needs v_prediction|prediction_type: v_prediction"):
        parse_config({"data": {"path": "x"}, "noise": {"zero_terminal_snr": True}})


def test_base_model_schedule_is_kept_and_config_overrides_it():
    base = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "beta_end": 0.012, "prediction_type": "epsilon"}
    kept = build_noise_scheduler(NoiseConfig(), base)
    assert kept.config.beta_schedule == "scaled_linear" and kept.config.beta_end == 0.012
    changed = build_noise_scheduler(NoiseConfig(prediction_type="v_prediction"), base)
    assert changed.config.prediction_type == "v_prediction" and changed.config.beta_end == 0.012


def test_input_perturbation_changes_the_input_but_not_the_target():
    s = scheduler()
    x0 = torch.zeros(4, 3, 8, 8)
    plain = noisy_inputs(x0, s, torch.Generator().manual_seed(0))
    perturbed = noisy_inputs(x0, s, torch.Generator().manual_seed(0), input_perturbation=0.1)
    assert torch.equal(plain[1], perturbed[1]) and torch.equal(plain[2], perturbed[2])
    assert not torch.equal(plain[0], perturbed[0])
