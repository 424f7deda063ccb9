"""Data: sources, decoding, transforms, buckets, cache and the resumable read order.

Nothing here knows about run configs or methods: `training.run_data` opens a run's data
with these parts, and a method's encoders reach the cache through `CacheEncoders`.
"""

from __future__ import annotations

from difftrain.data.dataset import ImageDataset, PairedDataset
from difftrain.data.folder import DatasetError
from difftrain.data.sampler import EpochBatchSampler, ResumableBatches

__all__ = ["DatasetError", "EpochBatchSampler", "ImageDataset", "PairedDataset", "ResumableBatches"]
