"""Exponential moving average of the trained weights, on top of diffusers' EMAModel.

We keep diffusers' decay schedule (warm-up included) and its state, and add what checkpoints
need: the shadow weights by parameter name as safetensors, the counters as plain JSON. The update
itself is ours (`Ema.step`): one fused lerp per tensor instead of diffusers' three passes.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from diffusers.training_utils import EMAModel

from difftrain.config import EmaConfig
from difftrain.training.sharding import local, plain_name


def trained_parameters(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


class Ema:
    """`held` gives the trained tensors this process holds, in parameter order: the parameters themselves,
    or under DeepSpeed ZeRO-3 this process's partition of each (the EMA is then partitioned too)."""

    def __init__(self, model: torch.nn.Module, config: EmaConfig,
                 held: Callable[[torch.nn.Module], list[torch.Tensor]] = trained_parameters):
        self.held = held
        self.names = [plain_name(name) for name, p in model.named_parameters() if p.requires_grad]
        self.inner = EMAModel(
            held(model),
            decay=config.decay,
            use_ema_warmup=config.warmup,
            power=config.power,
            inv_gamma=1.0,
        )

    @torch.no_grad()
    def step(self, model: torch.nn.Module) -> None:
        """diffusers' EMAModel.step, with its update `shadow -= (1 - decay) * (shadow - param)` as one
        lerp per tensor: diffusers makes three passes over every weight (sub, mul, sub_) and two
        temporaries, which on SD 1.5's UNet at a quarter width took 27 ms a step on this project's 2-core
        CPU against 15 ms (`benchmarks/optimizer_step.py`). lerp rounds once where diffusers rounds
        twice, so the shadow weights may differ from diffusers' in the last bit."""
        inner = self.inner
        inner.optimization_step += 1
        inner.cur_decay_value = inner.get_decay(inner.optimization_step)
        torch._foreach_lerp_(inner.shadow_params, self.held(model), 1 - inner.cur_decay_value)

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
        params = self.held(model)
        self.inner.store(params)
        self.inner.copy_to(params)
        try:
            yield model
        finally:
            self.inner.restore(params)
