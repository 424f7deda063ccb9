"""Every metric of one set of images, from the networks loaded once: shared by `difftrain eval` and training.

`Scorer` holds the networks a metric list needs (Inception for FID/KID/IS/precision-
recall, CLIP for CLIP score, LPIPS for diversity) and turns groups of images (one group per
prompt) into a flat dict of numbers plus the settings that produced them.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from difftrain.evaluate import metrics as m
from difftrain.evaluate.inception import RESIZE_RULE, InceptionFeatures
from difftrain.evaluate.names import METRICS
from difftrain.evaluate.reference import Reference
from difftrain.evaluate.weights import EvalError

NEEDS_REFERENCE = ("fid", "kid", "prc")
INCEPTION_METRICS = ("fid", "kid", "is", "prc")


class StoredImages(Sequence):
    """Images kept where they were written, not in memory: each is read again when a metric or the report takes it.

    FID-30k at 512 px held about 24 GB of images until the end; this holds their names and sizes. `read` turns a
    key (a path, a record index) into the image, decoded exactly as when it was first seen.
    """

    def __init__(self, read: Callable[[object], Image.Image]):
        self._read, self._keys, self.sizes = read, [], []
        self.digests: list[str | None] = []  # each image's file's sha256, where known (a folder's: its features cache)

    def append(self, key, size: tuple[int, int], digest: str | None = None) -> None:
        self._keys.append(key)
        self.sizes.append(size)
        self.digests.append(digest)

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._read(key) for key in self._keys[index]]
        return self._read(self._keys[index])


@dataclass
class Group:
    """Images drawn for one prompt (None for unconditional models): a list, or StoredImages."""

    prompt: str | None
    images: Sequence[Image.Image] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)

    def sizes(self) -> list[tuple[int, int]]:
        """Each image's (width, height), without reading stored images."""
        return self.images.sizes if isinstance(self.images, StoredImages) else [image.size for image in self.images]


def check_metrics(names: list[str]) -> list[str]:
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise EvalError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


@dataclass
class Networks:
    """Where each network's weights are, and the device; nothing loads until a metric asks."""

    weights_dir: str | None = None
    inception: str | None = None
    alexnet: str | None = None
    lpips: str | None = None
    clip_model: str | None = None
    device: str = "cpu"
    batch_size: int | None = None  # feature and CLIP batches; None: what suits the device


def check_networks(wanted: list[str], networks: Networks) -> None:
    """Find every network `wanted` needs, loading none: a missing one is refused before work starts."""
    from difftrain.evaluate.weights import ALEXNET, INCEPTION, LPIPS_HEAD, find_weights

    if any(name in wanted for name in INCEPTION_METRICS):
        find_weights(INCEPTION, networks.inception, networks.weights_dir)
    if "lpips" in wanted:
        find_weights(ALEXNET, networks.alexnet, networks.weights_dir)
        find_weights(LPIPS_HEAD, networks.lpips, networks.weights_dir)
    if "clip" in wanted:
        from difftrain.evaluate.clip_score import DEFAULT_CLIP, check_available

        check_available(networks.clip_model or DEFAULT_CLIP)


class Scorer:
    def __init__(self, wanted: list[str], networks: Networks):
        self.wanted = check_metrics(wanted)
        self.inception = self.clip = self.lpips = None
        self.info: dict = {}
        if any(name in self.wanted for name in INCEPTION_METRICS):
            self.inception = InceptionFeatures(networks.inception, networks.weights_dir, networks.device,
                                               networks.batch_size)
            self.info["inception"] = self.inception.info
        if "lpips" in self.wanted:
            from difftrain.evaluate.lpips import load_lpips

            self.lpips, self.info["lpips"] = load_lpips(networks.alexnet, networks.lpips, networks.weights_dir)
            self.lpips.to(networks.device)
        if "clip" in self.wanted:
            from difftrain.evaluate.clip_score import DEFAULT_CLIP, ClipScorer

            self.clip = ClipScorer(networks.clip_model or DEFAULT_CLIP, networks.device, networks.batch_size)
            self.info["clip"] = self.clip.info

    @property
    def custom_weights(self) -> list[str]:
        """The weight files in use that are not the published ones."""
        files = [self.info["inception"]["weights"]] if "inception" in self.info else []
        if "lpips" in self.info:
            files += [self.info["lpips"]["backbone"], self.info["lpips"]["head"]]
        return [f["file"] for f in files if not f["standard"]]

    def score(self, groups: list[Group], size: int, reference: Reference | None, progress: bool = False,
              inception: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
        """{metric name: value} for the images in `groups`, evaluated at `size` px (see RESIZE_RULE); `inception`:
        their (pool features, logits) in order, when already had (a cached folder's)."""
        count = sum(len(group.images) for group in groups)
        out: dict[str, float | int | None] = {"images": count}
        if self.inception is not None:
            images = itertools.chain.from_iterable(group.images for group in groups)  # one at a time
            features, logits = inception or self.inception(images, size, total=count, progress=progress,
                                                           desc="generated features")
            if "is" in self.wanted:
                score = m.inception_score(logits)
                out.update({"is": score["mean"], "is_std": score["std"]})
            if reference is not None:
                out.update(self._against_reference(features, reference))
        if self.clip is not None:
            prompted = [group for group in groups if group.prompt]
            if prompted:
                images = itertools.chain.from_iterable(group.images for group in prompted)
                prompts = [plain_text(group.prompt) for group in prompted for _ in group.images]
                out["clip_score"] = self.clip.score(images, prompts)
        if self.lpips is not None:
            from difftrain.evaluate.lpips import pairwise_diversity

            per_group = [pairwise_diversity(self.lpips, diversity_sample(group.images)) for group in groups]
            per_group = [value for value in per_group if value is not None]
            out["lpips_diversity"] = sum(per_group) / len(per_group) if per_group else None
        return out

    def _against_reference(self, features: torch.Tensor, reference: Reference) -> dict:
        out: dict[str, float | int] = {}
        if "fid" in self.wanted:
            out["fid"] = m.frechet_distance_of(features, reference.statistics)
        if reference.features is None:
            return out  # a mu/sigma file: FID only
        if "kid" in self.wanted:
            kid = m.kernel_inception_distance(features, reference.features)
            out.update({"kid": kid["mean"], "kid_std": kid["std"], "kid_subset_size": kid["subset_size"]})
        if "prc" in self.wanted and min(len(features), len(reference.features)) > m.PRC_NEIGHBOURS:
            prc = m.precision_recall(features, reference.features)
            out.update({"precision": prc["precision"], "recall": prc["recall"]})
        return out

    def settings(self, size: int) -> dict:
        return {
            "networks": self.info,
            "resize_rule": RESIZE_RULE.format(size=size),
            "fid": "Frechet distance of 2048-d pool features, float64, eigenvalues of sigma1.sigma2 (torch-fidelity's; "
                   "by the equal n x n eigenproblem when n < 2048)",
            "kid": f"unbiased MMD^2, cubic polynomial kernel, {m.KID_SUBSETS} subsets of min({m.KID_SUBSET_SIZE}, N)",
            "is": f"{m.IS_SPLITS} splits of the unbiased logits, shuffled with seed {m.IS_SEED}",
            "prc": f"Kynkaanniemi et al. 2019, k = {m.PRC_NEIGHBOURS}, on the 2048-d features",
            "lpips": "mean LPIPS (AlexNet, v0.1) over all pairs of one prompt's images (of a seeded sample of "
                     f"{LPIPS_MAX_IMAGES} where it has more), averaged over prompts",
        }


# All pairs of 50k unconditional images are 1.25e9 LPIPS evaluations (and the images held as float tensors): past this
# many images a group's diversity is measured on a seeded sample of them, all pairs of which are 4,950.
LPIPS_MAX_IMAGES, LPIPS_SEED = 100, 0


def diversity_sample(images: Sequence[Image.Image]) -> list[Image.Image]:
    """The images LPIPS diversity compares: all of a group's, or a seeded sample of LPIPS_MAX_IMAGES of them."""
    if len(images) <= LPIPS_MAX_IMAGES:
        return list(images)
    return [images[i] for i in sorted(random.Random(LPIPS_SEED).sample(range(len(images)), LPIPS_MAX_IMAGES))]


# A prompt edit's last text is the one at the last of this many steps (a fraction of them, or a step number below).
CLIP_SCHEDULE_STEPS = 1000


def plain_text(prompt: str) -> str:
    """A prompt as CLIP should read it: A1111's syntax gone (`(red:1.3)` -> `red`, `[fox]` -> `fox`, BREAK and
    `<lora:...>` tags dropped; a prompt edit as its last text, `[cat:dog:0.5]` -> `dog`), since the text encoder
    would otherwise score the brackets and numbers. AND stays a word, as evaluation draws it (captions are data)."""
    from difftrain.sampling.prompt_schedule import prompt_schedule
    from difftrain.sampling.prompts import extract_lora_tags, parse_attention

    text, _ = extract_lora_tags(prompt)
    text = prompt_schedule(text, CLIP_SCHEDULE_STEPS)[-1][1]
    return " ".join("".join(part if weight >= 0 else " " for part, weight in parse_attention(text)).split())


def warn_small(count: int, what: str) -> str | None:
    if count < m.FID_STABLE_COUNT:
        return (f"{what} has {count} images; FID from fewer than {m.FID_STABLE_COUNT} is biased upwards and only "
                "compares with FIDs at the same image count")
    return None
