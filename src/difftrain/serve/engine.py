"""The served models and how one request becomes images.

Each model is located (and its manifest read) at start and loaded on first use; a request
gets its own scheduler instance and its own generators, on a pipeline object built around
the model's shared weights, so no request sees another's sampler settings. Prompts go
through `difftrain generate`'s code: A1111's prompt syntax, the model's trained context
length and clip skip, the same infotext in every PNG.
"""

from __future__ import annotations

import inspect

import hashlib
import json
import os
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from difftrain.errors import DifftrainError
from difftrain.serve.jobs import release_device_memory
from difftrain.serve.requests import (ExtrasRequest, Img2ImgRequest, Limits, RequestError, Txt2ImgRequest,
                                      decode_image, decode_mask)

if TYPE_CHECKING:
    from difftrain.generate.upscale import ImageUpscaler


class ServeError(DifftrainError):
    pass


@dataclass
class ServedModel:
    spec: str  # what the user gave: a run folder, a model folder, a single file
    located: object  # generate.loader.Located
    pipe: object = None  # loaded on first use
    # Prompt LoRA file -> (adapter name, the file's mtime when loaded), loaded into `pipe`, least recently used first.
    loras: OrderedDict[str, tuple[str, int]] = field(default_factory=OrderedDict)
    adapters_loaded: int = 0  # prompt adapters ever loaded into `pipe`: each gets a name of its own
    # The model's own adapters (a LoRA run's), loaded with it: active in every request.
    own_adapters: list[str] = field(default_factory=list)
    own_weights: list[float] = field(default_factory=list)
    # The embeddings folder's files as A1111's /embeddings lists them: loaded into this model, or why not.
    embeddings: dict = field(default_factory=lambda: {"loaded": {}, "skipped": {}})
    # Token -> (prompt LoRA file, vectors) of the embeddings prompt LoRAs bundle, loaded into `pipe`.
    bundled: dict[str, tuple[str, int]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.located.name

    @cached_property  # a path resolved and hashed once, not on every request that keys a cache by title
    def hash(self) -> str:
        return hashlib.sha256(str(Path(self.spec).resolve()).encode()).hexdigest()[:10]

    @cached_property
    def title(self) -> str:
        return f"{self.name} [{self.hash}]"

    @property
    def own_clip_skip(self) -> int:
        """The clip skip the model was trained with (its manifest), what its requests use unless one is set."""
        manifest = self.located.manifest
        return (manifest.conditioning.get("clip_skip") if manifest is not None else None) or 1


@dataclass
class Prepared:
    """What a request resolves to, worked out once when it is submitted (the worker draws from this,
    nothing is decoded or looked up a second time)."""

    model: ServedModel
    scheduler: str  # the sampler's name, resolved
    prompt: str  # without its <lora:...> tags
    loras: list[tuple[Path, float]]  # the tags' files in the LoRA folder
    units: list  # ControlNet units (generate.controlnet.ControlUnit) ...
    unit_images: list  # ... and their images as sent (each unit carries its control mode)
    init_image: object = None  # img2img: the decoded image
    inpainting: object = None  # img2img with a mask: its image and mask made ready (generate.inpaint.Inpainting)
    hires_prompt: str = ""  # the hires pass's own prompt without its <lora:...> tags (the prompt's); "": the prompt
    hires_upscaler: ImageUpscaler | None = None  # the hires fix's model upscaler, from the upscaler folder
    hires_model: ServedModel | None = None  # the hires pass's own model (hr_checkpoint_name), among the served


@dataclass
class Drawn:
    images: list  # PIL images
    seeds: list[int]
    infotexts: list[str]
    model: ServedModel | None = None
    subseeds: list[int] = field(default_factory=list)
    interrupted: bool = False
    clip_skip: int = 1


class Engine:
    """Models by name, one current (A1111's sd_model_checkpoint), drawn on one device."""

    def __init__(self, specs: list[str], lora_dir: str | None = None, device: str | None = None,
                 precision: str = "auto", prompt_cache_size: int = 256, controlnet_dir: str | None = None,
                 embeddings_dir: str | None = None, models_in_memory: int = 1, upscaler_dir: str | None = None,
                 limits: Limits | None = None):
        from difftrain.generate.loader import NOT_TEXT_TO_IMAGE, locate
        from difftrain.generate.text2image import _dtype, resolve_device

        if not specs:
            raise ServeError("serve: give at least one model (run folder, model folder or single file)")
        self.device = resolve_device(device or "auto")
        self.dtype = _dtype(precision, self.device)
        self.limits = limits or Limits()  # the sizes drawn are held to them here too (_refuse_oversize)
        self.models: dict[str, ServedModel] = {}
        for spec in specs:
            located = locate(spec)
            kind = located.manifest.kind if located.manifest else "stable-diffusion"
            if kind in NOT_TEXT_TO_IMAGE:
                raise ServeError(f"serve {spec}: a {kind} model; serve draws Stable Diffusion text-to-image models "
                                 "(LoRA and embedding runs included)")
            model = ServedModel(spec, located)
            if model.title in self.models:
                raise ServeError(f"serve: {spec} is given twice")
            self.models[model.title] = model
        self.current = next(iter(self.models.values()))
        self.lora_dir = Path(lora_dir) if lora_dir else None
        self.controlnet_dir = Path(controlnet_dir) if controlnet_dir else None
        self.embeddings_dir = Path(embeddings_dir) if embeddings_dir else None
        self.upscaler_dir = Path(upscaler_dir) if upscaler_dir else None
        # (model title, ControlNet path) -> loaded network, least recently used first
        self.nets: OrderedDict[tuple[str, str], object] = OrderedDict()
        self.clip_skip: int | None = None  # A1111's CLIP_stop_at_last_layers option; None: each model's own
        self.ensd = 0  # A1111's eta_noise_seed_delta option
        # Held while a job draws and while a model loads: a switch from a handler (POST options) waits for the job
        # in progress, as in A1111, so it never lets go of, or loads beside, a model a job is using. Re-entrant:
        # the worker loads its job's model while holding it.
        self._busy = threading.RLock()
        # Loaded models, least recently used first: beyond `models_in_memory` (A1111's sd_checkpoints_limit,
        # also 1 by default) the oldest is let go, so clients switching models cannot fill the device.
        self.models_in_memory = models_in_memory
        self._loaded: OrderedDict[str, ServedModel] = OrderedDict()
        # Text-encoder outputs by (model, prompt, negative, clip skip, active LoRAs): seed 001's
        # "pre-compute common prompts"; a bot that repeats its prompt skips the text encoder.
        self.prompt_cache: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.prompt_cache_size = prompt_cache_size
        self.prompt_cache_hits = self.prompt_cache_misses = 0

    # ----------------------------------------------------------------- models
    def find(self, name: str, field: str = "sd_model_checkpoint") -> ServedModel:
        """A served model by its title, name or spec; nothing outside the served list (refused naming `field`)."""
        for model in self.models.values():
            if name in (model.title, model.name, model.spec):
                return model
        raise RequestError(field, f"{name!r} is not served here; choose one of {', '.join(self.models)}", status=404)

    def load(self, model: ServedModel):
        with self._busy:
            self._loaded.pop(model.title, None)
            self._loaded[model.title] = model
            while len(self._loaded) > max(self.models_in_memory, 1):
                self._unload(self._loaded.popitem(last=False)[1])  # before the new one: one model's memory at a time
            if model.pipe is None:
                from difftrain.generate.loader import build_pipeline, loading_bar

                try:
                    with loading_bar(False):  # a server's log is no terminal
                        pipe = build_pipeline(model.located, dtype=self.dtype)
                except BaseException:
                    self._loaded.pop(model.title, None)
                    raise
                pipe.to(self.device)
                pipe.set_progress_bar_config(disable=True)
                # build_pipeline names a model's own LoRAs lora0, lora1, ... in manifest order.
                own = pipe.manifest.loras
                model.own_adapters = [f"lora{i}" for i in range(len(own))]
                model.own_weights = [float(lora["weight"]) for lora in own]
                self._load_embeddings(model, pipe)
                model.pipe = pipe
        return model.pipe

    def _unload(self, model: ServedModel) -> None:
        """Let a model go (a job drawing with it keeps its own reference until it ends); loaded again when asked."""
        model.pipe, model.loras, model.embeddings = None, OrderedDict(), {"loaded": {}, "skipped": {}}
        model.adapters_loaded = 0  # a new pipe has none
        for key in [key for key in self.nets if key[0] == model.title]:
            del self.nets[key]
        release_device_memory()

    def _load_embeddings(self, model: ServedModel, pipe) -> None:
        """Every `.safetensors` embedding of the embeddings folder that fits this model's text encoder,
        as A1111 loads its embeddings folder (its token: the file's own, or the file name)."""
        from difftrain.models.embeddings import load_embedding, width_misfit

        if self.embeddings_dir is None or not self.embeddings_dir.is_dir():
            return
        if pipe.manifest.kind == "onnx":
            model.embeddings["skipped"].update({path.stem: _listed_embedding(None, "an ONNX export's vocabulary is "
                                                                         "fixed when it is exported (difftrain "
                                                                         "export --embedding)")
                                                for path in self.embeddings_dir.glob("*.safetensors")})
            return
        for path in sorted(self.embeddings_dir.glob("*.safetensors")):  # never a pickle (.pt/.bin)
            try:
                token, vectors = load_embedding(path)
            except DifftrainError as reason:
                model.embeddings["skipped"][path.stem] = _listed_embedding(None, str(reason))
                continue
            if misfit := width_misfit(vectors, pipe.text_encoder):
                model.embeddings["skipped"][path.stem] = _listed_embedding(vectors, misfit)
                continue
            try:
                pipe.load_textual_inversion(str(path), token=token or path.stem)
            except (ValueError, RuntimeError) as reason:  # e.g. a token the vocabulary has (a TI run's own)
                model.embeddings["skipped"][path.stem] = _listed_embedding(vectors, f"diffusers did not load it: "
                                                                                    f"{reason}")
                continue
            model.embeddings["loaded"][path.stem] = _listed_embedding(vectors)

    def upscale(self, request: ExtrasRequest, images: list) -> tuple[list, str]:
        """A1111's Extras over decoded `images`: the upscaled images and the postprocessing text, run while no job
        draws (A1111 holds its queue lock for them too)."""
        from difftrain.errors import UpscalerError
        from difftrain.generate.upscale import ImageUpscaler, check_extras, extras, postprocessing_text

        request.check()
        for image in images:
            request.check_output(*image.size)
        visibility = request.extras_upscaler_2_visibility
        second = visibility > 0 and request.upscaler_2 != "None"
        found = {}
        for name in ("upscaler_1", "upscaler_2")[:1 + second]:
            try:  # (by name among the folder's files, never a client's path)
                found[name] = ImageUpscaler.find(getattr(request, name), self.upscaler_dir, self.device, paths=False)
            except UpscalerError as reason:
                raise RequestError(name, str(reason)) from None
        scale = request.upscaling_resize if request.size is None else None
        try:
            check_extras(found["upscaler_1"], scale, request.size)
        except UpscalerError as reason:
            raise RequestError("upscaling_resize" if scale is not None else "upscaling_resize_w", str(reason)) from None
        upscaled, params = [], {}
        with self._busy:
            for image in images:
                try:
                    result, params = extras(image, found["upscaler_1"], scale, request.size, request.upscaling_crop,
                                            found.get("upscaler_2"), visibility)
                except UpscalerError as reason:  # (an image too small for its scale)
                    raise RequestError("upscaling_resize", str(reason)) from None
                upscaled.append(result)
        return upscaled, postprocessing_text(params)

    def lora_files(self) -> dict[str, Path]:
        """The LoRAs a prompt may name: `<name>.safetensors` in the LoRA folder, and nothing else."""
        if self.lora_dir is None or not self.lora_dir.is_dir():
            return {}
        return {path.stem: path for path in sorted(self.lora_dir.glob("*.safetensors"))}

    # ----------------------------------------------------------------- drawing
    def _refuse_oversize(self, width: int, height: int, field: str) -> None:
        """A second guard behind the request's check(), which holds every size to the limits: a slip there once
        let a 6400x6400 hires pass reach the sampler, which tried to take 20 GB. Here it is a 422."""
        if width > self.limits.max_width or height > self.limits.max_height:
            raise RequestError(field, f"draws {width}x{height}: this server draws at most "
                                      f"{self.limits.max_width}x{self.limits.max_height}")

    def precheck(self, request: Txt2ImgRequest) -> Prepared:
        """Everything that can be refused without drawing (the model, sampler, prompts, LoRAs, ControlNet
        units, the init image), resolved and decoded once for the worker."""
        from difftrain.generate.hires import checked_pass_prompt, model_upscaler
        from difftrain.sampling.prompts import extract_lora_tags, parse_attention
        from difftrain.serve.control import control_models, parse_units

        from difftrain.sampling.schedulers import eta_refusal, takes_eta

        model = self._model_for(request)
        scheduler = self._scheduler_name(request)
        second_sampler = request.hires.sampler if request.enable_hr and request.hires is not None else None
        passes = [scheduler, *([second_sampler] if second_sampler else [])]
        eta_field = "eta"
        if request.eta is None:  # A1111's settings, each for its samplers, where the request overrides them
            ddim, ancestral = (request.override_settings.get(name) for name in ("eta_ddim", "eta_ancestral"))
            for sampler in passes:  # (an ancestral or SDE sampler draws only 1 here)
                if not takes_eta(sampler) and ancestral is not None and (why := eta_refusal(sampler, ancestral)):
                    raise RequestError("override_settings.eta_ancestral", why)
            # DDIM's, unless it is DDIM's default, 0: one eta reaches every pass, and another sampler's may be 1
            if ddim and any(map(takes_eta, passes)):
                request.eta, eta_field = float(ddim), "override_settings.eta_ddim"
        for sampler in passes:
            if why := eta_refusal(sampler, request.eta):
                raise RequestError(eta_field, why)
        parsed = {}
        for field_name in ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt"):
            try:
                parsed[field_name] = extract_lora_tags(getattr(request, field_name))
                parse_attention(parsed[field_name][0])
            except DifftrainError as reason:
                raise RequestError(field_name, str(reason)) from None
        prompt, tags = parsed["prompt"]
        hires_upscaler = hires_model = None
        if request.enable_hr and request.hires is not None and request.hires.checkpoint:
            hires_model = self.find(request.hires.checkpoint, "hr_checkpoint_name")
            hires_model = None if hires_model is model else hires_model
        with request.hires_fields():
            hires_prompt = checked_pass_prompt(request.hr_prompt if request.enable_hr else "", request.prompt)
            if request.enable_hr and not isinstance(request, Img2ImgRequest):  # (a name, never a client's path)
                hires_upscaler = model_upscaler(request.hires, self.upscaler_dir, paths=False, device=self.device)
        files = self.lora_files()
        # (A1111's disable_extra_networks: the tags are taken out of the prompt all the same, and not applied)
        loras = [] if request.disable_extra_networks else [(_lora_file(files, name), weight) for name, weight in tags]
        if loras and model.located.manifest is not None and model.located.manifest.kind == "onnx":
            raise RequestError("prompt", f"{model.title} is an ONNX export: its weights are fixed, so <lora:...> "
                                         "cannot act on it; merge the LoRA when exporting (difftrain export --lora)")
        units, images = parse_units(request.alwayson_scripts, control_models(self.controlnet_dir))
        if units and request.enable_hr:
            raise RequestError("enable_hr", "the hires fix draws without ControlNet units; send one or the other")
        init = decode_image(request.init_images[0], "init_images[0]") if isinstance(request, Img2ImgRequest) else None
        inpainting = None
        if init is not None and request.mask:
            from difftrain.generate.inpaint import InpaintError
            from difftrain.generate.text2image import GenerateOptions, inpainting_of

            options = GenerateOptions(prompt=request.prompt, resize_mode=_resize_mode(request),
                                      **_inpaint_options(request))
            try:
                inpainting = inpainting_of(options, init, decode_mask(request.mask, "mask"), request.width,
                                           request.height)
            except InpaintError as reason:
                raise RequestError("mask", str(reason)) from None
        self._check_steps(model, scheduler, request)
        return Prepared(model, scheduler, prompt, loras, units, images, init, inpainting, hires_prompt,
                        hires_upscaler, hires_model)

    @staticmethod
    def _check_steps(model: ServedModel, scheduler_name: str, request: Txt2ImgRequest) -> None:
        """Whether the sampler takes a step in img2img or the hires pass at this strength, from the model's
        scheduler config (the loaded model's, or its folder's): refused before the job queues. A model without either
        is checked when drawn."""
        from difftrain.generate.hires import check_pass, pass_scheduler
        from difftrain.sampling.schedulers import img2img_strength, make_scheduler

        img2img = isinstance(request, Img2ImgRequest)
        if not (img2img or request.enable_hr):
            return
        pipe = model.pipe  # read once: the worker may unload the model meanwhile (checks run outside its lock)
        config = dict(pipe.scheduler.config) if pipe is not None else None
        saved = model.located.folder / "scheduler" / "scheduler_config.json" if model.located.folder else None
        if config is None and saved is not None and saved.is_file():
            config = json.loads(saved.read_text())
        if config is None:
            return
        try:
            scheduler = make_scheduler(scheduler_name, config)
        except DifftrainError as reason:
            raise RequestError("sampler_name", str(reason)) from None
        if not img2img:
            with request.hires_fields():
                scheduler = pass_scheduler(request.hires, scheduler, config)
                check_pass(scheduler, request.hr_second_pass_steps or request.steps, request.denoising_strength)
            return
        try:
            img2img_strength(scheduler, request.steps, request.denoising_strength)
        except DifftrainError as reason:
            raise RequestError("denoising_strength", str(reason)) from None

    def _model_for(self, request: Txt2ImgRequest) -> ServedModel:
        override = request.override_settings.get("sd_model_checkpoint")
        return self.find(str(override), "override_settings.sd_model_checkpoint") if override else self.current

    @staticmethod
    def _scheduler_name(request: Txt2ImgRequest) -> str:
        from difftrain.sampling.schedulers import SCHEDULERS, resolve_name

        # A1111 1.9+ reads a request without a scheduler as Automatic (Karras for DPM++ 2M); one of our short
        # names (dpm++_2m) says its schedule already.
        automatic = None if request.sampler in SCHEDULERS else "Automatic"
        try:
            return resolve_name(request.sampler, request.scheduler or automatic)
        except DifftrainError as reason:
            raise RequestError("sampler_name", str(reason)) from None

    def draw(self, request: Txt2ImgRequest, on_step: Callable[[object], None],
             prepared: Prepared | None = None) -> Drawn:
        """All batch_size x n_iter images of `request` with the current model (or its override).

        `on_step(pipe)` runs after every sampling step; it may set `pipe._interrupt` (ends the
        image in progress) and `pipe._difftrain_stop` (no further batch), see jobs.py.
        """
        with self._busy:
            return self._draw(request, on_step, prepared or self.precheck(request))

    def _draw(self, request: Txt2ImgRequest, on_step: Callable[[object], None], prepared: Prepared) -> Drawn:
        from difftrain.generate.hires import second_pass
        from difftrain.generate.infotext import format_infotext
        from difftrain.generate.text2image import (MAX_SIDE, Controls, GenerateOptions,
                                                   batch_seeds, encode_prompts, infotext_params, noise_of,
                                                   put_back, sampling_runner)
        from difftrain.sampling.prompt_schedule import schedule_steps
        from difftrain.sampling.schedulers import NoStepLeft, make_scheduler
        from difftrain.sampling.text2image import sample, to_images

        model, scheduler_name = prepared.model, prepared.scheduler
        self._refuse_oversize(request.width, request.height, "width" if request.width > self.limits.max_width
                              else "height")
        pipe = self.load(model)
        try:
            scheduler = make_scheduler(scheduler_name, dict(pipe.scheduler.config))
        except DifftrainError as reason:  # e.g. a sampler that cannot draw this model's noise schedule
            raise RequestError("sampler_name", str(reason)) from None
        adapters = self._activate_loras(model, pipe, prepared.loras)
        clip_skip = self._clip_skip(request, model)
        first = (model, pipe, clip_skip, adapters)

        # A prompt LoRA may change the text encoder, so the adapters (a file's, reloaded when it changes, gets a
        # new one) and their weights are part of the key; the steps place a prompt edit's spans. `on`: the model
        # (with its pipeline, clip skip and adapters) that encodes: the first pass's, or the hires checkpoint.
        def encoded(steps: int, first_pass: int | None = None, prompt: str | None = None, negative: str | None = None,
                    on: tuple = first):
            prompt = prepared.prompt if prompt is None else prompt
            negative = request.negative_prompt if negative is None else negative
            (which, encoder, skip, active) = on
            key = (which.title, prompt, negative, skip, active, steps, first_pass)
            if key in self.prompt_cache:
                self.prompt_cache.move_to_end(key)
                self.prompt_cache_hits += 1
            else:
                self.prompt_cache_misses += 1
                self.prompt_cache[key] = encode_prompts(encoder, prompt, negative, skip, steps, first_pass=first_pass)
                while len(self.prompt_cache) > self.prompt_cache_size:
                    self.prompt_cache.popitem(last=False)
            return self.prompt_cache[key]

        conditioning = encoded(schedule_steps(scheduler, request.steps))
        units = prepared.units
        hires = request.hires if not isinstance(request, Img2ImgRequest) else None
        second, hires_pipe = first, None
        if hires is not None:
            from difftrain.generate.hires import check_pass, check_second_model, pass_prompts, pass_scheduler

            pass_first_scheduler, pass_config = scheduler, dict(pipe.scheduler.config)
            if prepared.hires_model is not None:  # A1111's hr_checkpoint_name: the second pass on that model
                hires = replace(hires, checkpoint=prepared.hires_model.title)
                hires_pipe = self.load(prepared.hires_model)  # (this job keeps the first model's pipe)
                second = (prepared.hires_model, hires_pipe, self._clip_skip(request, prepared.hires_model),
                          self._activate_loras(prepared.hires_model, hires_pipe, prepared.loras))
                pass_config = dict(hires_pipe.scheduler.config)
                pass_first_scheduler = make_scheduler(scheduler_name, pass_config)
                with request.hires_fields():
                    check_second_model(pipe, hires_pipe, prepared.hires_model.title)
            with request.hires_fields():  # (checked before it queued too, unless the model is a single file)
                target = hires.check(request.width, request.height, MAX_SIDE, pipe.vae_scale_factor)
                hires_scheduler = pass_scheduler(hires, pass_first_scheduler, pass_config)
                check_pass(hires_scheduler, hires.steps or request.steps, request.denoising_strength)
            self._refuse_oversize(*target.size, request.hires_sizing_field)
            hires_conditioning = conditioning
            own = pass_prompts(hires, prepared.hires_prompt, prepared.prompt, request.negative_prompt)
            if own or second is not first:  # (another model: its own text encoder)
                hires_conditioning = encoded(schedule_steps(hires_scheduler, hires.steps or request.steps),
                                             schedule_steps(scheduler, request.steps), *(own or ()), on=second)
        controls = None
        if units:
            nets = self._nets(prepared, pipe)
            controls = Controls(units, nets, self._conditions(request, prepared))
        try:
            runner, extra = sampling_runner(pipe, request.width, request.height, request.steps, scheduler=scheduler,
                                            init=prepared.init_image, strength=request.denoising_strength,
                                            controls=controls, inpainting=prepared.inpainting,
                                            resize_mode=_resize_mode(request), eta=request.eta)
        except NoStepLeft as reason:
            raise RequestError("denoising_strength", str(reason)) from None
        runner.set_progress_bar_config(disable=True)
        hires_runner = runner
        if hires_pipe is not None:
            hires_runner, _ = sampling_runner(hires_pipe, request.width, request.height, request.steps,
                                              scheduler=pass_first_scheduler)

        def step_end(pipeline, step, timestep, values):
            on_step(pipeline)
            if getattr(pipeline, "_difftrain_stop", False):  # (the hires pass runs a pipeline of its own)
                runner._difftrain_stop = True
            return values

        if "callback_on_step_end" in inspect.signature(runner.__call__).parameters:
            hooks = {"callback_on_step_end": step_end}
        else:  # StableDiffusionAdapterPipeline keeps diffusers' older hook, and no interrupt: it stops between images
            hooks = {"callback": lambda step, timestep, latents: on_step(runner), "callback_steps": 1}

        room = 2**32 - request.batch_size * request.n_iter
        first_seed = request.seed if request.seed >= 0 else random.randrange(room)
        first_subseed = request.subseed if request.subseed >= 0 else random.randrange(room)  # (A1111 draws it too)
        options = GenerateOptions(prompt=request.prompt, negative_prompt=request.negative_prompt, steps=request.steps,
                                  seed=first_seed, variation_seed=first_subseed,
                                  variation_strength=request.subseed_strength,
                                  seed_resize_from=request.seed_resize_from,
                                  ensd=int(request.override_settings.get("eta_noise_seed_delta", self.ensd)),
                                  scheduler=scheduler_name, guidance_scale=request.cfg_scale, width=request.width,
                                  height=request.height, batch_size=request.batch_size, n_iter=request.n_iter,
                                  clip_skip=clip_skip if clip_skip != 1 else None,
                                  strength=request.denoising_strength,
                                  init_image="(request)" if isinstance(request, Img2ImgRequest) else None,
                                  resize_mode=_resize_mode(request), eta=request.eta,
                                  controlnets=units, hires=hires,
                                  **(_inpaint_options(request) if prepared.inpainting is not None else {}))
        drawn = Drawn([], [], [], model, clip_skip=clip_skip)
        for iteration in range(request.n_iter):
            seeds, subseeds = batch_seeds(options, iteration)
            noise = noise_of(options, subseeds, pipe.vae_scale_factor)
            hires_noise = noise_of(options, subseeds, pipe.vae_scale_factor, hires.sampler) if hires else None
            latents = sample(runner, conditioning, seeds, request.steps, request.cfg_scale, noise=noise,
                             **hooks, **extra)
            # An interrupted first pass is kept as it is, as A1111 keeps it.
            if hires is not None and not getattr(runner, "_interrupt", False):
                images = second_pass(hires_runner, latents, hires_conditioning, seeds, request.steps,
                                     request.cfg_scale, hires, target, request.denoising_strength, noise=hires_noise,
                                     scheduler=hires_scheduler, upscaler=prepared.hires_upscaler, first=runner,
                                     **({"eta": request.eta} if request.eta else {}), **hooks)
            else:
                images = to_images(runner, latents)
            images = put_back(prepared.inpainting, images, latents, extra, seeds)
            for seed, subseed, image in zip(seeds, subseeds, images):
                params = infotext_params(options, seed, request.width, request.height, model.name, [],
                                         conditioning.padded, subseed)
                if isinstance(request, Img2ImgRequest):
                    params.pop("Init image", None)  # it came in the request, not from a file
                    params.pop("Mask", None)  # (so did the mask)
                drawn.images.append(image)
                drawn.seeds.append(seed)
                drawn.subseeds.append(subseed)
                drawn.infotexts.append(format_infotext(request.prompt, request.negative_prompt, params))
            if getattr(runner, "_difftrain_stop", False):
                drawn.interrupted = True
                break
        return drawn

    def _clip_skip(self, request: Txt2ImgRequest, model: ServedModel) -> int:
        """The request's CLIP_stop_at_last_layers, else the server's option, else what `model` was trained with."""
        return (int(request.override_settings.get("CLIP_stop_at_last_layers") or 0) or self.clip_skip
                or model.own_clip_skip)

    def _nets(self, prepared: Prepared, pipe) -> list:
        """The units' networks, loaded once per (model, network, copy); beyond MAX_CONTROLNETS the least recently used
        is let go (a job drawing with it keeps its own reference), so a client walking through a folder of
        ControlNets does not fill the device."""
        from difftrain.models.control import load_control

        keys, modes = [], {}
        for unit in prepared.units:
            # A control mode is a hook on the network: the same ControlNet in units of two modes needs a second copy.
            seen = modes.setdefault(unit.model, [])
            if (soft := unit.mode == "prompt") not in seen:
                seen.append(soft)
            keys.append((prepared.model.title, unit.model, seen.index(soft)))
        for key, unit in zip(keys, prepared.units):
            if key not in self.nets:
                self.nets[key] = load_control(unit.model, pipe.unet.dtype, pipe.unet, what="ControlNet",
                                              latent_scale=pipe.vae_scale_factor).to(self.device)
            self.nets.move_to_end(key)
        nets = [self.nets[key] for key in keys]
        while len(self.nets) > max(MAX_CONTROLNETS, len(set(keys))):
            self.nets.popitem(last=False)
        return nets

    @staticmethod
    def _conditions(request: Txt2ImgRequest, prepared: Prepared) -> list:
        """The units' conditioning images at the output size (cut to the mask's box under "only masked")."""
        from difftrain.generate.text2image import control_image

        return [control_image(unit, request.width, request.height, prepared.inpainting, image)
                for unit, image in zip(prepared.units, prepared.unit_images)]

    def _activate_loras(self, model: ServedModel, pipe, loras: list[tuple[Path, float]]) -> tuple:
        """The model's own adapters plus the prompt's LoRA files (found by precheck in the LoRA folder); a prompt
        LoRA acts in the request that names it and no other. A file written again since it was loaded (a new
        epoch under the same name) is loaded again, as A1111 does; beyond MAX_PROMPT_LORAS the least recently
        used is let go, so a client walking through a folder of LoRAs does not fill the device.
        Returns the (adapter, weight) pairs now active."""
        from difftrain.models.lora_files import load_lora_adapter

        names, weights = list(model.own_adapters), list(model.own_weights)
        for file, weight in loras:
            path = str(file)
            try:
                stamp = os.stat(path).st_mtime_ns
            except OSError as reason:  # removed since the request was checked
                raise RequestError("prompt", f"<lora:{file.stem}>: cannot read {path}: {reason.strerror}") from None
            old, loaded_at = model.loras.get(path, (None, None))
            adapter = old
            if loaded_at != stamp:  # new, or written again: loaded under a new name before the old one goes
                adapter = f"prompt-lora{model.adapters_loaded}"  # apart from the model's own lora0, lora1, ...
                model.adapters_loaded += 1
                load_lora_adapter(pipe, path, adapter)
                self._add_bundled_embeddings(model, pipe, file)
                model.loras[path] = (adapter, stamp)
                if old is not None:
                    pipe.delete_adapters(old)
            model.loras.move_to_end(path)
            names.append(adapter)
            weights.append(weight)
        wanted = {str(file) for file, _ in loras}
        for path in [p for p in model.loras if p not in wanted][:max(0, len(model.loras) - MAX_PROMPT_LORAS)]:
            pipe.delete_adapters(model.loras.pop(path)[0])
        if model.adapters_loaded:  # (else only the model's own adapters exist, set when it was loaded)
            if names:
                pipe.enable_lora()
                pipe.set_adapters(names, adapter_weights=weights)
            else:
                pipe.disable_lora()
        return tuple(zip(names, weights))


    @staticmethod
    def _add_bundled_embeddings(model: ServedModel, pipe, file: Path) -> None:
        """The embeddings a prompt LoRA bundles, added when it loads (A1111 loads them with it) and kept after, as
        the embeddings folder's are. Those its earlier load added are replaced (the file was written again); a
        token the model has otherwise (a word, another file's) is not, and /embeddings lists why."""
        from difftrain.generate.loader import add_embeddings, bundled_tokens

        try:
            entries = bundled_tokens(file)
        except DifftrainError as reason:  # (its layers loaded)
            model.embeddings["skipped"][file.stem] = _listed_embedding(None, str(reason))
            return
        for entry in entries:
            token, vectors = entry[:2]
            earlier = model.bundled.get(token)
            if earlier is not None and earlier[0] == str(file):  # diffusers adds token, token_1, ... token_{n-1}
                pipe.unload_textual_inversion([token] + [f"{token}_{i}" for i in range(1, earlier[1])])
                del model.bundled[token]
            try:
                add_embeddings(pipe, [entry])
            except DifftrainError as reason:
                model.embeddings["skipped"][token] = _listed_embedding(vectors, str(reason))
                continue
            model.bundled[token] = (str(file), len(vectors))
            model.embeddings["skipped"].pop(token, None)
            model.embeddings["loaded"][token] = _listed_embedding(vectors)


def _listed_embedding(vectors, skipped: str | None = None) -> dict:
    """An embedding as A1111's /sdapi/v1/embeddings lists one (its EmbeddingItem, loaded or skipped alike); a
    skipped one says why in `reason` (ours), its shape None where its file could not be read."""
    listed = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
              "shape": None if vectors is None else int(vectors.shape[-1]),
              "vectors": None if vectors is None else int(vectors.shape[0])}
    return listed if skipped is None else listed | {"reason": skipped}


MAX_PROMPT_LORAS = 16  # prompt LoRAs kept loaded in a model, least recently used let go beyond
MAX_CONTROLNETS = 4  # ControlNets kept loaded over all models, least recently used let go beyond


def _lora_file(files: dict[str, Path], name: str) -> Path:
    if name not in files:  # a name is looked up among the folder's files, never joined into a path
        raise RequestError("prompt", f"<lora:{name}> is not in this server's LoRA folder "
                                     f"({', '.join(files) or 'none served'})")
    return files[name]


def a1111_info(request: Txt2ImgRequest, drawn: Drawn) -> str:
    """The `info` JSON string A1111 returns beside the images."""
    from difftrain.sampling.schedulers import display_name
    from difftrain.versions import difftrain_version

    model = drawn.model
    return json.dumps({
        "prompt": request.prompt, "all_prompts": [request.prompt] * len(drawn.images),
        "negative_prompt": request.negative_prompt,
        "all_negative_prompts": [request.negative_prompt] * len(drawn.images),
        "seed": drawn.seeds[0] if drawn.seeds else request.seed, "all_seeds": drawn.seeds,
        "subseed": drawn.subseeds[0] if drawn.subseeds else request.subseed, "all_subseeds": drawn.subseeds,
        "subseed_strength": request.subseed_strength,
        "width": request.width, "height": request.height, "sampler_name": display_name(request.sampler),
        "scheduler": request.scheduler or "Automatic", "cfg_scale": request.cfg_scale, "steps": request.steps,
        "batch_size": request.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": model.name, "sd_model_hash": model.hash, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": request.seed_resize_from_w, "seed_resize_from_h": request.seed_resize_from_h,
        "denoising_strength": request.denoising_strength if isinstance(request, Img2ImgRequest) or request.enable_hr
        else None, "extra_generation_params": {},
        "index_of_first_image": 0, "infotexts": drawn.infotexts, "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": drawn.clip_skip,
        "is_using_inpainting_conditioning": False,
        "interrupted": drawn.interrupted, "version": f"difftrain {difftrain_version()}",
    })


def _resize_mode(request: Txt2ImgRequest) -> str:
    """An img2img request's resize mode by name (generate/inpaint.RESIZE_MODES)."""
    from difftrain.generate.inpaint import RESIZE_MODES

    return RESIZE_MODES[getattr(request, "resize_mode", 0)]


def _inpaint_options(request: Img2ImgRequest) -> dict:
    """An img2img request's inpainting (A1111's API fields) as generate's GenerateOptions fields: what prepares it
    and what its infotext says."""
    from difftrain.generate.inpaint import FILLS

    return dict(mask="(request)", mask_blur=request.blur[0], masked_content=FILLS[request.inpainting_fill],
                invert_mask=bool(request.inpainting_mask_invert), only_masked=request.inpaint_full_res,
                only_masked_padding=request.inpaint_full_res_padding, soft_inpainting=request.soft_inpainting())
