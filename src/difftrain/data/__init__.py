"""Data: sources, decoding, transforms, buckets, cache and the resumable read order.

Nothing here knows about run configs or methods: `training.run_data` opens a run's data
with these parts, and a method's encoders reach the cache through `CacheEncoders`.

The names below are imported when first asked for, so that a submodule without torch (the
folder and jsonl readers' checks, which `difftrain train` runs before its imports) loads
without it.
"""

from __future__ import annotations

import importlib

_WHERE = {"DatasetError": "folder", "ImageDataset": "dataset", "PairedDataset": "dataset",
          "EpochBatchSampler": "sampler", "ResumableBatches": "sampler"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
