"""Train a config with noise drawn per record instead of per process, to compare process counts.

difftrain draws each process's noise and timesteps from that process's own generator, so
2 processes x batch B and 1 process x batch 2B see the same records but different noise,
and their weights differ by design. Keyed by (epoch, record) instead, the noise no longer
depends on which process reads a record, and the two layouts must agree up to float
rounding: that is what this probe isolates (the sampler and the gradient averaging).

Run in-process (`train_with_record_noise`) or as a script under `accelerate launch`.
"""

from __future__ import annotations

import sys
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from difftrain.training import losses

RECORD_NOISE_SEED = 12_345


class _LastKeys:
    """The (epoch, batch, index) keys of the batch being read now."""

    keys: list[tuple[int, int, int]] = []


def _recording(sampler, last: _LastKeys) -> None:
    # The loader reads the sampler lazily (no workers, no prefetch), so the keys it yielded
    # last are those of the batch the loss is computing.
    base = type(sampler)

    def __iter__(self):
        for keys in base.__iter__(self):
            last.keys = keys
            yield keys

    sampler.__class__ = type(f"Recording{base.__name__}", (base,), {"__iter__": __iter__})


def _record_noise(last: _LastKeys):
    def noisy_inputs(x0, scheduler, generator, noise_offset=0.0, input_perturbation=0.0):
        assert not noise_offset and not input_perturbation, "the probe draws plain noise only"
        assert len(last.keys) == x0.shape[0], "the batch is not the one the sampler yielded last"
        noise, timesteps = [], []
        for epoch, _, index in last.keys:
            record = torch.Generator().manual_seed(RECORD_NOISE_SEED + epoch * 1_000_003 + index)
            noise.append(torch.randn(x0.shape[1:], generator=record))
            timesteps.append(torch.randint(0, scheduler.config.num_train_timesteps, (), generator=record))
        noise = torch.stack(noise).to(x0.device, x0.dtype)
        timesteps = torch.stack(timesteps).to(x0.device)
        return scheduler.add_noise(x0, noise, timesteps), noise, timesteps

    return noisy_inputs


@contextmanager
def _patched_noise(last: _LastKeys) -> Iterator[None]:
    original = losses.noisy_inputs
    losses.noisy_inputs = _record_noise(last)
    try:
        yield
    finally:
        losses.noisy_inputs = original


def train_with_record_noise(config_path: str | Path) -> None:
    from difftrain.config import load_config
    from difftrain.training.trainer import Trainer

    trainer = Trainer(load_config(config_path), progress=False)
    last = _LastKeys()
    _recording(trainer.sampler, last)
    with _patched_noise(last), _wrappers_gone_before_the_process_group(trainer):
        trainer.run()


@contextmanager
def _wrappers_gone_before_the_process_group(trainer) -> Iterator[None]:
    """Under DDP, no wrapper may outlive the process group: its reducer would destroy the group while
    holding the GIL, which can deadlock with gloo's worker threads at exit (Trainer._end_processes)."""
    from torch.nn.parallel import DistributedDataParallel

    wrappers = [weakref.ref(m) for m in trainer.wrapped.values() if isinstance(m, DistributedDataParallel)]
    destroy, alive = torch.distributed.destroy_process_group, []

    def checked(*args, **kwargs):
        alive.append(sum(wrapper() is not None for wrapper in wrappers))
        return destroy(*args, **kwargs)

    torch.distributed.destroy_process_group = checked
    try:
        yield
    finally:
        torch.distributed.destroy_process_group = destroy
    if wrappers:
        assert alive == [0], f"DDP wrappers alive when the process group was destroyed: {alive}"


if __name__ == "__main__":
    train_with_record_noise(sys.argv[1])
