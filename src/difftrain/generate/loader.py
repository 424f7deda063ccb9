"""One loader for inference: anything a user calls a model becomes a ready diffusers pipeline.

`load_pipeline` takes a run folder (its final model, or for pixel models its latest
checkpoint), a model folder with a `difftrain.json` manifest, a plain diffusers folder, a
hub id or a single `.safetensors` file. What the model was trained with travels with it:
the manifest's text context length becomes the tokenizer's `model_max_length` (which
diffusers' own prompt encoding and ours both honour), its scheduler folder the sampler's
noise settings, its adapters are loaded on its base. `generate`, `sample`, evaluation and
the server load models through this and nothing else: none of them reads a training
config or builds a training method.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple

import torch

from difftrain.errors import DifftrainError
from difftrain.models.manifest import ADAPTER_KINDS, Manifest, legacy_manifest, read_manifest
from difftrain.run_folder import CHECKPOINTS, SHARD_LAYOUT, final_model_dir, is_run_folder, latest_checkpoint, split_modules


class ModelNotFound(DifftrainError):
    pass


class Located(NamedTuple):
    """Where a model is and what its manifest says; `folder` and `manifest` are None for a hub id or single file."""

    source: str | Path
    folder: Path | None
    manifest: Manifest | None
    name: str  # for display: the run's or folder's name, a file's stem, a hub id
    use_ema: bool


# Models that are not a text-to-image Stable Diffusion: `serve` serves none, and none is a hires checkpoint.
NOT_TEXT_TO_IMAGE = ("unconditional", "vae", "controlnet", "t2i-adapter")


def clip_skip_of(pipe, asked: int | None = None) -> int:
    """The clip skip a model draws with: the one asked for, else the one it was trained with, else 1."""
    return asked or pipe.manifest.conditioning.get("clip_skip") or 1


def load_pipeline(
    source: str | Path,
    loras: list[tuple[str, float]] = (),
    embeddings: list[str] = (),
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    use_ema: bool = True,
    config: str | None = None,
    provider: str = "auto",
    provider_fallback: bool = False,
):
    """A StableDiffusionPipeline (or a DDPMPipeline for pixel models) with `pipe.manifest` and `pipe.model_name`.

    `loras` are (file, weight) pairs loaded after the model's own adapters, `embeddings`
    Textual Inversion files; `use_ema` picks a run's EMA or raw weights; `config` is the
    diffusers folder (or hub id) holding a single file's component configs; `provider` the
    ONNX Runtime execution provider of an ONNX export (cpu, cuda, tensorrt; one this
    onnxruntime lacks is refused unless `provider_fallback`).
    """
    return build_pipeline(locate(source, use_ema), loras, embeddings, device, dtype, config, provider,
                          provider_fallback)


@contextmanager
def loading_bar(shown: bool) -> Iterator[None]:
    """diffusers' "Loading pipeline components" and transformers' "Loading weights" bars, off inside when
    not `shown` (a command's --no-progress, a server).

    Each library's switch is process-wide, and diffusers' reads no environment variable (transformers'
    reads HF_HUB_DISABLE_PROGRESS_BARS once, at import), so both are put back after.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    switches = [library for library in (diffusers_logging, transformers_logging) if library.is_progress_bar_enabled()]
    if not shown:
        for library in switches:
            library.disable_progress_bar()
    try:
        yield
    finally:
        for library in switches:
            library.enable_progress_bar()


def build_pipeline(
    located: Located,
    loras: list[tuple[str, float]] = (),
    embeddings: list[str] = (),
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    config: str | None = None,
    provider: str = "auto",
    provider_fallback: bool = False,
):
    """`load_pipeline` for a model already located (a caller that checked its kind first reads nothing twice)."""
    source, folder, manifest, name, use_ema = located
    if manifest is not None and manifest.kind == "onnx":
        return _onnx(located, loras, embeddings, provider, provider_fallback)
    if manifest is None:
        pipe = _from_hub_or_single_file(str(source), dtype, config)
        manifest = Manifest("stable-diffusion")
    elif manifest.kind == "vae":
        raise ModelNotFound(f"{source} is a VAE; use it as model.vae of a text2image run (it has nothing to sample)")
    elif manifest.kind == "unconditional":
        pipe = _unconditional(folder, manifest, use_ema)
    elif manifest.kind in ADAPTER_KINDS:
        pipe = _on_base(folder, manifest, dtype, config)
    else:
        pipe = _diffusers_folder(folder, dtype)
    if manifest.kind != "unconditional":
        _apply_conditioning(pipe, manifest)
        own = [(str(folder / lora["file"]), lora["weight"]) for lora in manifest.loras]
        own_embeddings = [str(folder / item["file"]) for item in manifest.embeddings]
        apply_adapters(pipe, own + list(loras), own_embeddings + list(embeddings))
    elif loras or embeddings:
        raise ModelNotFound(f"{source} is a pixel-space model: LoRAs and embeddings apply to Stable Diffusion")
    pipe.manifest, pipe.model_name = manifest, name
    if device is not None:
        pipe.to(device)
    return pipe


def locate(source: str | Path, use_ema: bool = True) -> Located:
    """Find the model folder `source` names and read (or, for an old run, derive) its manifest."""
    path = Path(source).expanduser()
    if is_run_folder(path):
        return Located(source, *_locate_in_run(path, use_ema), use_ema)
    if path.is_dir():
        manifest = read_manifest(path)
        if manifest is None and (path / "state.json").is_file() and (path / "config.yaml").is_file():
            raise ModelNotFound(f"{source}: a training checkpoint of a run, which holds training state (only a pixel "
                                f"model's checkpoint loads as a model); give the run folder {path.parent.parent} for "
                                "its final model, or resume the run to finish it")
        if (not use_ema and manifest is not None and manifest.method and manifest.weights == "ema"
                and not (path / "state.json").is_file()):
            # A run's model/ folder holds its EMA weights only (a checkpoint holds both): silently drawing them
            # would answer another question. (A model no run trained, a hub one exported, has no other weights.)
            raw = path.parent / "model-no-ema"
            where = f"{raw}" if raw.is_dir() and path.name == "model" else "the run folder"
            raise ModelNotFound(f"{source} holds a run's EMA weights; for its raw ones (--no-ema) give {where}")
        return Located(source, path, manifest or _plain_folder_manifest(path), path.name, use_ema)
    return Located(source, None, None, path.stem if path.exists() else str(source), use_ema)


def _locate_in_run(run: Path, use_ema: bool) -> tuple[Path, Manifest, str]:
    model_dir = final_model_dir(run, use_ema)
    weights = "raw" if model_dir.name == "model-no-ema" else "ema"
    if model_dir.is_dir():
        manifest = read_manifest(model_dir)
        if manifest is not None and not use_ema and manifest.weights == "ema":
            # EMA was on but model-no-ema/ is missing (a run stopped between its two writes): not the EMA instead.
            raise ModelNotFound(f"{run}: its raw weights (model-no-ema/) are missing, only the EMA ones (model/) are "
                                "there; draw those (without --no-ema), or resume the run to write both")
        return model_dir, manifest or legacy_manifest(run, model_dir, weights), run.name
    checkpoint = latest_checkpoint(run / CHECKPOINTS)
    if checkpoint is None:
        raise ModelNotFound(f"{run}: a run folder with neither a final model nor a checkpoint yet")
    manifest = read_manifest(checkpoint) or legacy_manifest(checkpoint, checkpoint, weights)
    if manifest.kind != "unconditional":
        raise ModelNotFound(f"{run} has no final model yet (no {model_dir}); finish or resume the run first")
    return checkpoint, manifest, run.name


def _plain_folder_manifest(path: Path) -> Manifest:
    """A diffusers folder without a manifest: what its own files say it is."""
    index = path / "model_index.json"
    if index.is_file():
        text = index.read_text()
        if "OnnxRuntimeModel" in text or "ORTStableDiffusion" in text:  # diffusers' or Optimum's ONNX export
            return Manifest("onnx", scheduler="scheduler")
        if "StableDiffusion" not in text and (path / "unet").is_dir() and not (path / "text_encoder").is_dir():
            return Manifest("unconditional", scheduler="scheduler")
        return Manifest("stable-diffusion")
    if (path / "unet").is_dir() and (path / "scheduler").is_dir() and not (path / "text_encoder").is_dir():
        return Manifest("unconditional", scheduler="scheduler")
    if (path / "config.json").is_file() and "AutoencoderKL" in (path / "config.json").read_text():
        return Manifest("vae")
    raise ModelNotFound(
        f"{path}: not a model folder: no difftrain.json, no model_index.json, no unet/ and scheduler/, "
        "and not a difftrain run folder (config.yaml)"
    )


def _onnx(located: Located, loras, embeddings, provider: str, fallback: bool):
    """An ONNX export: its graphs in ONNX Runtime sessions inside diffusers' pipeline."""
    from difftrain.models.onnx import load_onnx_pipeline

    if loras or embeddings:
        raise ModelNotFound(f"{located.source} is an ONNX export: its weights are fixed; merge LoRAs and embeddings "
                            "when exporting (difftrain export ... --lora FILE:WEIGHT --embedding FILE)")
    pipe = load_onnx_pipeline(located.folder, provider, fallback)
    _apply_conditioning(pipe, located.manifest)
    pipe.manifest, pipe.model_name = located.manifest, located.name
    return pipe


def _diffusers_folder(folder: Path, dtype: torch.dtype):
    from difftrain.models.sd import load_sd

    # Through load_sd, not the pipeline class: its checks (an SDXL folder refused by name, parts that do not fit,
    # missing weights) answer with a message rather than a traceback at draw time. Inpainting models draw.
    return _pipeline(load_sd(str(folder), dtype=dtype, inpainting=True))


def _from_hub_or_single_file(spec: str, dtype: torch.dtype, config: str | None):
    from difftrain.models.sd import ModelLoadError, load_sd

    try:
        return _pipeline(load_sd(spec, dtype=dtype, config=config, inpainting=True))  # with its clear errors
    except ModelLoadError as reason:
        # load_sd names the model by a run's config key, `base`; here it is the command's MODEL, named in the text
        raise ModelLoadError(str(reason).removeprefix("base: ")) from None


def _on_base(folder: Path, manifest: Manifest, dtype: torch.dtype, config: str | None = None):
    """An adapter or partial model: its base (with any component overrides), its parts on top,
    and the scheduler it trained with. `config` (else the one the run recorded) describes a
    single-file base."""
    from difftrain.models.sd import ModelLoadError, load_sd

    base = manifest.base or {}
    if not base.get("model") and not base.get("unet"):
        raise ModelNotFound(f"{folder}: the manifest names no base model, and a {manifest.kind} needs one")
    trained = {name: str(folder / name) for name in manifest.components}
    try:
        parts = load_sd(
            base.get("model"), unet=trained.get("unet", base.get("unet")), vae=base.get("vae"),
            text_encoder=trained.get("text_encoder", base.get("text_encoder")), tokenizer=base.get("tokenizer"),
            revision=base.get("revision"), variant=base.get("variant"), dtype=dtype,
            config=config or base.get("config"),
        )
    except ModelLoadError as reason:  # a folder copied to another machine names a base that is not there
        raise ModelNotFound(f"{folder} is a {manifest.kind} on a base model that does not load: {reason}. The base "
                            f"is named in {folder / 'difftrain.json'} (\"base\"); put it there, or edit that "
                            "entry to where the base is on this machine") from None
    if manifest.scheduler:
        parts.scheduler = _saved_scheduler(folder / manifest.scheduler)
    return _pipeline(parts)


def _saved_scheduler(folder: Path):
    import diffusers

    saved = diffusers.DDPMScheduler.load_config(folder)  # any scheduler class reads any scheduler config
    return getattr(diffusers, saved["_class_name"]).from_config(saved)


def _pipeline(parts):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        scheduler=parts.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _unconditional(folder: Path, manifest: Manifest, use_ema: bool):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    if (folder / "unet").is_dir():
        unet = UNet2DModel.from_pretrained(folder, subfolder="unet")
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder=manifest.scheduler or "scheduler")
        return DDPMPipeline(unet=unet, scheduler=scheduler)
    # A checkpoint: its weights, in the architecture the manifest records.
    from safetensors.torch import load_file

    if not (folder / "model.safetensors").is_file() and (folder / SHARD_LAYOUT).is_file():
        raise ModelNotFound(f"{folder} is an FSDP checkpoint, written in per-process parts: join them first with "
                        f"`difftrain checkpoint consolidate {folder}`")
    unet = UNet2DModel.from_config(manifest.architecture["unet"])
    weights = "ema.safetensors" if use_ema and (folder / "ema.safetensors").is_file() else "model.safetensors"
    tensors = split_modules(load_file(folder / weights))["unet"]
    # EMA files hold the parameters only; buffers keep their initial values, as in training.
    unet.load_state_dict(tensors, strict=weights == "model.safetensors")
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(manifest.architecture["scheduler"]))


def _apply_conditioning(pipe, manifest: Manifest) -> None:
    """Encode prompts as the model was trained: a short training context stays short here."""
    max_length = manifest.conditioning.get("max_length")
    if max_length:
        pipe.tokenizer.model_max_length = int(max_length)


def load_merged(source: str | Path, loras: list[tuple[str, float]] = (), embeddings: list[str] = (),
                use_ema: bool = True, config: str | None = None, lora_scale: float = 1.0, progress: bool = True):
    """`load_pipeline`'s pipeline with every LoRA (the model's own and `loras`) baked into the weights at its weight
    x `lora_scale`, and the LoRA layers gone: what an export or a merged folder writes."""
    with loading_bar(progress):
        pipe = load_pipeline(source, loras, embeddings, use_ema=use_ema, config=config)
    if getattr(pipe.unet, "peft_config", None) or getattr(getattr(pipe, "text_encoder", None), "peft_config", None):
        pipe.fuse_lora(lora_scale=lora_scale)  # x the adapters' own weights (set_adapters)
        pipe.unload_lora_weights()  # the fused weights stay
    return pipe


def loras_merged(located, loras: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """The LoRAs `load_merged` bakes into the model `located` names, in order: its own (a LoRA run's), then
    `loras`."""
    own = located.manifest.loras if located.manifest is not None else []
    return [(str(located.folder / lora["file"]), lora["weight"]) for lora in own] + list(loras)


def baked_manifest(pipe, kind: str, export: dict) -> Manifest:
    """The manifest of a folder `load_merged`'s pipeline is written to: what it was trained with (noise,
    conditioning: resolution, max_length, clip_skip) kept, so the folder draws as the model did; its adapters
    baked in, so none listed; `export` says how it was made."""
    from dataclasses import replace

    from difftrain.versions import difftrain_version

    manifest = replace(pipe.manifest or Manifest("stable-diffusion"), kind=kind, base=None, components=[], loras=[],
                       embeddings=[], controls=[], scheduler="scheduler")
    manifest.trained = {**manifest.trained, "difftrain": difftrain_version()}
    manifest.export = export
    return manifest


def lora_file(spec: str | Path) -> str | Path:
    """A LoRA as given (a file, or a folder holding diffusers' file), or a LoRA run folder's own file."""
    if not is_run_folder(Path(spec)):
        return spec
    located = locate(spec)
    if located.manifest is None or located.manifest.kind != "lora" or not located.manifest.loras:
        raise ModelNotFound(f"{spec}: a {located.manifest.kind if located.manifest else 'model'} run folder, not a "
                            "LoRA run's: give a LoRA file, or the folder of a run that trained one")
    return str(located.folder / located.manifest.loras[0]["file"])


def apply_adapters(pipe, loras: list[tuple[str, float]], embeddings: list[str]) -> list[str]:
    """Load LoRAs (each as its own adapter, at its weight; a LoRA run folder for its LoRA) with the embeddings a
    LoRA file bundles, and embeddings; returns the adapter names."""
    from difftrain.models.embeddings import load_embedding
    from difftrain.models.lora_files import load_lora_adapter

    names, weights, tokens = [], [], []
    for index, (lora, weight) in enumerate(loras):
        name = f"lora{index}"
        load_lora_adapter(pipe, lora_file(lora), name)
        names.append(name)
        weights.append(weight)
        tokens += bundled_tokens(lora_file(lora))
    if names:
        pipe.set_adapters(names, adapter_weights=weights)
    for embedding in embeddings:
        token, vectors = load_embedding(embedding)
        tokens.append((token or Path(embedding).stem, vectors, str(embedding),
                       "rename the file (its name is the token, as in A1111)"))
    add_embeddings(pipe, tokens)
    return names


def bundled_tokens(lora: str | Path) -> list[tuple[str, torch.Tensor, str, str]]:
    """`add_embeddings`' entries for the embeddings a LoRA file bundles."""
    from difftrain.models.lora_files import bundled_embeddings

    return [(token, vectors, f"{Path(lora).name}, its bundled embedding", "the LoRA bundles it under that name")
            for token, vectors in bundled_embeddings(lora).items()]


def add_embeddings(pipe, tokens: list[tuple[str, torch.Tensor, str, str]]) -> None:
    """Each (token, vectors, where they came from, how to rename them) into `pipe`'s tokenizer and text encoder,
    refused naming the source where the token is given twice, is a word already, or the width does not fit."""
    from difftrain.models.embeddings import EmbeddingFileError, width_misfit

    given: dict[str, str] = {}
    for token, vectors, where, rename in tokens:
        if token in given:
            raise EmbeddingFileError(f"{where}: its token {token!r} is given twice (also by {given[token]}); "
                                     "give each once")
        if misfit := width_misfit(vectors, pipe.text_encoder):  # (diffusers' message left its placeholders unfilled)
            raise EmbeddingFileError(f"{where}: {misfit}: an embedding made for another base model")
        if token in pipe.tokenizer.get_vocab():
            raise EmbeddingFileError(f"{where}: {token!r} is a word this model's tokenizer has already; {rename}")
        given[token] = where
        pipe.load_textual_inversion({token: vectors}, token=token)
