"""Where things live in a run folder, for the trainer that writes it and the loaders that read it.

    <run>/config.yaml                 the run config
    <run>/checkpoints/step-NNNNNNNN/  training state; complete once state.json is in it; its
                                      weight files key each module's tensors as "module.key"
    <run>/model/                      the final model (EMA weights when EMA is on)
    <run>/model-no-ema/               the raw weights, when EMA is on
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

STEP_DIR = re.compile(r"^step-(\d+)$")
CHECKPOINTS = "checkpoints"
ABANDONED = "abandoned"  # checkpoints of a branch left behind by resuming from an earlier one
SHARD_LAYOUT = "shards.json"  # in an FSDP checkpoint: its weights are per-process parts (training/sharding.py)


def is_run_folder(path: Path) -> bool:
    return (path / "config.yaml").is_file() and ((path / CHECKPOINTS).is_dir() or (path / "model").is_dir())


def checkpoint_dirs(root: Path) -> list[Path]:
    """The step-N folders under `root`, by step."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    complete = [p for p in checkpoint_dirs(root) if (p / "state.json").is_file()]
    return complete[-1] if complete else None


def join_modules(parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{module: {key: tensor}} -> {"module.key": tensor}: one checkpoint file holds every module."""
    return {f"{name}.{key}": value for name, tensors in parts.items() for key, value in tensors.items()}


def split_modules(flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The inverse of `join_modules`."""
    parts: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        name, rest = key.split(".", 1)
        parts.setdefault(name, {})[rest] = value
    return parts


def final_model_dir(run: Path, use_ema: bool = True) -> Path:
    """The model folder holding the weights asked for: model-no-ema only exists when EMA was on."""
    raw = run / "model-no-ema"
    return raw if not use_ema and raw.is_dir() else run / "model"
