"""Data: sources, decoding, transforms and the resumable read order."""

from __future__ import annotations

from difftrain.config import RunConfig
from difftrain.data.dataset import ImageDataset
from difftrain.data.folder import DatasetError, FolderScan, scan_folder

__all__ = ["build_dataset", "DatasetError"]


def build_dataset(config: RunConfig, progress: bool = True) -> tuple[ImageDataset, FolderScan]:
    data = config.data
    scan = scan_folder(data.path, data.captions, data.caption_extension, data.max_image_pixels, progress=progress)
    dataset = ImageDataset(scan.records, data.resolution, data.crop, data.random_flip, config.seed, data.max_image_pixels)
    return dataset, scan
