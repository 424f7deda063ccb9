"""Data: sources, decoding, transforms, buckets, cache and the resumable read order."""

from __future__ import annotations

from pathlib import Path

from difftrain.config import RunConfig
from difftrain.data.dataset import ImageDataset, PairedDataset
from difftrain.data.folder import DatasetError
from difftrain.data.sampler import EpochBatchSampler, ResumableBatches

__all__ = ["build_dataset", "build_sampler", "DatasetError"]


def build_dataset(config: RunConfig, progress: bool = True) -> ImageDataset:
    from difftrain.data.sources import open_source

    data = config.data
    source = open_source(
        data.source,
        data.path,
        image_key=data.image_key,
        caption_key=data.caption_key,
        captions=data.captions,
        caption_extension=data.caption_extension,
        max_pixels=data.max_image_pixels,
        index_dir=Path(cache_dir(config)) / "index",
        progress=progress,
    )
    buckets = None
    if data.buckets.enabled:
        from difftrain.data.buckets import assign_buckets, make_buckets

        sizes = make_buckets(data.resolution, data.buckets.step, max_ratio=data.buckets.max_ratio)
        buckets = BucketLookup(assign_buckets(source.sizes, sizes), sizes)
    def images(source, caption=None):
        return ImageDataset(
            source, data.resolution, data.crop, data.random_flip, config.seed, data.max_image_pixels, buckets, caption
        )

    if config.method != "dreambooth":
        return images(source)
    # DreamBooth: the instance images all carry the instance prompt; with prior preservation
    # each is paired with a class image carrying the class prompt.
    dreambooth = config.dreambooth
    instances = images(source, dreambooth.instance_prompt)
    if not dreambooth.prior_preservation:
        return instances
    class_source = open_source("folder", dreambooth.class_data, captions="none", max_pixels=data.max_image_pixels,
                               progress=progress)
    return PairedDataset(instances, images(class_source, dreambooth.class_prompt))


class BucketLookup:
    """index -> (width, height) of its bucket; a class (not a closure) so DataLoader workers can pickle it."""

    def __init__(self, bucket_ids, sizes):
        self.bucket_ids, self.sizes = bucket_ids, sizes

    def __call__(self, index: int) -> tuple[int, int]:
        return self.sizes[int(self.bucket_ids[index])]


def build_sampler(config: RunConfig, dataset: ImageDataset, rank: int, world_size: int) -> ResumableBatches:
    batch_size, seed, shards = config.training.batch_size, config.seed, dataset.source.shard_sizes
    if dataset.buckets is not None:
        from difftrain.data.buckets import BucketBatchSampler

        lookup = dataset.buckets
        return BucketBatchSampler(
            lookup.bucket_ids, batch_size, seed, rank, world_size, shard_sizes=shards, buckets=lookup.sizes
        )
    return EpochBatchSampler(len(dataset), batch_size, seed, rank=rank, world_size=world_size, shard_sizes=shards)


def cache_dir(config: RunConfig) -> str:
    return config.data.cache.dir or str(Path(config.output_dir) / "cache")
