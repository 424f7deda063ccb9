"""The order in which records are read: seeded, sharded across processes, resumable.

An epoch is a permutation drawn from (seed, epoch) alone, so any process can rebuild it
at any time; a position is just (epoch, batch). That is what makes resume exact: the
trainer saves the position of the next batch and the sampler starts there, with no
state hidden in iterators or worker processes.

Large data sets live in shards (tar files, gz parts) that are cheap to read front to back
and expensive to seek in. Given `shard_sizes`, an epoch is shard-blocked: the shards in a
seeded order, cut into groups of `shard_mixing` consecutive shards, each group's records
shuffled among themselves (with the default of 1, each shard's). A batch then draws from
the few shards of one group, which a reader keeps open together. That order is computed
lazily from O(num_shards) numbers plus one group's permutation, so a sampler over a
billion records costs no more memory than one over a thousand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

# Each purpose draws from its own stream, so e.g. the shard order of epoch 3 never equals
# the record order inside shard 3 of some other epoch by construction.
SHARD_ORDER, SHARD_RECORDS, BUCKET_RECORDS, BUCKET_BATCHES, SHARD_MIXING = 1, 2, 3, 4, 5


def seeded_rng(tag: int, seed: int, *key: int) -> np.random.Generator:
    # Fixed-width words: SeedSequence pads short entropy with zeros, so [1, 2] and
    # [1, 2, 0] would collide; tag first and 64-bit words keep every key distinct.
    words = np.array([tag, seed % 2**64, *key], dtype=np.uint64)
    return np.random.default_rng(np.random.SeedSequence(words))


@dataclass(frozen=True)
class Position:
    epoch: int = 0
    batch: int = 0


def batch_keys(epoch: int, batch: int, indices: Sequence[int]) -> list[tuple[int, ...]]:
    """The data set's keys for one batch: (epoch, batch, index), and a copy number after a record that repeats
    in it (a bucket smaller than a batch is filled out with its own records), so each copy draws its own
    flip, crop and caption rather than being the same view again."""
    keys, seen = [], {}
    for index in map(int, indices):
        copy = seen[index] = seen.get(index, -1) + 1
        keys.append((epoch, batch, index) if copy == 0 else (epoch, batch, index, copy))
    return keys


def copy_suffix(copy: Sequence[int]) -> str:
    """What a key's copy number (batch_keys) adds to an item's seed: nothing for a first copy."""
    return "".join(f"/{c}" for c in copy)


class ResumableBatches:
    """The iteration contract shared by the samplers: `start`, `__iter__`, `position_after`.

    A subclass sets `batches_per_epoch` and says how to read one epoch (`_epoch_reader`).
    """

    batches_per_epoch: int
    world_size: int  # processes sharing each epoch's order
    start: Position
    # Which rule drew the order; a checkpoint keeps it, so a resume whose order rule changed starts a new epoch
    # rather than continuing mid-epoch into another order (records repeated or missed). Bump when a rule changes.
    order_rule: int = 1

    def _epoch_reader(self, epoch: int) -> Callable[[int], Sequence[int]]:
        """A function batch -> this rank's record indices, for one epoch."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[list[tuple[int, ...]]]:
        epoch, batch = self.start.epoch, self.start.batch
        while True:
            read = self._epoch_reader(epoch)
            for b in range(batch, self.batches_per_epoch):
                yield batch_keys(epoch, b, read(b))
            epoch, batch = epoch + 1, 0

    def position_for_world(self, position: Position, written_by: int) -> Position:
        """`position`, reached by `written_by` processes, for this sampler's number: the same point of the epoch.

        Every sampler here cuts one global order an epoch and gives process r every world_size-th piece
        of it, so after `batch` batches the processes together have read batch x world_size batches' worth;
        this count of processes goes on from there, rounded down so no record is skipped (a few may be
        read twice).
        """
        batch = position.batch * written_by // self.world_size
        return Position(position.epoch, batch) if batch < self.batches_per_epoch else Position(position.epoch + 1, 0)

    def position_after(self, epoch: int, batch: int) -> Position:
        """Where reading resumes once batch `batch` of `epoch` has been consumed."""
        if batch + 1 < self.batches_per_epoch:
            return Position(epoch, batch + 1)
        return Position(epoch + 1, 0)


def check_shard_sizes(shard_sizes: Sequence[int], num_records: int) -> np.ndarray:
    sizes = np.asarray(shard_sizes, dtype=np.int64)
    if sizes.ndim != 1 or len(sizes) == 0 or (sizes < 0).any():
        raise ValueError("shard_sizes must be a non-empty list of record counts >= 0")
    if int(sizes.sum()) != num_records:
        raise ValueError(f"shard_sizes add up to {int(sizes.sum())} records, the data set has {num_records}")
    return sizes


def check_shard_mixing(mixing: int) -> int:
    if isinstance(mixing, bool) or not isinstance(mixing, (int, np.integer)) or mixing < 1:
        raise ValueError(f"shard_mixing must be a whole number of shards >= 1, got {mixing!r}")
    return int(mixing)


class ShardBlockedOrder:
    """One epoch's order over sharded records, one group's permutation in memory at a time.

    Record i lives in shard bisect_right(cumsum(sizes), i). The seeded shard order is cut
    into groups of `mixing` consecutive slots (the last may hold fewer); position p of the
    epoch is in the group whose start, a cumsum over the permuted sizes taken every
    `mixing` slots, is the last one <= p. Within a group, each shard's records follow a
    permutation seeded by (seed, epoch, shard), and a seeded interleaving (seed, epoch,
    group) says which shard each position takes its next record from: together a uniform
    permutation of the group's records, and with mixing = 1 exactly the shard's own order.
    """

    def __init__(self, sizes: np.ndarray, seed: int, epoch: int, mixing: int = 1):
        self.sizes, self.seed, self.epoch, self.mixing = sizes, seed, epoch, mixing
        self.first_record = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.shard_order = seeded_rng(SHARD_ORDER, seed, epoch).permutation(len(sizes))
        slot_start = np.concatenate([[0], np.cumsum(sizes[self.shard_order])])
        self.group_start = slot_start[np.r_[np.arange(0, len(sizes), mixing), len(sizes)]]
        self._cached: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.int64))

    def shard_records(self, shard: int) -> np.ndarray:
        """The record indices of `shard`, in this epoch's order."""
        permutation = seeded_rng(SHARD_RECORDS, self.seed, self.epoch, shard).permutation(int(self.sizes[shard]))
        return self.first_record[shard] + permutation

    def group_records(self, group: int) -> np.ndarray:
        """The record indices of the shards in `group`, interleaved in this epoch's order."""
        if self._cached[0] != group:
            shards = self.shard_order[group * self.mixing : (group + 1) * self.mixing]
            # Each shard's label once per record, shuffled: a uniform interleaving of the shards.
            labels = np.repeat(np.arange(len(shards)), self.sizes[shards])
            labels = seeded_rng(SHARD_MIXING, self.seed, self.epoch, group).permutation(labels)
            records = np.empty(len(labels), dtype=np.int64)
            # A stable sort lists each shard's positions in order, so its k-th position gets its k-th record.
            records[np.argsort(labels, kind="stable")] = np.concatenate([self.shard_records(int(s)) for s in shards])
            self._cached = (group, records)
        return self._cached[1]

    def at(self, positions: np.ndarray) -> np.ndarray:
        """The records at `positions` (each in [0, num_records)) of the epoch."""
        # side="right" skips empty groups: each starts where the next one does.
        groups = np.searchsorted(self.group_start, positions, side="right") - 1
        records = np.empty(len(positions), dtype=np.int64)
        for group in np.unique(groups):
            where = groups == group
            records[where] = self.group_records(int(group))[positions[where] - self.group_start[group]]
        return records

    def all(self) -> np.ndarray:
        """The whole epoch at once: O(num_records), for callers that need it anyway."""
        return np.concatenate([self.group_records(group) for group in range(len(self.group_start) - 1)])


class EpochBatchSampler(ResumableBatches):
    """Yields batches of `(epoch, batch, record_index)` keys forever, from `start` on.

    Each epoch's permutation is padded by wrapping so every process gets the same number
    of full batches (no record is dropped; a few repeat), then rank r takes every
    `world_size`-th index. With `shard_sizes` the permutation is shard-blocked, over groups
    of `shard_mixing` shards (see the module docstring), and never held in memory whole.
    """

    def __init__(
        self,
        num_records: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shard_sizes: Sequence[int] | None = None,
        shard_mixing: int = 1,
    ):
        if num_records < 1:
            raise ValueError("the sampler needs at least one record")
        self.num_records = num_records
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shard_sizes = None if shard_sizes is None else check_shard_sizes(shard_sizes, num_records)
        self.shard_mixing = check_shard_mixing(shard_mixing)
        self.batches_per_epoch = math.ceil(num_records / (batch_size * world_size))
        self.start = Position()

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's indices for `epoch`, in order (the whole epoch: O(num_records))."""
        if self.shard_sizes is not None:
            read = self._epoch_reader(epoch)
            return [int(i) for b in range(self.batches_per_epoch) for i in read(b)]
        return self._permuted(epoch).tolist()

    def _permuted(self, epoch: int) -> np.ndarray:
        """This rank's share of the epoch's permutation, as an array: 8 bytes a record where lists of Python ints
        took ~36 and a padded copy (`benchmarks/scale.py --only sampler`, 20M records, 2 processes: 229 MiB
        at the peak against 915, x2.1 faster)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_records, generator=generator).numpy()
        total = self.batches_per_epoch * self.batch_size * self.world_size
        mine = order[self.rank :: self.world_size]
        # The epoch is padded to `total` by repeating the order from its start (more than once for a data set
        # smaller than a step's batches): this rank's positions past the order, wrapped.
        past = np.arange(self.rank + len(mine) * self.world_size, total, self.world_size)
        return np.concatenate([mine, order[past % self.num_records]])

    def _epoch_reader(self, epoch: int) -> Callable[[int], Sequence[int]]:
        size = self.batch_size
        if self.shard_sizes is None:
            indices = self._permuted(epoch)
            return lambda b: indices[b * size : (b + 1) * size]
        order = ShardBlockedOrder(self.shard_sizes, self.seed, epoch, self.shard_mixing)
        # This rank's k-th index is the padded epoch's position k * world + rank, and the
        # padding wraps, so position p reads record order[p mod num_records].
        within = np.arange(size, dtype=np.int64)
        return lambda b: order.at(((b * size + within) * self.world_size + self.rank) % self.num_records)
