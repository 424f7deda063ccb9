"""Textual Inversion embeddings in the two layouts other tools load.

- `learned_embeds.safetensors`: diffusers' textual_inversion script's {token: [n, dim]};
  `pipe.load_textual_inversion(folder_or_file)` adds `token`, `token_1`, ... `token_{n-1}`.
- `<token>.safetensors`: {"emb_params": [n, dim]}, what kohya's sd-scripts write for SD 1.x/2.x
  and what AUTOMATIC1111 and ComfyUI read; those tools name the embedding after the file,
  so the file name is the trigger word. diffusers reads it too, given `token=`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from difftrain.atomic import write_safetensors
from difftrain.errors import DifftrainError
from difftrain.models.file_metadata import string_metadata

DIFFUSERS_FILE = "learned_embeds.safetensors"  # the name diffusers looks for in a folder
A1111_KEY = "emb_params"
# Characters no file name may hold on Windows, where most A1111/ComfyUI users are.
UNSAFE_IN_FILE_NAMES = re.compile(r'[<>:"/\\|?*\x00-\x1f]')


class EmbeddingFileError(DifftrainError):
    """A Textual Inversion embedding that cannot be written or read as asked."""


def embedding_vectors(vectors, where: str) -> torch.Tensor:
    if (not isinstance(vectors, torch.Tensor) or vectors.ndim not in (1, 2) or not vectors.is_floating_point()
            or 0 in vectors.shape):
        shape = list(vectors.shape) if isinstance(vectors, torch.Tensor) else type(vectors).__name__
        raise EmbeddingFileError(f"{where}: embedding vectors must be a float tensor [n_vectors, dim], got {shape}")
    return (vectors[None] if vectors.ndim == 1 else vectors).detach().cpu().contiguous()


def width_misfit(vectors: torch.Tensor, text_encoder) -> str | None:
    """Why `vectors` cannot go into `text_encoder` (an embedding made for another base model), or None."""
    width = text_encoder.config.hidden_size
    if vectors.shape[-1] == width:
        return None
    return f"{vectors.shape[-1]}-wide vectors, and this model's text encoder is {width} wide"


def a1111_file_name(token: str) -> str:
    """`<cat-toy>` -> `cat-toy.safetensors`: the trigger word A1111/ComfyUI users will type."""
    stem = UNSAFE_IN_FILE_NAMES.sub("", token).strip(". ")
    if not stem:
        raise EmbeddingFileError(f"token {token!r}: nothing usable as a file name is left; pick a token with letters")
    return f"{stem}.safetensors"


def check_token(token: str) -> str:
    """The A1111 file name `token` will be saved under; refused now if it cannot be (a training run checks
    before its first step, not after its last)."""
    if not isinstance(token, str) or not token or any(c.isspace() for c in token):
        raise EmbeddingFileError(f"token {token!r}: must be one word without spaces, e.g. '<my-style>'")
    name = a1111_file_name(token)
    if name.lower() == DIFFUSERS_FILE.lower():  # (as on a case-blind file system) one file would replace the other
        raise EmbeddingFileError(f"token {token!r}: its A1111 file would be {name}, the name of the diffusers file "
                                 "beside it; pick another token")
    return name


def save_embedding(out_dir, token: str, vectors: torch.Tensor, *, metadata: dict | None = None) -> tuple[Path, Path]:
    """Write out_dir/learned_embeds.safetensors (diffusers) and out_dir/<token>.safetensors
    (A1111/ComfyUI/kohya); returns both paths. `metadata` lands in both headers as strings."""
    a1111_name = check_token(token)  # before writing anything: no half-saved pair
    vectors = embedding_vectors(vectors, f"embedding {token!r}")
    meta = string_metadata(metadata, EmbeddingFileError, "embedding")
    meta.setdefault("token", token)
    meta.setdefault("num_vectors", str(vectors.shape[0]))
    out_dir = Path(out_dir)
    meta = {"format": "pt", **meta}
    diffusers_path = write_safetensors(out_dir / DIFFUSERS_FILE, {token: vectors}, meta)
    a1111_path = write_safetensors(out_dir / a1111_name, {A1111_KEY: vectors}, meta)
    return diffusers_path, a1111_path


def _read(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise EmbeddingFileError(f"{path}: not a readable .safetensors file ({e})") from None
    try:
        # weights_only: an embedding is tensors, names and numbers; never run a pickle's code.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad pickle
        raise EmbeddingFileError(
            f"{path}: not a readable embedding file ({type(e).__name__}: {e}); convert it to .safetensors"
        ) from None


def load_embedding(path) -> tuple[str | None, torch.Tensor]:
    """(token, vectors [n, dim]) of a diffusers or A1111 embedding (.safetensors, .bin or .pt).

    Token is None where the file name (`path.stem`) is the token: the A1111 layouts, and a one-key file of any
    other name (A1111 and ComfyUI take the file name whatever its key). A folder means its learned_embeds.safetensors,
    or learned_embeds.bin (older diffusers runs), as diffusers' load_textual_inversion reads a folder."""
    path = Path(path)
    if path.is_dir():
        legacy = path / "learned_embeds.bin"
        path = legacy if legacy.is_file() and not (path / DIFFUSERS_FILE).is_file() else path / DIFFUSERS_FILE
    if not path.is_file():
        raise EmbeddingFileError(f"{path}: no such embedding file")
    state = _read(path)
    if isinstance(state, torch.Tensor):
        return None, embedding_vectors(state, str(path))
    if not isinstance(state, dict):
        raise EmbeddingFileError(f"{path}: holds a {type(state).__name__}, not an embedding")
    if A1111_KEY in state and len(state) == 1:
        return None, embedding_vectors(state[A1111_KEY], str(path))
    if "string_to_param" in state:  # A1111's own .pt
        params = state["string_to_param"]
        if isinstance(params, dict) and len(params) == 1:
            return None, embedding_vectors(next(iter(params.values())), str(path))
    if len(state) == 1:
        key, vectors = next(iter(state.items()))
        if key == "clip_g":
            raise EmbeddingFileError(f"{path}: an SDXL embedding (clip_g alone); SDXL is not supported")
        # The file name is the trigger word, as in A1111 and ComfyUI, unless the file is diffusers' own
        # learned_embeds.*, whose key is its token; a key such as "*" or "clip_l" is no word anyone types.
        token = key if path.stem.startswith("learned_embeds") else None
        return token, embedding_vectors(vectors, str(path))
    raise EmbeddingFileError(
        f"{path}: not a Textual Inversion embedding for one text encoder (keys {sorted(state)[:5]}); expected "
        f"{{token: [n, dim]}} (diffusers) or {{'{A1111_KEY}': [n, dim]}} (A1111); "
        "SDXL's clip_l/clip_g pairs are not supported"
    )
