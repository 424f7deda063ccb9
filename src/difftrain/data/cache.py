"""A content-addressed tensor cache on disk, for VAE latents and text embeddings.

An entry's name is the hash of everything its value depends on: for a latent, the image
bytes, the target size, the flip and a fingerprint of the VAE's weights; for a text
embedding, the caption, the tokenizer and the text encoder. So a changed image, a new
resolution or another VAE miss exactly the entries they change, and nothing ever needs
to be invalidated by hand. Entries are single safetensors files written atomically, so
a killed run leaves no half-written entry behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from difftrain.atomic import write_safetensors

log = logging.getLogger(__name__)


@dataclass
class CacheEncoders:
    """What a method caches, and how to compute it: the data set calls these, never the method's models.

    `latents` maps a pixel batch to the latent distribution (mean, std); `texts` maps captions
    to embeddings. Either may be None (not cached). The tags identify the encoders (a weight
    fingerprint, the context length): entries made by other encoders are never read.
    """

    latents: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    texts: Callable[[list[str]], torch.Tensor] | None = None
    latent_tag: str = ""
    text_tag: str = ""


def content_key(*parts) -> str:
    """A stable hex key for a tuple of strings, bytes, numbers and tuples of those."""
    digest = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else json.dumps(part, sort_keys=True).encode()
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def fingerprint(obj) -> str:
    """What a model or tokenizer computes, as a hash: class, config and every weight byte.

    Hashing the weights (not a path or a name) is what makes the cache safe across
    fine-tuned copies that share a folder name. SD's VAE (84M parameters) takes ~0.3 s.
    """
    digest = hashlib.sha256(type(obj).__name__.encode())
    if isinstance(obj, torch.nn.Module):
        config = getattr(obj, "config", None)
        if config is not None:
            as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
            digest.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
        for name, tensor in sorted(obj.state_dict().items()):
            digest.update(name.encode())
            # reshape(-1): a channels_last 1x1 conv weight counts as contiguous yet has a last stride != 1.
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    else:  # a tokenizer: vocabulary, merges, normalisation and special tokens all change the ids
        backend = getattr(obj, "backend_tokenizer", None)
        # to_str() writes the vocabulary in hash-map order, which changes between calls: re-sort it.
        # Padding/truncation are per-call settings the tokenizer keeps from its last call, not identity.
        state = json.loads(backend.to_str()) if backend is not None else obj.get_vocab()
        if backend is not None:
            state.pop("padding", None)
            state.pop("truncation", None)
        digest.update(json.dumps(state, sort_keys=True).encode())
        digest.update(str(getattr(obj, "model_max_length", "")).encode())
        digest.update(str(getattr(obj, "pad_token", "")).encode())
    return digest.hexdigest()[:16]


def _whole_safetensors(path: Path) -> bool:
    """Whether the file is as long as its safetensors header says (the header and every tensor's bytes), from the
    header alone: a few hundred bytes read, where loading it reads it all."""
    try:
        with open(path, "rb") as file:
            size = int.from_bytes(file.read(8), "little")
            if not 0 < size < 100_000_000:  # (safetensors' own limit on a header)
                return False
            header = json.loads(file.read(size))
            ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
            return path.stat().st_size == 8 + size + max(ends, default=0)
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):  # (a header of another shape)
        return False


class TensorCache:
    """`root/<namespace>/<key[:2]>/<key>.safetensors`, one file per entry."""

    def __init__(self, root: str | Path, namespace: str):
        self.dir = Path(root) / namespace

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        """Whether the entry is there whole. A file cut short (a copy, a full disk) is deleted here, so the cache
        fill at the start computes it again: found "present" and read only in a step, it crashed the run (a text
        entry), or stood in another record for it all run long (a latent)."""
        path = self.path(key)
        if not path.is_file():
            return False
        if _whole_safetensors(path):
            return True
        log.warning("cache entry %s is damaged (cut short); deleted, computed again", path)
        path.unlink(missing_ok=True)
        return False

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError, ValueError) as exc:
            # A damaged entry is just a miss: drop it so it is recomputed.
            log.warning("cache entry %s unreadable (%s); deleted, the next cache fill recomputes it", path, exc)
            path.unlink(missing_ok=True)
            return None
        return tensors

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        path = self.path(key)
        write_safetensors(path, tensors, sync=False)  # an entry is cheap to recompute

    def __len__(self) -> int:
        return sum(1 for _ in self.dir.glob("*/*.safetensors")) if self.dir.is_dir() else 0
