"""Text-to-image latent diffusion (Stable Diffusion): fine-tune a released UNet, or train one from scratch.

A batch arrives either as pixels and captions, or, with caching on, as the VAE's latent
distribution and the text encoder's embeddings read from disk. Both paths draw the same
random numbers in the same order, so a cached run computes the same loss as an uncached
one (tested); with caching the VAE and text encoder never need to sit in memory.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
from PIL import Image

from difftrain.data.dataset import collate
from difftrain.methods.base import Method
from difftrain.models.sd import load_sd
from difftrain.sampling.prompt_schedule import ScheduledConditioning, schedule_steps
from difftrain.sampling.prompts import is_open_clip
from difftrain.sampling.schedulers import make_scheduler, plain_config, zero_snr_capable
from difftrain.training.losses import build_noise_scheduler, denoising_loss


class TextToImage(Method):
    name = "text2image"
    # The captions a batch trains on are the data's own, so the data loader can tokenise them;
    # Textual Inversion trains on its templates instead (ids picked in batch_parts).
    captions_from_data = True

    def __init__(self, config):
        super().__init__(config)
        self.settings = config.text2image
        parts = self._load_parts()
        self.unet, self.vae, self.text_encoder, self.tokenizer = parts.unet, parts.vae, parts.text_encoder, parts.tokenizer
        self.source = parts.source
        self.base_scheduler = parts.scheduler
        self.latent_scale = (self.vae.config.scaling_factor, getattr(self.vae.config, "shift_factor", None) or 0.0)
        self.noise_scheduler = build_noise_scheduler(config.noise, dict(parts.scheduler.config))
        self.max_length = self.settings.max_length or self.tokenizer.model_max_length
        limit = self.text_encoder.config.max_position_embeddings
        from difftrain.config import ConfigError

        if self.max_length > limit:
            raise ConfigError(f"text2image.max_length = {self.max_length}: the text encoder takes at most {limit} tokens")
        schedule = self.noise_scheduler.config
        unsaid = [f"{key} {schedule[key]}" for key, said in (("beta_schedule", ("scaled_linear",)),
                                                             ("num_train_timesteps", (1000,)),
                                                             ("prediction_type", ("epsilon", "v_prediction")))
                  if schedule[key] not in said]
        # (an SD checkpoint's; a ControlNet's single file holds no schedule)
        if config.output.single_file and unsaid and self.name in ("text2image", "dreambooth"):
            raise ConfigError(f"output.single_file: this run's noise schedule ({', '.join(unsaid)}) is not one an "
                              "A1111 checkpoint's config says (SD's scaled_linear, 1000 steps, epsilon or v), so "
                              "A1111, ComfyUI and diffusers would sample the file with another; use the diffusers "
                              "folder the run writes")
        self.unet.requires_grad_(True)
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(self.settings.train_text_encoder)
        self.caption_dropout = self.settings.caption_dropout
        self.add_modules()
        # A LoRA on the UNet (and text encoder); Textual Inversion runs have no lora section.
        self.lora = lora = config.lora if getattr(config, "lora", None) and config.lora.enabled else None
        if lora:
            from difftrain.models.lora import add_lora, warn_kohya_text_encoder_layout, warn_partial_open_clip_attention

            shape = dict(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, init=lora.init)
            add_lora(self.unet, lora.unet_targets, "unet", **shape)
            if lora.text_encoder:
                add_lora(self.text_encoder, lora.text_encoder_targets, "text_encoder", **shape)
                warn_partial_open_clip_attention(self.text_encoder, lora.text_encoder_targets)
                warn_kohya_text_encoder_layout(lora.text_encoder_targets)
        self.device = torch.device("cpu")
        self.weight_dtype = torch.float32
        self.encode_channels_last = False  # setup decides, by device
        self.empty_embedding: torch.Tensor | None = None  # the "" caption, for caption dropout
        self.empty_ids: torch.Tensor | None = None  # and its token ids, for a text encoder in training
        self.validation_embeddings: list[ScheduledConditioning] = []
        self.num_records: int | None = None
        self._saving_parts = None

    # ----------------------------------------------------------------- what trains
    def add_modules(self) -> None:
        """Where a method adds what it trains beside the UNet (ControlNet), before a LoRA changes the UNet's layers."""

    @property
    def trains_text_encoder(self) -> bool:
        """Whether any text-encoder parameter trains (fully, or a LoRA on it)."""
        return self.config.trains_text_encoder

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        modules = {"unet": self.unet}
        if self.trains_text_encoder:
            modules["text_encoder"] = self.text_encoder
        return modules

    def parameter_groups(self, learning_rate: float) -> list[dict]:
        groups = [{"params": [p for p in self.unet.parameters() if p.requires_grad], "lr": learning_rate}]
        if self.trains_text_encoder:
            lr = self.settings.text_encoder_lr or learning_rate
            groups.append({"params": [p for p in self.text_encoder.parameters() if p.requires_grad], "lr": lr})
        return groups


    def setup(self, accelerator, weight_dtype: torch.dtype, dataset, progress: bool) -> None:
        """Frozen parts go to the device in the compute dtype; caches are filled; unneeded parts leave memory."""
        device = accelerator.device
        self.device, self.weight_dtype = device, weight_dtype
        self.num_processes = accelerator.num_processes
        self.num_records = len(dataset)
        self.tag_frequency = _tag_frequency(getattr(dataset, "main", dataset))
        # SD 2.x's OpenCLIP-H encoder or SD 1.x's CLIP-L (A1111 files them apart by ss_v2).
        self.sd_version = "v2" if is_open_clip(self.text_encoder) else "v1"
        # SD's VAE overflows in fp16 (the reason for the "fp16-fix" VAEs): it stays fp32 then.
        _hold(self.vae, device, weight_dtype if weight_dtype != torch.float16 else torch.float32)
        self.encode_channels_last = device.type == "cpu"  # slower on a GPU: see encoder_channels_last
        if self.encode_channels_last:
            encoder_channels_last(self.vae)
        for module in (self.unet, self.text_encoder):
            _hold(module, device, weight_dtype)
        with torch.no_grad():
            self.empty_embedding = self.encode_text([""])[0].detach()
        self.empty_ids = tokenize(self.tokenizer, [""], self.max_length).to(device)
        if self.captions_from_data and not self.config.data.cache.text:
            # Token ids come with the batch (tokenised in the loader's workers when there are any)
            # and reach the device beside the pixels, not as a blocking copy in the middle of the step.
            self.collate = partial(tokenized_collate, tokenizer=self.tokenizer, max_length=self.max_length)
        # Encoded now: with text caching on, the text encoder leaves memory below.
        steps = self.config.sample.steps
        if self.validation_prompts():  # (a run without previews needs no preview sampler, nor its dependencies)
            steps = schedule_steps(make_scheduler(self.config.sample.scheduler, dict(self.saved_scheduler().config)),
                                   steps)
        self.validation_embeddings = self.validation_conditioning(self.text_encoder, steps)
        cache = self.config.data.cache
        if cache.latents or cache.text:
            from difftrain.training.run_data import cache_dir

            encoders, folder = self.cache_encoders(), cache_dir(self.config)
            counts = dataset.fill_cache(encoders, folder, accelerator.process_index, accelerator.num_processes, progress)
            accelerator.wait_for_everyone()  # every process's share is on disk before anyone reads
            if accelerator.num_processes > 1:
                # A cache dir that is not shared (node-local disks) lacks the other ranks'
                # shares: each process fills its own gaps (on a shared dir this finds none).
                dataset.fill_cache(encoders, folder, 0, 1, False)
            if progress:
                print("cache: " + ", ".join(f"{value} {name}" for name, value in counts.items()))
        # Evaluation encodes prompts drawn from the captions and decodes what it draws: it keeps both encoders.
        evaluates = self.config.eval.every_steps is not None
        if cache.text and not evaluates:
            self.text_encoder = None  # embeddings for captions, "", and validation prompts are all computed
        elif cache.text:
            self.text_encoder.to("cpu")  # it visits the device for evaluation
        if cache.latents and not self.validation_prompts() and not evaluates:
            self.vae = None  # reloaded from the base model only when the final model is saved
        elif cache.latents:
            self.vae.to("cpu")  # only validation and evaluation decode now; it visits the device for that

    # ----------------------------------------------------------------- encoders
    def cache_encoders(self):
        """The latent and text encoders the cache is filled with, tagged by what they compute."""
        from difftrain.data.cache import CacheEncoders, content_key, fingerprint

        cache = self.config.data.cache
        encoders = CacheEncoders()
        if cache.latents:
            encoders.latents, encoders.latent_tag = self.latent_distribution, fingerprint(self.vae)
        if cache.text:
            encoders.texts = self.encode_text
            encoders.text_tag = content_key(fingerprint(self.tokenizer), fingerprint(self.text_encoder), self.max_length)
        return encoders

    @torch.no_grad()
    def latent_distribution(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layout = torch.channels_last if self.encode_channels_last else torch.contiguous_format
        pixels = pixels.to(self.device, self.vae.dtype, memory_format=layout)
        dist = self.vae.encode(pixels).latent_dist
        # Back to the usual layout: the latents feed the UNet, whose kernels (and rounding) follow its input's.
        return dist.mean.float().contiguous(), dist.std.float().contiguous()

    def encode_text(self, captions: list[str] | None, encoder: torch.nn.Module | None = None,
                    ids: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings of `captions`, or of their token `ids` where the data loader made them."""
        encoder = encoder or self.text_encoder
        if ids is None:
            ids = tokenize(self.tokenizer, captions, self.max_length)
        ids = ids.to(self.device)
        with torch.set_grad_enabled(self.trains_text_encoder and torch.is_grad_enabled()):
            return encoder(ids)[0]

    def to_latents(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        sample = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        scale, shift = self.latent_scale
        return (sample - shift) * scale

    # ----------------------------------------------------------------- the objective
    def batch_parts(self, batch: dict, generator: torch.Generator) -> dict:
        """The batch as the loss sees it; DreamBooth joins its class half, Textual Inversion writes captions."""
        return batch

    def expand_prompt(self, prompt: str) -> str:
        return prompt

    def loss(self, modules, batch, generator):
        batch = self.batch_parts(batch, generator)
        batch_size = len(batch["caption"])
        dropped = torch.rand(batch_size, generator=generator, device=generator.device) < self.caption_dropout
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"], batch["latent_std"]
        else:
            mean, std = self.latent_distribution(batch["pixel_values"])
        latents = self.to_latents(mean.to(self.device), std.to(self.device), generator)
        ids = batch.get("input_ids")  # tokenised by the data loader; absent in a batch from the plain collate
        if self.trains_text_encoder:
            # The encoder being trained must see the dropped captions as "" itself: the empty caption's
            # ids selected in, a tensor select with no host-device sync (.tolist()) in the step.
            if ids is None:
                ids = tokenize(self.tokenizer, batch["caption"], self.max_length)
            ids = ids.to(self.device)
            ids = torch.where(dropped.to(self.device)[:, None], self.empty_ids, ids)
            embeds = self.encode_text(None, modules.get("text_encoder"), ids)
        else:
            # A frozen encoder's "" is the stored empty embedding: dropout is a tensor select,
            # with no host-device sync (.tolist()) in the step, cached or not.
            embeds = batch["prompt_embeds"] if "prompt_embeds" in batch else self.encode_text(batch["caption"], ids=ids)
            embeds = embeds.to(self.device)
            embeds = torch.where(dropped.to(self.device)[:, None, None], self.empty_embedding.to(embeds.dtype), embeds)
        return denoising_loss(
            latents,
            self.denoiser(modules, batch, embeds.to(latents.dtype)),
            self.noise_scheduler,
            self.config.noise,
            generator,
            batch.get("sample_weights"),
        )

    def denoiser(self, modules, batch: dict, embeds: torch.Tensor):
        """(noisy latents, timesteps) -> the model's prediction; a ControlNet adds its residuals here."""
        unet = modules.get("unet", self.unet)
        # A frozen UNet in half precision is not wrapped by accelerate's autocast (only trained
        # modules are), so the call gets its own: Textual Inversion and ControlNet under fp16/bf16.
        mixed = self.weight_dtype != torch.float32 and "unet" not in modules
        return lambda x, t: _autocast_call(unet, mixed, self.weight_dtype, x, t, embeds)

    # ----------------------------------------------------------------- outputs
    def pipeline(self, modules: dict[str, torch.nn.Module], scheduler=None, vae=None, text_encoder=None):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=vae or self.vae,
            text_encoder=modules.get("text_encoder", text_encoder or self.text_encoder),
            tokenizer=self.tokenizer,
            unet=modules.get("unet", self.unet),
            scheduler=scheduler or self.saved_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def saved_scheduler(self):
        """The base model's sampler class, carrying the noise settings this model was trained with."""
        settings = {
            key: self.noise_scheduler.config[key]
            for key in ("num_train_timesteps", "beta_schedule", "prediction_type", "rescale_betas_zero_snr", "timestep_spacing")
            if key in self.noise_scheduler.config
        }
        cls = type(self.base_scheduler)
        if settings.get("rescale_betas_zero_snr"):
            cls = zero_snr_capable(cls)
        return cls.from_config({**plain_config(self.base_scheduler.config), **settings})

    def validation_prompts(self) -> list[str]:
        return self.config.sample.prompts

    @torch.no_grad()
    def validation_conditioning(self, text_encoder, steps: int, prompts: list[str] | None = None,
                                negative_prompt: str | None = None, composable: bool = True, device=None
                                ) -> list[ScheduledConditioning]:
        """The conditioning of each validation prompt (or of each of `prompts`, against `negative_prompt` rather
        than the previews' sample.negative_prompt) for a prompt schedule of `steps` (prompt_schedule.schedule_steps),
        encoded as `difftrain generate` does, A1111's prompt editing and AND included."""
        from difftrain.sampling.prompt_schedule import encode_schedule
        from difftrain.sampling.prompts import encode_texts

        def encode(texts: list[str], pad: bool) -> tuple[list[torch.Tensor], bool]:
            return encode_texts(self.tokenizer, text_encoder, [self.expand_prompt(text) for text in texts],
                                device or self.device, max_length=self.max_length, pad=pad)

        negative = self.config.sample.negative_prompt if negative_prompt is None else negative_prompt
        return [encode_schedule(encode, prompt, negative, steps, composable)
                for prompt in (self.validation_prompts() if prompts is None else prompts)]

    def draws_samples(self) -> bool:
        return bool(self.validation_prompts())

    @torch.no_grad()
    def sample(self, modules, num_images, scheduler, steps, seed) -> list[Image.Image]:
        """One image per validation prompt, each from `seed`: what `difftrain generate` gives for it."""
        from difftrain.sampling.text2image import draw

        sample = self.config.sample
        if not self.validation_prompts():
            return []
        pipe = self.pipeline(modules, make_scheduler(scheduler, dict(self.saved_scheduler().config)))
        pipe.set_progress_bar_config(disable=True)
        conditioning = self.validation_embeddings  # for sample.steps, the steps the trainer draws previews in
        if "text_encoder" in modules:  # trained: the stored embeddings are stale
            conditioning = self.validation_conditioning(modules["text_encoder"], schedule_steps(pipe.scheduler, steps))
        size = self.config.data.resolution
        home = self.vae.device
        self.vae.to(self.device)
        try:
            return [image for number, spans in enumerate(conditioning)
                    for image in draw(pipe, spans, [seed], steps, sample.guidance_scale,
                                      autocast=self.weight_dtype, width=size, height=size,
                                      **self.validation_extras(number))]
        finally:
            self.vae.to(home)

    def validation_extras(self, number: int) -> dict:
        """What else the pipeline takes for validation prompt `number` (a ControlNet's image)."""
        return {}

    takes_prompts = True

    @torch.no_grad()
    def evaluation_images(self, modules, prompts, seed, scheduler, steps, guidance_scale, batch_size) -> list[Image.Image]:
        """Image i for prompts[i] from seed + i; consecutive images of one prompt are drawn as one batch."""
        from difftrain.sampling.text2image import draw, prompt_batches

        pipe = self.pipeline(modules, make_scheduler(scheduler, dict(self.saved_scheduler().config)))
        pipe.set_progress_bar_config(disable=True)
        text_encoder = modules.get("text_encoder", self.text_encoder)
        size = self.config.data.resolution
        # Parked on the CPU when the cache does their work in training (prepare): on the device while drawing.
        homes = [(module, module.device) for module in (self.vae, text_encoder)]
        for module, _ in homes:
            module.to(self.device)
        images: list[Image.Image] = []
        try:
            for start, end in prompt_batches(prompts, batch_size):
                [spans] = self.validation_conditioning(text_encoder, schedule_steps(pipe.scheduler, steps),
                                                       [prompts[start]], self.config.eval.negative_prompt,
                                                       composable=False)  # (captions, as difftrain eval reads them)
                images += draw(pipe, spans, list(range(seed + start, seed + end)), steps, guidance_scale,
                               autocast=self.weight_dtype, width=size, height=size)
        finally:
            for module, home in homes:
                module.to(home)
        return images

    def training_facts(self) -> dict[str, str | int | float]:
        """What a file we write should say about how it was made (safetensors metadata)."""
        config = self.config
        facts = {
            "base_model": str(config.model.base),
            "method": self.name,
            "steps": config.training.max_steps,
            "resolution": config.data.resolution,
            "learning_rate": config.training.learning_rate,
            # kohya's total: per device x processes x accumulation, what A1111 and Civitai show as the batch
            "batch_size": config.training.batch_size * getattr(self, "num_processes", 1)
            * config.training.gradient_accumulation_steps,
            "batch_size_per_device": config.training.batch_size,
            "gradient_accumulation_steps": config.training.gradient_accumulation_steps,
            "seed": config.seed,
            "prediction_type": str(self.noise_scheduler.config.prediction_type),
            "zero_terminal_snr": bool(config.noise.zero_terminal_snr),
        }
        if self.lora:
            facts.update(rank=self.lora.rank, alpha=self.lora.alpha or self.lora.rank)
        if self.num_records is not None:
            facts["num_images"] = self.num_records
            folder = Path(str(config.data.path)).name
            facts["tag_frequency"] = json.dumps({folder: self.tag_frequency})
            facts["dataset_dirs"] = json.dumps({folder: {"n_repeats": 1, "img_count": self.num_records}})
        facts["output_name"] = Path(config.output_dir).name
        facts["sd_version"] = getattr(self, "sd_version", "v1")
        return facts

    def save_model(self, modules, out_dir: Path) -> None:
        output = self.config.output
        if self.lora:
            from difftrain.models.lora_files import save_lora

            text_encoder = modules.get("text_encoder") if self.lora.text_encoder else None
            save_lora(out_dir, modules.get("unet", self.unet), text_encoder, metadata=self.training_facts())
            self.saved_scheduler().save_pretrained(out_dir / "scheduler")  # how the adapter was trained to sample
            return
        vae, frozen_text_encoder = self._frozen_parts_for_saving()
        unet, text_encoder = modules.get("unet", self.unet), modules.get("text_encoder", frozen_text_encoder)
        if output.trained_only:
            out_dir.mkdir(parents=True, exist_ok=True)
            unet.save_pretrained(out_dir / "unet")
            if "text_encoder" in modules:
                text_encoder.save_pretrained(out_dir / "text_encoder")
            self.saved_scheduler().save_pretrained(out_dir / "scheduler")
        else:
            # The tokenizer saved says the context length trained with, so diffusers' own prompt
            # encoding (which pads to model_max_length) conditions the model as training did.
            length, self.tokenizer.model_max_length = self.tokenizer.model_max_length, self.max_length
            try:
                pipe = self.pipeline(modules, vae=vae, text_encoder=text_encoder)
                pipe.save_pretrained(out_dir, safe_serialization=True)
            finally:
                self.tokenizer.model_max_length = length
        if output.single_file:
            from difftrain.models.single_file import save_single_file

            dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[output.single_file_dtype]
            from difftrain.models.file_metadata import shared_model_name

            facts = {key: str(value) for key, value in self.training_facts().items()}
            facts["base_model"] = shared_model_name(facts["base_model"])  # (as a LoRA file says it)
            save_single_file(unet, vae, text_encoder, out_dir / "model.safetensors", dtype=dtype, metadata=facts,
                             noise=dict(self.saved_scheduler().config))

    def manifest(self):
        """How to load what `save_model` writes: on its own, or on the base model."""
        from difftrain.models.manifest import Manifest, base_reference
        from difftrain.models.noise import trained_settings

        config, model = self.config, self.config.model
        manifest = Manifest(
            "stable-diffusion", self.name, scheduler="scheduler",
            noise=trained_settings(self.noise_scheduler.config),
            # Training encodes every caption to max_length tokens with the last layer's output.
            conditioning={"max_length": self.max_length, "clip_skip": 1, "resolution": config.data.resolution},
            trained={"steps": config.training.max_steps, "base": model.base},
        )
        if self.lora:
            manifest.kind = "lora"
            manifest.loras = [{"file": "pytorch_lora_weights.safetensors", "weight": 1.0}]
        elif config.output.trained_only:
            manifest.kind = "stable-diffusion-parts"
            manifest.components = list(self.trainable_modules())
        self.describe_adapter(manifest)
        if manifest.kind != "stable-diffusion":  # an adapter or partial model needs its base to load
            manifest.base = base_reference(model.base, model.revision, model.variant, unet=model.unet,
                                           vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                           config=model.config)
        return manifest

    def describe_adapter(self, manifest) -> None:
        """Textual Inversion turns the manifest into an embedding's."""

    def _load_parts(self, load: set[str] | None = None):
        model = self.config.model
        return load_sd(
            model.base,
            unet=model.unet,
            vae=model.vae,
            text_encoder=model.text_encoder,
            tokenizer=model.tokenizer,
            revision=model.revision,
            variant=model.variant,
            config=model.config,
            load=load,
        )

    def _frozen_parts_for_saving(self):
        """The VAE and frozen text encoder as the base model has them.

        Training may hold them in half precision, or (with caching) not at all; a saved model
        gets the base model's full-precision weights either way, so cached and uncached runs
        write the same files.
        """
        if self._saving_parts is None:
            trained_encoder = self.trains_text_encoder
            need = {name for name, module in (("vae", self.vae), ("text_encoder", self.text_encoder))
                    if not (name == "text_encoder" and trained_encoder)
                    and (module is None or module.dtype != torch.float32)}
            parts = self._load_parts(need) if need else None
            self._saving_parts = (
                parts.vae if "vae" in need else self.vae,
                parts.text_encoder if "text_encoder" in need else self.text_encoder,
            )
        return self._saving_parts

    def describe(self) -> list[str]:
        lines = super().describe()
        lines.append(f"base: {self.source}")
        lines.append(f"noise: {self.noise_scheduler.config.prediction_type}, "
                     f"{self.noise_scheduler.config.beta_schedule}, {self.noise_scheduler.config.num_train_timesteps} steps")
        return lines


def tokenize(tokenizer, captions: list[str], max_length: int) -> torch.Tensor:
    """Token ids as the text encoder trains on them: padded to `max_length`, longer captions cut."""
    return tokenizer(captions, padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt").input_ids


def tokenized_collate(items: list[dict], tokenizer, max_length: int) -> dict:
    """`collate`, plus the token ids of each list of captions: "caption" -> "input_ids", and a paired
    data set's "class_caption" -> "class_input_ids". A module-level function (bound with
    functools.partial), so DataLoader workers can pickle it."""
    batch = collate(items)
    for key in [key for key in batch if key == "caption" or key.endswith("_caption")]:
        batch[key.removesuffix("caption") + "input_ids"] = tokenize(tokenizer, batch[key], max_length)
    return batch


def encoder_channels_last(vae) -> None:
    """The frozen VAE encoder's convolutions in channels_last, the layout oneDNN computes in.

    Encoding on a 2-core CPU is x1.52 faster at SD-quarter width and x1.14 at SD's own width
    (benchmarks/vae_encode.py), with latents within 1e-5. On an H200 (torch 2.11, cuDNN) the same
    benchmark at 512 px ran x0.77-0.82 as fast at SD's width, bf16 and fp32, batch 1 and 4: its
    GroupNorm hands back contiguous tensors, which every next convolution converts again. So
    training applies it on CPUs only. Saving is unaffected (diffusers and our single-file writer
    store contiguous copies), and so are cache keys (data.cache.fingerprint reads values, not layout).
    """
    for module in (vae.encoder, vae.quant_conv):
        if module is not None:
            module.to(memory_format=torch.channels_last)


def _hold(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Frozen weights in the compute dtype, trainable ones (a full model, an adapter, new token rows) in fp32.

    Half-precision trainable parameters are what gives diffusers' scripts their fp16
    "Attempting to unscale FP16 gradients" crash; here they cannot exist.
    """
    if any(not p.requires_grad for p in module.parameters()) and module.dtype != dtype:
        # Trainable values are kept exactly (a round trip through half precision would round them).
        kept = {name: p.data.float().clone() for name, p in module.named_parameters() if p.requires_grad}
        # Moved and cast tensor by tensor, so the device never holds the frozen weights in fp32: moved
        # first, a LoRA run's whole fp32 UNet sat on the GPU, which was the run's peak memory (the GPU
        # table's LoRA rows, README). diffusers warns on any .to(dtype), even a no-op: only when needed.
        module.to(device, dtype)
        parameters = dict(module.named_parameters())  # by name: a move may give a module new Parameter objects
        for name, value in kept.items():
            parameters[name].data = value.to(device)
    else:
        module.to(device)
    for parameter in module.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()


def _autocast_call(unet, enabled: bool, dtype: torch.dtype, x, t, embeds, **residuals):
    with torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
        return unet(x, t, encoder_hidden_states=embeds, **residuals).sample


def _tag_frequency(dataset) -> dict[str, int]:
    """Comma-separated tags counted over the captions held outside the images (kohya's ss_tag_frequency)."""
    counts: dict[str, int] = {}
    fixed = getattr(dataset, "fixed_caption", None)
    for _, _, captions in dataset.source.stored_files():
        for caption in [fixed] if fixed else captions[:1]:
            for tag in (t.strip() for t in caption.split(",")):
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1
    return counts

