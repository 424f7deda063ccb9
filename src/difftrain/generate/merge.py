"""`difftrain lora merge`: LoRAs baked into a model, written as a plain diffusers folder that every tool loads.

The model is anything `generate` takes (a folder, a hub id, a single file, a run folder; a
LoRA or Textual Inversion run's own adapter goes in too), and each LoRA a file, a folder
holding one or a LoRA run folder: through `load_merged`, the loader `export` uses.
"""

from __future__ import annotations

from pathlib import Path

from difftrain.atomic import atomic_dir, occupied
from difftrain.generate.loader import baked_manifest, load_merged, locate, loras_merged
from difftrain.models.lora_files import LoraFileError

# What a LoRA merges into: Stable Diffusion, alone or with adapters of its own.
MERGEABLE = ("stable-diffusion", "stable-diffusion-parts", "lora", "embedding")


def merge_loras(model: str, loras: list[tuple[str, float]], out_dir, use_ema: bool = True,
                progress: bool = True) -> Path:
    """`model` with each (LoRA, weight) baked in (W += weight x alpha/rank x up @ down), written to the new folder
    `out_dir`, whole or not at all."""
    out = Path(out_dir)
    if occupied(out):
        raise LoraFileError(f"{out}: exists and is not empty; merge into a new folder")
    located = locate(model, use_ema)
    manifest = located.manifest
    kind = manifest.kind if manifest is not None else "stable-diffusion"
    if kind not in MERGEABLE:  # (a ControlNet run's network, an export's graphs: a merged folder would drop them)
        raise LoraFileError(f"{model}: a {kind} model; LoRAs merge into a Stable Diffusion model (a folder, a single "
                            "file, a hub id, or a full, LoRA or Textual Inversion run)")
    pipe = load_merged(model, loras, use_ema=use_ema, progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as staging:
        pipe.save_pretrained(staging, safe_serialization=True)
        # (a plain diffusers folder to other tools; to difftrain, also the size and text length it was trained at)
        baked_manifest(pipe, "stable-diffusion", {
            "format": "diffusers", "source": pipe.model_name,
            "loras_merged": [[str(path), weight] for path, weight in loras_merged(located, loras)]}).write(staging)
    return out


__all__ = ["MERGEABLE", "merge_loras"]
