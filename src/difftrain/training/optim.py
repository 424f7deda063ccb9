"""Optimizer and learning-rate schedule from the training config."""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler

from difftrain.config import TrainingConfig


def build_optimizer(parameters: list[torch.nn.Parameter], training: TrainingConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        parameters,
        lr=training.learning_rate,
        betas=(training.adam_beta1, training.adam_beta2),
        eps=training.adam_epsilon,
        weight_decay=training.weight_decay,
    )


def build_lr_schedule(optimizer: torch.optim.Optimizer, training: TrainingConfig):
    # Counted in optimizer steps: the loop calls step() once per update, whatever the
    # accumulation or the number of processes.
    return get_scheduler(
        training.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=training.lr_warmup_steps,
        num_training_steps=training.max_steps,
    )
