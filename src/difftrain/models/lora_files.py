"""LoRA files in the formats our users load, and conversion between them (merging: generate/merge.py).

Training holds the adapter in peft (`model.add_adapter(LoraConfig(...))`); `save_lora` writes
it twice:

- `pytorch_lora_weights.safetensors`, diffusers' format (`pipe.load_lora_weights(folder)`):
  keys `unet.<module>.lora.down.weight` / `text_encoder.text_model.<module>.lora_linear_layer.up.weight`
  (diffusers' own `convert_state_dict_to_diffusers` spelling), and a LoraConfig (rank, alpha,
  per-module patterns) as JSON in the header under `lora_adapter_metadata`, which is where
  diffusers reads alpha from (without it, it assumes alpha = rank).
- `<name>.safetensors`, kohya's format (AUTOMATIC1111, ComfyUI, and diffusers' kohya path):
  `lora_unet_<module_with_underscores>.lora_down.weight`, `.lora_up.weight` and a scalar
  `.alpha` per module; the scale applied is alpha / rank.

Inside, both become one list of `Module`s (part, module path, down, up, kohya alpha), so
every conversion is two small functions, not one per pair of formats.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import logging
import math
import re
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from difftrain.atomic import write_safetensors
from difftrain.errors import DifftrainError
from difftrain.models.file_metadata import shared_model_name, string_metadata

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers looks for in a folder
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' header key for the LoraConfig JSON

# diffusers component -> kohya key prefix. Read-only aliases: SDXL files say lora_te1_.
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
KOHYA_READ_PREFIX = {**{p: part for part, p in KOHYA_PREFIX.items()}, "lora_te1_": "text_encoder"}
KOHYA_SUFFIX = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
# Every spelling diffusers and peft use for the two matrices.
DIFFUSERS_SUFFIX = {
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
}

# How diffusers' convert_state_dict_to_diffusers spells attention LoRAs, used for every module:
# diffusers' loader converts a unet file only when its FIRST key lacks "lora_A", so the mix
# it writes for other targets (proj_in.lora_A next to to_q.lora.down) silently drops layers.
DIFFUSERS_SPELLING = {"unet": ".lora.{}.weight", "text_encoder": ".lora_linear_layer.{}.weight"}

# kohya flattens "." to "_", which also sits inside module names. Reading a kohya key back,
# these words are re-joined (longest first); check_lora_fits never needs them, it
# flattens the model's own names instead.
COMPOUND_WORDS = frozenset(
    "down_blocks up_blocks mid_block transformer_blocks to_q to_k to_v to_out proj_in proj_out "
    "conv_shortcut conv_in conv_out time_embedding time_emb_proj linear_1 linear_2 add_embedding "
    "conv_norm_out text_model self_attn q_proj k_proj v_proj out_proj text_projection "
    "final_layer_norm layer_norm1 layer_norm2 token_embedding position_embedding".split()
)

# Plain training facts -> the kohya metadata names that A1111, ComfyUI and Civitai show.
SS_KEYS = {
    "base_model": "ss_sd_model_name",
    "rank": "ss_network_dim",
    "alpha": "ss_network_alpha",
    "steps": "ss_max_train_steps",
    "resolution": "ss_resolution",
    "num_images": "ss_num_train_images",
    "epochs": "ss_num_epochs",
    "learning_rate": "ss_learning_rate",
    "batch_size": "ss_total_batch_size",
    "batch_size_per_device": "ss_batch_size_per_device",
    "gradient_accumulation_steps": "ss_gradient_accumulation_steps",
    "seed": "ss_seed",
    "lr_scheduler": "ss_lr_scheduler",
    "optimizer": "ss_optimizer",
    "mixed_precision": "ss_mixed_precision",
    "comment": "ss_training_comment",
}


class LoraFileError(DifftrainError):
    """A LoRA file that cannot be written, read, converted or applied as asked."""


@dataclass
class Module:
    """One LoRA'd layer: W + (alpha / rank) * up @ down, whatever file it came from."""

    part: str  # "unet" | "text_encoder" | "text_encoder_2"
    module: str  # the module path in the model, without CLIP's "text_model." (transformers 5 has none)
    down: torch.Tensor  # [rank, in(, kh, kw)]
    up: torch.Tensor  # [out, rank(, 1, 1)]
    alpha: float  # kohya's alpha: the scale is alpha / rank
    key: str  # the down key in the file it came from, for messages

    @property
    def rank(self) -> int:
        return self.down.shape[0]


# ---------------------------------------------------------------- names


def _strip_text_model(part: str, module: str) -> str:
    return module.removeprefix("text_model.") if part != "unet" else module


def _with_text_model(part: str, module: str) -> str:
    """CLIP's layers live under text_model. in every tool but transformers 5; writing the long
    name loads everywhere (diffusers strips it again when the model is flattened)."""
    if part == "unet" or module.startswith(("text_model.", "text_projection")):
        return module
    return f"text_model.{module}"


def kohya_name(part: str, module: str) -> str:
    return KOHYA_PREFIX[part] + _with_text_model(part, module).replace(".", "_")


def _unflatten(name: str) -> str:
    words, out, i = name.split("_"), [], 0
    while i < len(words):
        for n in (3, 2, 1):
            joined = "_".join(words[i : i + n])
            if n == 1 or joined in COMPOUND_WORDS:
                out.append(joined)
                i += n
                break
    return ".".join(out)


# ---------------------------------------------------------------- reading


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise LoraFileError(f"{path}: no such LoRA file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise LoraFileError(f"{path}: not a readable .safetensors file ({e}); LoRA files must be safetensors") from None


# sd-scripts bundles Textual Inversion embeddings into a LoRA file for pivotal tuning, as
# "bundle_emb.<token>.string_to_param.*"; A1111 loads them with the LoRA, <token> being the word.
BUNDLE_PREFIX = "bundle_emb."


def bundled_embeddings(lora_path) -> dict[str, torch.Tensor]:
    """{token: vectors [n, dim]} of the embeddings a LoRA file bundles ({} for most files)."""
    from safetensors import safe_open

    from difftrain.models.embeddings import EmbeddingFileError, embedding_vectors

    path = _resolve(lora_path)
    with safe_open(str(path), framework="pt") as f:
        keys = [key for key in f.keys() if key.startswith(BUNDLE_PREFIX)]
        found: dict[str, torch.Tensor] = {}
        for key in keys:
            token, _, name = key[len(BUNDLE_PREFIX):].partition(".")
            if name in ("clip_l", "clip_g"):
                raise EmbeddingFileError(f"{path}: bundles an SDXL embedding ({key}); SDXL is not supported")
            if name != "string_to_param.*" or token in found:
                raise EmbeddingFileError(f"{path}: bundled embedding key {key!r}: expected one "
                                         f"{BUNDLE_PREFIX}<token>.string_to_param.* per token, as sd-scripts writes")
            found[token] = embedding_vectors(f.get_tensor(key), f"{path}: bundled embedding {token!r}")
    return found


def _resolve(path) -> Path:
    path = Path(path)
    return path / DIFFUSERS_FILE if path.is_dir() else path


def _detect(tensors: dict[str, torch.Tensor]) -> str | None:
    keys = list(tensors)
    if not keys:
        return None
    if all(k.startswith(tuple(KOHYA_READ_PREFIX)) and k.endswith(tuple(KOHYA_SUFFIX)) for k in keys):
        return "kohya"
    if not all(k.endswith(tuple(DIFFUSERS_SUFFIX)) for k in keys):
        return None
    prefixed = [k.split(".", 1)[0] in KOHYA_PREFIX for k in keys]
    if all(prefixed):
        return "diffusers"
    return "peft" if not any(prefixed) else None


# Older spellings of the same matrices, read as today's: diffusers' attention-processor files (save_attn_procs,
# before peft: "...attn1.processor.to_q_lora.down.weight"; their text encoder's "...self_attn.to_q_lora.down.weight",
# as diffusers' DIFFUSERS_OLD_TO_PEFT reads them) and a PeftModel's own ("base_model.model." first).
OLD_SPELLINGS = [
    (re.compile(r"\.processor\.(to_[qkv])_lora\.(down|up)\.weight$"), r".\1.lora.\2.weight"),
    (re.compile(r"\.processor\.to_out_lora\.(down|up)\.weight$"), r".to_out.0.lora.\1.weight"),
    (re.compile(r"\.self_attn\.to_([qkv])_lora\.(down|up)\.weight$"),
     r".self_attn.\1_proj.lora_linear_layer.\2.weight"),
    (re.compile(r"\.self_attn\.to_out_lora\.(down|up)\.weight$"), r".self_attn.out_proj.lora_linear_layer.\1.weight"),
]


def _today(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, tensor in tensors.items():
        key = key.removeprefix("base_model.model.")
        for pattern, replacement in OLD_SPELLINGS:
            key = pattern.sub(replacement, key)
        renamed[key] = tensor
    return renamed


def load_lora_state(path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """(tensors, header metadata, format) of a LoRA file, format "kohya" | "diffusers" | "peft".

    A folder means its pytorch_lora_weights.safetensors, as in diffusers."""
    path = _resolve(path)
    tensors, metadata = _read(path)
    bundled = {key for key in tensors if key.startswith(BUNDLE_PREFIX)}  # bundled_embeddings reads them
    tensors = _today({key: value for key, value in tensors.items() if key not in bundled})
    if bundled and not tensors:
        raise LoraFileError(f"{path}: holds bundled embeddings ({BUNDLE_PREFIX}*) and no LoRA layer")
    beside = path.parent / "adapter_config.json"  # a PeftModel's save_pretrained keeps its LoraConfig there
    if ADAPTER_METADATA_KEY not in metadata and beside.is_file():
        metadata = {**metadata, ADAPTER_METADATA_KEY: beside.read_text()}
    fmt = _detect(tensors)
    if fmt is None:
        odd = [k for k in tensors if not k.endswith(tuple(KOHYA_SUFFIX) + tuple(DIFFUSERS_SUFFIX))] or list(tensors)
        raise LoraFileError(
            f"{path}: not a LoRA in kohya, diffusers or peft key format "
            f"(e.g. {odd[:3]}); expected keys like lora_unet_..._to_q.lora_down.weight or "
            "unet.....to_q.lora.down.weight (LyCORIS/LoHa/DoRA files are not supported)"
        )
    return tensors, metadata, fmt


def _pair(tensors: dict, suffixes: dict[str, str], path: Path) -> dict[str, dict]:
    """Group keys by module stem: {stem: {"down": t, "up": t, ("alpha": t), "key": down key}}."""
    groups: dict[str, dict] = {}
    for key, tensor in tensors.items():
        suffix = next(s for s in suffixes if key.endswith(s))
        group = groups.setdefault(key[: -len(suffix)], {})
        group[suffixes[suffix]] = tensor
        if suffixes[suffix] == "down":
            group["key"] = key
    broken = [stem for stem, g in groups.items() if not {"down", "up"} <= g.keys()]
    if broken:
        raise LoraFileError(f"{path}: modules with only one of their two LoRA matrices: {broken[:3]}; file cut short?")
    return groups


def _part_config(metadata: dict[str, str], part: str | None) -> dict:
    """One part's peft LoraConfig dict from diffusers' header JSON, {} where there is none.
    A diffusers file scopes it by part ("unet.r"); a peft file has one model's, unscoped."""
    raw = metadata.get(ADAPTER_METADATA_KEY)
    flat = json.loads(raw) if raw else {}
    if part is None:
        return flat
    return {k[len(part) + 1 :]: v for k, v in flat.items() if k.startswith(f"{part}.")}


def _peft_alpha(config: dict, module: str, rank: int) -> float:
    """kohya alpha (scale * rank) of one module under a peft LoraConfig dict; without one,
    diffusers' convention: scale 1."""
    from peft.utils.other import get_pattern_key

    if "lora_alpha" not in config:
        return float(rank)
    pattern = config.get("alpha_pattern") or {}
    alpha = float(pattern.get(get_pattern_key(pattern.keys(), module), config["lora_alpha"]))
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


def _text_encoder_guess(module: str) -> bool:
    return module.startswith(("text_model.", "encoder.layers.", "embeddings.", "final_layer_norm", "text_projection"))


def _modules(tensors: dict, metadata: dict[str, str], fmt: str, path: Path) -> list[Module]:
    out = []
    if fmt == "kohya":
        for stem, g in _pair(tensors, KOHYA_SUFFIX, path).items():
            prefix = next(p for p in KOHYA_READ_PREFIX if stem.startswith(p))
            part = KOHYA_READ_PREFIX[prefix]
            module = _strip_text_model(part, _unflatten(stem[len(prefix) :]))
            alpha = float(g["alpha"].item()) if "alpha" in g else float(g["down"].shape[0])
            out.append(Module(part, module, g["down"], g["up"], alpha, g["key"]))
        return out
    for stem, g in _pair(tensors, DIFFUSERS_SUFFIX, path).items():
        if fmt == "diffusers":
            part, module = stem.split(".", 1)
        else:  # peft: one model's keys, no component prefix
            part, module = ("text_encoder" if _text_encoder_guess(stem) else "unet"), stem
        config = _part_config(metadata, part if fmt == "diffusers" else None)
        module = _strip_text_model(part, module)
        # Matched as peft matches its patterns, a suffix of the layer's whole path: an alpha_pattern key written with
        # or without CLIP's text_model. finds it.
        alpha = _peft_alpha(config, _with_text_model(part, module), g["down"].shape[0])
        out.append(Module(part, module, g["down"], g["up"], alpha, g["key"]))
    return out


def _modules_from_model(part: str, model, adapter_name: str) -> list[Module]:
    """The trained adapter of a peft-wrapped model, with each layer's own alpha (so
    rank_pattern / alpha_pattern / rslora all come out right)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    if adapter_name not in getattr(model, "peft_config", {}):
        raise LoraFileError(
            f"{part} has no LoRA adapter {adapter_name!r}: add one with {part}.add_adapter(peft.LoraConfig(...)) "
            "before saving, or pass None for a part that is not trained"
        )
    # save_embedding_layers="auto" (peft's default) asks the Hub whether the base model's config.json
    # exists, a network request at every save (a wait on a machine without access, a warning offline).
    # A LoRA file never holds whole embedding matrices: odd weights are refused just below.
    state = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    odd = [k for k in state if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if odd:
        raise LoraFileError(
            f"{part}: adapter {adapter_name!r} has weights kohya files cannot hold: {odd[:3]}; "
            "train plain LoRA (no DoRA, no lora_bias, no embedding layers)"
        )
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.r}
    out = []
    for name, layer in layers.items():
        r, alpha = layer.r[adapter_name], float(layer.lora_alpha[adapter_name])
        kohya_alpha = alpha * math.sqrt(r) if layer.use_rslora.get(adapter_name, False) else alpha
        down, up = (state[f"{name}.lora_{x}.weight"].detach().cpu().contiguous() for x in "AB")
        out.append(Module(part, _strip_text_model(part, name), down, up, kohya_alpha, f"{name}.lora_A.weight"))
    return out


# ---------------------------------------------------------------- writing


def _derived_config(modules: list[Module]) -> dict:
    """The smallest LoraConfig dict that gives every module its rank and scale in diffusers.

    Only the fields diffusers' own get_peft_kwargs fills: peft's full to_dict() names fields
    an older peft's LoraConfig(**...) rejects, which would make the file unloadable there.
    Pattern keys are whole module paths (peft matches them as a suffix: with or without
    CLIP's text_model.)."""
    ranks = {m.module: m.rank for m in modules}
    alphas = {m.module: m.alpha for m in modules}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {k: v for k, v in ranks.items() if v != r},
        "alpha_pattern": {k: v for k, v in alphas.items() if v != alpha},
        "target_modules": sorted(ranks),
        "use_dora": False,
        "lora_bias": False,
    }


def to_diffusers(modules: list[Module]) -> tuple[dict, str]:
    """(tensors, lora_adapter_metadata JSON) in StableDiffusionPipeline.save_lora_weights' layout."""
    tensors, adapter_meta = {}, {}
    for part in dict.fromkeys(m.part for m in modules):
        mods = [m for m in modules if m.part == part]
        spelling = DIFFUSERS_SPELLING["unet" if part == "unet" else "text_encoder"]
        for m in mods:
            name = f"{part}.{_with_text_model(part, m.module)}"
            tensors[name + spelling.format("down")] = m.down
            tensors[name + spelling.format("up")] = m.up
        adapter_meta.update({f"{part}.{k}": v for k, v in _derived_config(mods).items()})
    return tensors, json.dumps(adapter_meta, indent=2, sort_keys=True)


def to_kohya(modules: list[Module]) -> dict[str, torch.Tensor]:
    tensors = {}
    for m in modules:
        name = kohya_name(m.part, m.module)
        tensors[f"{name}.lora_down.weight"] = m.down
        tensors[f"{name}.lora_up.weight"] = m.up
        tensors[f"{name}.alpha"] = torch.tensor(float(m.alpha))
    return tensors


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    return write_safetensors(path, tensors, {"format": "pt", **metadata})


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _stringify(metadata: dict | None) -> dict[str, str]:
    return string_metadata(metadata, LoraFileError, "LoRA")


def training_metadata(metadata: dict | None, kohya_name: str = "lora") -> dict[str, str]:
    """The caller's plain keys, plus kohya's ss_ names for those it has."""
    out = _stringify(metadata)
    for plain, ss in SS_KEYS.items():
        if plain in out and ss not in out:
            value = out[plain]
            # kohya's --resolution is "W,H"; one number means a square.
            out[ss] = f"{value},{value}" if plain == "resolution" and value.isdigit() else value
    out.setdefault("ss_network_module", "networks.lora")
    out.setdefault("ss_output_name", out.get("output_name", kohya_name))
    return out


def file_hashes(path: Path) -> tuple[str, str]:
    """(sha256 of the whole file, A1111's old 8-digit hash: sha256 of 64 KiB at 1 MiB), as kohya writes them.

    Remembered per (file, size, modification time): a run saving its EMA and raw LoRA reads a
    multi-GB base checkpoint once, not twice.
    """
    stat = Path(path).stat()
    return _file_hashes(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _file_hashes(path: str, size: int, mtime_ns: int) -> tuple[str, str]:
    full = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            full.update(block)
        file.seek(0x100000)
        legacy = hashlib.sha256(file.read(0x10000)).hexdigest()[:8]
    return full.hexdigest(), legacy


def _tensor_hashes(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """kohya's sshs_ hashes: of the tensor bytes only (after the header), so metadata edits keep them."""
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()})
    start = 8 + int.from_bytes(data[:8], "little")
    return {"sshs_model_hash": hashlib.sha256(data[start:]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]}


KOHYA_ONLY = ("ss_", "sshs_", "modelspec.")  # kohya's fields: LoRA browsers take a file holding them for a kohya one


def _plain(meta: dict[str, str]) -> dict[str, str]:
    """The metadata a diffusers-format file keeps: ours, not kohya's, since A1111 and ComfyUI cannot load its keys
    and Civitai and LoRA browsers would list it as a kohya LoRA."""
    return {key: value for key, value in meta.items() if not key.startswith(KOHYA_ONLY)}


def kohya_metadata(meta: dict[str, str], modules: list[Module]) -> dict[str, str]:
    """What kohya's sd-scripts write beside the weights, which A1111's LoRA browser and Civitai read.

    Facts the caller may give: base_model (a path is reduced to its name, hashed when it is a
    file, as kohya does: no user's folder layout leaks), sd_version ("v1" | "v2"),
    prediction_type, output_name, tag_frequency ({folder: {tag: count}}), dataset_dirs.
    """
    out = dict(meta)
    base = out.get("base_model", "")
    if base and Path(base).exists():
        if Path(base).is_file():
            full, legacy = file_hashes(Path(base))
            out.setdefault("ss_new_sd_model_hash", full)
            out.setdefault("ss_sd_model_hash", legacy)
        out["ss_sd_model_name"] = out["base_model"] = shared_model_name(base)
    v2 = out.get("sd_version") == "v2"
    v_prediction = out.get("prediction_type") == "v_prediction"
    out.setdefault("ss_v2", str(v2))
    out.setdefault("ss_base_model_version", ("sd_v2" if v2 else "sd_v1") + ("_v" if v_prediction else ""))
    out.setdefault("ss_v_parameterization", str(v_prediction))
    if out.get("zero_terminal_snr") == "True":
        out.setdefault("ss_zero_terminal_snr", "True")
    conv = [m for m in modules if m.down.dim() == 4 and m.down.shape[-1] > 1]
    if conv:
        out.setdefault("ss_network_args", json.dumps({"conv_dim": str(conv[0].rank),
                                                      "conv_alpha": str(_number(conv[0].alpha))}))
    for key in ("tag_frequency", "dataset_dirs"):
        if key in out:
            out.setdefault(f"ss_{key}", out[key])
    resolution = out.get("resolution", "512")
    architecture = ("stable-diffusion-v2-768-v" if v_prediction else "stable-diffusion-v2-512") if v2 else "stable-diffusion-v1"
    out.update({
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": out["ss_output_name"],
        "modelspec.resolution": f"{resolution}x{resolution}" if resolution.isdigit() else resolution.replace(",", "x"),
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
    })
    return out


def save_lora(
    out_dir,
    unet=None,
    text_encoder=None,
    *,
    metadata: dict[str, str] | None = None,
    kohya_name: str = "lora",
    adapter_name: str = "default",
) -> tuple[Path, Path]:
    """Write the peft adapters of `unet` / `text_encoder` as out_dir/pytorch_lora_weights.safetensors
    (diffusers) and out_dir/<kohya_name>.safetensors (kohya/A1111/ComfyUI); returns both paths.

    `metadata` (base_model, rank, alpha, steps, resolution, num_images, ...) goes into both
    headers, under its own keys and kohya's ss_ names; rank and alpha default to the unet's
    (else the text encoder's) most common ones.
    """
    out_dir = Path(out_dir)
    stem = kohya_name.removesuffix(".safetensors")
    if not stem or "/" in stem or "\\" in stem or f"{stem}.safetensors" == DIFFUSERS_FILE:
        raise LoraFileError(f"kohya_name {kohya_name!r}: give a plain file name other than {DIFFUSERS_FILE!r}")
    parts = {name: model for name, model in (("unet", unet), ("text_encoder", text_encoder)) if model is not None}
    if not parts:
        raise LoraFileError("save_lora: pass the unet and/or the text encoder that carry the LoRA adapter")
    modules = [m for part, model in parts.items() for m in _modules_from_model(part, model, adapter_name)]
    main = _derived_config([m for m in modules if m.part == next(iter(parts))])
    info = {"rank": main["r"], "alpha": _number(main["lora_alpha"]), "output_name": stem, **(metadata or {})}
    meta = kohya_metadata(training_metadata(info, stem), modules)
    tensors, adapter_json = to_diffusers(modules)
    diffusers_path = _write(out_dir / DIFFUSERS_FILE, tensors, {**_plain(meta), ADAPTER_METADATA_KEY: adapter_json})
    kohya_tensors = to_kohya(modules)
    kohya_path = _write(out_dir / f"{stem}.safetensors", kohya_tensors, {**meta, **_tensor_hashes(kohya_tensors)})
    return diffusers_path, kohya_path


def convert_lora(src, dst, to: str) -> Path:
    """Rewrite a LoRA file in the other key format ("kohya" | "diffusers"); metadata kept, kohya's
    fields (ss_*, modelspec.*) in kohya files only, made from ours when the source has none.

    diffusers' lora_adapter_metadata is rebuilt from the alphas (a kohya file keeps
    alphas as tensors and must not carry it: diffusers refuses a file with both)."""
    if to not in ("kohya", "diffusers"):
        raise LoraFileError(f"convert_lora: to={to!r}; choose 'kohya' or 'diffusers'")
    src = _resolve(src)
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        dst = dst / DIFFUSERS_FILE if to == "diffusers" else dst.with_suffix(".safetensors")
    tensors, metadata, fmt = load_lora_state(src)
    modules = _modules(tensors, metadata, fmt, src)
    meta = {k: v for k, v in metadata.items() if k not in ("format", ADAPTER_METADATA_KEY)}
    bundle = bundled_embeddings(src)
    if bundle and to != "kohya":
        raise LoraFileError(f"{src}: bundles the embeddings {', '.join(bundle)} ({BUNDLE_PREFIX}*), which a diffusers "
                            "LoRA file has no place for; use the file as it is (generate, serve and merge load them "
                            "with the LoRA, as A1111 does)")
    if to == "kohya":
        kohya_tensors = to_kohya(modules) | {f"{BUNDLE_PREFIX}{token}.string_to_param.*": vectors
                                             for token, vectors in bundle.items()}
        if not any(key.startswith("ss_") for key in meta):  # a diffusers file of ours: its facts, in kohya's names
            facts = {"sd_version": _sd_version(modules), **meta}
            made = kohya_metadata(training_metadata(facts, dst.stem), modules)
            meta = {k: v for k, v in made.items() if k in meta or k not in facts}
        # Hashes of the tensors as written (A1111 shows sshs_model_hash as the LoRA's hash, civitai matches on
        # it): a kohya source's own no longer hold once its tensors are rewritten (fp16 alphas become fp32).
        return _write(dst, kohya_tensors, {**meta, **_tensor_hashes(kohya_tensors)})
    return _write_diffusers(dst, modules, _plain(meta))


# The layers whose input width tells SD 2.x from SD 1.x: (part, layer name ends, SD 1.x width, SD 2.x width).
# SD 2.x's cross-attention context and its OpenCLIP text encoder are 1,024 wide, SD 1.x's 768; the encoders'
# MLPs widen to 4,096 and 3,072. The UNet's other layers have the same widths in both.
VERSION_WIDTHS = (("unet", ("attn2.to_k", "attn2.to_v"), 768, 1024),
                  ("text_encoder", ("q_proj", "k_proj", "v_proj", "out_proj", "fc1"), 768, 1024),
                  ("text_encoder", ("fc2",), 3072, 4096))


def _sd_version(modules: list[Module]) -> str:
    """"v2" or "v1" by the widths a file's layers take (a file from elsewhere does not say); "v1" where no
    layer tells."""
    for m in modules:
        for part, ends, v1_width, v2_width in VERSION_WIDTHS:
            if m.part == part and m.module.endswith(ends) and m.down.shape[1] in (v1_width, v2_width):
                return "v2" if m.down.shape[1] == v2_width else "v1"
    return "v1"


def _write_diffusers(dst: Path, modules, metadata: dict[str, str]) -> Path:
    """`modules` as a diffusers LoRA file, with their ranks and alphas in its adapter header."""
    tensors, adapter_json = to_diffusers(modules)
    return _write(dst, tensors, {**metadata, ADAPTER_METADATA_KEY: adapter_json})


# ---------------------------------------------------------------- applying


def _components(pipe_or_components) -> dict:
    """The LoRA-able models of a pipeline or of a {"unet": ..., "text_encoder": ...} dict."""
    if isinstance(pipe_or_components, dict):
        return {part: pipe_or_components.get(part) for part in KOHYA_PREFIX}
    return {part: getattr(pipe_or_components, part, None) for part in KOHYA_PREFIX}


def check_lora_fits(pipe_or_components, lora_path) -> None:
    """Raise LoraFileError naming the LoRA modules the base model has no layer for, or whose
    shapes do not fit its layer (a LoRA made for another model)."""
    path = _resolve(lora_path)
    tensors, metadata, fmt = load_lora_state(path)
    _check_fit(pipe_or_components, _modules(tensors, metadata, fmt, path), path)


def _as_layer_shape(m: Module, weight: torch.Tensor) -> Module:
    """`m` in its layer's shape where a 1x1 convolution and a Linear are one map: SD 2.x's proj_in/proj_out are
    1x1 convolutions in kohya's and the original layout (use_linear_projection off) and Linear in diffusers',
    and its LoRAs store [rank, in, 1, 1] where diffusers' layer wants [rank, in] (A1111 and ComfyUI reshape
    the same way)."""
    if m.down.ndim == 4 and weight.ndim == 2 and m.down.shape[2:] == m.up.shape[2:] == (1, 1):
        return replace(m, down=m.down.flatten(1), up=m.up.flatten(1))
    if m.down.ndim == 2 and weight.ndim == 4 and weight.shape[2:] == (1, 1):
        return replace(m, down=m.down[:, :, None, None], up=m.up[:, :, None, None])
    return m


def _check_fit(pipe_or_components, modules: list[Module], path: Path) -> list[Module]:
    """`modules` in the shapes of the base model's layers; LoraFileError naming those that do not fit."""
    components = _components(pipe_or_components)
    # Flat kohya-style names on both sides: exact whatever format the file came in.
    layers = {}
    for part, model in components.items():
        if model is not None:
            for name, layer in model.named_modules():
                layers[kohya_name(part, _strip_text_model(part, name))] = getattr(layer, "base_layer", layer)
    bad, fitted = [], []
    for m in modules:
        layer = layers.get(kohya_name(m.part, m.module))
        weight = getattr(layer, "weight", None)
        if weight is None:
            bad.append(f"{m.key}: no layer {m.part}.{m.module} in the base model")
            continue
        m = _as_layer_shape(m, weight)
        fitted.append(m)
        if (
            m.down.ndim != weight.ndim
            or m.up.shape[1] != m.rank
            or m.down.shape[1] != weight.shape[1]
            or m.up.shape[0] != weight.shape[0]
        ):
            shapes = f"down {list(m.down.shape)} up {list(m.up.shape)}"
            bad.append(f"{m.key}: {shapes} vs {m.part}.{m.module}.weight {list(weight.shape)}")
    if bad:
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise LoraFileError(
            f"{path}: {len(bad)} of {len(modules)} LoRA modules do not fit the base model "
            "(a LoRA trained for a different model?): " + "; ".join(bad[:5]) + more
        )
    return fitted


def load_lora_adapter(pipe, lora_path, adapter_name: str) -> None:
    """Load a LoRA of any format difftrain reads into `pipe` as `adapter_name`, checked to fit first.

    Always through the diffusers format: its header carries each module's alpha, which diffusers'
    own kohya path reduces to one per component (a resized or block-weighted kohya LoRA would draw at
    the wrong strength), and a peft file saved without its part prefix would load nothing."""
    path = _resolve(lora_path)
    tensors, metadata, fmt = load_lora_state(path)  # read and parsed once, for the check and the load
    modules = _modules(tensors, metadata, fmt, path)
    modules = _check_fit(pipe, modules, path)  # a LoRA for another model is refused with its keys and shapes
    with tempfile.TemporaryDirectory(prefix="difftrain-lora-") as work:
        written = _write_diffusers(Path(work) / DIFFUSERS_FILE, modules, {})
        # A UNet-only LoRA (what most training writes) drew diffusers' warning of "no LoRA keys associated to
        # CLIPTextModel" at every load: true, and the fit check knows it. Other warnings stay.
        unet_only = not any(module.part.startswith("text_encoder") for module in modules)
        with _errors_only("diffusers.loaders.lora_base", unet_only):
            pipe.load_lora_weights(str(written), adapter_name=adapter_name)


@contextmanager
def _errors_only(logger: str, when: bool) -> Iterator[None]:
    """The logger `logger` passes errors only inside, `when` so; its level is restored after."""
    log = logging.getLogger(logger)
    level = log.level
    if when:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
