"""The order in which records are read: seeded, sharded across processes, resumable.

An epoch is a permutation drawn from (seed, epoch) alone, so any process can rebuild it
at any time; a position is just (epoch, batch). That is what makes resume exact: the
trainer saves the position of the next batch and the sampler starts there, with no
state hidden in iterators or worker processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class Position:
    epoch: int = 0
    batch: int = 0


class EpochBatchSampler:
    """Yields batches of `(epoch, batch, record_index)` keys forever, from `start` on.

    Each epoch's permutation is padded by wrapping so every process gets the same number
    of full batches (no record is dropped; a few repeat), then rank r takes every
    `world_size`-th index.
    """

    def __init__(self, num_records: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if num_records < 1:
            raise ValueError("the sampler needs at least one record")
        self.num_records = num_records
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.batches_per_epoch = math.ceil(num_records / (batch_size * world_size))
        self.start = Position()

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's indices for `epoch`, in order."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_records, generator=generator).tolist()
        total = self.batches_per_epoch * self.batch_size * self.world_size
        order = (order * math.ceil(total / len(order)))[:total]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        epoch, batch = self.start.epoch, self.start.batch
        while True:
            indices = self.epoch_indices(epoch)
            for b in range(batch, self.batches_per_epoch):
                chunk = indices[b * self.batch_size : (b + 1) * self.batch_size]
                yield [(epoch, b, index) for index in chunk]
            epoch, batch = epoch + 1, 0

    def position_after(self, epoch: int, batch: int) -> Position:
        """Where reading resumes once batch `batch` of `epoch` has been consumed."""
        if batch + 1 < self.batches_per_epoch:
            return Position(epoch, batch + 1)
        return Position(epoch + 1, 0)
