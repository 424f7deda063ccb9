"""ControlNet for `difftrain generate`: one or several ControlNets, each with its image, scale and window.

A unit is what AUTOMATIC1111's ControlNet extension calls one: a model, a conditioning
image (optionally run through a preprocessor first), a weight, the share of the sampling
steps it acts on, a resize mode and a control mode. The conditioning image follows the
extension's resize modes (default "Crop and Resize": scaled to cover the output size, then
centre-cropped to it). The control modes are the extension's: "My prompt is more important"
weighs the residuals 0.825^(12 - i) from the deepest block out, on both halves of the guidance
batch; "ControlNet is more important" is that weighting on the prompt's half alone, which is
diffusers' guess mode (its 10^(-1 + i/12) is the same curve). Each PNG records its units in
the extension's own infotext format, plus the paths `--from-png` needs.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image

from difftrain.data.conditioning import (ANNOTATORS, RESIZE_MODES, Preprocess, at_processor_res, binarised,
                                         condition_image, load_condition)
from difftrain.models.control import ControlNetError, control_pipeline, is_adapter, load_control, local_folder
from difftrain.generate.infotext import recorded_path

__all__ = ["ControlNetError", "ControlUnit", "control_pipeline", "load_control"]
log = logging.getLogger(__name__)
CONTROL_KINDS = ("controlnet", "t2i-adapter")  # manifest kinds that carry their own control network
OWN = "(model)"  # how a PNG's infotext names the drawn model's own ControlNet
# The model-based annotators need a weights folder, which generate does not take yet.
PREPROCESSORS = ("none", "canny", "mask", "segmentation")
CONTROL_MODES = {"balanced": "Balanced", "prompt": "My prompt is more important",
                 "control": "ControlNet is more important"}


@dataclass
class ControlUnit:
    # A diffusers ControlNet folder (or a run's), a hub id, or a single .safetensors file; None: the
    # ControlNet of the model being drawn from (a ControlNet run's), which also fills in None
    # scale and preprocess with what it was trained with.
    model: str | None
    image: str
    scale: float | None = 1.0
    preprocess: str | None = "none"
    start: float = 0.0  # the share of sampling steps before the ControlNet starts acting
    end: float = 1.0
    # canny's; None: what the ControlNet was trained with (a difftrain run's), else 100 and 200
    low_threshold: int | None = None
    high_threshold: int | None = None
    own: bool = False  # the drawn model's own network (recorded as such, so --from-png finds it wherever it moved)
    resize: str = "crop"  # a key of RESIZE_MODES
    mode: str = "balanced"  # a key of CONTROL_MODES
    # A computing preprocessor's (canny's) resolution, the image's short side: A1111's Preprocessor Resolution.
    # None: it runs on the image fitted to the drawn size, as A1111's Pixel Perfect does.
    processor_res: int | None = None

    def check(self, number: int) -> None:
        owner = self.model or "the model's own"
        where = f"ControlNet {number} ({owner})"
        if self.preprocess is not None and self.preprocess not in PREPROCESSORS:  # (given, or a PNG's Module)
            raise ControlNetError(f"{where}: preprocessor {self.preprocess!r}: generate runs "
                                  f"{', '.join(PREPROCESSORS)}; for another one, give its map as --control-image "
                                  "with --preprocess none")
        if self.resize not in RESIZE_MODES:
            raise ControlNetError(f"{where}: --control-resize {self.resize}: choose one of {', '.join(RESIZE_MODES)}")
        if self.mode not in CONTROL_MODES:
            raise ControlNetError(f"{where}: --control-mode {self.mode}: choose one of {', '.join(CONTROL_MODES)}")
        if self.processor_res is not None and not 64 <= self.processor_res <= 2048:
            raise ControlNetError(f"{where}: --processor-res {self.processor_res}: from 64 to 2048 (A1111's slider)")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ControlNetError(f"{where}: --control-start {self.start} / --control-end {self.end}: "
                                  "need 0 <= start < end <= 1")
        if not Path(self.image).is_file():
            raise ControlNetError(f"{where}: --control-image {self.image}: no such file")
        from difftrain.data.images import BadImage, load_image

        try:
            load_image(self.image)
        except BadImage as reason:
            raise ControlNetError(f"{where}: --control-image {self.image}: {reason}") from None


def with_own_controlnet(units: list[ControlUnit], manifest, folder: Path | None, source) -> list[ControlUnit]:
    """`units` with the model's own ControlNet (manifest kind "controlnet") in those that name none.

    A ControlNet model drawn without its ControlNet would be its base alone: refused.
    """
    from dataclasses import replace

    mine = manifest is not None and manifest.kind in CONTROL_KINDS and manifest.controls
    units = [_as_trained(unit) if unit.model is not None else unit for unit in units]
    if not mine:
        if any(unit.model is None for unit in units):
            raise ControlNetError(f"{source} is not a ControlNet model: give --controlnet for each --control-image")
        return units
    trained = manifest.controls[0]
    path = (folder / trained.get("folder", ".")).resolve()
    if not any(unit.model is None or local_folder(unit.model).resolve() == path for unit in units):
        raise ControlNetError(f"{source} is a {manifest.kind}: give --control-image (the first one is for it)")
    trained_preprocess = trained.get("preprocess", "none")
    resolved = []
    for unit in units:
        if unit.model is None:
            chosen = unit.preprocess is not None
            if not chosen and trained_preprocess in ANNOTATORS:
                raise ControlNetError(f"{source} was trained on {trained_preprocess} maps made by controlnet_aux, "
                                      f"which generate does not run: give a {trained_preprocess} map as "
                                      "--control-image with --preprocess none")
            unit = replace(
                unit, model=str(path), own=True, scale=trained.get("scale", 1.0) if unit.scale is None else unit.scale,
                preprocess=unit.preprocess if chosen else trained_preprocess, **_thresholds(unit, trained))
        resolved.append(unit)
    return resolved


def _as_trained(unit: ControlUnit) -> ControlUnit:
    """A unit naming another ControlNet: a difftrain ControlNet run's preprocessor (and canny thresholds)
    unless --preprocess was given, its weight unless one was (a T2I-Adapter's, which its manifest carries), and a
    warning if the run also trained a UNet LoRA, which steers only the model it was trained beside."""
    from dataclasses import replace

    from difftrain.models.manifest import read_manifest

    folder = local_folder(unit.model)
    theirs = read_manifest(folder) if folder.is_dir() else None
    if theirs is None or theirs.kind not in CONTROL_KINDS or not theirs.controls:
        return replace(unit, preprocess="none" if unit.preprocess is None else unit.preprocess,
                       scale=1.0 if unit.scale is None else unit.scale)
    if theirs.loras:
        log.warning("%s was trained beside a LoRA on its base's UNet, which a --controlnet unit does not load: draw "
                    "with the run itself as the model (difftrain generate %s --control-image ...) to have both",
                    unit.model, unit.model)
    trained = theirs.controls[0]
    if unit.preprocess is None and trained.get("preprocess") in ANNOTATORS:
        raise ControlNetError(f"{unit.model} was trained on {trained['preprocess']} maps made by controlnet_aux, "
                              f"which generate does not run: give a {trained['preprocess']} map as its "
                              "--control-image with --preprocess none")
    return replace(unit, preprocess=unit.preprocess or trained.get("preprocess", "none"),
                   scale=trained.get("scale", 1.0) if unit.scale is None else unit.scale, **_thresholds(unit, trained))


def _thresholds(unit: ControlUnit, trained: dict) -> dict:
    """The canny thresholds given for `unit`, else those its ControlNet was trained with (when it runs the
    preprocessor it was trained on: none given means the trained one)."""
    if unit.preprocess not in (None, trained.get("preprocess", "none")):
        return {}
    return {key: trained.get(key) if getattr(unit, key) is None else getattr(unit, key)
            for key in ("low_threshold", "high_threshold")}


def canny_thresholds(unit: ControlUnit) -> tuple[int, int]:
    """The thresholds a unit's canny runs with: its own, the trained ones, or canny's defaults."""
    return (100 if unit.low_threshold is None else unit.low_threshold,
            200 if unit.high_threshold is None else unit.high_threshold)


def conditioning_image(unit: ControlUnit, width: int, height: int, image: Image.Image | None = None) -> Image.Image:
    """The unit's image (its file, or `image` already decoded) as its ControlNet reads it: cropped and
    resized, then preprocessed, as in training."""
    preprocess = Preprocess(unit.preprocess, *canny_thresholds(unit))
    if image is None:
        image = load_condition(unit.image, preprocess)
    if unit.processor_res is None or not preprocess.computes:  # made at the drawn size (A1111's pixel perfect)
        return condition_image(image, (width, height), preprocess, unit.resize)
    condition = condition_image(at_processor_res(image, unit.processor_res, preprocess), (width, height),
                                Preprocess(), unit.resize)
    return binarised(condition) if preprocess.name == "canny" else condition


def pipeline_arguments(units: list[ControlUnit], images: list[Image.Image], img2img: bool, nets: list) -> dict:
    from difftrain.models.control import condition_channels

    one = len(units) == 1
    modes = [unit.mode for unit in units]
    # A grey-scale adapter's image goes as grey: diffusers' adapter pipeline keeps the channels it is given.
    images = [image.convert("L") if condition_channels(net) == 1 else image for image, net in zip(images, nets)]
    if any(is_adapter(net) for net in nets):
        if set(modes) != {"balanced"} or any(u.start != 0.0 or u.end != 1.0 for u in units):
            raise ControlNetError("--guess-mode, --control-mode, --control-start and --control-end apply to "
                                  "ControlNets; diffusers' T2I-Adapter pipeline acts on every step, balanced")
        return {"image": images[0] if one else images,
                "adapter_conditioning_scale": units[0].scale if one else [u.scale for u in units]}
    if "control" in modes and set(modes) != {"control"}:
        raise ControlNetError("'ControlNet is more important' (guess mode) acts on every ControlNet of a drawing in "
                              "diffusers: give it to all units or to none")
    soft = {}
    for net, mode in zip(nets, modes):
        if soft.setdefault(id(net), mode == "prompt") != (mode == "prompt"):
            raise ControlNetError("one ControlNet in two units with different control modes: load it once per mode")
        _soft_injection(net, mode == "prompt")
    return {
        "control_image" if img2img else "image": images[0] if one else images,
        "controlnet_conditioning_scale": units[0].scale if one else [u.scale for u in units],
        "control_guidance_start": [u.start for u in units],
        "control_guidance_end": [u.end for u in units],
        "guess_mode": modes[0] == "control",
    }


def _soft_injection(net, on: bool) -> None:
    """Weigh `net`'s residuals as A1111's "My prompt is more important" does, from now until turned off.

    A forward hook, registered once per network and switched by a flag, so a server that keeps a network
    loaded across requests sets each request's mode without piling up hooks.
    """
    if not hasattr(net, "_difftrain_soft_hook"):
        net._difftrain_soft_hook = net.register_forward_hook(_weigh_residuals)
    net._difftrain_soft = on


def _weigh_residuals(net, args, output):
    if not getattr(net, "_difftrain_soft", False):
        return output
    down, mid = output[0], output[1]
    count = len(down)  # SD's 12: the shallowest at 0.825^12, the deepest 1, the middle block 1
    return ([residual * 0.825 ** (count - i) for i, residual in enumerate(down)], mid, *output[2:])


def infotext_units(units: list[ControlUnit], width: int, height: int) -> dict[str, str]:
    """`ControlNet N` entries as A1111's ControlNet extension writes them, and our paths for --from-png."""
    params = {}
    for number, unit in enumerate(units):
        parts = [f"Module: {unit.preprocess}", f"Model: {_model_name(unit.model)} [{model_hash(unit.model)}]",
                 f"Weight: {unit.scale:g}", f"Resize Mode: {RESIZE_MODES[unit.resize]}", "Low Vram: False",
                 f"Processor Res: {unit.processor_res or min(width, height)}"]
        if unit.preprocess == "canny":
            low, high = canny_thresholds(unit)
            parts += [f"Threshold A: {low}", f"Threshold B: {high}"]
        parts += [f"Guidance Start: {unit.start:g}", f"Guidance End: {unit.end:g}",
                  f"Pixel Perfect: {unit.processor_res is None}",
                  f"Control Mode: {CONTROL_MODES[unit.mode]}"]
        params[f"ControlNet {number}"] = ", ".join(parts)
        # (a resolution given is said here too: it may be the drawn short side, which older PNGs wrote for the drawn
        # size under Pixel Perfect: False)
        given = f"{RESOLUTION_MARK}{unit.processor_res}" if unit.processor_res else ""
        params[f"ControlNet {number} files"] = (f"{OWN if unit.own else recorded_path(unit.model)} | "
                                                f"{recorded_path(unit.image)}{given}")
    return params


def units_from_infotext(params: dict[str, str]) -> list[ControlUnit]:
    """The units a PNG's infotext records (each with its control mode, "ControlNet is more important" included)."""
    units = recorded_units(params)
    for number, unit in enumerate(units):
        if not unit.image:  # another tool's PNG: its model and image are not ours to find
            raise ControlNetError(f"the PNG's ControlNet {number} ({unit.model}) names no files difftrain can find: "
                                  "give --controlnet and --control-image for each of its units to draw it again (its "
                                  "other settings are taken from the PNG)")
    return units


def recorded_units(params: dict[str, str]) -> list[ControlUnit]:
    """`units_from_infotext`'s units, those of another tool's PNG too: without our files entry, a unit's model is
    the name the PNG shows and its image empty."""
    units, number = [], 0
    while f"ControlNet {number}" in params:
        fields = dict(item.split(": ", 1) for item in params[f"ControlNet {number}"].split(", ") if ": " in item)
        model, image, given = fields.get("Model", "unnamed"), "", ""
        if f"ControlNet {number} files" in params:
            model, image = (text.strip() for text in params[f"ControlNet {number} files"].split(" | ", 1))
            image, _, given = image.partition(RESOLUTION_MARK)

        def recorded(key: str, default: float) -> float:
            try:  # (A1111 writes its thresholds as floats, and -1 for a module without them)
                return float(fields.get(key, default))
            except ValueError:
                raise ControlNetError(f"the PNG's ControlNet {number}: {key}: {fields[key]!r} is not a "
                                      "number") from None

        low, high = recorded("Threshold A", -1), recorded("Threshold B", -1)
        units.append(ControlUnit(
            model=None if model == OWN else model, image=image, scale=recorded("Weight", 1),
            preprocess=fields.get("Module", "none"), start=recorded("Guidance Start", 0),
            end=recorded("Guidance End", 1), low_threshold=int(low) if low > 0 else None,
            high_threshold=int(high) if high > 0 else None,
            resize=_key_of(RESIZE_MODES, fields.get("Resize Mode"), "crop"),
            mode=_key_of(CONTROL_MODES, fields.get("Control Mode"), "balanced"),
            processor_res=int(given) if given.isdigit() else _processor_res(fields, params.get("Size", "")),
        ))
        number += 1
    return units


RESOLUTION_MARK = " | processor res "  # after the files: the resolution a unit was given


def _processor_res(fields: dict[str, str], size: str) -> int | None:
    """A unit's preprocessor resolution from its infotext where its files do not say it; None where it ran at the
    drawn size: Pixel Perfect, or the drawn short side (what PNGs before 2026-12-07 17:30 UTC recorded, under
    Pixel Perfect: False)."""
    if fields.get("Pixel Perfect") == "True" or not fields.get("Processor Res", "").isdigit():
        return None
    resolution = int(fields["Processor Res"])
    drawn = [int(side) for side in size.split("x") if side.isdigit()]
    return None if len(drawn) == 2 and resolution == min(drawn) else resolution


def _key_of(names: dict[str, str], shown: str | None, default: str) -> str:
    return next((key for key, name in names.items() if name == shown), default)


def _model_name(spec: str) -> str:
    path = Path(spec)
    if path.name in ("model", "model-no-ema", "model-best"):  # a run's final model: the run's name
        return path.parent.name
    return path.stem if path.suffix == ".safetensors" else path.name


@lru_cache(maxsize=32)  # one read of a large file per model and process, not one per image
def model_hash(spec: str) -> str:
    """The first 8 hex digits of the weights file's SHA-256, the short hash A1111 shows beside a model."""
    path = local_folder(spec)
    if path.is_dir():
        candidates = sorted(path.glob("*.safetensors"))
        path = candidates[0] if candidates else path
    if not path.is_file():
        return "hub"
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:8]
