"""The work after each backward: gradient clipping and the EMA update, against the libraries they replace."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from difftrain.config import EmaConfig
from difftrain.training.ema import Ema
from difftrain.training.optim import clip_gradients


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(4, 8), torch.nn.Linear(6, 5))
    model[1].weight.requires_grad_(False)  # a frozen weight: not averaged
    return model


def test_ema_follows_diffusers_emamodel_to_the_last_bits():
    model = _model()
    trained = [p for p in model.parameters() if p.requires_grad]
    ours = Ema(model, EmaConfig(decay=0.99, power=0.75))
    theirs = EMAModel(trained, decay=0.99, use_ema_warmup=True, power=0.75, inv_gamma=1.0)
    generator = torch.Generator().manual_seed(1)
    for _ in range(30):
        with torch.no_grad():
            for p in trained:
                p.add_(torch.randn(p.shape, generator=generator))
        ours.step(model)
        theirs.step(trained)
        assert ours.decay == theirs.cur_decay_value and ours.counters()["optimization_step"] == theirs.optimization_step
    assert 0.9 < ours.decay <= 0.99  # the warm-up has run: later steps weigh the average differently from early ones
    for shadow, expected, param in zip(ours.tensors().values(), theirs.shadow_params, trained):
        assert not torch.equal(shadow, param)  # an average, not a copy
        # One rounding where diffusers has two: the last bits only.
        torch.testing.assert_close(shadow, expected, rtol=1e-6, atol=1e-7)
    assert list(ours.tensors()) == ["0.weight", "0.bias", "1.bias", "2.weight", "2.bias"]


@pytest.mark.parametrize("limit", [1000.0, 0.01], ids=["within", "beyond"])
def test_clip_gradients_matches_torch_bit_for_bit(limit):
    mine, reference = _model(), _model()
    inputs = torch.randn(2, 3, 8, 8)
    for model in (mine, reference):
        model(inputs).square().sum().backward()
    trained = [p for p in mine.parameters() if p.requires_grad]
    before = [p.grad.clone() for p in trained]
    versions = [p.grad._version for p in trained]  # bumped by every in-place write, torch's multiply by 1.0 too
    norm = torch.nn.utils.get_total_norm(before)
    assert (norm > limit) == (limit == 0.01)  # the two cases are what their names say

    clip_gradients(Accelerator(cpu=True), trained, limit)
    torch.nn.utils.clip_grad_norm_([p for p in reference.parameters() if p.requires_grad], limit)
    for p, q, original, version in zip(trained, (p for p in reference.parameters() if p.requires_grad), before,
                                       versions):
        assert torch.equal(p.grad, q.grad)
        assert torch.equal(p.grad, original) == (limit == 1000.0)
        assert (p.grad._version == version) == (limit == 1000.0)  # within the limit: not a pass over them
    assert all(q.grad._version > 0 for q in reference.parameters() if q.requires_grad)  # torch's always writes
    assert torch.nn.utils.get_total_norm([p.grad for p in trained]) == pytest.approx(min(limit, norm.item()), rel=1e-5)
