"""Inception-v3 features for FID, KID, IS and precision/recall, from torch-fidelity's network.

torch-fidelity's InceptionV3 is the PyTorch port that reproduces the original TensorFlow
FID code (its bilinear resize to 299 px included) to about 1e-5, so our numbers compare
with published ones when the standard weights are used. Its package `__init__` imports
torchvision for the CLIP, DINOv2 and VGG extractors we do not use, and torchvision does not
install beside every torch build (not beside this project's CPU one), so the module is
imported on its own (see `_inception_class`). Its weights are given to it as a state dict
we read ourselves, never as a file for it to unpickle.

One forward pass gives both the 2048-d pool features (FID, KID, precision/recall) and the
1008 unbiased logits (IS).
"""

from __future__ import annotations

import functools
import importlib.util
import io
import sys
import types
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from difftrain.evaluate.weights import INCEPTION, EvalError, find_weights, load_state_dict, weights_info

POOL, LOGITS = "2048", "logits_unbiased"
RESIZE_RULE = ("RGB; not square: centre crop to a square; then PIL bicubic to {size} px when the size differs; "
               "then torch-fidelity's TensorFlow-1 bilinear resize to 299 px inside the network")


@functools.cache
def _inception_class():
    stub = None
    if "torch_fidelity" not in sys.modules:
        spec = importlib.util.find_spec("torch_fidelity")
        if spec is None:
            raise EvalError("FID, KID and IS need torch-fidelity: pip install --no-deps 'torch-fidelity>=0.4,<0.5' "
                            "(make setup installs it from requirements.lock)")
        # The package without its __init__: the submodule we use imports only torch and its own helpers.
        package = types.ModuleType("torch_fidelity")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["torch_fidelity"] = stub = package
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    finally:
        if stub is not None and sys.modules.get("torch_fidelity") is stub:
            # Gone again, so a later `import torch_fidelity` in this process (a user's, with torchvision
            # installed) gets the whole package rather than this empty one.
            del sys.modules["torch_fidelity"]
    return FeatureExtractorInceptionV3


def _network(state_dict: dict[str, torch.Tensor] | None):
    """torch-fidelity's module holding `state_dict` (None: its own initialisation, for random test networks)."""
    cls = _inception_class()
    if state_dict is None:
        class Fresh(cls):
            def load_state_dict(self, state, strict=True, assign=False):
                return super().load_state_dict(state, strict=False)

        cls, state_dict = Fresh, {}
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)  # bytes we wrote from tensors: nothing foreign is unpickled
    buffer.seek(0)
    try:
        return cls("inception-v3-compat", [POOL, LOGITS], feature_extractor_weights_path=buffer)
    except RuntimeError as error:  # a state dict of another network
        raise EvalError(f"the Inception weights do not fit torch-fidelity's InceptionV3: {str(error)[:300]}") from None


def prepare(image: Image.Image, size: int) -> np.ndarray:
    """An image as uint8 HxWx3 at `size` x `size` by RESIZE_RULE (the same for generated and reference images)."""
    image = image.convert("RGB")
    width, height = image.size
    if width != height:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


class InceptionFeatures:
    """Callable: images -> (pool features [N, 2048], logits [N, 1008]), float32 on the CPU."""

    def __init__(self, weights: str | Path | None = None, weights_dir: str | Path | None = None,
                 device: str | torch.device = "cpu", batch_size: int | None = None):
        path = find_weights(INCEPTION, weights, weights_dir)
        # channels_last: 1.75x on a 2-core CPU (benchmarks/eval_cost.py), features within ~1e-6 of the
        # contiguous layout's. Small batches are fastest on a CPU (cache), large ones on a GPU.
        self.device = torch.device(device)
        self.network = _network(load_state_dict(path)).to(self.device, memory_format=torch.channels_last)
        self.batch_size = batch_size or (64 if self.device.type == "cuda" else 4)
        self.info = {"network": "InceptionV3 (torch-fidelity 'inception-v3-compat', 2048-d pool features)",
                     "weights": weights_info(INCEPTION, path)}

    @torch.no_grad()
    def __call__(self, images: Iterable[Image.Image], size: int, total: int | None = None,
                 progress: bool = False, desc: str = "Inception features") -> tuple[torch.Tensor, torch.Tensor]:
        pools, logits, batch = [], [], []
        bar = tqdm(total=total, desc=desc, unit="img", disable=not progress, dynamic_ncols=True, leave=False)

        def flush():
            pixels = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).to(self.device)
            pool, logit = self.network(pixels)
            pools.append(pool.float().cpu())
            logits.append(logit.float().cpu())
            bar.update(len(batch))
            batch.clear()

        for image in images:
            batch.append(prepare(image, size))
            if len(batch) == self.batch_size:
                flush()
        if batch:
            flush()
        bar.close()
        if not pools:
            return torch.zeros(0, 2048), torch.zeros(0, 1008)
        return torch.cat(pools), torch.cat(logits)


def write_random_inception(path: str | Path, seed: int = 0) -> Path:
    """torch-fidelity's InceptionV3 with random weights, as safetensors: the real network for tests and benchmarks.

    He-normal convolutions keep activations at a usable scale through its ~100 layers (the
    default init shrinks them to ~1e-8); batch-norm statistics stay at 0 and 1.
    """
    from difftrain.atomic import write_safetensors

    torch.manual_seed(seed)
    network = _network(None)
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return write_safetensors(path, network.state_dict())
