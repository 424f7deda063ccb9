"""Sets of real images and their Inception features, computed once per content.

A reference is an image folder, a data source of ours (folder, jsonl, laion, webdataset)
or a statistics file written by `save_reference` (or another tool's `.npz` with `mu` and
`sigma`, which serves FID only). Its features are cached under a key made of every image's
bytes (sha256), the network's weights and the resize rule: editing, adding or removing an
image makes a new entry, and the second evaluation against the same data reads the cache.
Unreadable records are skipped and listed, never fatal.
"""

from __future__ import annotations

import hashlib
import json
import random
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from difftrain.evaluate.inception import RESIZE_RULE, InceptionFeatures
from difftrain.evaluate.metrics import Statistics
from difftrain.evaluate.weights import EvalError

CACHE_VERSION = 1


@dataclass
class ImageRecords:
    """The usable records of a source (optionally a seeded sample of them), with what was skipped."""

    source: object  # a data.sources.RecordSource
    indices: list[int]
    description: str
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.indices)

    def sample_captions(self, count: int, seed: int) -> list[str]:
        """`count` captions, each from a record drawn (seeded): every record once, in a shuffled order, before
        any twice (FID against COCO-style captions wants distinct images' captions); reads only the records drawn.

        Uncaptioned and unreadable records are passed over; [] when a run of draws finds no caption at all.
        """
        from difftrain.data.sources import BadRecord

        rng, found, misses = random.Random(seed), [], 0
        order = rng.sample(self.indices, len(self.indices))
        while len(found) < count and misses < max(100, 10 * count):
            index = order[len(found) + misses] if len(found) + misses < len(order) else rng.choice(self.indices)
            try:
                captions = self.source.read(index).captions
            except BadRecord:
                captions = []
            if captions:
                found.append(rng.choice(captions))
            else:
                misses += 1
        return found

    def image(self, index: int) -> Image.Image:
        """Record `index`'s image again, decoded as `images` decoded it."""
        from difftrain.data.images import load_image_bytes

        return load_image_bytes(self.source.read(index).data)

    def images(self) -> Iterator[tuple[int, object, Image.Image]]:
        """(index, record, image) for each record that decodes; the others go to `skipped`."""
        from difftrain.data.images import BadImage, load_image_bytes
        from difftrain.data.sources import BadRecord

        for index in self.indices:
            try:
                record = self.source.read(index)
            except BadRecord as reason:  # its message names the record
                self.skipped.append((f"record {index}", str(reason)))
                continue
            try:
                yield index, record, load_image_bytes(record.data)
            except BadImage as reason:
                self.skipped.append((record.key, str(reason)))


# The seed of the reference's sample (--reference-max): fixed, not the generation seed, so FIDs measured with other
# seeds (or by other runs) compare against the same images, and the reference's cached features are found again.
REFERENCE_SEED = 0


def keyed_options(kind: str, image_key: str | None, caption_key: str | None) -> dict:
    """open_records' options naming a reference's image and caption fields: a jsonl line's keys, a Hugging Face
    table's columns; None: the source's defaults ("image", "caption"); a caption key of '': no captions (FID needs
    none; a model drawn without prompts then has none to take from the reference)."""
    without = {"captions": "none"} if caption_key == "" else {}
    if kind == "jsonl":
        named = {key: value for key, value in (("image_key", image_key), ("caption_key", caption_key)) if value}
        return named | without
    if kind == "hf":
        from difftrain.data.hf import HFOptions

        return {"hf": HFOptions(image_column=image_key or "image",
                                caption_column=None if caption_key == "" else caption_key or "caption")} | without
    return without


def open_records(path: str | Path, kind: str = "folder", max_images: int | None = None, progress: bool = False,
                 setting: str = "data.path", **source_options) -> ImageRecords:
    """The records at `path`; `setting`: what the user calls `path` (eval.reference, --reference), which a
    message about it names, with the keys that name its fields beside it (eval.reference_image_key,
    --reference-image-key)."""
    from difftrain.data.setting_names import reference_names
    from difftrain.data.sources import open_source

    source = open_source(kind, path, progress=progress, names=reference_names(setting), **source_options)
    indices = list(range(len(source)))
    if max_images is not None and max_images < len(indices):
        indices = sorted(random.Random(REFERENCE_SEED).sample(indices, max_images))
    description = source.description + (f", a seeded sample of {len(indices):,}" if len(indices) < len(source) else "")
    return ImageRecords(source, indices, description, list(source.skipped))


@dataclass
class Reference:
    features: torch.Tensor | None  # [N, 2048]; None for a statistics file holding mu/sigma only
    statistics: Statistics
    description: str
    skipped: list[tuple[str, str]]
    cached: bool  # read from the cache (or a statistics file) rather than computed now
    digest: str | None
    file: str | None = None  # the statistics file it was read from
    size: int | None = None  # the evaluation size that file was computed at (None: it does not say)

    @property
    def count(self) -> int:
        return self.statistics.count

    def check_size(self, size: int) -> None:
        """FID compares only at one size: a statistics file computed at another is refused."""
        if self.size is not None and self.size != size:
            raise EvalError(f"{self.file} was computed at {self.size} px and these images are {size} px; FID only "
                            f"compares at the same size: generate at {self.size} px or compute the reference again")

    def info(self) -> dict:
        return {"source": self.description, "images": self.count, "skipped": len(self.skipped),
                "content_sha256": self.digest, "from_cache": self.cached,
                "features": "full" if self.features is not None else "mu/sigma only (FID only)"}


def default_cache_dir() -> Path:
    from difftrain.cache import cache_root

    return cache_root() / "eval"


def reference_features(records: ImageRecords, extractor: InceptionFeatures, size: int,
                       cache_dir: str | Path | None = None, progress: bool = False) -> Reference:
    """The features of `records` at `size`, from the cache when this exact content was seen before."""
    from safetensors import safe_open

    from difftrain.atomic import write_safetensors
    from difftrain.data.sources import BadRecord

    digests = []
    for index in records.indices:
        try:
            digests.append(hashlib.sha256(records.source.read(index).data).hexdigest())
        except BadRecord:  # unreadable: images() skips and reports it
            digests.append("unreadable")
    cache, key = _cache_file("reference", digests, extractor, size, cache_dir)
    if cache.is_file():
        with safe_open(str(cache), "pt") as handle:
            meta = handle.metadata()
            features = handle.get_tensor("features")
        skipped = [tuple(item) for item in json.loads(meta.get("skipped", "[]"))]
        return Reference(features, Statistics.of(features), records.description, records.skipped + skipped, True, key)
    before = len(records.skipped)
    features, _ = extractor((image for _, _, image in records.images()), size, total=len(records),
                            progress=progress, desc="reference features")
    if len(features) < 2:
        raise EvalError(f"reference {records.description}: {len(features)} usable image(s); FID needs many more")
    write_safetensors(cache, {"features": features}, metadata={
        "skipped": json.dumps(records.skipped[before:]), "source": records.description}, sync=False)
    return Reference(features, Statistics.of(features), records.description, records.skipped, False, key)


def measured_features(digests: list[str], images: Iterator[Image.Image], extractor: InceptionFeatures, size: int,
                      cache_dir: str | Path | None = None,
                      progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(pool features, logits, from the cache) of a folder's images, in order, `digests` their files' sha256: a
    folder measured again (other metrics, another reference) reads them, as a reference's are read."""
    from safetensors import safe_open

    from difftrain.atomic import write_safetensors

    cache, _ = _cache_file("measured", digests, extractor, size, cache_dir)
    if cache.is_file():
        with safe_open(str(cache), "pt") as handle:
            return handle.get_tensor("features"), handle.get_tensor("logits"), True
    features, logits = extractor(images, size, total=len(digests), progress=progress, desc="measured features")
    write_safetensors(cache, {"features": features, "logits": logits}, sync=False)
    return features, logits, False


def _cache_file(kind: str, digests: list[str], extractor: InceptionFeatures, size: int,
                cache_dir: str | Path | None) -> tuple[Path, str]:
    """Where features of these image contents are cached, and the key: every image's bytes, the decode, the
    network's weights and the resize rule (a reference's key as it always was; a measured set's names its kind)."""
    from difftrain.data.images import DECODE_VERSION

    kind_key = {} if kind == "reference" else {"kind": kind}
    key = hashlib.sha256(json.dumps({
        "version": CACHE_VERSION, "decode": DECODE_VERSION, "images": digests,
        "weights": extractor.info["weights"]["sha256"],
        "rule": RESIZE_RULE.format(size=size), **kind_key,
    }).encode()).hexdigest()
    return Path(cache_dir or default_cache_dir()) / f"{kind}-{key[:32]}.safetensors", key


def save_reference(reference: Reference, path: str | Path, extractor_info: dict, size: int) -> Path:
    """A statistics file any later `difftrain eval --reference FILE` reads: features, mu and sigma."""
    from difftrain.atomic import write_safetensors

    tensors = {"mu": torch.from_numpy(reference.statistics.mu), "sigma": torch.from_numpy(reference.statistics.sigma)}
    if reference.features is not None:
        tensors["features"] = reference.features
    meta = {"format": "difftrain-reference", "version": str(CACHE_VERSION), "count": str(reference.count),
            "size": str(size), "weights_sha256": extractor_info["weights"]["sha256"],
            "source": reference.description, "content_sha256": reference.digest or ""}
    return write_safetensors(path, tensors, metadata=meta)


def load_statistics_file(path: str | Path, extractor_info: dict | None, size: int | None) -> Reference:
    """A file from `save_reference` (checked against our network and size), or an `.npz` with mu and sigma."""
    path = Path(path)
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                if "mu" not in data or "sigma" not in data:
                    raise EvalError(f"{path}: a statistics .npz needs arrays 'mu' and 'sigma' (found {list(data)})")
                mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        except (OSError, ValueError, zipfile.BadZipFile, zlib.error) as error:  # not an npz, one that needs
            # unpickling, or a compressed one damaged
            raise EvalError(f"{path}: not a statistics .npz of plain arrays ({str(error).splitlines()[0]})") from None
        if mu.shape != (2048,) or sigma.shape != (2048, 2048):  # InceptionV3's pool features, as FID's tools save
            raise EvalError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not statistics of InceptionV3's "
                            "2048-d pool features (mu (2048,), sigma (2048, 2048)); another network's cannot compare")
        stats = Statistics(mu, sigma, 0)  # the count is unknown: such files do not record it
        return Reference(None, stats, f"{path} (mu/sigma from another tool; weights unverified)", [], True, None)
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:
        raise EvalError(f"{path}: not a statistics file ({error})") from None
    if meta.get("format") != "difftrain-reference":
        raise EvalError(f"{path}: not a difftrain statistics file (write one with difftrain eval --save-reference)")
    if extractor_info and meta["weights_sha256"] != extractor_info["weights"]["sha256"]:
        raise EvalError(f"{path} was computed with other Inception weights (sha256 {meta['weights_sha256'][:12]}..., "
                        f"these are {extractor_info['weights']['sha256'][:12]}...): its numbers do not compare; "
                        "compute the reference again from its images")
    features = tensors.get("features")
    stats = Statistics(tensors["mu"].double().numpy(), tensors["sigma"].double().numpy(), int(meta["count"]))
    reference = Reference(features, stats, f"{path} ({meta.get('source', '')})", [], True,
                          meta.get("content_sha256") or None, str(path), int(meta["size"]))
    if size is not None:
        reference.check_size(size)
    return reference
