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

import logging
import os
from importlib import import_module
from typing import Any

__version__ = "0.1.0"

import difftrain.cache  # noqa: E402,F401  (reads TORCHINDUCTOR_CACHE_DIR before diffusers can set it)
from difftrain.versions import check_installed_versions  # noqa: E402

check_installed_versions()  # a clear error now, not a traceback from inside a library later


def _not_the_empty_fp32_warning(record: logging.LogRecord) -> bool:
    """diffusers 0.42 warns "modules ... that should be kept in float32: []" on every cast of a model
    to a dtype (`from_pretrained(torch_dtype=...)` and pipeline casts included), when nothing is to be
    kept; each bf16/fp16 run printed it. The warning with modules in the list still shows."""
    return "should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_not_the_empty_fp32_warning)


def _not_deepspeeds_cpu_notice(record: logging.LogRecord) -> bool:
    """Where deepspeed is installed, accelerate imports it whenever transformers saves a model (to check
    for its engine), and on a machine without a GPU deepspeed then prints "Setting accelerator to CPU.
    If you have GPU or other accelerator, we were unable to detect it." to stdout: every text-to-image
    run on a CPU showed it. Outside a DeepSpeed launch deepspeed's accelerator is never used; inside
    one the notice still shows."""
    return (os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
            or "Setting accelerator to CPU" not in record.getMessage())


logging.getLogger("DeepSpeed").addFilter(_not_deepspeeds_cpu_notice)  # deepspeed's logger, by the name it gives it

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
