"""Checkpoints as folders of named parts, written so that a crash never costs the last good one.

A checkpoint is built in `checkpoints/.tmp-step-N/`, every file flushed to disk, and only
then swapped in as `checkpoints/step-N/` (atomic.replace_dir: a step saved again keeps its
old folder until the new one has the name). A folder without the `.tmp-` prefix is
therefore always complete; leftovers from a killed save are removed at the next start.
Tensors go to safetensors and everything else to JSON, so loading a checkpoint never
unpickles anything.

The step folders are one line of history: resuming from an earlier checkpoint moves the
later ones to `checkpoints/abandoned/`, so `keep_last` prunes the branch being trained
and `--resume latest` never jumps back to the one left behind.

Layout of one checkpoint:
    state.json              step, data position, world size, LR schedule, counters
    config.yaml             the run config that produced it
    model.safetensors       trainable weights, keys prefixed by module name
    ema.safetensors         EMA weights, same keys (when EMA is on)
    optimizer.safetensors   optimizer tensors; its param groups are in state.json
    (under FSDP, model/ema/optimizer are written per process as `model-rank{R}.safetensors`, ...,
    with shards.json saying which tensors are split: see training/sharding.py; under DeepSpeed ZeRO
    model and ema stay whole and each process writes its optimizer partition as
    `optimizer-rank{R}.safetensors` + `.json`: see training/zero.py)
    rng-rank{R}.safetensors each process's random generators
    difftrain.json          pixel models: the model manifest, so `difftrain sample` draws from it
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from difftrain.atomic import recover_dirs, replace_dir, write_safetensors, write_text
from difftrain.config import RunConfig, parse_config
from difftrain.errors import DifftrainError
from difftrain.run_folder import ABANDONED, checkpoint_dirs, latest_checkpoint
from difftrain.training.sharding import local, plain_name


class CheckpointError(DifftrainError):
    pass


class CheckpointStore:
    """The step-N folders of one run, always one line of history (see `adopt`)."""

    def __init__(self, root: str | Path, keep_last: int = 3):
        self.root = Path(root)
        self.keep_last = keep_last
        self.keep_step: int | None = None  # the best checkpoint (checkpoint.keep_best): never pruned

    def all(self) -> list[Path]:
        return checkpoint_dirs(self.root)

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)

    def resolve(self, which: str) -> Path:
        """`latest` or a path to a checkpoint folder."""
        if which == "latest":
            found = self.latest()
            if found is None:
                raise CheckpointError(f"--resume latest: no checkpoint under {self.root}; start without --resume")
            return found
        path = Path(which)
        if not (path / "state.json").is_file():
            raise CheckpointError(f"--resume {which}: not a checkpoint folder (no state.json inside)")
        if path.resolve().parent == self.root.resolve() and path.resolve() not in {p.resolve() for p in self.all()}:
            # (adopt orders this run's history by step-N names: a copy named otherwise has no place in it)
            raise CheckpointError(f"--resume {which}: a copy inside this run's checkpoints/ under another name than "
                                  "step-N; resume from the step-N folder, or move the copy out of checkpoints/")
        return path

    def staging_dir(self, step: int) -> Path:
        return self.root / f".tmp-step-{step:08d}"

    def clean_staging(self) -> None:
        """After a crash: put back a checkpoint a killed re-save had moved aside, drop half-written ones."""
        recover_dirs(self.root)
        for leftover in self.root.glob(".tmp-step-*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def adopt(self, checkpoint: Path) -> list[Path]:
        """Make `checkpoint` the tip of this run's history before training on from it.

        Checkpoints after it here belong to the branch being abandoned (all of them, when
        it comes from another folder); they move to `abandoned/` rather than being pruned
        as "older" by step number or picked up by a later `--resume latest`. Returns the
        moved folders.
        """
        checkpoint = checkpoint.resolve()
        history = self.all()
        # all() is sorted by step: what comes after `checkpoint` in it is the abandoned branch.
        names = [p.name for p in history]
        keep = names.index(checkpoint.name) + 1 if checkpoint.parent == self.root.resolve() else 0
        moved = []
        for path in history[keep:]:
            target = self.root / ABANDONED / path.name
            copy = 1
            while target.exists():
                target, copy = self.root / ABANDONED / f"{path.name}-{copy}", copy + 1
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            moved.append(target)
        return moved

    def begin(self, step: int) -> Path:
        staging = self.staging_dir(step)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        return staging

    def commit(self, step: int) -> Path:
        # replace_dir keeps an existing step-N (the same step saved again) until the new one is in place.
        final = replace_dir(self.staging_dir(step), self.root / f"step-{step:08d}")
        best = f"step-{self.keep_step:08d}" if self.keep_step is not None else None
        for old in self.all()[: -self.keep_last]:
            if old.name != best:
                # Renamed first: a kill during the deletion leaves a name clean_staging removes, not a step-N whose
                # state.json survived some of its weights (which --resume would take for whole).
                doomed = self.root / f".tmp-{old.name}.pruned"
                os.replace(old, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
        return final


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Under FSDP, of each sharded tensor the part this process holds."""
    # sync=False: the whole folder is flushed when it is committed
    write_safetensors(path, {name: local(value) for name, value in tensors.items()}, sync=False)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint is missing {path.name} ({path.parent})")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:  # cut short (a copy interrupted), or not safetensors at all
        raise CheckpointError(_damaged(path, error)) from None


def _damaged(path: Path, error: Exception) -> str:
    return (f"checkpoint file {path} is damaged ({str(error).splitlines()[0] or type(error).__name__}); resume from "
            f"an earlier checkpoint: --resume {path.parent.parent}/step-...")


def optimizer_to_parts(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and the rest (for JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, slots in state["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_parts(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, slots in rest["scalars"].items():
        state.setdefault(int(index), {}).update(slots)
    return {"state": state, "param_groups": rest["param_groups"]}


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True), sync=False)


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"checkpoint is missing {path.name} ({path.parent})")
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as error:  # (JSONDecodeError and UnicodeDecodeError are ValueErrors)
        raise CheckpointError(_damaged(path, error)) from None


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train: all of a fully trained model, only the adapter of a LoRA one.

    Frozen weights never change, so a checkpoint need not carry them (for a LoRA on SD
    1.5 that is 3 MB per checkpoint instead of 3.4 GB).
    """
    return {plain_name(name): p.detach() for name, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    expected = set(trainable_state(module))
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise CheckpointError(
            f"{where} does not match the model being trained: missing {missing[:3]}, unexpected {extra[:3]}"
            f" ({len(missing)} missing, {len(extra)} unexpected). Was it written with another model or adapter?"
        )
    with torch.no_grad():
        parameters = {plain_name(name): p for name, p in module.named_parameters()}
        for name, value in tensors.items():
            local(parameters[name]).copy_(value)


def read_config(checkpoint: Path) -> RunConfig:
    """The run config a checkpoint was written with."""
    path = checkpoint / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"checkpoint is missing config.yaml ({checkpoint})")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):  # (a truncated file: empty, or cut inside a value)
            raise ValueError(f"holds {type(raw).__name__}, not the run's sections")
    except (yaml.YAMLError, ValueError) as error:  # (UnicodeDecodeError is a ValueError)
        raise CheckpointError(_damaged(path, error)) from None
    return parse_config(raw, source=str(path))
