"""LPIPS (Zhang et al. 2018, v0.1, AlexNet) and the diversity measure built on it.

The `lpips` package and torchmetrics' LPIPS both build their backbone with torchvision,
which does not install beside every torch build (not beside this project's CPU one). The
network is small, so it is written here with the exact layer layout of torchvision's
AlexNet `features` (its published weights load unchanged) and of lpips' linear heads
(`lin{i}.model.1.weight`, the file that package ships): ScalingLayer, five ReLU taps,
unit-normalised channels, squared difference, 1x1 heads, spatial mean, sum.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from difftrain.evaluate.weights import ALEXNET, LPIPS_HEAD, EvalError, find_weights, load_state_dict, weights_info

CHANNELS = (64, 192, 384, 256, 256)
TAPS = ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12))  # torchvision AlexNet.features slices ending at each ReLU
MIN_SIZE = 64  # smaller images are upsampled (bilinear) first: AlexNet's strides leave nothing of a 32 px image


def alexnet_features() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2),
    )


class _Head(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    """d(x, y) for images in [-1, 1], NCHW; returns one distance per pair."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.features = alexnet_features()
        for i, channels in enumerate(CHANNELS):
            self.add_module(f"lin{i}", _Head(channels))
        self.requires_grad_(False)
        self.eval()

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        out = []
        for start, end in TAPS:
            for layer in self.features[start:end]:
                x = layer(x)
            out.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = 0
        for i, (a, b) in enumerate(zip(self.taps(x), self.taps(y))):
            total = total + getattr(self, f"lin{i}").model((a - b) ** 2).mean(dim=(2, 3))
        return total.flatten()

    def load(self, backbone: dict[str, torch.Tensor], head: dict[str, torch.Tensor]) -> "LPIPS":
        features = {k.removeprefix("features."): v for k, v in backbone.items() if k.startswith("features.")}
        missing = self.features.load_state_dict(features, strict=False).missing_keys
        head_missing = [k for k in self.state_dict() if k.startswith("lin") and k not in head]
        if missing or head_missing:
            raise EvalError(f"LPIPS weights do not fit: missing {missing + head_missing}")
        self.load_state_dict({**head, **{f"features.{k}": v for k, v in features.items()}}, strict=False)
        return self


def load_lpips(backbone: str | Path | None = None, head: str | Path | None = None,
               weights_dir: str | Path | None = None) -> tuple[LPIPS, dict]:
    """The network with torchvision's AlexNet weights and lpips' v0.1 heads, and what eval.json says of them."""
    backbone_path = find_weights(ALEXNET, backbone, weights_dir)
    head_path = find_weights(LPIPS_HEAD, head, weights_dir)
    network = LPIPS().load(load_state_dict(backbone_path), load_state_dict(head_path))
    info = {"network": "LPIPS v0.1 AlexNet (our layout of lpips 0.1.4; see evaluate/lpips.py)",
            "backbone": weights_info(ALEXNET, backbone_path), "head": weights_info(LPIPS_HEAD, head_path),
            "min_size": MIN_SIZE}
    return network, info


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB images of one size as [-1, 1] NCHW, upsampled to MIN_SIZE when smaller."""
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
    x = torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1
    if min(x.shape[-2:]) < MIN_SIZE:
        factor = MIN_SIZE / min(x.shape[-2:])
        size = (round(x.shape[-2] * factor), round(x.shape[-1] * factor))
        x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x


@torch.no_grad()
def pairwise_diversity(network: LPIPS, images: list[Image.Image], batch_size: int = 64) -> float | None:
    """Mean LPIPS over all pairs of `images` (one prompt's images); None for fewer than two."""
    if len(images) < 2:
        return None
    size = images[0].size
    # One prompt's images of several sizes (a folder of earlier outputs): compared at the first one's size.
    images = [image if image.size == size else image.resize(size, Image.BICUBIC) for image in images]
    x = to_tensor(images).to(next(network.parameters()).device)
    pairs = list(combinations(range(len(images)), 2))
    distances = []
    for start in range(0, len(pairs), batch_size):
        first, second = zip(*pairs[start:start + batch_size])
        distances.append(network(x[list(first)], x[list(second)]).cpu())
    return float(torch.cat(distances).mean())


def write_random_lpips(folder: str | Path, seed: int = 0) -> Path:
    """Random AlexNet and head weights under their standard file names, for tests and benchmarks."""
    from difftrain.atomic import write_safetensors

    torch.manual_seed(seed)
    network = LPIPS()
    folder = Path(folder)
    backbone = {f"features.{k}": v for k, v in network.features.state_dict().items()}
    heads = {k: v.abs() for k, v in network.state_dict().items() if k.startswith("lin")}  # lpips' heads are >= 0
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "alexnet.safetensors", backbone)
    write_safetensors(folder / "lpips.safetensors", heads)
    return folder
