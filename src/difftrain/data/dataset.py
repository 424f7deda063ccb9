"""A torch Dataset over scanned records, keyed by (epoch, batch, index) from the sampler."""

from __future__ import annotations

import logging
import random

import torch
from torch.utils.data import DataLoader, Dataset

from difftrain.data.folder import Record
from difftrain.data.images import BadImage, load_image
from difftrain.data.sampler import EpochBatchSampler
from difftrain.data.transforms import prepare_image

log = logging.getLogger(__name__)


class ImageDataset(Dataset):
    def __init__(self, records: list[Record], resolution: int, crop: str, flip: bool, seed: int, max_pixels: int):
        self.records = records
        self.resolution = resolution
        self.crop = crop
        self.flip = flip
        self.seed = seed
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        epoch, batch, index = key
        # A file can break after the scan (disk, sync tool); take the next one rather than die.
        for offset in range(len(self.records)):
            record = self.records[(index + offset) % len(self.records)]
            try:
                image = load_image(record.path, self.max_pixels)
                break
            except BadImage as reason:
                log.warning("skipping %s at read time: %s", record.path, reason)
        else:
            raise RuntimeError("every image in the dataset became unreadable during training")
        rng = random.Random(f"{self.seed}/{epoch}/{index}")
        pixels = prepare_image(image, self.resolution, self.crop, self.flip, rng)
        return {"pixel_values": pixels, "caption": record.caption or "", "epoch": epoch, "batch": batch}


def collate(items: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "captions": [item["caption"] for item in items],
        "epoch": items[0]["epoch"],
        "batch": items[0]["batch"],
    }


def make_loader(dataset: Dataset, sampler: EpochBatchSampler, num_workers: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=2 if num_workers else None,
    )
