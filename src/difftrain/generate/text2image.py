"""`difftrain generate`: Stable Diffusion generation in the vocabulary AUTOMATIC1111 users know.

A model is a run folder (full fine-tune, LoRA, DreamBooth or Textual Inversion run), a
diffusers folder, a hub id or a single-file checkpoint. Prompts take A1111's attention
syntax, chunking past 75 tokens and BREAK; LoRAs come from `--lora file:weight` or
`<lora:name:weight>` in the prompt; each PNG carries A1111's `parameters` infotext, which
`--from-png` turns back into the same call.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image

from difftrain.errors import DifftrainError
from difftrain.generate.controlnet import ControlUnit
from difftrain.generate.hires import Hires, HiresError, model_upscaler
from difftrain.generate.infotext import recorded_path
from difftrain.sampling.prompt_schedule import ScheduledConditioning, schedule_steps
from difftrain.sampling.soft_inpaint import SoftInpainting

log = logging.getLogger(__name__)


class GenerateError(DifftrainError):
    pass


# A side past this is a typo, not a picture: attention over (100000 / 8)^2 latents asked for terabytes.
MAX_SIDE = 8192


@dataclass
class GenerateOptions:
    prompt: str
    negative_prompt: str = ""
    steps: int = 25
    scheduler: str = "DPM++ 2M Karras"
    guidance_scale: float = 7.0
    seed: int = 0
    variation_seed: int = -1  # A1111's variation seed (subseed): image i's noise slerped toward subseed + i's ...
    variation_strength: float = 0.0  # ... this far (0: not at all; sampling/seed_noise.py)
    ensd: int = 0  # A1111's eta noise seed delta: an ancestral sampler's noise from seed + ensd
    eta: float | None = None  # DDIM's eta (A1111's "Eta DDIM"); None: each sampler's own (DDIM 0, ancestral 1)
    seed_resize_from: tuple[int, int] | None = None  # A1111's "Seed resize from" (width, height): each seed's noise
    # drawn as at that size and centred, so a seed keeps its composition at another size (sampling/seed_noise.py)
    width: int | None = None  # default: the size it was trained at (default_size)
    height: int | None = None
    batch_size: int = 1
    n_iter: int = 1
    loras: list[tuple[str, float]] = field(default_factory=list)
    embeddings: list[str] = field(default_factory=list)
    lora_dir: str = "models/lora"
    upscaler_dir: str = "models/upscalers"  # where a hires fix's model upscaler named as A1111 names it is looked for
    use_ema: bool = True
    clip_skip: int | None = None  # None: what the model was trained with (its manifest), else 1
    precision: str = "auto"  # auto: fp16 on CUDA, fp32 elsewhere
    attention_slicing: bool = False
    vae_tiling: bool = False
    vae_slicing: bool = False
    cpu_offload: bool = False
    compile: bool = False  # the UNet and VAE decoder through torch.compile (generate/speed.py)
    compile_mode: str = "auto"  # auto: CUDA graphs (reduce-overhead) on CUDA, inductor's default elsewhere
    channels_last: bool | None = None  # None: on for CUDA
    fuse_qkv: bool | None = None  # None: on for CUDA unless LoRA adapters or attention slicing are in
    init_image: str | None = None
    strength: float = 0.75  # img2img's, or the hires pass's (A1111's one "Denoising strength")
    resize_mode: str = "just resize"  # how img2img's image comes to the drawing size (generate/inpaint.RESIZE_MODES)
    mask: str | None = None  # inpainting (generate/inpaint.py): white (or opaque) is redrawn
    mask_blur: int = 4  # px, A1111's default
    masked_content: str = "original"  # fill | original | latent noise | latent nothing (inpaint.FILLS)
    invert_mask: bool = False  # A1111's "Inpaint not masked"
    only_masked: bool = False  # A1111's "Inpaint area: Only masked": the mask's box drawn at the output size
    only_masked_padding: int = 32  # px around the mask's box
    soft_inpainting: SoftInpainting | None = None  # A1111's soft inpainting (sampling/soft_inpaint.py)
    hires: Hires | None = None  # A1111's hires fix (generate/hires.py)
    config: str | None = None  # single-file model: a diffusers folder (or hub id) holding its configs
    controlnets: list[ControlUnit] = field(default_factory=list)
    deepcache: int = 0  # > 1: the whole UNet every this many steps, its shallow blocks between (generate/deepcache.py)
    backend: str = "auto"  # torch | onnxruntime; auto: onnxruntime for an ONNX export, torch otherwise
    compose: bool = True  # AND and a trailing ":weight" composed as A1111 does; eval reads captions as plain text
    provider: str = "auto"  # ONNX Runtime's execution provider: auto, cpu, cuda, tensorrt
    provider_fallback: bool = False  # run on what there is when the provider asked for is missing
    device: str = "auto"  # auto: CUDA where there is a GPU, else the CPU; or cpu, cuda, cuda:1 ...
    unpadded_png: bool = False  # --from-png of a PNG whose infotext does not say "Pad conds"

    @property
    def samplers(self) -> list[str]:
        """The samplers the drawing uses: the first pass's, and a hires pass's own."""
        return [self.scheduler, *([self.hires.sampler] if self.hires and self.hires.sampler else [])]

    def check(self) -> None:
        """Everything that can be refused before a model loads."""
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise GenerateError(f"--{name} {value}: must be a positive multiple of 8 (the VAE works in 8 px cells)")
            if value is not None and value > MAX_SIDE:
                raise GenerateError(f"--{name} {value}: at most {MAX_SIDE} px (SD draws 512 to 1024; past that, "
                                    "generate at its size and upscale)")
        if self.steps < 1 or self.batch_size < 1 or self.n_iter < 1:
            raise GenerateError("--steps, --batch-size and --n-iter must be at least 1")
        from difftrain.sampling.schedulers import eta_refusal

        for sampler in self.samplers:
            if why := eta_refusal(sampler, self.eta):
                raise GenerateError(f"--eta {why}")
        if not 0.0 < self.strength <= 1.0:
            raise GenerateError(f"--strength {self.strength}: must be in (0, 1]")
        if not 0.0 <= self.variation_strength <= 1.0:
            raise GenerateError(f"--variation-strength {self.variation_strength}: must be from 0 to 1")
        if self.variation_seed < -1:
            raise GenerateError(f"--variation-seed {self.variation_seed}: -1 (random) or a seed from 0")
        if self.seed_resize_from and not all(8 <= side <= MAX_SIDE for side in self.seed_resize_from):
            raise GenerateError(f"--seed-resize-from {self.seed_resize_from[0]}x{self.seed_resize_from[1]}: each side "
                                f"from 8 to {MAX_SIDE} px, the size the seed was drawn at")
        if self.init_image and not Path(self.init_image).is_file():
            raise GenerateError(f"--init-image {self.init_image}: no such file")
        if self.init_image:
            from difftrain.data.images import BadImage, load_image

            try:
                load_image(self.init_image)
            except BadImage as reason:
                raise GenerateError(f"--init-image {self.init_image}: {reason}") from None
        from difftrain.generate.inpaint import LATENT_UPSCALE, RESIZE_MODES

        if self.resize_mode not in RESIZE_MODES:
            raise GenerateError(f"--resize-mode {self.resize_mode!r}: choose one of {', '.join(RESIZE_MODES)}")
        if self.resize_mode != "just resize" and not self.init_image:
            raise GenerateError("--resize-mode brings img2img's image to the size drawn: give --init-image too")
        if self.resize_mode == LATENT_UPSCALE and self.mask:
            raise GenerateError(f"--resize-mode {LATENT_UPSCALE!r} resizes the image's latents, which an inpainting's "
                                "mask and original do not follow: give another resize mode with --mask")
        if self.mask:
            self.check_mask()
        elif self.soft_inpainting is not None:
            raise GenerateError("--soft-inpainting applies to inpainting: give --mask (and --init-image) too")
        if self.hires is not None:
            if self.init_image or self.controlnets:
                raise GenerateError("the hires fix is text-to-image's second pass: give it without --init-image and "
                                    "--controlnet (A1111's img2img has none either)")
            with hires_flags():
                if self.width and self.height:
                    self.hires.check(self.width, self.height, MAX_SIDE)
                model_upscaler(self.hires, self.upscaler_dir)  # (before a model loads)
            if self.hires.checkpoint:
                from difftrain.models.sd import check_exists

                try:
                    check_exists("--hires-checkpoint", self.hires.checkpoint)
                except DifftrainError as reason:  # e.g. an A1111 PNG's "name [hash]", a file of its models folder
                    titled = re.fullmatch(r".+ \[[0-9a-f]{8,10}\]", self.hires.checkpoint)
                    raise GenerateError(f"{reason}" + ("; an A1111 checkpoint title: give that model's path with "
                                                       "--hires-checkpoint" if titled else "")) from None
        resolve_device(self.device)
        if self.precision not in ("auto", "fp32", "fp16", "bf16"):
            raise GenerateError(f"--precision {self.precision}: choose auto, fp32, fp16 or bf16")
        if self.deepcache > 1 and self.controlnets:  # refused before any model loads
            raise GenerateError(_DEEPCACHE_WITH_CONTROL)
        for number, unit in enumerate(self.controlnets):
            unit.check(number)
        if self.deepcache < 0:
            raise GenerateError(f"--deepcache {self.deepcache}: the number of steps between whole-UNet steps, >= 1")
        if self.deepcache > 1 and self.compile:
            raise GenerateError("--deepcache skips the UNet's deep blocks inside --compile's graph; use one of them")
        if self.compile and self.cpu_offload:
            raise GenerateError("--compile with --cpu-offload: offloading moves the UNet on and off the GPU around "
                                "every call, inside what the compiled graph (and its CUDA graphs) would replay; "
                                "use one of them")
        if self.fuse_qkv and self.attention_slicing:
            raise GenerateError("--fuse-qkv and --attention-slicing: sliced attention runs the unfused projections; "
                                "choose one")
        if self.compile_mode != "auto" and not self.compile:
            raise GenerateError(f"--compile-mode {self.compile_mode} applies to --compile: give --compile too")
        from difftrain.generate.speed import COMPILE_MODES

        if self.compile_mode not in COMPILE_MODES:
            raise GenerateError(f"--compile-mode {self.compile_mode}: choose one of {', '.join(COMPILE_MODES)}")
        if self.backend not in ("auto", "torch", "onnxruntime"):
            raise GenerateError(f"--backend {self.backend}: choose torch or onnxruntime")
        from difftrain.sampling.schedulers import resolve_name

        resolve_name(self.scheduler)  # an unknown name lists the valid ones

    def check_mask(self) -> None:
        from difftrain.generate.inpaint import FILLS, load_mask

        if not self.init_image:
            raise GenerateError("--mask marks what img2img redraws: give --init-image too")
        if not Path(self.mask).is_file():
            raise GenerateError(f"--mask {self.mask}: no such file")
        load_mask(self.mask, f"--mask {self.mask}")
        if not 0 <= self.mask_blur <= 64:
            raise GenerateError(f"--mask-blur {self.mask_blur}: from 0 to 64 px (A1111's range)")
        if self.masked_content not in FILLS:
            raise GenerateError(f"--masked-content {self.masked_content!r}: choose one of {', '.join(FILLS)}")
        if not 0 <= self.only_masked_padding <= 256:
            raise GenerateError(f"--only-masked-padding {self.only_masked_padding}: from 0 to 256 px (A1111's range)")
        for setting, why in self.soft_inpainting.problems() if self.soft_inpainting is not None else []:
            raise GenerateError(f"--soft-{setting.replace('_', '-')} {why} (A1111's range)")


@contextlib.contextmanager
def hires_flags():
    """A hires fix refused names the command line's flag for what to change."""
    flags = {"upscaler": "--hires-upscaler", "steps": "--hires-steps", "resize": "--hires-resize",
             "checkpoint": "--hires-checkpoint",
             "scale": "--hires-scale", "strength": "--strength", "sampler": "--hires-sampler",
             "prompt": "--hires-prompt"}
    try:
        yield
    except HiresError as reason:
        raise GenerateError(f"{flags.get(reason.setting, '--hires-scale or --hires-resize')}: {reason}") from None


_DEEPCACHE_WITH_CONTROL = ("--deepcache skips the UNet's deep blocks, where a ControlNet's residuals go; "
                           "use it without ControlNets")


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device `name` (auto, cpu, cuda, cuda:1 ...) names; auto is CUDA where there is a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GenerateError(f"--device {name}: not a device; give auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise GenerateError(f"--device {name}: there is no such CUDA device here "
                            f"({torch.cuda.device_count()} visible); use auto or cpu")
    return device


def _dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def _resolve_prompt_loras(prompt: str, lora_dir: str) -> tuple[str, list[tuple[str, float]]]:
    from difftrain.sampling.prompts import extract_lora_tags

    text, tags = extract_lora_tags(prompt)
    found = []
    for name, weight in tags:
        candidates = [Path(lora_dir) / f"{name}.safetensors", Path(name)]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise GenerateError(f"<lora:{name}:{weight}> in the prompt: no {candidates[0]} (set --lora-dir)")
        found.append((str(path), weight))
    return text, found


def _check_backend(located, options: GenerateOptions) -> None:
    """An ONNX export runs on ONNX Runtime and a torch model on torch; the torch-only switches stay with torch."""
    onnx = located.manifest is not None and located.manifest.kind == "onnx"
    if options.backend == "onnxruntime" and not onnx:
        raise GenerateError(f"--backend onnxruntime runs ONNX exports; {located.source} is a torch model: "
                            f"difftrain export {located.source} OUT --to onnx, then generate from OUT")
    if onnx and options.backend == "torch":
        raise GenerateError(f"{located.source} is an ONNX export: it runs on --backend onnxruntime (or auto)")
    if onnx:
        torch_only = [flag for flag, on in (("--compile", options.compile), ("--cpu-offload", options.cpu_offload),
                                            ("--attention-slicing", options.attention_slicing),
                                            ("--vae-tiling", options.vae_tiling), ("--vae-slicing", options.vae_slicing),
                                            ("--channels-last", options.channels_last),
                                            ("--fuse-qkv", options.fuse_qkv),
                                            ("--precision", options.precision != "auto"),
                                            ("--deepcache", options.deepcache > 1)) if on]
        if torch_only:
            raise GenerateError(f"{', '.join(torch_only)}: torch switches; an ONNX export's precision is set when "
                                "exporting (difftrain export --precision, --quantize)")
    else:
        onnx_only = [flag for flag, on in (("--provider", options.provider != "auto"),
                                           ("--provider-fallback", options.provider_fallback)) if on]
        if onnx_only:  # (they were ignored: a torch model runs where --device says)
            raise GenerateError(f"{', '.join(onnx_only)}: ONNX Runtime's; {located.source} is a torch model, which "
                                "runs where --device says (--device cuda, cpu)")


def configure_pipeline(pipe, options: GenerateOptions, device: torch.device) -> None:
    """Precision and the memory/speed switches; defaults are the fast path on a GPU, the safe one elsewhere."""
    if getattr(pipe, "manifest", None) is not None and pipe.manifest.kind == "onnx":
        return  # ONNX Runtime places and runs its own sessions
    from difftrain.generate.speed import compile_pipeline, fuse_qkv, resolve_compile_mode

    dtype = _dtype(options.precision, device)
    if pipe.unet.dtype != dtype:
        pipe.to(dtype=dtype)
    fuse_qkv(pipe, options.fuse_qkv, device, options.attention_slicing)
    if options.attention_slicing:
        pipe.enable_attention_slicing()
    if options.vae_tiling:
        pipe.vae.enable_tiling()
    if options.vae_slicing:
        pipe.vae.enable_slicing()
    channels_last = device.type == "cuda" if options.channels_last is None else options.channels_last
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    if options.cpu_offload:
        if device.type != "cuda":
            raise GenerateError("--cpu-offload moves parts between the GPU and the CPU; there is no GPU here")
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if options.compile:
        compile_pipeline(pipe, resolve_compile_mode(options.compile_mode, device))


def default_size(pipe) -> int:
    """The side drawn when none is asked: the size the model was trained at, as its previews were drawn.

    A fine-tune of SD 1.5 at 768 px keeps the base UNet's `sample_size` (512 px); what it learnt, and
    what its training previews show, is 768 px. A model without that record draws at its native size.
    """
    trained = pipe.manifest.conditioning.get("resolution")
    return int(trained) if trained else pipe.unet.config.sample_size * pipe.vae_scale_factor


def infotext_params(options: GenerateOptions, seed: int, width: int, height: int, model_name: str,
                    loras: list[tuple[str, float]], pad_conds: bool = False, subseed: int | None = None) -> dict:
    """A1111's infotext parameters of one image (`subseed`: its variation seed, batch_seeds')."""
    from difftrain.sampling.schedulers import a1111_sampler, takes_ensd, takes_eta

    params = {
        "Steps": options.steps,
        **a1111_sampler(options.scheduler),  # A1111's names, so A1111 reads them too
        "CFG scale": options.guidance_scale,
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model": model_name,
    }
    if options.variation_strength:
        params["Variation seed"] = options.variation_seed if subseed is None else subseed
        params["Variation seed strength"] = options.variation_strength
    if options.seed_resize_from:
        params["Seed resize from"] = "{}x{}".format(*options.seed_resize_from)
    samplers = options.samplers
    if options.ensd and any(map(takes_ensd, samplers)):  # (A1111 too writes it only where it acts)
        params["ENSD"] = options.ensd
    if options.eta and any(map(takes_eta, samplers)):  # (A1111 writes it where it is not DDIM's default, 0)
        params["Eta DDIM"] = options.eta
    if options.clip_skip not in (None, 1):
        params["Clip skip"] = options.clip_skip
    if pad_conds:
        params["Pad conds"] = True
    # The starting noise (and an ancestral sampler's) comes from a CPU generator per seed, as A1111's "CPU" option
    # draws it; A1111 reads a missing RNG as its default, the GPU's.
    params["RNG"] = "CPU"
    if options.init_image:
        params["Denoising strength"] = options.strength
        params["Init image"] = recorded_path(options.init_image)  # so --from-png can repeat an img2img generation
        if options.resize_mode != "just resize":  # (A1111's paste field, its radio's label; A1111 writes none)
            params["Resize mode"] = options.resize_mode.capitalize()
    if options.mask:
        params.update(inpaint_infotext(options))
    if options.hires is not None:
        params.update(options.hires.infotext(options.strength, options.prompt, options.negative_prompt))
    if loras:  # files given with --lora (prompt <lora:...> tags stay in the prompt itself, as in A1111)
        params["Lora files"] = " | ".join(f"{recorded_path(str(p))}:{w}" for p, w in loras)
    if options.embeddings:
        params["Embeddings"] = " | ".join(map(recorded_path, options.embeddings))
    if not options.use_ema:
        params["EMA"] = "off"
    if options.deepcache > 1:
        params["DeepCache"] = options.deepcache
    if options.controlnets:
        from difftrain.generate.controlnet import infotext_units

        params.update(infotext_units(options.controlnets, width, height))
    return params


def inpainting_of(options: GenerateOptions, init: Image.Image, mask: Image.Image, width: int, height: int):
    """The init image and mask made ready as `options` say (generate/inpaint.py)."""
    from difftrain.generate.inpaint import prepare

    return prepare(init, mask, width, height, (options.mask_blur, options.mask_blur), options.invert_mask,
                   options.masked_content, options.only_masked, options.only_masked_padding, options.soft_inpainting,
                   options.resize_mode)


def put_back(inpainting, images: list[Image.Image], latents: torch.Tensor, extra: dict, seeds: list[int]) -> list:
    """Images an inpainting drew from `latents` laid back into its init image (generate/inpaint.Inpainting.finish),
    under soft inpainting each through the mask of how far its own latents moved. `extra`: sampling_runner's."""
    if inpainting is None:
        return images
    changed = extra["mask"].composite_masks(latents, extra["image"], seeds)
    return [inpainting.finish(image, None if changed is None else changed[index]) for index, image in enumerate(images)]


def inpaint_infotext(options: GenerateOptions) -> dict:
    """A1111's inpainting keys (and the mask file and masked content, ours, for --from-png)."""
    params = {"Mask blur": options.mask_blur}
    if options.invert_mask:
        params["Mask mode"] = "Inpaint not masked"
    if options.only_masked:
        params.update({"Inpaint area": "Only masked", "Masked area padding": options.only_masked_padding})
    params.update({"Mask": recorded_path(options.mask), "Masked content": options.masked_content})
    return params | (options.soft_inpainting.infotext() if options.soft_inpainting is not None else {})


def control_image(unit: ControlUnit, width: int, height: int, inpainting=None, image: Image.Image | None = None):
    """A ControlNet unit's conditioning image for a drawing of width x height; under an inpainting's "only masked",
    made at the init image's size and cut to the mask's box as the init image is, so the two line up."""
    from difftrain.generate.controlnet import conditioning_image

    if inpainting is None:
        return conditioning_image(unit, width, height, image)
    return inpainting.fit(lambda w, h: conditioning_image(unit, w, h, image))


@dataclass
class Controls:
    """ControlNet or T2I-Adapter units with their loaded networks and conditioning images (at the output size)."""
    units: list[ControlUnit]
    nets: list
    images: list[Image.Image]


def sampling_runner(pipe, width: int, height: int, steps: int, *, scheduler=None, init: Image.Image | None = None,
                    strength: float = 0.75, controls: Controls | None = None, inpainting=None,
                    resize_mode: str = "just resize", eta: float | None = None) -> tuple[object, dict]:
    """The pipeline that draws around `pipe`'s weights, and the arguments it takes besides the prompts.

    `difftrain generate` and `difftrain serve` both draw through this, so one request draws the
    same image through either. `scheduler`: a sampler instance of the caller's own (the server
    gives every request one); `init`: img2img from this image, brought to the output size as
    A1111's `resize_mode` does; `controls`: ControlNets or T2I-Adapters acting on every image;
    `inpainting`: img2img redraws only its mask (generate/inpaint.py: the caller lays each image over
    the original with its `finish`); `eta`: DDIM's (the pipelines give it to a scheduler whose step takes it).
    """
    runner, extra = pipe, {"width": width, "height": height}
    if init is not None or scheduler is not None:
        from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

        components = dict(pipe.components, **({"scheduler": scheduler} if scheduler is not None else {}))
        cls = StableDiffusionPipeline if init is None else StableDiffusionImg2ImgPipeline
        runner = cls(**components, requires_safety_checker=False)
    if init is not None:
        from difftrain.sampling.schedulers import img2img_strength
        from difftrain.sampling.text2image import encode_pixels

        from difftrain.generate.inpaint import LATENT_UPSCALE, resize_image

        if resize_mode == LATENT_UPSCALE:  # A1111: encoded at its own size, the latents then resized bilinearly
            pixels = pipe.image_processor.preprocess(init)  # (its sides rounded down to the VAE's multiple)
            latents = torch.nn.functional.interpolate(encode_pixels(pipe, pixels), mode="bilinear", size=(
                height // pipe.vae_scale_factor, width // pipe.vae_scale_factor))
        else:
            start = resize_image(init, resize_mode, width, height) if inpainting is None else inpainting.image
            pixels = pipe.image_processor.preprocess(start)
            latents = encode_pixels(pipe, pixels)
        extra = {"image": latents, "strength": img2img_strength(scheduler or pipe.scheduler, steps, strength)}
        if inpainting is not None:
            extra["mask"] = inpainting.latent_mask_for(pipe, pixels, extra["image"])
    if controls is not None:
        from difftrain.generate.controlnet import pipeline_arguments
        from difftrain.models.control import control_pipeline

        runner = control_pipeline(runner, controls.nets, init is not None)
        extra.update(pipeline_arguments(controls.units, controls.images, init is not None, controls.nets))
    if eta:
        extra["eta"] = eta
    return runner, extra


def encode_prompts(pipe, prompt: str, negative_prompt: str, clip_skip: int, steps: int,
                   composable: bool = True, first_pass: int | None = None) -> ScheduledConditioning:
    """The conditioning of A1111-syntax prompts (without <lora:> tags) for each span of a schedule of `steps`
    (schedule_steps: the sampler's steps, twice for a second-order one; one span unless they use prompt editing
    or alternation). Its `padded` says whether a side was padded to the other's length, which A1111 does only
    with its "Pad conds" option (its infotext then says so): a PNG without it would be redrawn unpadded.
    `first_pass`: a hires fix's second pass follows that many steps (prompt_schedule)."""
    from difftrain.sampling.prompt_schedule import encode_schedule
    from difftrain.sampling.prompts import encode_texts

    def encode(texts: list[str], pad: bool) -> tuple[list[torch.Tensor], bool]:
        # A multi-vector embedding's token stands for all its vectors ("<tok>" -> "<tok> <tok>_1 ...").
        texts = [pipe.maybe_convert_prompt(text, pipe.tokenizer) for text in texts]
        return encode_texts(pipe.tokenizer, pipe.text_encoder, texts, pipe._execution_device, clip_skip, pad=pad)

    return encode_schedule(encode, prompt, negative_prompt, steps, composable, first_pass)


class Drawer:
    """A model loaded once and set up as `options` say (sampler, precision, size, adapters, img2img).

    `difftrain generate` and `difftrain eval` both draw through it, so an evaluation measures
    the images the command gives. `extra_loras` are LoRAs named by prompt tags.
    """

    def __init__(self, model, options: GenerateOptions, extra_loras: list[tuple[str, float]] = (),
                 progress: bool = True):
        """`model`: anything `load_pipeline` takes, or the `Located` a caller already has."""
        from difftrain.generate.loader import Located, build_pipeline, clip_skip_of, loading_bar, locate
        from difftrain.sampling.schedulers import make_scheduler

        options.check()
        self.options = options
        self.unpadded_png = options.unpadded_png  # warned of at the first padded draw
        device = resolve_device(options.device)
        located = model if isinstance(model, Located) else locate(model, options.use_ema)
        manifest = located.manifest
        if not options.use_ema and not (manifest is not None and manifest.method and manifest.weights == "raw"):
            # One set of weights, drawn as it is: its PNGs said "EMA: off" all the same
            log.warning("--no-ema: %s holds one set of weights (not a difftrain run's EMA and raw pair); drawn "
                        "as it is", located.source)
            options.use_ema = True
        if located.manifest is not None and located.manifest.kind == "unconditional":
            raise GenerateError(f"{located.source} is a pixel-space (unconditional) model; "
                                f"`difftrain sample {located.source}` draws from it")
        _check_backend(located, options)
        with loading_bar(progress):
            pipe = build_pipeline(located, list(options.loras) + list(extra_loras), options.embeddings,
                                  dtype=_dtype(options.precision, device), config=options.config,
                                  provider=options.provider, provider_fallback=options.provider_fallback)
        self.clip_skip = clip_skip_of(pipe, options.clip_skip)
        model_scheduler = dict(pipe.scheduler.config)
        pipe.scheduler = make_scheduler(options.scheduler, model_scheduler)
        configure_pipeline(pipe, options, device)
        pipe.set_progress_bar_config(disable=not progress)
        size = default_size(pipe)
        self.width, self.height = options.width or size, options.height or size
        self.pipe, self.model_name, self.progress = pipe, pipe.model_name, progress
        init, self.inpainting = self._init_images(options)
        controls = None
        if options.controlnets or pipe.manifest.kind in ("controlnet", "t2i-adapter"):
            from difftrain.generate import controlnet

            options.controlnets = controlnet.with_own_controlnet(options.controlnets, located.manifest,
                                                                 located.folder, located.source)
            nets = [controlnet.load_control(unit.model, pipe.unet.dtype, pipe.unet, latent_scale=pipe.vae_scale_factor)
                    for unit in options.controlnets]
            images = [control_image(unit, self.width, self.height, self.inpainting) for unit in options.controlnets]
            controls = Controls(options.controlnets, nets, images)
        self.controls = controls
        self.runner, self.extra = sampling_runner(pipe, self.width, self.height, options.steps, init=init,
                                                  strength=options.strength, controls=controls,
                                                  inpainting=self.inpainting, resize_mode=options.resize_mode,
                                                  eta=options.eta)
        self.hires_target = self.hires_scheduler = self.hires_prompt = self.hires_upscaler = None
        self.hires_pipe, self.hires_clip_skip = pipe, self.clip_skip  # the second pass's model: the first's ...
        if options.hires is not None:
            if controls is not None:  # a ControlNet run's own model: known only once it is loaded
                raise GenerateError("the hires fix draws without ControlNets: leave out --hires-*")
            from difftrain.generate.hires import check_pass, checked_pass_prompt, pass_scheduler

            first_scheduler, pass_config = self.runner.scheduler, model_scheduler
            if options.hires.checkpoint:  # ... or a checkpoint of its own (A1111's hr_checkpoint_name)
                self.hires_pipe = self._second_model(options, extra_loras, device, progress)
                self.hires_clip_skip = clip_skip_of(self.hires_pipe, options.clip_skip)
                pass_config = dict(self.hires_pipe.scheduler.config)
                first_scheduler = make_scheduler(options.scheduler, pass_config)
            with hires_flags():
                self.hires_prompt = checked_pass_prompt(options.hires.prompt, options.prompt)
                self.hires_target = options.hires.check(self.width, self.height, MAX_SIDE, pipe.vae_scale_factor)
                _check_onnx_pass(self.hires_pipe, self.hires_target.size)
                self.hires_scheduler = pass_scheduler(options.hires, first_scheduler, pass_config)
                check_pass(self.hires_scheduler, options.hires.steps or options.steps, options.strength)
                self.hires_upscaler = model_upscaler(options.hires, options.upscaler_dir, device=device)
        if controls is not None:
            if options.cpu_offload:
                self.runner.enable_model_cpu_offload(device=device)
            else:
                self.runner.to(device)
        self.runner.set_progress_bar_config(disable=not progress)
        self.deepcache = None
        if options.deepcache > 1:
            from difftrain.generate.deepcache import DeepCache

            if controls is not None:  # a ControlNet run's own model: known only once it is loaded
                raise GenerateError(_DEEPCACHE_WITH_CONTROL)
            self.deepcache = DeepCache(pipe.unet, options.deepcache)

    def _init_images(self, options: GenerateOptions):
        """(img2img's image, its inpainting made ready), or Nones for text to image."""
        if not options.init_image:
            return None, None
        from difftrain.data.images import load_image
        from difftrain.generate.inpaint import load_mask

        # The same decoder as training (EXIF rotation, alpha on white, 16-bit), so a phone photo is upright.
        init = load_image(options.init_image)
        if not options.mask:
            return init, None
        mask = load_mask(options.mask, f"--mask {options.mask}")
        return init, inpainting_of(options, init, mask, self.width, self.height)

    def retarget(self, options: GenerateOptions) -> None:
        """Draw from now on from `options`' init image (and mask), all else as loaded: an img2img batch's next
        image. ControlNet units keep their networks and images, as A1111's batch gives each image a unit's one
        image; under "only masked" the images are cut again, to this mask's box (made at the image's own size)."""
        init, inpainting = self._init_images(options)  # (an image that cannot be read leaves this Drawer as it was)
        controls = self.controls
        boxed = [item is not None and item.paste_to is not None for item in (self.inpainting, inpainting)]
        if controls is not None and any(boxed):  # (at the drawing size, they are the same for every image)
            controls = replace(controls, images=[control_image(unit, self.width, self.height, inpainting)
                                                 for unit in controls.units])
        self.options, self.inpainting, self.controls = options, inpainting, controls
        self.runner, self.extra = sampling_runner(self.pipe, self.width, self.height, options.steps, init=init,
                                                  strength=options.strength, controls=controls,
                                                  inpainting=self.inpainting, resize_mode=options.resize_mode,
                                                  eta=options.eta)
        self.runner.set_progress_bar_config(disable=not self.progress)

    def _second_model(self, options: GenerateOptions, extra_loras, device: torch.device, progress: bool):
        """The hires pass's own model, with the first's LoRAs and embeddings (A1111 applies them to it too); its
        latents must be the first model's."""
        from difftrain.generate.hires import check_second_model
        from difftrain.generate.loader import NOT_TEXT_TO_IMAGE, build_pipeline, loading_bar, locate

        located = locate(options.hires.checkpoint, options.use_ema)
        kind = located.manifest.kind if located.manifest is not None else "stable-diffusion"
        # Runs and files of every Stable Diffusion kind (whole, parts, LoRA, embedding) draw it; an ONNX export cannot,
        # the second pass being diffusers' torch img2img.
        if kind in (*NOT_TEXT_TO_IMAGE, "onnx"):
            raise GenerateError(f"--hires-checkpoint {options.hires.checkpoint}: a {kind} model; give a Stable "
                                "Diffusion model (a folder, a run, a single file) for the second pass")
        with loading_bar(progress):
            second = build_pipeline(located, list(options.loras) + list(extra_loras), options.embeddings,
                                    dtype=_dtype(options.precision, device), config=options.config)
        with hires_flags():
            check_second_model(self.pipe, second, options.hires.checkpoint)
        configure_pipeline(second, options, device)
        second.set_progress_bar_config(disable=not progress)
        return second

    def draw(self, prompt: str, negative_prompt: str, seeds: list[int],
             subseeds: list[int] | None = None) -> list[Image.Image]:
        """One image per seed for `prompt` (A1111 syntax, without <lora:> tags); `subseeds`: their variation seeds
        (batch_seeds'), under a variation strength."""
        from difftrain.sampling.text2image import sample, to_images

        # At CFG <= 1 the pipeline draws without the negative side: a long negative prompt must not pad the prompt.
        guided = self.options.guidance_scale > 1
        conditioning = encode_prompts(self.pipe, prompt, negative_prompt if guided else "", self.clip_skip,
                                      schedule_steps(self.runner.scheduler, self.options.steps), self.options.compose)
        self.padded = conditioning.padded  # goes into the infotext of what save() writes
        if self.padded and self.unpadded_png:
            self.unpadded_png = False  # (said once)
            log.warning("the PNG's prompt and negative prompt differ in 75-token chunks and its infotext does not say "
                        "'Pad conds': A1111 drew them as two separate batches, diffusers' pipelines need one shape, so "
                        "the shorter side is padded with empty chunks and the image will differ a little")
        if self.deepcache is not None:
            self.deepcache.reset()  # each generation starts with a whole-UNet step
        options = self.options
        subseeds = subseeds or [options.variation_seed + i for i in range(len(seeds))]
        noise = noise_of(options, subseeds, self.pipe.vae_scale_factor)
        latents = sample(self.runner, conditioning, seeds, options.steps, options.guidance_scale, noise=noise,
                         **self.extra)
        if options.hires is None:
            return put_back(self.inpainting, to_images(self.runner, latents), latents, self.extra, seeds)
        from difftrain.generate.hires import pass_prompts, second_pass

        own = pass_prompts(options.hires, self.hires_prompt, prompt, negative_prompt)
        if own or self.hires_pipe is not self.pipe:  # (another model: its own text encoder)
            own = own or (prompt, negative_prompt)
            conditioning = encode_prompts(self.hires_pipe, own[0], own[1] if guided else "", self.hires_clip_skip,
                                          schedule_steps(self.hires_scheduler, options.hires.steps or options.steps),
                                          options.compose, schedule_steps(self.runner.scheduler, options.steps))
        hires_noise = noise_of(options, subseeds, self.pipe.vae_scale_factor, options.hires.sampler)
        second = self.runner if self.hires_pipe is self.pipe else self.hires_pipe
        return second_pass(second, latents, conditioning, seeds, options.steps, options.guidance_scale,
                           options.hires, self.hires_target, options.strength, noise=hires_noise,
                           scheduler=self.hires_scheduler, upscaler=self.hires_upscaler, first=self.runner,
                           **({"eta": options.eta} if options.eta else {}))

    def save(self, image: Image.Image, path: Path, prompt: str, negative_prompt: str, seed: int,
             subseed: int | None = None) -> Path:
        """A PNG carrying A1111's infotext for this image, one `draw` drew (`--from-png` repeats it)."""
        from difftrain.generate.infotext import format_infotext, write_png

        used = replace(self.options, clip_skip=self.clip_skip)  # the model's own clip skip too, as A1111 records it
        params = infotext_params(used, seed, self.width, self.height, self.model_name, list(self.options.loras),
                                 self.padded, subseed)
        return write_png(image, path, format_infotext(prompt, negative_prompt, params))


def generate(model: str, options: GenerateOptions, out_dir: str | Path, progress: bool = True) -> list[Path]:
    """Generate batch_size x n_iter images with seeds seed + i (seed -1: a random one, as in A1111; batch_seeds);
    write PNGs with infotext; return their paths. An init image that is a folder: each of its images in turn
    (generate_batch)."""
    options = with_seed(options)
    if options.init_image and Path(options.init_image).is_dir():
        return generate_batch(model, options, Path(out_dir), progress)
    prompt, prompt_loras = _resolve_prompt_loras(options.prompt, options.lora_dir)
    drawer = Drawer(model, options, prompt_loras, progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    # Number on from the highest index the folder holds, as A1111 does, so nothing is overwritten.
    taken = [int(p.name.split("-", 1)[0]) for p in out.glob("*.png") if p.name.split("-", 1)[0].isdigit()]
    first = max(taken, default=-1) + 1
    for iteration in range(options.n_iter):
        seeds, subseeds = batch_seeds(options, iteration)
        for seed, subseed, image in zip(seeds, subseeds, drawer.draw(prompt, options.negative_prompt, seeds, subseeds)):
            path = out / f"{first + len(written):05d}-{seed}.png"
            written.append(drawer.save(image, path, options.prompt, options.negative_prompt, seed, subseed))
    return written


def batch_items(images: str, masks: str | None) -> tuple[list[tuple[Path, Path | None]], list[tuple[str, str]]]:
    """A1111's img2img batch: the images of the folder `images` (by name), each with its mask: `masks` a file for
    all, or a folder with a file of the image's name (any extension; one file alone serves all, as in A1111).
    Returns (items, skipped as (name, why))."""
    from difftrain.data.images import IMAGE_EXTENSIONS

    def image_files(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)

    files, skipped, stems = [], [], set()
    for path in image_files(Path(images)):  # a.png and a.jpg would both write a.png: the first is drawn
        if path.stem in stems:
            skipped.append((path.name, f"another image is named {path.stem} too"))
        else:
            files.append(path)
            stems.add(path.stem)
    if masks is None or Path(masks).is_file():
        return [(path, masks and Path(masks)) for path in files], skipped
    if not Path(masks).is_dir():
        raise GenerateError(f"--mask {masks}: no such file or folder")
    found = image_files(Path(masks))
    by_name = {path.stem: path for path in reversed(found)}
    items = []
    for path in files:
        mask = found[0] if len(found) == 1 else by_name.get(path.stem)
        if mask is None:
            skipped.append((path.name, f"no mask named {path.stem}.* in {masks}"))
        else:
            items.append((path, mask))
    return items, skipped


def generate_batch(model: str, options: GenerateOptions, out: Path, progress: bool = True) -> list[Path]:
    """A1111's img2img batch: every image of the folder `options.init_image` drawn with the same settings and seeds
    (with its mask, batch_items), written as NAME.png (NAME-SEED.png for several an image, NAME-SEED-VARIATIONSEED.png
    for variations of one seed). An image or mask that
    cannot be read is skipped, said and counted; names already in `out` are refused before any drawing."""
    from tqdm.auto import tqdm

    from difftrain.data.images import BadImage, load_image
    from difftrain.generate.inpaint import InpaintError, load_mask

    items, skipped = batch_items(options.init_image, options.mask)
    considered = len(items) + len(skipped)
    pairs = [pair for iteration in range(options.n_iter) for pair in zip(*batch_seeds(options, iteration))]
    unique = len({seed for seed, _ in pairs}) == len(pairs)  # (variations share a seed: their own seeds name them)
    suffixes = [""] if len(pairs) == 1 else [f"-{seed}" if unique else f"-{seed}-{sub}" for seed, sub in pairs]
    names = {path: [f"{path.stem}{suffix}.png" for suffix in suffixes] for path, _ in items}
    taken = [name for planned in names.values() for name in planned if (out / name).exists()]
    if taken:
        raise GenerateError(f"--out {out} holds {taken[0]} already ({len(taken)} of the names this batch writes): "
                            "give another folder, or move them")
    prompt, prompt_loras = _resolve_prompt_loras(options.prompt, options.lora_dir)
    drawer, written = None, []
    out.mkdir(parents=True, exist_ok=True)
    for path, mask in tqdm(items, desc="init images", unit="image", disable=not progress or len(items) < 2):
        item = replace(options, init_image=str(path), mask=str(mask) if mask else None)
        try:  # (what is wrong with this image or its mask skips it; anything else stops the batch)
            if drawer is None:  # (read first: the Drawer's own checks would stop the batch on a bad image)
                load_image(item.init_image)
                if item.mask:
                    load_mask(item.mask, f"--mask {item.mask}")
                drawer = Drawer(model, item, prompt_loras, progress)
            else:
                drawer.retarget(item)
        except (BadImage, InpaintError) as reason:
            skipped.append((path.name, str(reason)))
            continue
        drawn = []
        for iteration in range(options.n_iter):
            seeds, subseeds = batch_seeds(options, iteration)
            drawn += zip(seeds, subseeds, drawer.draw(prompt, options.negative_prompt, seeds, subseeds))
        for name, (seed, subseed, image) in zip(names[path], drawn):
            written.append(drawer.save(image, out / name, options.prompt, options.negative_prompt, seed, subseed))
    for name, why in skipped:
        log.warning("skipped %s: %s", name, why)
    if skipped:
        log.warning("%d of the %d init images skipped (above)", len(skipped), considered)
    if drawer is None:
        raise GenerateError(f"--init-image {options.init_image}: no image in it could be drawn from")
    return written


def with_seed(options: GenerateOptions) -> GenerateOptions:
    """`options` with seed -1 (A1111's "random") replaced by a random seed that leaves room for every image; a
    variation seed too, when a variation is asked for."""
    import random

    room = 2**32 - options.batch_size * options.n_iter
    if options.seed < 0:
        options = replace(options, seed=random.randrange(room))
    if options.variation_seed < 0 and options.variation_strength:
        options = replace(options, variation_seed=random.randrange(room))
    return options


def batch_seeds(options: GenerateOptions, iteration: int) -> tuple[list[int], list[int]]:
    """The seeds and variation seeds of batch `iteration`, as A1111 numbers them: image i of the run takes seed + i
    and variation seed + i, but under a variation strength every image keeps the seed (variations of one picture)."""
    indices = range(iteration * options.batch_size, (iteration + 1) * options.batch_size)
    stride = 0 if options.variation_strength else 1
    return [options.seed + stride * i for i in indices], [options.variation_seed + i for i in indices]


def noise_of(options: GenerateOptions, subseeds: list[int], cell: int, sampler: str | None = None):
    """The images' noise options (their variation seeds at the options' strength, the ENSD where the sampler takes
    it: `sampler`, a hires pass's own, or the options', the size the seeds' noise is drawn at in latents of `cell`
    pixels, the pipeline's VAE factor), or None where their noise is plainly their seeds'."""
    from difftrain.sampling.schedulers import takes_ensd
    from difftrain.sampling.seed_noise import SeedNoise

    ensd = options.ensd if takes_ensd(sampler or options.scheduler) else 0
    resize = options.seed_resize_from and (options.seed_resize_from[1] // cell, options.seed_resize_from[0] // cell)
    if not (options.variation_strength or ensd or resize):
        return None
    return SeedNoise(list(subseeds), options.variation_strength, ensd, resize)


def _check_onnx_pass(pipe, size: tuple[int, int]) -> None:
    """An ONNX UNet takes latents its upsamplers halve evenly (models/onnx.py): a hires pass at another size is
    refused before the first pass draws, naming the flags that set it, not the width and height."""
    if getattr(getattr(pipe, "manifest", None), "kind", None) != "onnx":
        return
    from difftrain.models.onnx import latent_cell

    cell = pipe.vae_scale_factor * latent_cell(pipe.unet.config)
    if size[0] % cell or size[1] % cell:
        raise GenerateError(f"--hires-scale/--hires-resize: the hires pass would draw {size[0]}x{size[1]}, and this "
                            f"ONNX export's UNet takes multiples of {cell} px only; choose a scale or size that gives "
                            "them, or use the torch model")


# A1111 infotext keys of features generate does not have: repeating such a PNG draws another picture.
NOT_REPEATED = ("Hires CFG Scale", "Old prompt editing timelines", "Eta", "Refiner",
                "Face restoration", "Tiling", "Noise multiplier", "Schedule min sigma", "Schedule max sigma",
                "Schedule rho", "Discard penultimate sigma", "Emphasis", "NGMS", "Token merging ratio",
                "UniPC variant", "UniPC order", "UniPC skip type", "UniPC lower order final")


def options_from_inpaint_infotext(path, options: GenerateOptions, params: dict, mask_given: bool) -> None:
    """An inpainting's settings read back (its mask from our "Mask" key, unless --mask gives one)."""
    if params.get("Mask") and not mask_given:
        options.mask = str(params["Mask"])
    if not (options.mask or mask_given):
        if "Mask blur" in params:
            log.warning("%s: an inpainting (Mask blur %s) without its mask recorded: give --mask to repeat it; "
                        "without one the whole image is redrawn", path, params["Mask blur"])
        return
    # A1111 writes its blur only when there is one; ours always.
    blur = params.get("Mask blur", 0 if "Version" in params else options.mask_blur)
    try:
        options.mask_blur = int(blur)
        options.only_masked_padding = int(params.get("Masked area padding", options.only_masked_padding))
    except ValueError:
        raise GenerateError(f"{path}: its infotext says Mask blur: {params.get('Mask blur')!r}, Masked area padding: "
                            f"{params.get('Masked area padding')!r}: not whole numbers") from None
    options.invert_mask = params.get("Mask mode") == "Inpaint not masked"
    options.only_masked = params.get("Inpaint area") == "Only masked"
    options.masked_content = str(params.get("Masked content", options.masked_content))
    try:
        options.soft_inpainting = SoftInpainting.from_infotext(params)
    except ValueError:
        raise GenerateError(f"{path}: its infotext's soft inpainting settings are not numbers") from None


def options_from_png(path: str | Path, **overrides) -> GenerateOptions:
    """The options an image of ours (or A1111's) was generated with, from its `parameters` chunk."""
    from difftrain.generate.infotext import parse_infotext, read_png_infotext

    prompt, negative, params = parse_infotext(read_png_infotext(path))
    options = GenerateOptions(prompt=prompt, negative_prompt=negative)
    from difftrain.sampling.schedulers import resolve_name

    if "Sampler" in params and "scheduler" not in overrides:  # 1.9+ writes Karras etc. as "Schedule type"
        options.scheduler = resolve_name(params["Sampler"], params.get("Schedule type"))
    dropped = [key for key in NOT_REPEATED if key in params]
    if dropped:
        log.warning("%s: %s not repeated (difftrain generate has no such setting): the image will differ",
                    path, ", ".join(f"{key}: {params[key]}" for key in dropped))
    # A1111 writes its version and leaves RNG out for its default, GPU noise; an older PNG of ours says neither.
    rng = params.get("RNG", "GPU" if "Version" in params else "CPU")
    if rng != "CPU":
        log.warning("%s: RNG: %s not repeated: difftrain draws A1111's CPU noise (its 'RNG: CPU' option), so the "
                    "image will differ", path, rng)
    if "[" in prompt + negative and _version(params.get("Version")) < (1, 6) and "Old prompt editing timelines" \
            not in params:  # A1111 reads a PNG before 1.6 with the old timelines (infotext_versions.backcompat)
        log.warning("%s: drawn by A1111 %s, whose prompt editing timeline was the old one: the edits may fall on "
                    "other steps", path, params["Version"])
    if params.get("TI hashes") and not params.get("Embeddings"):
        log.warning("%s: its prompt names Textual Inversion embeddings (TI hashes: %s): give each file with "
                    "--embedding, or their names are read as plain words", path, params["TI hashes"])
    try:
        options.hires = Hires.from_infotext(params)  # its "Denoising strength" is then the hires pass's
    except DifftrainError as reason:
        raise GenerateError(f"{path}: {reason}") from None
    if options.hires is not None and ("init_image" in overrides or overrides.get("controlnets")):
        log.warning("%s: its hires fix is not repeated with --init-image or --controlnet (A1111's img2img has none)",
                    path)
        options.hires = None
    if options.hires is not None and options.hires.prompt and overrides.get("prompt", prompt) != prompt:
        log.warning("%s: its hires prompt (%r) is kept for the second pass beside the new --prompt; give "
                    "--hires-prompt to change it too", path, options.hires.prompt)
    if params.get("Init image"):
        options.init_image = str(params["Init image"])
    elif "Denoising strength" in params and options.hires is None:
        if "init_image" not in overrides:
            log.warning("%s: an img2img or inpainting image (Denoising strength %s, no init image recorded): give "
                        "--init-image to repeat it; without one it is drawn from text alone", path,
                        params["Denoising strength"])
    img2img = params.get("Init image") or "init_image" in overrides or options.hires is not None
    if img2img and options.hires is None:
        options_from_inpaint_infotext(path, options, params, "mask" in overrides)
        options.resize_mode = str(params.get("Resize mode", options.resize_mode)).lower()
    converters = {"Steps": ("steps", int), "CFG scale": ("guidance_scale", float),
                  "Seed": ("seed", int), "Clip skip": ("clip_skip", int), "Variation seed": ("variation_seed", int),
                  "Variation seed strength": ("variation_strength", float), "ENSD": ("ensd", int),
                  "Eta DDIM": ("eta", float),
                  **({"Denoising strength": ("strength", float)} if img2img else {}),
                  "DeepCache": ("deepcache", int)}
    for key, (name, convert) in converters.items():
        if key in params:
            try:
                setattr(options, name, convert(params[key]))
            except ValueError:
                raise GenerateError(f"{path}: its infotext says {key}: {params[key]!r}, not a number") from None
    def size_of(key: str) -> tuple[int, int]:
        if (size := parse_size(str(params[key]))) is None:
            raise GenerateError(f"{path}: its infotext says {key}: {params[key]!r}, not WIDTHxHEIGHT")
        return size

    if "Size" in params:
        options.width, options.height = size_of("Size")
        if options.width % 8 or options.height % 8:  # A1111 takes such a size and draws its latents' whole cells
            options.width, options.height = options.width // 8 * 8, options.height // 8 * 8
            log.warning("%s: its Size %s is not in multiples of 8; drawn at %dx%d, as A1111 drew it", path,
                        params["Size"], options.width, options.height)
    # (A1111 writes none when off, up to 1.5 "-1x-1", its API's default)
    if "Seed resize from" in params and str(params["Seed resize from"]).strip() != "-1x-1" \
            and min(resize := size_of("Seed resize from")) > 0:
        options.seed_resize_from = resize
    if params.get("Lora files"):
        options.loras = [parse_lora_arg(item.strip()) for item in str(params["Lora files"]).split(" | ")]
    if params.get("Embeddings"):
        options.embeddings = [item.strip() for item in str(params["Embeddings"]).split(" | ")]
    options.use_ema = params.get("EMA") != "off"
    options.unpadded_png = "Pad conds" not in params
    from difftrain.generate.controlnet import units_from_infotext

    if "controlnets" not in overrides:  # units given on the command line replace the PNG's
        options.controlnets = units_from_infotext(params)
    return replace(options, **overrides)


def parse_size(text: str) -> tuple[int, int] | None:
    """"512x768" (A1111's Size and Seed resize from, --hires-resize) as (512, 768); None where it is not that."""
    width, _, height = (side.strip() for side in text.partition("x"))
    return (int(width), int(height)) if width.isdigit() and height.isdigit() else None


def _version(text) -> tuple[int, ...]:
    """A1111's "Version: v1.5.1" as (1, 5, 1); ours and none as the newest."""
    import re

    match = re.match(r"v?(\d+)\.(\d+)", str(text or ""))
    return (int(match.group(1)), int(match.group(2))) if match else (999,)


def parse_lora_arg(text: str, default: float | None = 1.0) -> tuple[str, float | None]:
    """`path[:weight]` (the weight after the last colon, so Windows drive letters survive); `default` without
    one."""
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            value = float(weight)
        except ValueError:
            if Path(path).is_file() and not Path(text).is_file():
                raise GenerateError(f"{text}: the weight after the last colon, {weight!r}, is not a number") from None
        else:
            if not math.isfinite(value):  # a NaN weight drew black images and wrote NaN weights
                raise GenerateError(f"{text}: give a finite weight")
            return path, value
    return text, default


__all__ = ["Drawer", "GenerateOptions", "GenerateError", "generate", "options_from_png"]
