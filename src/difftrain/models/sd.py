"""Load Stable Diffusion from every form users keep it in.

A base model is a diffusers pipeline folder, a Hugging Face Hub id, or one A1111/ComfyUI
`.safetensors` file. Any part can be swapped: a component folder, another pipeline (its
same-named subfolder), a single file, and for the UNet a config JSON, which starts it from
random weights. `load` names the parts to bring into memory: with cached latents and text
embeddings only the UNet is needed.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from difftrain.errors import DifftrainError
from difftrain.sampling.schedulers import plain_config, zero_snr_capable

log = logging.getLogger(__name__)

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer")
MODELS = ("unet", "vae", "text_encoder")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth")
SINGLE_FILE_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
# LDM key prefixes of each model in a single file, so the parts we skip are never read.
LDM_PREFIXES = {
    "unet": ("model.diffusion_model.",),
    "vae": ("first_stage_model.", "vae."),
    "text_encoder": ("cond_stage_model.", "conditioner.", "text_encoders."),
}
# The training noise schedule of SD 1.x/2.x, for when no base model says otherwise.
SD_TRAIN_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(DifftrainError):
    """A model path, id or part that cannot be loaded or does not fit the others."""


@dataclass
class SDComponents:
    unet: Any  # UNet2DConditionModel
    vae: Any | None  # AutoencoderKL
    text_encoder: Any | None  # CLIPTextModel or any transformers text model
    tokenizer: Any | None
    scheduler: Any  # the base model's noise scheduler
    source: str  # where each part came from, one line for the run summary


@dataclass
class _Where:
    """A resolved location: `kind` is pipeline | component | hub | single_file | model_json."""

    kind: str
    path: str
    subfolder: str | None = None

    def describe(self) -> str:
        what = {"pipeline": "folder", "component": "folder", "hub": "hub", "single_file": "single file"}
        sub = f"/{self.subfolder}" if self.subfolder else ""
        return f"{what.get(self.kind, 'random init from')} {self.path}{sub}"


def _offline_by_setting() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """Hub ids come from the HF cache alone: offline by setting, or the Hub's host cannot be reached. Without that
    probe, a hub id on a machine with no network waited out huggingface_hub's ~25 s of retries for every file,
    cached or not, before its message."""
    from huggingface_hub import constants

    return _offline_by_setting() or _unreachable(constants.ENDPOINT)


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


@functools.cache
def _unreachable(endpoint: str) -> bool:
    """Whether a TCP connection to `endpoint`, name lookup included, fails within about 3 s (once per process). Behind
    a proxy the proxy resolves the host, so nothing is probed."""
    import socket
    import threading
    from urllib.parse import urlparse

    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return False
    url, reached = urlparse(endpoint), []

    def connect() -> None:
        try:
            address = (url.hostname, url.port or (80 if url.scheme == "http" else 443))
            socket.create_connection(address, timeout=3).close()
            reached.append(True)
        except (OSError, ValueError):  # no such host, no route, refused, or no host at all in the URL
            pass

    # In a thread: the name lookup takes no timeout, and a dead resolver holds it for tens of seconds.
    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout=4)
    if not reached:
        log.info("the Hugging Face Hub (%s) cannot be reached: hub ids are looked up in the HF cache only", endpoint)
    return not reached


def _offline_error(role: str, spec: str) -> ModelLoadError:
    """The hub id is in no local cache and cannot be fetched: offline by setting, or the Hub unreachable."""
    why = ("network access is off (HF_HUB_OFFLINE=1)" if _offline_by_setting() else
           "the Hugging Face Hub could not be reached (no network, or a proxy in the way)")
    return ModelLoadError(
        f"{role}: {spec!r} is not a local path, and as a Hugging Face Hub id it is not in the local HF cache; "
        f"{why}. Download it once with network access, "
        "or give the path of a local diffusers folder or .safetensors file"
    )


def _has_component(folder: Path, name: str) -> bool:
    marker = ("tokenizer_config.json", "vocab.json", "tokenizer.json") if name == "tokenizer" else ("config.json",)
    return any((folder / m).is_file() for m in marker)


def _locate_base(spec: str, inpainting: bool = False) -> _Where:
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
            return _Where("single_file", str(path))
        raise ModelLoadError(
            f"base: {path} is a {path.suffix or 'suffix-less'} file; give a diffusers folder, a hub id "
            "or a .safetensors checkpoint"
        )
    if path.is_dir():
        if (path / "model_index.json").is_file():
            _check_pipeline_kind(str(path), path / "model_index.json", inpainting)
        if (path / "model_index.json").is_file() or (path / "unet").is_dir():
            return _Where("pipeline", str(path))
        raise ModelLoadError(f"base: {path} is not a diffusers pipeline folder (no model_index.json, no unet/)")
    return _locate_missing("base", spec)


def check_exists(role: str, spec: str) -> None:
    """Refuse now a model `spec` that is neither here nor shaped like a hub id (a server would start and then fail
    every request); what it holds is checked when it loads."""
    if not Path(spec).expanduser().exists():
        _locate_missing(role, spec)


def _locate_missing(role: str, spec: str) -> _Where:
    """A hub id, or a local path that is not there (named with the nearest names beside it).

    `runs/my-rnu` has a hub id's shape, but where `runs/` is a local folder it is a mistyped
    path: looking it up on the Hub would only wait out the retries and then blame the network.
    Unless the HF cache holds that id: a `stabilityai/` folder beside a cached stabilityai model.
    """
    looks_like_file = spec.startswith((".", "~")) or spec.endswith((".json",) + SINGLE_FILE_SUFFIXES)
    parent = Path(spec).expanduser().parent
    local_parent = "/" in spec and parent.is_dir()
    if HUB_ID.match(spec) and not looks_like_file and (not local_parent or _in_hf_cache(spec)):
        return _Where("hub", spec)
    hint = ""
    if parent.is_dir():
        import difflib

        near = difflib.get_close_matches(Path(spec).name, [p.name for p in parent.iterdir()], n=3, cutoff=0.6)
        hint = f"; {parent}/ holds {', '.join(near)}" if near else ""
    if HUB_ID.match(spec) and local_parent:
        hint += f"; {parent}/ is a local folder, so this is read as a local path, not a hub id"
    raise ModelLoadError(f"{role}: {spec} does not exist (check the path{hint})")


def _in_hf_cache(repo: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo, name), str) for name in ("model_index.json", "config.json"))


def _locate_part(name: str, spec: str) -> _Where:
    path = Path(spec).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".json" and name in ("unet", "vae"):
            return _Where("model_json", str(path))
        if suffix in SINGLE_FILE_SUFFIXES and name in MODELS:
            return _Where("single_file", str(path))
        kinds = f"a .json {name} config, " if name in ("unet", "vae") else ""
        kinds += "a .safetensors file, " if name in MODELS else ""
        raise ModelLoadError(f"{name}: {path} is not {kinds}a {name} folder or a pipeline folder")
    if path.is_dir():
        if (path / name).is_dir() and _has_component(path / name, name):
            return _Where("pipeline", str(path), name)
        if _has_component(path, name):
            return _Where("component", str(path))
        marker = "tokenizer files" if name == "tokenizer" else "config.json"
        raise ModelLoadError(f"{name}: {path} is neither a {name} folder ({marker}) nor a pipeline with a {name}/")
    return _locate_missing(name, spec)


def _hub_subfolder(repo: str, name: str | None, revision: str | None, inpainting: bool = False) -> str | None:
    """A hub repo is either a whole pipeline (use its `name`/ subfolder) or one component."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    role = name or "base"
    if hub_offline():
        marker = "tokenizer_config.json" if name == "tokenizer" else "config.json"
        candidates = [("model_index.json", name)] + ([(f"{name}/{marker}", name), (marker, None)] if name else [])
        for filename, subfolder in candidates:
            cached = try_to_load_from_cache(repo, filename, revision=revision)
            if isinstance(cached, str):
                if filename == "model_index.json" and name is None:  # a part may come from any pipeline
                    _check_pipeline_kind(repo, Path(cached), inpainting)
                return subfolder
        raise _offline_error(role, repo)
    try:
        index = hf_hub_download(repo, "model_index.json", revision=revision)
        if name is None:
            _check_pipeline_kind(repo, Path(index), inpainting)
        return name
    except LocalEntryNotFoundError:
        raise _offline_error(role, repo) from None
    except EntryNotFoundError:
        if name is None:
            raise ModelLoadError(f"base: hub repo {repo} has no model_index.json: not a diffusers pipeline") from None
        return None
    except (HfHubHTTPError, OSError) as exc:
        raise ModelLoadError(f"{role}: cannot reach hub repo {repo!r}: {_first_line(exc)}") from None


# What difftrain trains and draws: Stable Diffusion 1.x and 2.x, a UNet conditioned by one CLIP text encoder.
NOT_SD = "difftrain trains and draws Stable Diffusion 1.x and 2.x models (one text encoder, a UNet)"
INPAINTING = ("an inpainting model (its UNet also takes the masked image's latents and the mask); difftrain draws "
              "with it (generate, serve) but trains text-to-image models: train the model it was made from "
              "(stable-diffusion-v1-5 rather than sd-v1-5-inpainting)")


def _check_pipeline_kind(where: str, index_file: Path, inpainting: bool = False) -> None:
    """Refuse SDXL, SD 3, Flux and other pipelines by their model_index.json, before any weight loads (and an
    inpainting pipeline unless `inpainting`: drawing takes one, training does not)."""
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        return  # the loaders below say what is wrong with the folder
    kind = index.get("_class_name", "a pipeline")
    if "text_encoder_2" in index or "transformer" in index or ("unet" not in index and "prior" in index):
        raise ModelLoadError(f"{where}: a {kind}; {NOT_SD}")
    if "Inpaint" in kind and not inpainting:
        raise ModelLoadError(f"{where}: a {kind}, {INPAINTING}")


def _check_single_file_kind(path: str, header: dict, inpainting: bool = False) -> None:
    """Refuse what a single file's keys say is not SD 1.x/2.x (SDXL, SD 3, ...) before its weights are read."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    keys = list(header)
    # diffusers' guess falls back to SD 1.x for any file, so a LoRA was "an SD 1.5 model whose configs are missing".
    if any("lora_" in key or ".lora." in key for key in keys):
        raise ModelLoadError(f"{path} is a LoRA, not a model: give a base model, and the file with --lora")
    if any(key.startswith(("control_model.", "controlnet_")) for key in keys):
        raise ModelLoadError(f"{path} is a ControlNet, not a model: give a base model, and the file with --controlnet")
    if 0 < len(keys) <= 2 and all("." not in key for key in keys):  # emb_params, string_to_param, clip_l/g, a token
        raise ModelLoadError(f"{path} is a Textual Inversion embedding: give a base model, and the file with "
                             "--embedding")
    kind = infer_diffusers_model_type(header)
    if kind.startswith("inpainting") and not inpainting:
        raise ModelLoadError(f"{path}: {INPAINTING}")
    if kind not in ("v1", "v2", "inpainting", "inpainting_v2"):
        raise ModelLoadError(f"{path}: its keys are those of a {kind!r} checkpoint (diffusers' name for it); {NOT_SD}")
    if not any(key.startswith("model.diffusion_model.") for key in keys):
        raise ModelLoadError(f"{path} holds no Stable Diffusion UNet weights (no model.diffusion_model.* keys): "
                             "not a single-file checkpoint")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------- single files


def _read_checkpoint(path: str, keep, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """The tensors of an LDM single file whose key passes `keep` (others are never read)."""
    suffix = Path(path).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ModelLoadError(
                f"{path}: {suffix} files are Python pickles, and loading one can run any code it contains. "
                "Use a .safetensors version of the model, or, only if you trust where the file came from, "
                "pass allow_pickle=True once and re-save it with difftrain.models.single_file.save_single_file"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # old LDM checkpoints pickle training state too; the caller vouched for the file
            try:
                state = torch.load(path, map_location="cpu", weights_only=False)
            except Exception as exc:
                raise ModelLoadError(f"{path}: cannot read it as a PyTorch checkpoint: {_first_line(exc)}") from None
        while isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and keep(k)}
    return _safetensors(path, lambda f, k: f.get_tensor(k), keep)


def _header(path: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """Every tensor of a single file as a shape-only meta tensor: enough to guess its model type."""
    if Path(path).suffix.lower() in PICKLE_SUFFIXES:
        return _read_checkpoint(path, lambda key: True, allow_pickle)
    return _safetensors(path, lambda f, k: torch.empty(f.get_slice(k).get_shape(), device="meta"), lambda key: True)


def _safetensors(path: str, read, keep) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k: read(f, k) for k in f.keys() if keep(k)}
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"{path}: not a readable .safetensors file ({_first_line(exc)})") from None


def _keep_for(names: set[str]):
    skip = tuple(p for name in MODELS if name not in names for p in LDM_PREFIXES[name])
    return lambda key: not key.startswith(skip) and not key.startswith("model_ema.")


def _single_file_config(path: str, config: str | None, allow_pickle: bool = False, inpainting: bool = False) -> str:
    """A local folder holding the diffusers configs (and tokenizer) for a single file.

    The file has weights only. diffusers guesses a hub repo from its keys (SD 1.x ->
    stable-diffusion-v1-5/stable-diffusion-v1-5) and, when that is not cached, goes online
    even with local_files_only=True; resolving a local folder first keeps loading offline.
    """
    from diffusers.loaders.single_file_utils import fetch_diffusers_config
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    header = _header(path, allow_pickle)  # its kind is checked whatever configs it is given (a LoRA, an SDXL)
    _check_single_file_kind(path, header, inpainting)
    if config is not None and Path(config).expanduser().is_dir():
        folder = Path(config).expanduser()
        if not (folder / "unet" / "config.json").is_file():
            raise ModelLoadError(f"config: {folder} is not a diffusers pipeline folder (no unet/config.json)")
        return str(folder)
    guessed, repo = config is None, config
    if guessed:
        repo = fetch_diffusers_config(header)["pretrained_model_name_or_path"]
    try:
        configs_only = ["*.json", "**/*.json", "*.txt", "**/*.txt", "**/*.model"]
        return snapshot_download(repo, allow_patterns=configs_only, local_files_only=hub_offline())
    except LocalEntryNotFoundError:
        why = f"its keys say it is a {repo} model" if guessed else f"config={repo!r}"
        raise ModelLoadError(
            f"{path}: a single file holds weights only; the configs come from a diffusers model ({why}), "
            f"which is not in the local HF cache and network access is off. Give --config <a local diffusers "
            f"folder of the same architecture> (config= in Python), or run once with network access"
        ) from None
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot get the diffusers configs from {repo!r}: {_first_line(exc)}") from None


def _from_single_file(name: str, checkpoint: dict, config_dir: str, path: str, dtype) -> Any:
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    from difftrain.models.single_file import load_single_file_components

    try:
        return load_single_file_components(checkpoint, config_dir, names=(name,), dtype=dtype, source=path)[name]
    except DifftrainError as exc:
        raise ModelLoadError(str(exc)) from None
    except SingleFileComponentError:
        raise ModelLoadError(f"{name}: {path} holds no {name} weights; give the {name} separately") from None
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        size = r"(torch\.Size\(\[.*?\]\))"
        shape = re.search(rf"(\S+) expected shape {size}, but got {size}", str(exc))
        if shape:
            key, expected, got = shape.groups()
            raise ModelLoadError(
                f"{name}: {path} is another architecture than {config_dir}/{name}: {key} is {got} in the file "
                f"but the config expects {expected}; pass config= a diffusers folder of the same model"
            ) from None
        raise ModelLoadError(
            f"{name}: cannot load {path} with the configs in {config_dir}: {_first_line(exc)}"
        ) from None


# ---------------------------------------------------------------- folders and hub


def _transformers_class(where: _Where, kind: str, revision: str | None):
    import transformers

    if kind == "tokenizer":
        # The class its tokenizer_config.json names (CLIPTokenizer for every SD), not AutoTokenizer: offline,
        # AutoTokenizer also asks for tokenizer/config.json, which SD repos lack, and a cache filled by
        # `huggingface-cli download` cannot say it is missing, so loading failed on a machine with the model.
        return getattr(transformers, _tokenizer_class(where, revision) or "", transformers.AutoTokenizer)
    config = transformers.AutoConfig.from_pretrained(where.path, subfolder=where.subfolder or "", revision=revision)
    arch = (config.architectures or [None])[0]
    return getattr(transformers, arch) if arch and hasattr(transformers, arch) else transformers.AutoModel


def _tokenizer_class(where: _Where, revision: str | None) -> str | None:
    """`tokenizer_class` of the tokenizer's tokenizer_config.json (a local folder's, or a hub repo's through the
    HF cache or a download); None when it cannot be read."""
    filename = f"{where.subfolder}/tokenizer_config.json" if where.subfolder else "tokenizer_config.json"
    try:
        if where.kind == "hub":
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(where.path, filename, revision=revision, local_files_only=hub_offline())
        else:
            path = Path(where.path) / filename
        found = json.loads(Path(path).read_text()).get("tokenizer_class")
    except Exception:  # noqa: BLE001 - any failure leaves the choice to AutoTokenizer, which then says what is wrong
        return None
    return found if isinstance(found, str) else None


def _from_pretrained(name: str, where: _Where, dtype, revision, variant) -> Any:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    kwargs: dict[str, Any] = {"subfolder": where.subfolder} if where.subfolder else {}
    if where.kind == "hub":
        kwargs.update(revision=revision, local_files_only=hub_offline())
    try:
        if name == "tokenizer":
            return _transformers_class(where, name, kwargs.get("revision")).from_pretrained(where.path, **kwargs)
        kwargs.update(dtype=dtype, variant=variant)
        if name == "text_encoder":
            return _transformers_class(where, name, kwargs.get("revision")).from_pretrained(where.path, **kwargs)
        cls = UNet2DConditionModel if name == "unet" else AutoencoderKL
        _check_class(name, where, cls.__name__)
        return cls.from_pretrained(where.path, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{name}: cannot load it from {where.describe()}: {_first_line(exc)}") from None


def _check_class(name: str, where: _Where, expected: str) -> None:
    """Refuse a local folder whose config names another model class (a ControlNet's as the unet): diffusers loads
    what fits, leaves the rest on the meta device, and a traceback came at the first step or draw."""
    if where.kind not in ("pipeline", "component"):
        return
    config = Path(where.path) / (where.subfolder or "") / "config.json"
    try:
        held = json.loads(config.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return  # (diffusers says what is wrong with it)
    if held and held != expected:
        raise ModelLoadError(f"{name}: {config.parent} holds a {held}, not a {expected}; give the {name} folder of "
                             "a Stable Diffusion pipeline")


def _model_from_json(name: str, path: str, dtype) -> Any:
    """A UNet2DConditionModel or AutoencoderKL with random weights, for training from scratch."""
    import inspect

    from diffusers import AutoencoderKL, UNet2DConditionModel

    cls = UNet2DConditionModel if name == "unet" else AutoencoderKL
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{name}: cannot read {path} as JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{name}: {path} must hold a JSON object (a {cls.__name__} config)")
    cls_name = config.get("_class_name", cls.__name__)
    if cls_name != cls.__name__:
        raise ModelLoadError(f"{name}: {path} is a {cls_name} config; a {cls.__name__} config is needed")
    accepted = set(inspect.signature(cls.__init__).parameters)
    unknown = sorted(k for k in config if not k.startswith("_") and k not in accepted)
    if unknown:  # diffusers would ignore them with a warning; a typo must not train the default
        raise ModelLoadError(f"{name}: {path} has keys {cls.__name__} does not know: {unknown}")
    try:
        model = cls.from_config(config)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ModelLoadError(f"{name}: cannot build a {cls.__name__} from {path}: {_first_line(exc)}") from None
    return model if dtype == torch.float32 else model.to(dtype)


def _scheduler(where: _Where | None, config_dir: str | None, revision: str | None):
    import diffusers

    if where is None:
        return diffusers.DDPMScheduler(**SD_TRAIN_SCHEDULE), "DDPMScheduler (SD defaults, no base)"
    location = config_dir or where.path
    kwargs = {"revision": revision} if where.kind == "hub" else {}
    try:
        config = diffusers.DDPMScheduler.load_config(location, subfolder="scheduler", **kwargs)
    except (OSError, ValueError) as exc:
        where_config = f"{location}/scheduler/scheduler_config.json"
        raise ModelLoadError(f"scheduler: cannot read {where_config}: {_first_line(exc)}") from None
    cls = getattr(diffusers, str(config.get("_class_name")), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        cls = diffusers.DDPMScheduler
    return cls.from_config(config), f"{cls.__name__} from {location}/scheduler"


def _single_file_parameterization(path: str, unet, scheduler, keys, config_given: bool = False):
    """A single file's prediction type, which its keys cannot say, as the tools that read such files find it.

    diffusers' guess describes an SD 1.x file with SD 1.5's configs (epsilon) and any SD 2.x file with
    2-1's (768 px, v), though SD 2.x at 512 px (epsilon) has the same keys. In order: a `.yaml` beside
    the file (AUTOMATIC1111 reads it first; difftrain writes one for v and SD 2.x models) with
    `parameterization: "v"` or without; a `v_pred` key in the file (Forge's marker; ComfyUI reads it for
    SDXL only); for SD 2.x the UNet itself, asked as A1111 asks it; else the guessed configs' own. A `ztsnr`
    key says the model was trained with zero terminal SNR. With configs given (`config_given`) the UNet is
    not asked: those configs' scheduler speaks for it unless the file or its yaml says otherwise."""
    beside = Path(path).with_suffix(".yaml")
    sd2 = unet.config.cross_attention_dim == 1024
    markers = {key for key in ("v_pred", "ztsnr") if key in keys}
    if "ztsnr" in markers:  # trained with zero terminal SNR: sampling must rescale its betas the same way
        cls = zero_snr_capable(type(scheduler))
        scheduler = cls.from_config(plain_config(scheduler.config), rescale_betas_zero_snr=True)
    if beside.is_file():
        how = f"{beside.name} beside it"
        predicts_v = _yaml_parameterization(beside) == "v"
    elif "v_pred" in markers:
        how, predicts_v = "its v_pred key", True
    elif sd2 and not config_given:
        how, predicts_v = "its UNet's answer at t = 999 (A1111's test)", predicts_v_for_sd2(unet)
    else:
        return scheduler
    prediction = "v_prediction" if predicts_v else "epsilon"
    if sd2 and not predicts_v and not config_given:
        unet.register_to_config(sample_size=64)  # 512 px, not 2-1's 768, by default
    log.info("%s: %s says %s", path, how, prediction)
    return type(scheduler).from_config(plain_config(scheduler.config), prediction_type=prediction)


def _yaml_parameterization(path: Path) -> str | None:
    """model.params.parameterization of an LDM config yaml ("v", or None for LDM's default, eps)."""
    import yaml

    try:
        config = yaml.safe_load(path.read_text(errors="replace"))
        value = config["model"]["params"].get("parameterization")
    except (yaml.YAMLError, KeyError, TypeError, AttributeError):
        log.warning("%s: not an LDM config yaml (model.params); its parameterization is taken as eps", path)
        return None
    return str(value) if value is not None else None


def predicts_v_for_sd2(unet) -> bool:
    """AUTOMATIC1111's `is_using_v_parameterization_for_sd2`, on a diffusers UNet: latent and text all 0.5, t = 999;
    v-prediction when the output's mean lies more than 1 below the input's."""
    parameter = next(unet.parameters())
    with torch.no_grad():
        latent = torch.full((1, unet.config.in_channels, 8, 8), 0.5, device=parameter.device, dtype=parameter.dtype)
        text = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, device=parameter.device, dtype=parameter.dtype)
        out = unet(latent, torch.tensor([999], device=parameter.device), encoder_hidden_states=text).sample
    return (out.float() - latent.float()).mean().item() < -1


# ---------------------------------------------------------------- the whole


def _check_fit(parts: dict, origin: dict[str, str], inpainting: bool = False) -> None:
    unet, vae, text = parts.get("unet"), parts.get("vae"), parts.get("text_encoder")
    if unet is not None and text is not None:
        width = getattr(text.config, "hidden_size", None) or getattr(text.config, "d_model", None)
        cross = unet.config.cross_attention_dim
        cross_dims = set(cross) if isinstance(cross, (list, tuple)) else {cross}
        if width is not None and cross_dims != {width}:
            raise ModelLoadError(
                f"the parts do not fit: unet cross_attention_dim {cross} ({origin['unet']}) != "
                f"text_encoder hidden size {width} ({origin['text_encoder']})"
            )
    if unet is not None and vae is not None:
        from difftrain.sampling.masked import is_inpainting_unet

        latent = vae.config.latent_channels
        if is_inpainting_unet(unet, latent):
            if not inpainting:  # training would feed it latents alone: it would fail deep in a convolution
                raise ModelLoadError(f"{origin['unet']}: {unet.config.in_channels} input channels, {INPAINTING}")
        elif unet.config.in_channels != latent or unet.config.out_channels != latent:
            raise ModelLoadError(
                f"the parts do not fit: unet in_channels {unet.config.in_channels} / out_channels "
                f"{unet.config.out_channels} ({origin['unet']}) != vae latent_channels {latent} ({origin['vae']})"
            )


def load_sd(
    base: str | None,
    *,
    unet: str | None = None,
    vae: str | None = None,
    text_encoder: str | None = None,
    tokenizer: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
    load: set[str] | None = None,
    config: str | None = None,
    allow_pickle: bool = False,
    inpainting: bool = False,
) -> SDComponents:
    """Load a Stable Diffusion model's parts, each from its override or else from `base`.

    `revision` and `variant` apply to the base. `config` (a local diffusers folder or hub id)
    describes a single-file base; without it, diffusers' guess from the file's keys is used,
    which needs that model's configs in the HF cache or the network. `allow_pickle` lets a
    trusted .ckpt/.pt/.pth be read. `inpainting`: an inpainting model (9-channel UNet) is taken, for drawing.
    """
    overrides = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}
    wanted = set(COMPONENTS if load is None else load) - {"scheduler"}
    if wanted - set(COMPONENTS):
        raise ModelLoadError(f"load: unknown parts {sorted(wanted - set(COMPONENTS))}; choose from {list(COMPONENTS)}")
    if base is None:
        missing = [n for n in COMPONENTS if n in wanted and overrides[n] is None]
        if missing:
            raise ModelLoadError(f"base: no base model, so {missing} must be given explicitly (or give a base)")
    # Every path given is checked, even for a part not loaded now: a typo should not wait.
    base_where = _locate_base(str(base), inpainting) if base is not None else None
    located = {n: _locate_part(n, str(spec)) for n, spec in overrides.items() if spec is not None}
    parts_where = {n: w for n, w in located.items() if n in wanted}
    if base_where is not None and base_where.kind == "hub":
        base_where.subfolder = _hub_subfolder(base_where.path, None, revision, inpainting)  # fails fast offline
    for name, where in parts_where.items():
        if where.kind == "hub":
            where.subfolder = _hub_subfolder(where.path, name, None)

    config_dir = _config_dir(base_where, parts_where, config, allow_pickle, inpainting)
    base_checkpoint = None
    if base_where is not None and base_where.kind == "single_file":
        from_base = {n for n in wanted if n not in parts_where}
        base_checkpoint = _read_checkpoint(base_where.path, _keep_for(from_base), allow_pickle)

    parts: dict[str, Any] = {}
    origin = {n: "not loaded" for n in COMPONENTS}
    for name in sorted(wanted, key=COMPONENTS.index):
        where = parts_where.get(name)
        if where is None and base_where.kind == "single_file":
            if name == "tokenizer":  # a single file has none: the config folder's
                where = _Where("pipeline", config_dir, "tokenizer")
            else:
                parts[name] = _from_single_file(name, base_checkpoint, config_dir, base_where.path, dtype)
                origin[name] = f"{base_where.describe()} (config {config_dir}/{name})"
                continue
        if where is None:
            where = _Where(base_where.kind, base_where.path, name)
            parts[name] = _from_pretrained(name, where, dtype, revision, variant)
        elif where.kind == "model_json":
            parts[name] = _model_from_json(name, where.path, dtype)
        elif where.kind == "single_file":
            checkpoint = _read_checkpoint(where.path, lambda key: True, allow_pickle)
            parts[name] = _from_single_file(name, checkpoint, config_dir, where.path, dtype)
        else:
            parts[name] = _from_pretrained(name, where, dtype, None, None)
        origin[name] = where.describe()

    _check_fit(parts, origin, inpainting)
    scheduler, origin["scheduler"] = _scheduler(base_where, config_dir, revision)
    if base_where is not None and base_where.kind == "single_file" and parts.get("unet") is not None:
        keys = base_checkpoint if base_checkpoint is not None else _header(base_where.path, allow_pickle)
        scheduler = _single_file_parameterization(base_where.path, parts["unet"], scheduler, keys, config is not None)
        origin["scheduler"] += f", {scheduler.config.prediction_type}"
    return SDComponents(
        unet=parts.get("unet"),
        vae=parts.get("vae"),
        text_encoder=parts.get("text_encoder"),
        tokenizer=parts.get("tokenizer"),
        scheduler=scheduler,
        source="; ".join(f"{n}: {origin[n]}" for n in (*COMPONENTS, "scheduler")),
    )


def _config_dir(base: _Where | None, parts: dict[str, _Where], config: str | None, allow_pickle: bool,
                inpainting: bool = False) -> str | None:
    """The local folder whose configs describe single files (they hold weights only)."""
    if not (base is not None and base.kind == "single_file") and all(w.kind != "single_file" for w in parts.values()):
        return None
    if base is None:
        raise ModelLoadError("a single-file part needs a base model whose configs describe it; give base")
    if base.kind == "single_file":
        return _single_file_config(base.path, config, allow_pickle, inpainting)
    if base.kind == "hub":
        return _single_file_config(base.path, base.path)
    return base.path


def load_vae(vae: str | None, base: str | None) -> Any:
    """Just the AutoencoderKL: from a folder, a random-init .json config, or the base model's vae/."""
    if vae is None and base is None:
        raise ModelLoadError("model.vae: give a VAE folder or AutoencoderKL config .json, or model.base")
    return load_sd(base, vae=vae, load={"vae"}).vae
