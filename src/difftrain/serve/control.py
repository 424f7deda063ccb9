"""ControlNet units as AUTOMATIC1111's ControlNet extension receives them, in `alwayson_scripts`.

`{"ControlNet": {"args": [{"enabled", "image", "module", "model", "weight", "guidance_start",
"guidance_end", "threshold_a", "threshold_b", "control_mode"}, ...]}}` becomes the control units
`difftrain generate` draws with. Models are looked up by name among the ControlNets of the
server's ControlNet folder (the extension's "name [hash]" is accepted), never as paths.
"""

from __future__ import annotations

from pathlib import Path

from difftrain.serve.requests import RequestError, decode_image

MODULES = ("none", "canny", "mask", "segmentation")  # the extension's preprocessor names we run
GUESS_MODES = (2, "ControlNet is more important")
MAX_UNITS = 8  # each holds a decoded image until its job runs; the extension itself offers 3 by default


def control_models(folder: Path | None) -> dict[str, Path]:
    """The ControlNets (and T2I-Adapters) a request may name: diffusers folders and single files in `folder`."""
    if folder is None or not folder.is_dir():
        return {}
    found = {path.name: path for path in sorted(folder.iterdir()) if (path / "config.json").is_file()}
    found.update({path.stem: path for path in sorted(folder.glob("*.safetensors"))})
    return found


def parse_units(scripts: dict, models: dict[str, Path]) -> tuple[list, list, bool]:
    """(control units, their images as sent, guess mode) of a request's `alwayson_scripts`."""
    from difftrain.generate.controlnet import ControlUnit

    unknown = [name for name in scripts if name.lower() != "controlnet"]
    if unknown:
        raise RequestError("alwayson_scripts", f"{', '.join(unknown)}: only the ControlNet extension's units are "
                                               "served by difftrain")
    entry = next(iter(scripts.values()), None) or {}
    args = entry.get("args", []) if isinstance(entry, dict) else None
    if not isinstance(args, list):
        raise RequestError("alwayson_scripts.controlnet.args", "must be a list of units")
    if len(args) > MAX_UNITS:
        raise RequestError("alwayson_scripts.controlnet.args", f"{len(args)} units: this server takes at most "
                                                               f"{MAX_UNITS}")
    units, images, guess_mode = [], [], False
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
        units.append(ControlUnit(model=str(models[name]), image="(request)", scale=_number(arg, "weight", 1.0, field),
                                 preprocess=module, start=start, end=end,
                                 low_threshold=int(low) if low > 0 else 100, high_threshold=int(high) if high > 0 else 200))
        images.append(decode_image(image, f"{field}.image"))
        guess_mode = guess_mode or arg.get("control_mode") in GUESS_MODES
    return units, images, guess_mode


def _number(arg: dict, key: str, default: float, field: str) -> float:
    """A unit's numeric setting; absent or null is the extension's default."""
    value = arg.get(key)
    if value is None:
        return float(default)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise RequestError(f"{field}.{key}", f"{value!r}: a number") from None
