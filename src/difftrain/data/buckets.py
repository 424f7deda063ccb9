"""Aspect-ratio buckets: train on wide and tall images without cropping them square.

As in NovelAI's scheme (and kohya-ss's sd-scripts): a fixed set of (width, height) sizes
of about the same pixel count, each image goes to the size whose shape is closest to its
own, and every batch is drawn from a single bucket so its tensors stack.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from difftrain.data.sampler import (
    BUCKET_BATCHES,
    BUCKET_RECORDS,
    Position,
    ResumableBatches,
    ShardBlockedOrder,
    check_shard_mixing,
    check_shard_sizes,
    seeded_rng,
)


def make_buckets(
    resolution: int,
    step: int = 64,
    min_side: int | None = None,
    max_side: int | None = None,
    max_ratio: float = 2.0,
) -> list[tuple[int, int]]:
    """(width, height) sizes with area <= resolution**2, both sides multiples of `step`.

    For each width, the tallest height that fits the area (so each shape is as large as it
    can be), kept when both sides lie in [min_side, max_side] (default: step, unbounded)
    and width/height in [1/max_ratio, max_ratio]; then the same shapes turned on their
    side, so the set is symmetric. (resolution, resolution) is always one of them.
    """
    if resolution < step or resolution % step:
        raise ValueError(f"resolution {resolution} must be a multiple of step {step}")
    if max_ratio < 1:
        raise ValueError(f"max_ratio must be >= 1, got {max_ratio}")
    low = step if min_side is None else math.ceil(min_side / step) * step
    area = resolution * resolution
    # Unbounded, a side is still limited by the area and the other side's minimum.
    high = (area // low if max_side is None else max_side) // step * step
    if not low <= resolution <= high:
        raise ValueError(f"resolution {resolution} lies outside [min_side, max_side] = [{low}, {high}]")
    buckets = set()
    for width in range(low, high + 1, step):
        height = min(area // width // step * step, high)
        if height >= low and 1 / max_ratio <= width / height <= max_ratio:
            buckets |= {(width, height), (height, width)}
    return sorted(buckets)


def assign_buckets(sizes: np.ndarray, buckets: Sequence[tuple[int, int]]) -> np.ndarray:
    """The bucket index for each (width, height) in `sizes`, shape (N, 2).

    Rule: the bucket whose aspect ratio is nearest the image's in log space, i.e. the
    smallest |log(w/h) - log(bw/bh)|, so 2:1 and 1:2 are equally far from square. On a tie
    (within 1e-9) the squarer bucket wins, since it crops less of the image's long side; if
    still tied (a bucket list without a square, a square image), the lower index wins. An
    image with a side <= 0 has no shape: ValueError, naming how many there are.
    """
    sizes = np.asarray(sizes)
    if sizes.ndim != 2 or sizes.shape[1] != 2:
        raise ValueError(f"sizes must have shape (N, 2), got {sizes.shape}")
    invalid = int((sizes <= 0).any(axis=1).sum())
    if invalid:
        raise ValueError(f"{invalid} of {len(sizes)} images have a side <= 0 (unreadable or empty); drop them first")
    shapes = np.asarray(buckets, dtype=np.float64).reshape(-1, 2)
    if len(shapes) == 0 or (shapes <= 0).any():
        raise ValueError("buckets must be a non-empty list of positive (width, height)")
    bucket_log = np.log(shapes[:, 0]) - np.log(shapes[:, 1])
    if len(np.unique(bucket_log)) != len(bucket_log):
        raise ValueError("two buckets have the same aspect ratio; keep one of each shape")

    # The nearest ratio is one of the two neighbours in sorted order, which keeps this
    # O(N log K) in time and O(N) in memory, not an (N, K) distance matrix.
    order = np.argsort(bucket_log, kind="stable")
    sorted_log = bucket_log[order]
    image_log = np.log(sizes[:, 0].astype(np.float64)) - np.log(sizes[:, 1].astype(np.float64))
    upper = np.searchsorted(sorted_log, image_log).clip(0, len(order) - 1)
    lower = (upper - 1).clip(0, len(order) - 1)
    d_lower, d_upper = np.abs(image_log - sorted_log[lower]), np.abs(sorted_log[upper] - image_log)
    tie = np.abs(d_lower - d_upper) <= 1e-9
    square_lower, square_upper = np.abs(sorted_log[lower]), np.abs(sorted_log[upper])
    upper_wins_tie = (square_upper < square_lower) | ((square_upper == square_lower) & (order[upper] < order[lower]))
    take_upper = np.where(tie, upper_wins_tie, d_upper < d_lower)
    return order[np.where(take_upper, upper, lower)]


def no_upscale_buckets(sizes: np.ndarray, resolution: int, step: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """kohya's `bucket_no_upscale`: (the bucket index of each (width, height) in `sizes`, the buckets).

    Each image gets a bucket of its own size: within resolution**2 pixels it keeps its scale, and its
    bucket is its size with each side floored to a multiple of `step`; a larger image is first scaled to
    that area at its own aspect, rounded to whole steps along the side that keeps the aspect closer
    (kohya's arithmetic, its rounding included), then floored the same way. A side shorter than `step`
    gets `step`: the one case that enlarges, and where that takes a bucket past the pixel budget, its
    long side is cut to fit it (kohya's is not; elsewhere its rounding's own small excess is kept). The
    image is then scaled down to cover its bucket and
    cropped, as for any bucket (kohya crops a small image without scaling it).
    """
    wide = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    width, height = wide[:, 0], wide[:, 1]
    aspect, area = width / height, float(resolution) ** 2

    def down(x):  # to a multiple of step, at least one step
        return np.maximum(x - x % step, step)

    def steps(x):  # kohya's round_to_steps: to the nearest pixel, then down to a multiple of step
        return down(np.floor(x + 0.5))

    scaled_width = np.sqrt(area * aspect)
    by_width = steps(scaled_width)  # rounded along the width, the height following
    by_height = steps(area / scaled_width)
    width_first = (np.abs(by_width / steps(by_width / aspect) - aspect)
                   < np.abs(steps(by_height * aspect) / by_height - aspect))
    large = width * height > area
    resized_width = np.where(large, np.where(width_first, by_width, np.floor(by_height * aspect + 0.5)), width)
    resized_height = np.where(large, np.where(width_first, np.floor(by_width / aspect + 0.5), by_height), height)
    own = np.stack([down(resized_width), down(resized_height)], axis=1).astype(np.int64)
    # A short side raised to one step can take a long, thin image's bucket far past the pixel budget (20000 x 50
    # at 512 px: 25600 x 64, x6.25): its long side is cut to fit the budget, and the image cropped to it.
    # Only there: kohya's own rounding may pass the budget by a fraction of a step, and stays as kohya has it.
    fits = np.maximum(int(area) // own.min(axis=1) // step * step, step)
    raised = np.where(large, np.minimum(scaled_width, area / scaled_width), np.minimum(width, height)) < step
    rows, long_side = np.arange(len(own)), (own[:, 1] > own[:, 0]).astype(np.int64)
    own[rows, long_side] = np.where(raised, np.minimum(own[rows, long_side], fits), own[rows, long_side])
    buckets, ids = np.unique(own, axis=0, return_inverse=True)
    return ids.reshape(-1), [(int(w), int(h)) for w, h in buckets]


class BucketBatchSampler(ResumableBatches):
    """Yields batches of `(epoch, batch, record_index)` keys, each batch from one bucket.

    The same contract as EpochBatchSampler (`start`, `position_after`,
    `batches_per_epoch`). Per epoch, without `shard_sizes`: the records in a seeded
    permutation; each bucket's records in that order, cut into batches, the last one
    filled by wrapping around the bucket's own records (so no record is dropped and every
    batch is full); the list of batches shuffled. With `shard_sizes` the epoch walks the
    shard-blocked order group by group instead (`_sharded_batches`), so reading stays
    front to back through the shards. Either way the batches are padded by wrapping to a
    multiple of `world_size`, and rank r takes batches r, r + world_size, ...

    `buckets` (the list `bucket_ids` indexes, e.g. from make_buckets) is optional; with it,
    `target_size(index)` tells the dataset what (width, height) to make a record.
    """

    def __init__(
        self,
        bucket_ids: np.ndarray,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shard_sizes: Sequence[int] | None = None,
        buckets: Sequence[tuple[int, int]] | None = None,
        shard_mixing: int = 1,
    ):
        bucket_ids = np.asarray(bucket_ids)
        if bucket_ids.ndim != 1 or len(bucket_ids) == 0:
            raise ValueError("the sampler needs a non-empty 1-D array of bucket ids")
        if not np.issubdtype(bucket_ids.dtype, np.integer) or bucket_ids.min() < 0:
            raise ValueError("bucket ids must be integers >= 0")
        self.bucket_ids = bucket_ids.astype(np.int64)
        self.num_records = len(bucket_ids)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shard_sizes = None if shard_sizes is None else check_shard_sizes(shard_sizes, self.num_records)
        self.shard_mixing = check_shard_mixing(shard_mixing)
        if self.shard_sizes is not None:
            self.order_rule = 2  # batched group by group since 2026-12-05; one shuffle of all batches before
        self.bucket_sizes = None if buckets is None else np.asarray(buckets, dtype=np.int64).reshape(-1, 2)
        if self.bucket_sizes is not None and self.bucket_ids.max() >= len(self.bucket_sizes):
            raise ValueError(f"bucket id {self.bucket_ids.max()} but only {len(self.bucket_sizes)} buckets")
        # Records per bucket never change, so neither does the number of batches.
        self.bucket_counts = np.bincount(self.bucket_ids)
        self.num_batches = int(sum(math.ceil(c / batch_size) for c in self.bucket_counts))
        self.batches_per_epoch = math.ceil(self.num_batches / world_size)
        self.start = Position()

    def describe(self) -> str:
        """One line for the run summary: how many buckets hold records, and how many are smaller than a batch."""
        used = self.bucket_counts[self.bucket_counts > 0]
        small = int((used < self.batch_size).sum())
        line = f"{len(used)} in use, {int(used.max())} records in the fullest"
        if small:
            line += (f"; {small} hold fewer records than a batch ({self.batch_size}), so their batches repeat "
                     "records, each copy with its own flip, crop and caption")
        return line

    def target_size(self, index: int) -> tuple[int, int]:
        """(width, height) of record `index`'s bucket."""
        if self.bucket_sizes is None:
            raise ValueError("target_size needs the sampler built with buckets=[(width, height), ...]")
        width, height = self.bucket_sizes[self.bucket_ids[index]]
        return int(width), int(height)

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """This rank's batches for `epoch`: (batches_per_epoch, batch_size) record indices."""
        stacked = self._batches(epoch) if self.shard_sizes is None else self._sharded_batches(epoch)
        padded = stacked[np.arange(self.batches_per_epoch * self.world_size) % len(stacked)]
        return padded[self.rank :: self.world_size]

    def _batches(self, epoch: int) -> np.ndarray:
        order = seeded_rng(BUCKET_RECORDS, self.seed, epoch).permutation(self.num_records)
        # A stable sort by bucket keeps each bucket's records in the epoch's order.
        grouped = order[np.argsort(self.bucket_ids[order], kind="stable")]
        batches, first = [], 0
        for count in self.bucket_counts:
            if count:
                wrapped = np.arange(math.ceil(count / self.batch_size) * self.batch_size) % count
                batches.append(grouped[first + wrapped].reshape(-1, self.batch_size))
            first += count
        stacked = np.concatenate(batches)
        return stacked[seeded_rng(BUCKET_BATCHES, self.seed, epoch).permutation(len(stacked))]

    def _sharded_batches(self, epoch: int) -> np.ndarray:
        """The epoch's batches group by group of the shard-blocked order, so a reader holding the current
        group's shards and the previous group's (2 x shard_mixing) reads each shard about once an epoch.

        Each group's records join their bucket's queue in the epoch's order; every full batch the
        queues then hold is this group's, and the group's batches are shuffled among themselves. A
        bucket's remainder waits for its next records, usually the next group's (a bucket rarer than
        one batch a group spans more, and its batches reread an older shard). At the end of the
        epoch a bucket's remainder is filled by repeating itself: the last group's shards are still
        held. Each bucket yields ceil(records / batch_size) batches, as without shards.
        """
        size, order = self.batch_size, ShardBlockedOrder(self.shard_sizes, self.seed, epoch, self.shard_mixing)
        waiting: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(self.bucket_counts)
        sections = []
        for group in range(len(order.group_start) - 1):
            records = order.group_records(group)
            buckets = self.bucket_ids[records]
            full = []
            for bucket in np.unique(buckets):
                queue = np.concatenate([waiting[bucket], records[buckets == bucket]])
                cut = len(queue) // size * size
                full.append(queue[:cut].reshape(-1, size))
                waiting[bucket] = queue[cut:]
            batches = np.concatenate(full) if full else np.empty((0, size), dtype=np.int64)
            sections.append(batches[seeded_rng(BUCKET_BATCHES, self.seed, epoch, group).permutation(len(batches))])
        sections += [np.resize(queue, size)[None] for queue in waiting if len(queue)]
        return np.concatenate(sections)

    def _epoch_reader(self, epoch: int) -> Callable[[int], Sequence[int]]:
        return self.epoch_batches(epoch).__getitem__


class BucketLookup:
    """index -> (width, height) of its bucket; a class (not a closure) so DataLoader workers can pickle it."""

    def __init__(self, bucket_ids, sizes):
        self.bucket_ids, self.sizes = bucket_ids, sizes

    def __call__(self, index: int) -> tuple[int, int]:
        return self.sizes[int(self.bucket_ids[index])]
