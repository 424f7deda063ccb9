"""A run config's `data:` section opened as a data set, and its resumable batch order.

Methods call these from `Method.build_dataset` (DreamBooth opens its class folder the same
way); the loop calls `build_sampler`. The data package below knows nothing of run configs.
"""

from __future__ import annotations

from pathlib import Path

from difftrain.config import DataConfig, RunConfig
from difftrain.data.augment import Augment
from difftrain.data.captions import CaptionTags
from difftrain.data.conditioning import Conditions, Preprocess
from difftrain.data.dataset import ImageDataset
from difftrain.data.folder import ConditioningFiles
from difftrain.data.hf import HFOptions
from difftrain.data.records import ShardSource
from difftrain.data.sampler import EpochBatchSampler, ResumableBatches


def open_images(
    config: RunConfig, path: str | None = None, caption: str | None = None, progress: bool = True,
    conditioning: tuple[ConditioningFiles, Preprocess] | None = None,
) -> ImageDataset:
    """The images of `config.data`, or of the image folder `path`, transformed as `config.data` says.

    `caption` gives every image the same caption (DreamBooth's instance or class prompt);
    `conditioning` gives every item its conditioning image too (ControlNet): from the files
    the data names, or, when it names none, computed from the image by the preprocessor.
    """
    from difftrain.data.sources import open_source

    data = config.data
    records = open_source(
        "folder" if path else data.source,
        path or data.path,
        image_key=data.image_key,
        caption_key=data.caption_key,
        captions="none" if path else data.captions,
        caption_extension=data.caption_extension,
        max_pixels=data.max_image_pixels,
        index_dir=Path(cache_dir(config)) / "index",
        progress=progress,
        conditioning=conditioning[0] if conditioning else None,
        hf=hf_options(data),
    )
    if isinstance(records, ShardSource):
        # The group build_sampler interleaves; with buckets also the group before it, whose last records wait in
        # batches the next group completes (BucketBatchSampler._sharded_batches).
        records.shards_in_memory = data.shard_mixing * (2 if data.buckets.enabled else 1)
    conditions = None
    if conditioning:
        conditions = Conditions(conditioning[1], records.has_conditioning, data.max_image_pixels,
                                "folder" if path else data.source, conditioning[0].column)
    buckets = None
    if data.buckets.enabled:
        from difftrain.data.buckets import BucketLookup, assign_buckets, make_buckets, no_upscale_buckets

        if data.buckets.no_upscale:
            ids, sizes = no_upscale_buckets(records.sizes, data.resolution, data.buckets.step)
        else:
            sizes = make_buckets(data.resolution, data.buckets.step, max_ratio=data.buckets.max_ratio)
            ids = assign_buckets(records.sizes, sizes)
        buckets = BucketLookup(ids, sizes)
    augment = Augment(**data.augment.model_dump()) if data.augment.active else None
    t2i = getattr(config, "text2image", None)  # (Stable Diffusion methods; a pixel model's captions name classes)
    tags = CaptionTags(t2i.shuffle_caption, t2i.keep_tokens, t2i.caption_tag_dropout_rate) if t2i else None
    return ImageDataset(
        records, data.resolution, data.crop, data.random_flip, config.seed, data.max_image_pixels, buckets, caption,
        conditions, augment, tags,
    )


def build_sampler(config: RunConfig, dataset: ImageDataset, rank: int, world_size: int) -> ResumableBatches:
    batch_size, seed, shards = config.training.batch_size, config.seed, dataset.source.shard_sizes
    mixing = config.data.shard_mixing
    if dataset.buckets is not None:
        from difftrain.data.buckets import BucketBatchSampler

        lookup = dataset.buckets
        return BucketBatchSampler(
            lookup.bucket_ids, batch_size, seed, rank, world_size, shard_sizes=shards, buckets=lookup.sizes,
            shard_mixing=mixing,
        )
    return EpochBatchSampler(
        len(dataset), batch_size, seed, rank=rank, world_size=world_size, shard_sizes=shards, shard_mixing=mixing
    )


def hf_options(data: DataConfig) -> HFOptions:
    """What `data:` says to read from a Hugging Face data set (data.source = hf)."""
    return HFOptions(data.image_column, data.caption_column, data.split, data.hf_config, data.revision, data.streaming)


def cache_dir(config: RunConfig) -> str:
    return config.data.cache.dir or str(Path(config.output_dir) / "cache")
