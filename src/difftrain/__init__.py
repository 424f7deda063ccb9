"""difftrain: from a folder of images to a diffusion model that every other tool can load.

The Python API mirrors the CLI one to one:

    from difftrain import load_config, train, sample_grid
    result = train(load_config("configs/demo.yaml"))
    sample_grid(result.run_dir, num_images=16, scheduler="dpm++_2m", out="grid.png")
    generate("runs/sd-lora", GenerateOptions(prompt="a (red:1.2) fox", scheduler="DPM++ 2M Karras"), "outputs")
    pipe = load_pipeline("runs/sd-lora")  # any model as a ready diffusers pipeline
    evaluate("runs/demo", EvalOptions(reference="data/shapes", num_images=256), "runs/demo/eval")
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

import difftrain.cache  # noqa: E402,F401  (reads TORCHINDUCTOR_CACHE_DIR before diffusers can set it)
from difftrain.versions import check_installed_versions  # noqa: E402

check_installed_versions()  # a clear error now, not a traceback from inside a library later

# Heavy imports (torch, diffusers) wait until a function is used, so `difftrain config
# check` and `--help` answer at once.
_EXPORTS = {
    "load_config": "difftrain.config",
    "RunConfig": "difftrain.config",
    "ConfigError": "difftrain.config",
    "train": "difftrain.training.trainer",
    "sample_grid": "difftrain.generate.unconditional",
    "write_shapes_dataset": "difftrain.data.shapes",
    "scan_folder": "difftrain.data.folder",
    "generate": "difftrain.generate.text2image",
    "load_pipeline": "difftrain.generate.loader",
    "evaluate": "difftrain.evaluate.run",
    "EvalOptions": "difftrain.evaluate.run",
    "GenerateOptions": "difftrain.generate.text2image",
    "options_from_png": "difftrain.generate.text2image",
    "load_sd": "difftrain.models.sd",
    "write_tiny_sd": "difftrain.models.tiny_sd",
    "merge_lora": "difftrain.models.lora_files",
    "convert_lora": "difftrain.models.lora_files",
    "build_shards": "difftrain.data.shards",
    "open_source": "difftrain.data.sources",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'difftrain' has no attribute {name!r}")
