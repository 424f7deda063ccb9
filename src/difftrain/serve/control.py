"""ControlNet units as AUTOMATIC1111's ControlNet extension receives them, in `alwayson_scripts`.

`{"ControlNet": {"args": [{"enabled", "image", "module", "model", "weight", "guidance_start",
"guidance_end", "threshold_a", "threshold_b", "resize_mode", "control_mode", "processor_res",
"pixel_perfect"}, ...]}}` becomes the control units
`difftrain generate` draws with. Models are looked up by name among the ControlNets of the
server's ControlNet folder (the extension's "name [hash]" is accepted), never as paths.
"""

from __future__ import annotations

import math
from pathlib import Path

from difftrain.data.conditioning import Preprocess
from difftrain.serve.requests import SOFT_INPAINTING, RequestError, decode_image

MODULES = ("none", "canny", "mask", "segmentation")  # the extension's preprocessor names we run
# The extension's values (its API takes the index or the name; older versions' names too) -> ours.
RESIZE_VALUES = {0: "resize", "Just Resize": "resize", 1: "crop", "Crop and Resize": "crop",
                 "Scale to Fit (Inner Fit)": "crop", 2: "fill", "Resize and Fill": "fill",
                 "Envelope (Outer Fit)": "fill"}
MODE_VALUES = {0: "balanced", "Balanced": "balanced", 1: "prompt", "My prompt is more important": "prompt",
               2: "control", "ControlNet is more important": "control"}
MAX_UNITS = 8  # each holds a decoded image until its job runs; the extension itself offers 3 by default


def control_models(folder: Path | None) -> dict[str, Path]:
    """The ControlNets (and T2I-Adapters) a request may name: diffusers folders and single files in `folder`."""
    if folder is None or not folder.is_dir():
        return {}
    found = {path.name: path for path in sorted(folder.iterdir()) if (path / "config.json").is_file()}
    found.update({path.stem: path for path in sorted(folder.glob("*.safetensors"))})
    return found


def parse_units(scripts: dict, models: dict[str, Path]) -> tuple[list, list]:
    """(control units, their images as sent) of a request's `alwayson_scripts`."""
    from difftrain.generate.controlnet import ControlUnit

    unknown = [name for name in scripts if name.lower() not in ("controlnet", SOFT_INPAINTING)]
    if unknown:
        raise RequestError("alwayson_scripts", f"{', '.join(unknown)}: only the ControlNet extension's units and "
                                               "soft inpainting are served by difftrain")
    entry = next((value for name, value in scripts.items() if name.lower() == "controlnet"), None) or {}
    args = entry.get("args", []) if isinstance(entry, dict) else None
    if not isinstance(args, list):
        raise RequestError("alwayson_scripts.controlnet.args", "must be a list of units")
    if len(args) > MAX_UNITS:
        raise RequestError("alwayson_scripts.controlnet.args", f"{len(args)} units: this server takes at most "
                                                               f"{MAX_UNITS}")
    units, images = [], []
    for number, arg in enumerate(args):
        field = f"alwayson_scripts.controlnet.args[{number}]"
        if not isinstance(arg, dict):
            raise RequestError(field, "each unit is an object")
        if not arg.get("enabled", True):
            continue
        name = str(arg.get("model", "")).split(" [")[0]
        if name not in models:
            raise RequestError(f"{field}.model", f"{name!r} is not in this server's ControlNet folder "
                                                 f"({', '.join(models) or 'none served'})")
        module = str(arg.get("module", "none"))
        if module not in MODULES:
            raise RequestError(f"{field}.module", f"{module!r}: this server runs {', '.join(MODULES)}; send the "
                                                  "preprocessed image with module none")
        image = arg.get("image") or arg.get("input_image")
        if isinstance(image, dict):  # some extension versions send {"image": ..., "mask": ...}
            image = image.get("image")
        if not isinstance(image, str) or not image:
            raise RequestError(f"{field}.image", "each enabled unit needs its image (base64)")
        start, end = _number(arg, "guidance_start", 0.0, field), _number(arg, "guidance_end", 1.0, field)
        if not 0.0 <= start < end <= 1.0:
            raise RequestError(f"{field}.guidance_start", f"{start}..{end}: need 0 <= start < end <= 1")
        low, high = _number(arg, "threshold_a", -1, field), _number(arg, "threshold_b", -1, field)
        mode = "control" if arg.get("guessmode") else _choice(arg, "control_mode", MODE_VALUES, "balanced", field)
        # The extension's preprocessor resolution: -1 (absent) is its slider's default, 512; pixel perfect runs it
        # at the drawn size. (Our preprocessors that compute, canny, use it; the others take the image as it is.)
        resolution = _number(arg, "processor_res", -1, field)
        if resolution > 0 and not 64 <= resolution <= 2048:
            raise RequestError(f"{field}.processor_res", f"{resolution:g}: from 64 to 2048, or -1 for 512")
        units.append(ControlUnit(model=str(models[name]), image="(request)", scale=_number(arg, "weight", 1.0, field),
                                 preprocess=module, start=start, end=end, low_threshold=int(low) if low > 0 else None,
                                 high_threshold=int(high) if high > 0 else None,
                                 resize=_choice(arg, "resize_mode", RESIZE_VALUES, "crop", field), mode=mode,
                                 processor_res=None if arg.get("pixel_perfect") else int(resolution) if resolution > 0
                                 else 512))
        images.append(decode_image(image, f"{field}.image", Preprocess(module).colour_managed))
    modes = {unit.mode for unit in units}
    if "control" in modes and len(modes) > 1:
        raise RequestError("alwayson_scripts.controlnet.args", "'ControlNet is more important' on some units and "
                                                               "not others: diffusers applies it to all or none")
    return units, images


def _choice(arg: dict, key: str, values: dict, default: str, field: str) -> str:
    """A unit's named setting (the extension's index or name); absent or null is the extension's default."""
    value = arg.get(key)
    if value is None:
        return default
    if not isinstance(value, (int, str)) or isinstance(value, bool) or value not in values:
        names = ", ".join(f"{name!r}" for name in values if isinstance(name, str))
        raise RequestError(f"{field}.{key}", f"{value!r}: one of {names} (or its index)")
    return values[value]


def _number(arg: dict, key: str, default: float, field: str) -> float:
    """A unit's numeric setting; absent or null is the extension's default."""
    value = arg.get(key)
    if value is None:
        return float(default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RequestError(f"{field}.{key}", f"{value!r}: a number") from None
    if not math.isfinite(number):  # (JSON's 1e400 parses as infinity, and Python's parser takes NaN)
        raise RequestError(f"{field}.{key}", f"{value!r}: a finite number")
    return number
