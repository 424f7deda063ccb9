"""The metric networks' weights: found on disk first, downloaded only when allowed, loaded without unpickling code.

Each network has a standard file (the name its own library caches it under, with the
hash prefix torch.hub checks). It is looked for, in order: the path given (a flag or a
config key), the file named by its environment variable, `DIFFTRAIN_WEIGHTS_DIR`, the
libraries' own caches (torch.hub's checkpoints folder; for LPIPS the `lpips` and
`torchmetrics` packages, which ship the head), and only then downloaded into torch.hub's
folder, unless the machine is offline (`HF_HUB_OFFLINE=1` or `DIFFTRAIN_OFFLINE=1`). A file
that is nowhere is an error naming it, its expected hash and where to get it.

`.pth` files are read with `torch.load(weights_only=True)`, which restores tensors and
plain containers only; `.safetensors` files are read as they are.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from difftrain.errors import DifftrainError


class EvalError(DifftrainError):
    pass


@dataclass(frozen=True)
class WeightsFile:
    key: str  # what the user calls it
    filename: str
    url: str
    sha256_prefix: str  # what the standard file's sha256 starts with
    env: str
    # Inside an installed package (package name, path in it): libraries that ship the file.
    shipped_in: tuple[tuple[str, str], ...] = ()


INCEPTION = WeightsFile(
    "inception", "weights-inception-2015-12-05-6726825d.pth",
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
    "6726825d", "DIFFTRAIN_INCEPTION_WEIGHTS",
)
ALEXNET = WeightsFile(
    "alexnet", "alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "7be5be79", "DIFFTRAIN_ALEXNET_WEIGHTS",
)
LPIPS_HEAD = WeightsFile(
    "lpips", "alex.pth", "https://github.com/richzhang/PerceptualSimilarity/raw/v0.1/lpips/weights/v0.1/alex.pth",
    "df73285e", "DIFFTRAIN_LPIPS_WEIGHTS",
    shipped_in=(("lpips", "weights/v0.1/alex.pth"), ("torchmetrics", "functional/image/lpips_models/alex.pth")),
)


def offline() -> bool:
    return any(os.environ.get(name, "") not in ("", "0") for name in ("HF_HUB_OFFLINE", "DIFFTRAIN_OFFLINE"))


def hub_models_offline() -> bool:
    """Hub models (CLIP, captioners) come from the HF cache alone: offline by setting, or the Hub unreachable (one
    probe; without it each load waited out huggingface_hub's ~25 s of retries, cached or not)."""
    from difftrain.models.sd import hub_offline

    return offline() or hub_offline()


def find_weights(spec: WeightsFile, given: str | Path | None = None, weights_dir: str | Path | None = None) -> Path:
    """The file holding `spec`'s weights (see the module docstring for the search order)."""
    if given:
        path = Path(given)
        if path.is_dir():
            path = path / spec.filename
        if not path.is_file():
            raise EvalError(f"{spec.key} weights: {given} does not exist. {_where_to_get(spec)}")
        return path
    candidates = []
    if os.environ.get(spec.env):
        candidates.append(Path(os.environ[spec.env]))
    for folder in (weights_dir, os.environ.get("DIFFTRAIN_WEIGHTS_DIR")):
        if folder:
            candidates.append(Path(folder) / spec.filename)
    candidates.append(_hub_cache() / spec.filename)
    for package, inside in spec.shipped_in:
        found = importlib.util.find_spec(package)  # locates the package without importing it
        if found is not None and found.submodule_search_locations:
            candidates.append(Path(list(found.submodule_search_locations)[0]) / inside)
    for path in candidates:
        if path.is_file():
            return path
    if offline():
        raise EvalError(f"{spec.key} weights not found, and this machine is offline. {_where_to_get(spec)}. "
                        f"Looked in: {', '.join(str(c) for c in candidates)}")
    return _download(spec)


def _where_to_get(spec: WeightsFile) -> str:
    return (f"The file is {spec.filename} (sha256 {spec.sha256_prefix}...), from {spec.url}; put it in "
            f"$DIFFTRAIN_WEIGHTS_DIR or {_hub_cache()}, or name it with {spec.env} or the --weights-dir flag")


def _hub_cache() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _download(spec: WeightsFile) -> Path:
    target = _hub_cache() / spec.filename
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(spec.url, str(target), hash_prefix=spec.sha256_prefix, progress=True)
    except Exception as error:  # no route, a proxy, a changed file: all end the same way for the user
        raise EvalError(f"could not download the {spec.key} weights ({error}). {_where_to_get(spec)}") from None
    return target


def sha256(path: str | Path) -> str:
    from difftrain.models.lora_files import file_hashes  # remembered per file, size and time

    return file_hashes(Path(path))[0]


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise EvalError(f"{path}: not a readable weights file ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise EvalError(f"{path}: expected a state dict of tensors")
    return state


def weights_info(spec: WeightsFile, path: Path) -> dict:
    """What eval.json records about a network's weights; `standard`: the published file, so the numbers
    compare with other tools'."""
    digest = sha256(path)
    return {"file": str(path), "sha256": digest, "standard": digest.startswith(spec.sha256_prefix)}
