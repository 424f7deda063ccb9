"""The manifest beside every model difftrain writes: what the folder holds and how to load it.

`difftrain.json` is plain JSON next to the diffusers files; diffusers, AUTOMATIC1111 and
ComfyUI ignore a file they do not know. It says what the folder is (`kind`), which base
model an adapter or a partial model needs, which adapter files it carries, the noise
settings and the conditioning the model was trained with (text context length, clip
skip), and whether the weights are the EMA or the raw ones. The inference loader reads
this and nothing of the training run.

Folders written before manifests existed get one synthesised from their run's
`config.yaml` (`legacy_manifest`): the one place that still reads an old training config.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from difftrain.atomic import write_text
from difftrain.errors import DifftrainError
from difftrain.versions import difftrain_version

MANIFEST_FILE = "difftrain.json"
FORMAT = "difftrain-model"
VERSION = 1
KINDS = {
    "stable-diffusion": "a whole Stable Diffusion pipeline in diffusers layout",
    "stable-diffusion-parts": "trained components (unet/, text_encoder/) that replace the base model's",
    "lora": "a LoRA on the base model",
    "embedding": "a Textual Inversion embedding for the base model",
    "unconditional": "a pixel-space UNet2DModel and its noise scheduler",
    "vae": "an AutoencoderKL",
    "controlnet": "a ControlNet (diffusers folder) for the base model, which it steers with a conditioning image",
    "t2i-adapter": "a T2I-Adapter (diffusers folder) for the base model, which it steers with a conditioning image",
    "onnx": "a Stable Diffusion exported to ONNX graphs (diffusers' and Optimum's layout), run by ONNX Runtime",
}
ADAPTER_KINDS = ("stable-diffusion-parts", "lora", "embedding", "controlnet", "t2i-adapter")


class ManifestError(DifftrainError):
    pass


@dataclass
class Manifest:
    kind: str
    method: str | None = None
    weights: str = "ema"  # "ema" or "raw": which weights of the run these are
    # The model an adapter or partial model goes on: {"model", "revision", "variant"} and any
    # component replaced one by one ("unet", "vae", "text_encoder", "tokenizer").
    base: dict | None = None
    components: list[str] = field(default_factory=list)  # subfolders here that replace the base's
    loras: list[dict] = field(default_factory=list)  # {"file", "weight"}, relative to the folder
    embeddings: list[dict] = field(default_factory=list)  # {"file", "token"}
    # ControlNets / T2I-Adapters here: {"folder" (relative to this one), "scale", "preprocess", canny's
    # "low_threshold"/"high_threshold"}
    controls: list[dict] = field(default_factory=list)
    scheduler: str | None = None  # subfolder holding the scheduler the model was trained with
    noise: dict = field(default_factory=dict)  # prediction_type, beta_schedule, ... as trained
    # What shaped the text conditioning in training; every consumer must use the same.
    conditioning: dict = field(default_factory=dict)  # max_length, clip_skip, resolution
    # Pixel models: the UNet2DModel and scheduler configs, so a checkpoint's tensors load alone.
    architecture: dict = field(default_factory=dict)
    trained: dict = field(default_factory=dict)  # steps, difftrain version
    export: dict = field(default_factory=dict)  # an exported model: format, precision, quantisation, its quality gate

    def to_json(self) -> str:
        header = {"format": FORMAT, "version": VERSION, "written_by": f"difftrain {difftrain_version()}"}
        return json.dumps({**header, **asdict(self)}, indent=2) + "\n"

    def write(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST_FILE
        write_text(path, self.to_json())
        return path


def base_reference(model: str | None, revision: str | None = None, variant: str | None = None, **parts) -> dict:
    """A base model as the manifest records it: local paths made absolute, hub ids kept as they are."""

    def where(spec: str | None) -> str | None:
        if spec is None:
            return None
        path = Path(spec).expanduser()
        return str(path.resolve()) if path.exists() else spec

    reference = {"model": where(model), "revision": revision, "variant": variant}
    reference.update({name: where(spec) for name, spec in parts.items() if spec is not None})
    return reference


def read_manifest(folder: Path) -> Manifest | None:
    """The folder's manifest, None if it has none; a manifest this version cannot read is refused."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not a readable manifest ({exc}); delete it to load the folder as plain diffusers")
    return parse_manifest(raw, str(path))


def parse_manifest(raw: dict, where: str) -> Manifest:
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ManifestError(f"{where}: not a difftrain model manifest (no \"format\": \"{FORMAT}\")")
    version = raw.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise ManifestError(
            f"{where}: manifest version {version!r} was written by a newer difftrain; this one reads up to "
            f"version {VERSION}. Upgrade difftrain to load this model"
        )
    if raw.get("kind") not in KINDS:
        raise ManifestError(f"{where}: kind {raw.get('kind')!r} is not one of {', '.join(KINDS)}")
    known = {key: value for key, value in raw.items() if key in Manifest.__dataclass_fields__}
    _check_types(known, where)
    return Manifest(**known)


# What a hand-edited or damaged manifest must still hold for the loaders to read it: the field's
# JSON types, and the keys each listed entry is read by.
_FIELD_TYPES = {"method": (str, type(None)), "weights": (str,), "base": (dict, type(None)), "components": (list,),
                "loras": (list,), "embeddings": (list,), "controls": (list,), "scheduler": (str, type(None)),
                "noise": (dict,), "conditioning": (dict,), "architecture": (dict,), "trained": (dict,),
                "export": (dict,)}
_ENTRY_KEYS = {"loras": {"file": str, "weight": (int, float)}, "embeddings": {"file": str}, "controls": {},
               "components": None}
_CONDITIONING_INTS = ("max_length", "clip_skip", "resolution")


def _check_types(fields: dict, where: str) -> None:
    """Refuse, by field, what the loaders would otherwise fail on deep inside (a string weight, a list for a dict)."""
    def json_name(types) -> str:
        names = {str: "a string", dict: "an object", list: "a list", int: "a number", float: "a number",
                 type(None): "null"}
        return " or ".join(dict.fromkeys(names[t] for t in (types if isinstance(types, tuple) else (types,))))

    for key, value in fields.items():
        if not isinstance(value, _FIELD_TYPES.get(key, object)):  # (kind: checked by name above)
            raise ManifestError(f"{where}: {key} is {value!r:.60}; it must be {json_name(_FIELD_TYPES[key])}")
    if fields.get("weights", "ema") not in ("ema", "raw"):
        raise ManifestError(f"{where}: weights is {fields['weights']!r}; it must be \"ema\" or \"raw\"")
    for key, required in _ENTRY_KEYS.items():
        for number, entry in enumerate(fields.get(key, [])):
            if required is None:  # a list of names
                if not isinstance(entry, str):
                    raise ManifestError(f"{where}: {key}[{number}] is {entry!r:.60}; it must be a string")
                continue
            if not isinstance(entry, dict):
                raise ManifestError(f"{where}: {key}[{number}] is {entry!r:.60}; it must be an object")
            for name, types in required.items():
                if not isinstance(entry.get(name), types) or isinstance(entry.get(name), bool):
                    raise ManifestError(f"{where}: {key}[{number}].{name} is {entry.get(name)!r:.60}; it must be "
                                        f"{json_name(types)}")
    for name in _CONDITIONING_INTS:
        value = fields.get("conditioning", {}).get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ManifestError(f"{where}: conditioning.{name} is {value!r:.60}; it must be a whole number >= 1 "
                                "or null")


def legacy_manifest(run_dir: Path, model_dir: Path, weights: str) -> Manifest:
    """The manifest a run from before manifests would have written for `model_dir`, from its config.yaml.

    Only keys that existed then are read, as plain YAML (the run config schema may have
    moved on since): method, lora.enabled, model.*, text2image.max_length, data.resolution,
    noise.* and, for pixel models, the UNet preset.
    """
    path = Path(run_dir) / "config.yaml"
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ManifestError(f"{path}: cannot read the run's config ({exc})") from None
    method = config.get("method", "unconditional")
    model = config.get("model") or {}
    resolution = (config.get("data") or {}).get("resolution")
    if method == "vae":
        return Manifest("vae", method, weights)
    if method == "unconditional":
        return _legacy_unconditional(config, model, resolution, weights)
    base = base_reference(model.get("base"), model.get("revision"), model.get("variant"),
                          **{name: model.get(name) for name in ("unet", "vae", "text_encoder", "tokenizer")})
    max_length = (config.get("text2image") or {}).get("max_length")
    conditioning = {"max_length": max_length, "clip_skip": 1, "resolution": resolution}
    scheduler = "scheduler" if (model_dir / "scheduler").is_dir() else None
    common = dict(method=method, weights=weights, base=base, conditioning=conditioning, scheduler=scheduler)
    if (config.get("lora") or {}).get("enabled"):
        return Manifest("lora", loras=[{"file": "pytorch_lora_weights.safetensors", "weight": 1.0}], **common)
    if method == "textual_inversion":
        token = (config.get("textual_inversion") or {}).get("token")
        return Manifest("embedding", embeddings=[{"file": "learned_embeds.safetensors", "token": token}], **common)
    if (model_dir / "model_index.json").is_file():
        return Manifest("stable-diffusion", **{**common, "base": None})
    parts = [name for name in ("unet", "text_encoder") if (model_dir / name).is_dir()]
    return Manifest("stable-diffusion-parts", components=parts, **common)


def _legacy_unconditional(config: dict, model: dict, resolution: int | None, weights: str) -> Manifest:
    from difftrain.models.noise import noise_scheduler
    from difftrain.models.unet import unet_config

    noise = config.get("noise") or {}
    scheduler = noise_scheduler(None, noise.get("num_train_timesteps"), noise.get("beta_schedule"),
                                noise.get("prediction_type"), bool(noise.get("zero_terminal_snr")))
    unet = unet_config(model.get("preset"), model.get("unet_config"), model.get("channels", 3), resolution or 32)
    return Manifest("unconditional", "unconditional", weights,
                    architecture={"unet": unet, "scheduler": dict(scheduler.config)})
