"""Exponential moving average of the trained weights, on top of diffusers' EMAModel.

We keep diffusers' update rule (decay warm-up included) and add what checkpoints need:
the shadow weights by parameter name as safetensors, the counters as plain JSON.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from diffusers.training_utils import EMAModel

from difftrain.config import EmaConfig
from difftrain.training.sharding import local, plain_name


class Ema:
    def __init__(self, model: torch.nn.Module, config: EmaConfig):
        self.names = [plain_name(name) for name, p in model.named_parameters() if p.requires_grad]
        self.inner = EMAModel(
            [p for p in model.parameters() if p.requires_grad],
            decay=config.decay,
            use_ema_warmup=config.warmup,
            power=config.power,
            inv_gamma=1.0,
        )

    def step(self, model: torch.nn.Module) -> None:
        self.inner.step([p for p in model.parameters() if p.requires_grad])

    @property
    def decay(self) -> float:
        return self.inner.cur_decay_value if self.inner.cur_decay_value is not None else 0.0

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in zip(self.names, self.inner.shadow_params)}

    def counters(self) -> dict:
        return {"optimization_step": self.inner.optimization_step}

    def load(self, tensors: dict[str, torch.Tensor], counters: dict) -> None:
        for name, shadow in zip(self.names, self.inner.shadow_params):
            local(shadow.data).copy_(tensors[name])
        self.inner.optimization_step = counters["optimization_step"]

    @contextmanager
    def swapped_into(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Run `model` with the EMA weights for the duration, then put the trained ones back."""
        params = [p for p in model.parameters() if p.requires_grad]
        self.inner.store(params)
        self.inner.copy_to(params)
        try:
            yield model
        finally:
            self.inner.restore(params)
