"""ControlNet for `difftrain generate`: one or several ControlNets, each with its image, scale and window.

A unit is what AUTOMATIC1111's ControlNet extension calls one: a model, a conditioning
image (optionally run through a preprocessor first), a weight and the share of the sampling
steps it acts on. The conditioning image follows the extension's default "Crop and Resize"
rule: scaled to cover the output size, then centre-cropped to it. Each PNG records its
units in the extension's own infotext format, plus the paths `--from-png` needs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from difftrain.errors import DifftrainError

PREPROCESSORS = ("none", "canny")


class ControlNetError(DifftrainError):
    pass


@dataclass
class ControlUnit:
    model: str  # a diffusers ControlNet folder (or a run's), a hub id, or a single .safetensors file
    image: str
    scale: float = 1.0
    preprocess: str = "none"
    start: float = 0.0  # the share of sampling steps before the ControlNet starts acting
    end: float = 1.0
    low_threshold: int = 100  # canny
    high_threshold: int = 200

    def check(self, number: int) -> None:
        where = f"ControlNet {number} ({self.model})"
        if self.preprocess not in PREPROCESSORS:
            raise ControlNetError(f"{where}: --preprocess {self.preprocess}: choose one of {', '.join(PREPROCESSORS)}")
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


def canny(image: Image.Image, low: int, high: int) -> Image.Image:
    """OpenCV's Canny edges, white on black, as the ControlNet canny models were trained on."""
    import cv2

    edges = cv2.Canny(np.asarray(image.convert("L")), low, high)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def crop_and_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale to cover width x height, then centre-crop: A1111's default "Crop and Resize", and
    the rule training's centre crop follows (the same code)."""
    from difftrain.data.transforms import resize_to_cover

    image = resize_to_cover(image, (width, height))
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def conditioning_image(unit: ControlUnit, width: int, height: int) -> Image.Image:
    from difftrain.data.images import load_image

    image = crop_and_resize(load_image(unit.image), width, height)
    if unit.preprocess == "canny":
        image = canny(image, unit.low_threshold, unit.high_threshold)
    return image


def load_controlnet(spec: str, dtype: torch.dtype, unet):
    """A ControlNetModel from a folder, a run folder's model, a single file or a hub id, checked against `unet`."""
    from diffusers import ControlNetModel

    path = _local_folder(spec)
    try:
        if path.is_dir():
            net = ControlNetModel.from_pretrained(path, torch_dtype=dtype)
        elif path.suffix == ".safetensors":
            net = ControlNetModel.from_single_file(str(path), torch_dtype=dtype)
        elif path.exists():
            raise ControlNetError(f"--controlnet {spec}: a ControlNet is a folder or a .safetensors file "
                                  "(pickled .ckpt/.pth files are not loaded)")
        else:
            net = ControlNetModel.from_pretrained(spec, torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as exc:
        hint = (" A single file needs its diffusers config, fetched from the Hub (SD 1.5's) unless cached: offline, "
                "or for another base, give the ControlNet as a diffusers folder." if path.suffix == ".safetensors" else "")
        raise ControlNetError(f"--controlnet {spec}: cannot load a ControlNet from it "
                              f"({str(exc).splitlines()[0]}).{hint}") from None
    check_fits(net, unet, spec)
    return net


def check_fits(net, unet, name: str) -> None:
    """A ControlNet adds its residuals to this UNet's blocks: the widths must be the UNet's."""
    pairs = [("cross_attention_dim", "text conditioning width"), ("in_channels", "latent channels"),
             ("block_out_channels", "block widths")]
    for key, meaning in pairs:
        ours, theirs = _as_list(net.config[key]), _as_list(unet.config[key])
        if ours != theirs:
            raise ControlNetError(f"--controlnet {name}: its {meaning} ({key}) is {_show(ours)}, the model's UNet has "
                                  f"{_show(theirs)}: it was trained for another base (an SD 1.x ControlNet on SD 1.x, "
                                  "SD 2.x on SD 2.x)")


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _show(values: list) -> str:
    return str(values[0]) if len(values) == 1 else str(tuple(values))


def controlnet_pipeline(pipe, nets: list, img2img: bool):
    """The text2image (or img2img) ControlNet pipeline around `pipe`'s own components."""
    from diffusers import StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetPipeline

    cls = StableDiffusionControlNetImg2ImgPipeline if img2img else StableDiffusionControlNetPipeline
    return cls(**pipe.components, controlnet=nets[0] if len(nets) == 1 else nets)


def pipeline_arguments(units: list[ControlUnit], images: list[Image.Image], guess_mode: bool, img2img: bool) -> dict:
    one = len(units) == 1
    return {
        "control_image" if img2img else "image": images[0] if one else images,
        "controlnet_conditioning_scale": units[0].scale if one else [u.scale for u in units],
        "control_guidance_start": [u.start for u in units],
        "control_guidance_end": [u.end for u in units],
        "guess_mode": guess_mode,
    }


def infotext_units(units: list[ControlUnit], guess_mode: bool, width: int, height: int) -> dict[str, str]:
    """`ControlNet N` entries as A1111's ControlNet extension writes them, and our paths for --from-png."""
    params = {}
    for number, unit in enumerate(units):
        parts = [f"Module: {unit.preprocess}", f"Model: {_model_name(unit.model)} [{model_hash(unit.model)}]",
                 f"Weight: {unit.scale:g}", "Resize Mode: Crop and Resize", "Low Vram: False",
                 f"Processor Res: {min(width, height)}"]
        if unit.preprocess == "canny":
            parts += [f"Threshold A: {unit.low_threshold}", f"Threshold B: {unit.high_threshold}"]
        parts += [f"Guidance Start: {unit.start:g}", f"Guidance End: {unit.end:g}", "Pixel Perfect: False",
                  f"Control Mode: {'ControlNet is more important' if guess_mode else 'Balanced'}"]
        params[f"ControlNet {number}"] = ", ".join(parts)
        params[f"ControlNet {number} files"] = f"{unit.model} | {unit.image}"
    return params


def units_from_infotext(params: dict[str, str]) -> tuple[list[ControlUnit], bool]:
    units, guess_mode, number = [], False, 0
    while f"ControlNet {number}" in params and f"ControlNet {number} files" in params:
        fields = dict(item.split(": ", 1) for item in params[f"ControlNet {number}"].split(", ") if ": " in item)
        model, image = (text.strip() for text in params[f"ControlNet {number} files"].split(" | ", 1))
        units.append(ControlUnit(
            model=model, image=image, scale=float(fields.get("Weight", 1)),
            preprocess=fields.get("Module", "none"), start=float(fields.get("Guidance Start", 0)),
            end=float(fields.get("Guidance End", 1)), low_threshold=int(fields.get("Threshold A", 100)),
            high_threshold=int(fields.get("Threshold B", 200)),
        ))
        guess_mode = fields.get("Control Mode") == "ControlNet is more important"
        number += 1
    return units, guess_mode


def _local_folder(spec: str) -> Path:
    """`spec` as a path; a difftrain run folder stands for its final model."""
    from difftrain.run_folder import final_model_dir, is_run_folder

    path = Path(spec)
    return final_model_dir(path) if is_run_folder(path) else path


def _model_name(spec: str) -> str:
    path = Path(spec)
    return path.stem if path.suffix == ".safetensors" else path.name  # a run's name, not its "model"


@lru_cache(maxsize=32)  # one read of a large file per model and process, not one per image
def model_hash(spec: str) -> str:
    """The first 8 hex digits of the weights file's SHA-256, the short hash A1111 shows beside a model."""
    path = _local_folder(spec)
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
