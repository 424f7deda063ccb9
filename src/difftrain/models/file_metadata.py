"""safetensors headers hold str -> str only: the one conversion every file we write uses."""

from __future__ import annotations

from pathlib import Path


def string_metadata(metadata: dict | None, error: type[Exception], what: str) -> dict[str, str]:
    """Plain values as strings; anything else (lists, dicts, None) is refused rather than str()'d silently."""
    out = {}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, (str, int, float, bool)):
            raise error(f"{what} metadata {key!r}: keys must be strings, values str/int/float/bool; "
                        "json.dumps anything else")
        out[key] = str(value)
    return out


def shared_model_name(base: str) -> str:
    """A base model as a file we share names it: a local path by its last part (no user's folder layout leaks),
    a hub id as it is."""
    return Path(base).name if base and Path(base).exists() else base
