"""A torch Dataset over a record source, keyed by (epoch, batch, index) from the sampler.

Each item's randomness (which caption, crop, flip, augmentation) comes from a `random.Random` seeded by
(seed, epoch, index), so an item is the same whichever worker builds it and whether or
not the run was resumed in between. A record that turns out unreadable is replaced by the
next readable one and counted, never fatal.

With caching on, `fill_cache` encodes every record once (VAE latents for each flip,
text embeddings for each caption, conditioning images at the bucket's size) and from then
on items are read from the cache alone: the images are not opened again.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import replace
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from difftrain.data.augment import Augment, plan_view, render
from difftrain.data.cache import CacheEncoders, TensorCache, content_key
from difftrain.data.captions import CaptionTags
from difftrain.data.conditioning import Conditions
from difftrain.data.images import DECODE_VERSION, BadImage, load_image_bytes
from difftrain.data.packed import PackedLists
from difftrain.data.record_summary import SummaryLookup
from difftrain.data.records import read_order
from difftrain.data.sampler import ResumableBatches, copy_suffix
from difftrain.data.sources import BadRecord, RecordSource
from difftrain.data.transforms import apply_plan, plan_crop, prepare_image_for_size, to_tensor

log = logging.getLogger(__name__)

CACHE_BATCH = 16
PENDING_VALUES = CACHE_BATCH * 3 * 1024 * 1024  # pixels waiting to be encoded: ~200 MB of float32 at most


class ImageDataset(Dataset):
    def __init__(
        self,
        source: RecordSource,
        resolution: int,
        crop: str,
        flip: bool,
        seed: int,
        max_pixels: int,
        buckets: Callable[[int], tuple[int, int]] | None = None,
        fixed_caption: str | None = None,
        conditions: Conditions | None = None,
        augment: Augment | None = None,
        caption_tags: CaptionTags | None = None,
    ):
        self.source = source
        self.resolution = resolution
        self.crop = crop
        self.flip = flip
        self.seed = seed
        self.max_pixels = max_pixels
        self.buckets = buckets  # index -> (width, height) of its aspect bucket
        self.fixed_caption = fixed_caption  # DreamBooth: every image has the instance (or class) prompt
        self.caption_tags = caption_tags if caption_tags is not None and caption_tags.active else None
        self.conditions = conditions  # ControlNet: items carry "conditioning_pixels", uint8 CHW
        self.augment = augment  # None: the plain crop and flip, drawn exactly as before augmentation existed
        # Filled by fill_cache:
        self.latent_cache: TensorCache | None = None
        self.text_cache: TensorCache | None = None
        self.latent_tag: str = ""
        self.text_tag: str = ""
        self.hashes: np.ndarray | None = None  # per record: sha256 of its image bytes
        self.condition_cache: TensorCache | None = None
        self.condition_hashes: np.ndarray | None = None  # per record: Conditions.digest
        self.captions: PackedLists | None = None  # per record, when latents are cached
        self.last_walk: SummaryLookup | None = None  # what the last fill_cache learnt of each record

    def __len__(self) -> int:
        return len(self.source)

    def sources(self) -> dict[str, RecordSource]:
        """Every source this data set reads, by the config key that names it (for resume checks)."""
        return {"data": self.source}

    def target_size(self, index: int) -> tuple[int, int]:
        return self.buckets(index) if self.buckets else (self.resolution, self.resolution)

    # ----------------------------------------------------------------- reading
    def _read(self, index: int):
        """(position, record, image, conditioning image or None, [why it stands in] or []) for `index`, or for the
        record read in its place (records.read_order)."""
        first_failure = ""
        for offset, position in enumerate(read_order(index, len(self), self.source.block(index))):
            record = None
            try:
                record = self.source.read(position)
                image = load_image_bytes(record.data, self.max_pixels)
                condition = self.conditions.load(record, image) if self.conditions else None
            except (BadRecord, BadImage) as reason:
                where = getattr(reason, "where", None) or (record.key if record else f"record {position}")
                first_failure = first_failure or f"{where}: {reason}"
                continue
            others = f" ({offset - 1} tried in its place were unreadable too)" if offset > 1 else ""
            if offset:  # one line however many were passed (a shard that broke whole is thousands)
                log.warning("skipping record %d at read time (%s); reading record %d in its place%s", index,
                            first_failure, position, others)
            return position, record, image, condition, [f"{first_failure}{others}"] if offset else []
        raise RuntimeError(f"every record in the data set became unreadable during training ({first_failure})")

    def __getitem__(self, key: tuple[int, ...]) -> dict:
        epoch, batch, index, *copy = key  # a copy number for a record repeated within its batch (sampler.batch_keys)
        rng = random.Random(f"{self.seed}/{epoch}/{index}{copy_suffix(copy)}")
        item = {"epoch": epoch, "batch": batch, "skipped": []}  # why each record read in another's place stands in
        if self.hashes is not None:  # latents cached: the image is never opened
            flipped = self.flip and rng.random() < 0.5
            position, entry, offset = self._cached_latent(index, flipped)
            if offset:
                why = ("its cached latent went missing or was damaged after the cache was filled (a damaged one is "
                       "deleted: the next start computes it again)" if self.hashes[index].any()
                       else "it had no cached latent (unreadable when the cache was filled)")
                item["skipped"] = [f"record {index}: {why}"]
            captions = self.captions[position]
            item.update(latent_mean=entry["mean"], latent_std=entry["std"])
            if "conditioning" in entry:
                item["conditioning_pixels"] = entry["conditioning"]
        else:
            position, record, image, condition, item["skipped"] = self._read(index)
            captions = tuple(record.captions)
            # The requested record's bucket, which the batch shares: a record read in place of an unreadable
            # one may have another aspect (cover-cropping fits any), and a batch of two sizes cannot stack.
            size = self.target_size(index)
            plan = plan_view(image.size, size, self.crop, self.flip, self.augment, rng)  # image and condition alike
            item["pixel_values"] = to_tensor(render(image, size, plan))
            if condition is not None:
                item["conditioning_pixels"] = self.conditions.transform(condition, image.size, size, plan)
        if self.fixed_caption is not None:
            captions = (self.fixed_caption,)
        caption = rng.choice(captions) if captions else ""
        if self.caption_tags is not None and caption and self.fixed_caption is None:
            caption = self.caption_tags(caption, rng)
        item["caption"] = caption
        if self.text_cache is not None:
            item["prompt_embeds"] = self._cached_text(caption)["embeds"]
        return item

    def plain_pixels(self, index: int) -> torch.Tensor:
        """Record `index` centre-cropped, unflipped: for previews and the like."""
        _, _, image, _, _ = self._read(index)
        return prepare_image_for_size(image, self.target_size(index), "center", False, random.Random(0))[0]

    # ----------------------------------------------------------------- cache
    def _latent_key(self, digest: bytes, size: tuple[int, int], flipped: bool) -> str:
        return content_key(digest, list(size), flipped, "center", DECODE_VERSION, self.latent_tag)

    def _text_key(self, caption: str) -> str:
        return content_key(caption, self.text_tag)

    def _condition_key(self, position: int, size: tuple[int, int], flipped: bool) -> str:
        return content_key(self.hashes[position].tobytes(), self.condition_hashes[position].tobytes(), list(size),
                           flipped, "center", DECODE_VERSION, self.conditions.preprocess.tag())

    def _cached_latent(self, index: int, flipped: bool) -> tuple[int, dict, int]:
        """The cached latent (and condition) of `index` or, for a record that could not be encoded, of the record
        the uncached path reads in its place: the first after it with an entry at this record's size (its batch
        stacks latents of one size). fill_cache encoded that one there; the records before it in read_order did not
        decode, so nothing need be decoded here to find it."""
        wanted = self.target_size(index)
        for offset, position in enumerate(read_order(index, len(self), self.source.block(index))):
            # An all-zero hash is a record that could not even be read: it has no entries of its own.
            entry = self._cached_entry(position, wanted, flipped) if self.hashes[position].any() else None
            if entry is not None:
                return position, entry, offset
        raise RuntimeError(f"the latent cache under {self.latent_cache.dir} is empty at {wanted[0]}x{wanted[1]}; "
                           "resume the run to fill it again")

    def _cached_entry(self, position: int, size: tuple[int, int], flipped: bool) -> dict | None:
        entry = self.latent_cache.get(self._latent_key(self.hashes[position].tobytes(), size, flipped))
        if entry is not None and self.condition_cache is not None:
            condition = self.condition_cache.get(self._condition_key(position, size, flipped))
            entry = None if condition is None else {**entry, "conditioning": condition["pixels"]}
        return entry

    def _condition_digest(self, index: int, record) -> bytes:
        """Conditions.digest of record `index`; from the source's hash of its file when the record was not read."""
        if record is None and self.conditions.from_records:
            return self.source.known_condition(index)
        return self.conditions.digest(record)

    def _flips(self) -> tuple[bool, ...]:
        return (False, True) if self.flip else (False,)

    def _cached_text(self, caption: str) -> dict:
        entry = self.text_cache.get(self._text_key(caption))
        if entry is None:
            raise RuntimeError(f"the text cache entry for {caption!r} under {self.text_cache.dir} went missing or was "
                               "damaged during the run (a damaged one is deleted): start the run again, with "
                               "--resume latest if it has a checkpoint; the start computes it again")
        return entry

    def fill_cache(self, encoders: CacheEncoders, cache_dir, rank: int = 0, world_size: int = 1,
                   progress: bool = True) -> dict[str, int]:
        """Encode what the cache lacks; this process takes every `world_size`-th record.

        Returns counts of entries computed and found. Afterwards items come from the cache.
        """
        counts = {"latents computed": 0, "latents found": 0, "texts computed": 0, "texts found": 0, "skipped": 0}
        latents, text = encoders.latents is not None, encoders.texts is not None
        conditions = latents and self.conditions is not None  # cached beside the latents, never without them
        if latents:
            self.latent_cache = TensorCache(cache_dir, "latents")
            self.latent_tag = encoders.latent_tag
            # Set now: the condition keys read them while filling.
            self.hashes = np.zeros((len(self), 32), dtype=np.uint8)  # not "S32": numpy strips trailing NUL bytes
            captions: list[tuple[str, ...]] = [()] * len(self)
        if conditions:
            self.condition_cache = TensorCache(cache_dir, "conditions")
            self.condition_hashes = np.zeros((len(self), 32), dtype=np.uint8)
            counts.update({"conditions computed": 0, "conditions found": 0})
        if text:
            self.text_cache = TensorCache(cache_dir, "text")
            self.text_tag = encoders.text_tag
        pending_images: dict[tuple[int, int], list[tuple[str, torch.Tensor]]] = {}
        pending_values = 0  # of all the queues together
        pending_texts: dict[str, str] = {}

        def flush_images(size, force=False):
            nonlocal pending_values
            queue = pending_images.get(size, [])
            while queue and (force or len(queue) >= CACHE_BATCH):
                chunk, queue[:] = queue[:CACHE_BATCH], queue[CACHE_BATCH:]
                pending_values -= sum(pixels.numel() for _, pixels in chunk)
                mean, std = encoders.latents(torch.stack([pixels for _, pixels in chunk]))
                for (key, _), m, s in zip(chunk, mean, std):
                    self.latent_cache.put(key, {"mean": m, "std": s})
                counts["latents computed"] += len(chunk)

        def flush_texts(force=False):
            while pending_texts and (force or len(pending_texts) >= CACHE_BATCH):
                chunk = list(pending_texts.items())[:CACHE_BATCH]
                with torch.no_grad():
                    embeds = encoders.texts([caption for _, caption in chunk])
                for (key, _), e in zip(chunk, embeds):
                    self.text_cache.put(key, {"embeds": e})
                    del pending_texts[key]
                counts["texts computed"] += len(chunk)

        def queue_texts(record_captions):
            wanted_captions = [self.fixed_caption] if self.fixed_caption is not None else record_captions
            for caption in sorted(set(wanted_captions) | {""}):
                key = self._text_key(caption)
                if key in self.text_cache or key in pending_texts:
                    counts["texts found"] += key in self.text_cache
                    continue
                pending_texts[key] = caption
            flush_texts()

        def queue_views(image, condition, size, missing, missing_conditions):
            """The centre-cropped views (and conditions) of `image` at `size` the cache lacks, to encode."""
            nonlocal pending_values
            plan = plan_crop(image.size, size, "center", False, random.Random(0))
            for key, flipped in missing_conditions:
                pixels = self.conditions.transform(condition, image.size, size, replace(plan, flipped=flipped))
                self.condition_cache.put(key, {"pixels": pixels})
                counts["conditions computed"] += 1
            for key, flipped in missing:
                pixels = to_tensor(apply_plan(image, size, plan))
                pending_images.setdefault(size, []).append((key, pixels.flip(-1) if flipped else pixels))
                pending_values += pixels.numel()
            flush_images(size)
            # Rare buckets never fill a batch: past the budget the fullest waiting queue goes as it is, so
            # memory stays bounded however many buckets there are.
            while pending_values > PENDING_VALUES:
                flush_images(max(pending_images, key=lambda s: len(pending_images[s]) * s[0] * s[1]), force=True)

        # Every process walks all records (cheap when nothing is missing) so each knows
        # every record's hash; only its own share is encoded. A record whose hash and captions the source
        # knows (a folder scan hashed it) is not even read unless something of it is missing.
        # A record that cannot be encoded is read, as in the uncached path, as the next readable record: that
        # one is encoded at this record's size too (under its own content keys), or a bucket the record alone
        # filled would have nothing to read. Which records those are is found again at every start.
        # A stored condition is hashed from its file, unless the source knows every hash (a folder scan's index).
        reads_records = conditions and self.conditions.from_records and not self.source.knows_conditions
        # What the source knows of each record, or an earlier walk over the same data learnt (record_summary.py).
        # A launch's second walk reuses its first one's hashes: each process read every record then.
        known_records = SummaryLookup(cache_dir, self.source, enabled=latents, reads_records=reads_records,
                                      earlier=self.last_walk if latents else None)

        def views(index: int, digest: bytes, size) -> tuple[list, list]:
            """The (key, flip) of each latent and condition at `size` of the record at `index`, whose data has
            `digest`, that the cache lacks."""
            self.hashes[index] = np.frombuffer(digest, dtype=np.uint8)
            missing = [(key, f) for f in self._flips()
                       if (key := self._latent_key(digest, size, f)) not in self.latent_cache]
            missing_conditions = [(key, f) for f in self._flips() if conditions
                                  and (key := self._condition_key(index, size, f)) not in self.condition_cache]
            return missing, missing_conditions

        unreadable: list[int] = []

        def skip(index: int, reason: Exception, encoded_here: bool) -> None:
            log.warning("skipping record %d while caching: %s", index, reason)
            counts["skipped"] += 1
            if encoded_here:
                unreadable.append(index)

        bar = tqdm(range(len(self)), desc="filling cache", unit="rec", disable=not progress, dynamic_ncols=True)
        for index in bar:
            mine = index % world_size == rank
            known, broken = known_records.lookup(index)
            if broken:
                skip(index, BadImage(f"record {index} did not decode at an earlier start (the cache's record "
                                     "summary says)"), latents and mine)
                continue
            try:
                record = self.source.read(index) if known is None else None
            except BadRecord as reason:
                skip(index, reason, latents and mine)
                continue
            record_captions = record.captions if known is None else known[1]
            if latents:
                captions[index] = tuple(record_captions)
                size = self.target_size(index)
                if conditions:
                    self.condition_hashes[index] = np.frombuffer(self._condition_digest(index, record), dtype=np.uint8)
                digest = hashlib.sha256(record.data).digest() if known is None else known[0]
                known_records.read_to_hash |= known is None
                missing, missing_conditions = views(index, digest, size)
                if (missing or missing_conditions) and mine and record is None:
                    try:
                        record = self.source.read(index)
                    except BadRecord as reason:
                        skip(index, reason, True)
                        continue
                    if (fresh := hashlib.sha256(record.data).digest()) != digest:
                        # Changed since the folder scan (or the summary): its keys are those of the bytes read now.
                        missing, missing_conditions = views(index, fresh, size)
                        known_records.stale = True
                counts["latents found"] += len(self._flips()) - len(missing)
                if conditions:
                    counts["conditions found"] += len(self._flips()) - len(missing_conditions)
                if (missing or missing_conditions) and mine:
                    try:
                        image = load_image_bytes(record.data, self.max_pixels)
                        condition = self.conditions.load(record, image) if missing_conditions else None
                    except BadImage as reason:
                        skip(index, reason, True)
                        known_records.broken[index] = True
                        continue
                    queue_views(image, condition, size, missing, missing_conditions)
            if text and mine:
                queue_texts(record_captions)
        for size in list(pending_images):  # on disk before the look for what the broken records need
            flush_images(size, force=True)
        for index in unreadable:
            if (position := known_records.replacement(index, self.hashes)) is not None:
                missing, missing_conditions = views(position, self.hashes[position].tobytes(), self.target_size(index))
                if not missing and not missing_conditions:
                    continue  # encoded in its place at an earlier start: nothing need be read
            position, record, image, condition, _ = self._read(index)  # what the uncached path reads instead
            if latents and not self.hashes[position].any():  # failed to read in the walk, read now: its captions
                captions[position] = tuple(record.captions)
                if text:
                    queue_texts(record.captions)
            if conditions:
                self.condition_hashes[position] = np.frombuffer(self.conditions.digest(record), dtype=np.uint8)
            size = self.target_size(index)  # the broken record's: its batch stacks latents of that size
            # (a read that failed in the walk may succeed now)
            missing, missing_conditions = views(position, hashlib.sha256(record.data).digest(), size)
            queue_views(image, condition, size, missing, missing_conditions)
        for size in list(pending_images):
            flush_images(size, force=True)
        flush_texts(force=True)
        if latents:
            self.captions = PackedLists(captions)  # read by every worker: shared, not copied (packed.py)
        known_records.finish(self.hashes, self.captions, write=world_size == 1)  # (each decoded only its share)
        self.last_walk = known_records if latents else None
        return counts


class PairedDataset(Dataset):
    """Each item of `main` with a companion item from `companion` under `prefix` keys (DreamBooth's prior).

    The companion record is drawn from (seed, epoch, index), so pairs are reproducible and
    survive resume; the read order and the epoch length are `main`'s. `companion_key` is the
    config key naming the companion data, for resume checks.
    """

    def __init__(self, main: ImageDataset, companion: ImageDataset, companion_key: str, prefix: str):
        self.main, self.companion = main, companion
        self.companion_key, self.prefix = companion_key, prefix
        self.source, self.buckets = main.source, main.buckets

    def __len__(self) -> int:
        return len(self.main)

    def sources(self) -> dict[str, RecordSource]:
        return {"data": self.main.source, self.companion_key: self.companion.source}

    def __getitem__(self, key: tuple[int, ...]) -> dict:
        epoch, batch, index, *copy = key
        partner = random.Random(f"{self.main.seed}/{epoch}/{index}/class{copy_suffix(copy)}").randrange(
            len(self.companion))
        item = self.main[key]
        extra = self.companion[(epoch, batch, partner)]
        item.update({f"{self.prefix}{k}": v for k, v in extra.items() if k not in BOOKKEEPING})
        item["skipped"] += extra["skipped"]
        return item

    def plain_pixels(self, index: int) -> torch.Tensor:
        return self.main.plain_pixels(index)

    def fill_cache(self, encoders, cache_dir, rank=0, world_size=1, progress=True) -> dict[str, int]:
        counts = self.main.fill_cache(encoders, cache_dir, rank, world_size, progress)
        for name, value in self.companion.fill_cache(encoders, cache_dir, rank, world_size, progress).items():
            counts[name] += value
        return counts


BOOKKEEPING = ("epoch", "batch", "skipped")  # where a batch sits in the read order, and why records were replaced


def collate(items: list[dict]) -> dict:
    """Tensors stacked, every other field listed, under the item's own names (so "caption" holds a list).

    Whatever a data set puts into its items reaches the method as it is: nothing here knows
    which fields a method uses.
    """
    first = items[0]
    batch = {"epoch": first["epoch"], "batch": first["batch"],
             "skipped": [reason for item in items for reason in item["skipped"]]}
    for key, value in first.items():
        if key not in BOOKKEEPING:
            values = [item[key] for item in items]
            batch[key] = torch.stack(values) if torch.is_tensor(value) else values
    return batch


def make_loader(dataset: Dataset, sampler: ResumableBatches, num_workers: int, collate_fn=collate,
                pin_memory: bool = False) -> DataLoader:
    """`pin_memory` (for a CUDA device): batches in page-locked memory, so the step's non_blocking
    copies to the GPU run asynchronously; from pageable memory the host waits for each copy."""
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=2 if num_workers else None,
        # Its own generator: the workers' base seed drawn from the global one would shift the training RNG by a
        # draw at every resume (nothing a worker does is random by it: records are seeded by epoch and index).
        generator=torch.Generator().manual_seed(0),
        worker_init_fn=_leave_stops_to_the_trainer if num_workers else None,
    )


def _leave_stops_to_the_trainer(worker_id: int) -> None:
    """A terminal's Ctrl-C reaches the whole process group, and a scheduler's SIGTERM (SLURM's preemption) every
    process of the job: workers that died of it stopped the run with "DataLoader worker exited unexpectedly"
    instead of letting it finish the step and save a checkpoint. A worker still ends with its loader: the
    loader's shutdown tells it to, and torch's watchdog ends it once the trainer is gone (the loader's SIGTERM
    comes only after those, for a worker that did not end)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
