"""A1111's hires fix: draw at the model's size, upscale, then redraw the larger image as img2img.

Sizes, steps and upscalers follow A1111's `StableDiffusionProcessingTxt2Img` (1.6+): the target
is the first pass's size times `scale`, or `resize` (one side 0: kept to the first pass's aspect;
both given: scaled to cover them, the latents then cropped to them). The second pass runs exactly
`steps` steps (0: the first pass's count) of a schedule int(steps / strength) long, as A1111's
`setup_img2img_steps` does when it is handed steps, from fresh noise of each image's seed (A1111
makes a new `ImageRNG` for it). `generate` and `serve` both draw it through `second_pass`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from difftrain.errors import DifftrainError, UpscalerError
# (IMAGE_UPSCALERS: the first image decoded, resized, encoded again)
from difftrain.generate.infotext import recorded_path
from difftrain.generate.upscale import IMAGE_UPSCALERS, ImageUpscaler, a1111_name, is_path

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# A1111's shared.latent_upscale_modes: the latents themselves interpolated.
LATENT_UPSCALERS = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
UPSCALERS = (*LATENT_UPSCALERS, *IMAGE_UPSCALERS)


class HiresError(DifftrainError):
    """`setting`: the one to change (upscaler, steps, resize, scale, strength, sampler, prompt; size: the scale or
    resize gives too much)."""

    def __init__(self, setting: str, message: str):
        super().__init__(message)
        self.setting = setting


@dataclass(frozen=True)
class Target:
    """Where the first pass's latents are upscaled to, and how many latent cells each side then loses."""
    width: int
    height: int
    truncate_x: int = 0
    truncate_y: int = 0
    cell: int = 8  # pixels a latent stands for (the VAE's scale factor; A1111's opt_f)

    @property
    def latent_size(self) -> tuple[int, int]:
        """(height, width) the latents are interpolated to, before the crop."""
        return self.height // self.cell, self.width // self.cell

    @property
    def size(self) -> tuple[int, int]:
        """The final image's pixels: what the cropped latents decode to."""
        return ((self.width // self.cell - self.truncate_x) * self.cell,
                (self.height // self.cell - self.truncate_y) * self.cell)


@dataclass(frozen=True)
class Hires:
    scale: float = 2.0
    resize: tuple[int, int] = (0, 0)  # A1111's hr_resize_x/y: 0 on both sides means `scale`
    upscaler: str = "Latent"  # A1111's default latent upscale mode
    steps: int = 0  # the second pass's; 0: the first pass's
    sampler: str | None = None  # the second pass's (a schedulers name); None: the first pass's
    prompt: str = ""  # the second pass's; "": the first pass's (A1111's hr_prompt)
    negative_prompt: str = ""
    checkpoint: str = ""  # the second pass's model (A1111's hr_checkpoint_name); "": the first pass's

    def check(self, width: int, height: int, max_side: int, cell: int = 8) -> Target:
        """The target of a first pass of this size, or the reason there is none, naming the option. (A model
        upscaler's file is found by model_upscaler, which knows where to look.)"""
        if self.sampler is not None:
            from difftrain.sampling.schedulers import resolve_name

            try:
                resolve_name(self.sampler)
            except DifftrainError as reason:
                raise HiresError("sampler", f"hires sampler: {reason}") from None
        if self.steps < 0:
            raise HiresError("steps", f"hires steps {self.steps}: 0 (the first pass's) or more")
        if min(self.resize) < 0:
            raise HiresError("resize", f"hires resize {self.resize[0]}x{self.resize[1]}: each side 0 (follows the "
                                       "other) or more")
        if self.resize == (0, 0) and not (self.scale > 0 and math.isfinite(self.scale)):
            raise HiresError("scale", f"hires scale {self.scale}: must be above 0")
        target = self.target(width, height, cell)
        out_width, out_height = target.size
        # (the latents are upscaled to cover a resize, then cropped: the covering size must fit too)
        if min(out_width, out_height) < cell or max(out_width, out_height, target.width, target.height) > max_side:
            raise HiresError("size", f"hires fix to {out_width}x{out_height} px (upscaled to {target.width}x"
                                     f"{target.height} before the crop) from {width}x{height}: each side must be from "
                                     f"{cell} to {max_side} px")
        return target

    def target(self, width: int, height: int, cell: int = 8) -> Target:
        """A1111's calculate_target_resolution."""
        resize_x, resize_y = self.resize
        if resize_x == 0 and resize_y == 0:
            return Target(int(width * self.scale), int(height * self.scale), cell=cell)
        if resize_y == 0:
            return Target(resize_x, resize_x * height // width, cell=cell)
        if resize_x == 0:
            return Target(resize_y * width // height, resize_y, cell=cell)
        if width / height < resize_x / resize_y:
            up_x, up_y = resize_x, resize_x * height // width
        else:
            up_x, up_y = resize_y * width // height, resize_y
        return Target(up_x, up_y, (up_x - resize_x) // cell, (up_y - resize_y) // cell, cell)

    def infotext(self, strength: float, prompt: str, negative_prompt: str) -> dict:
        """A1111's keys for it ("Denoising strength" is the second pass's; a prompt where it differs)."""
        size = {"Hires upscale": self.scale} if self.resize == (0, 0) else {
            "Hires resize": f"{self.resize[0]}x{self.resize[1]}"}
        sampler = {}
        if self.sampler is not None:
            from difftrain.sampling.schedulers import a1111_sampler

            sampler = {f"Hires {key.lower()}": value for key, value in a1111_sampler(self.sampler).items()}
        prompts = {key: text for key, text, first in (("Hires prompt", self.prompt, prompt),
                                                      ("Hires negative prompt", self.negative_prompt, negative_prompt))
                   if text and text != first}
        # A file given by path: A1111's name for it, and the path in a key of ours, as "Init image" and "Mask" keep
        # theirs, so --from-png finds the file without --upscaler-dir.
        file = {"Hires upscaler file": recorded_path(self.upscaler)} if is_path(self.upscaler) else {}
        return {"Denoising strength": strength, **size, **({"Hires steps": self.steps} if self.steps else {}),
                "Hires upscaler": a1111_name(self.upscaler), **file, **sampler, **prompts,
                **({"Hires checkpoint": recorded_path(self.checkpoint)} if self.checkpoint else {})}

    @classmethod
    def from_infotext(cls, params: dict) -> Hires | None:
        """The hires fix an infotext records, or None when it records none."""
        if "Hires upscale" not in params and "Hires resize" not in params:
            return None
        from difftrain.generate.infotext import parse_size

        try:
            resize = parse_size(str(params["Hires resize"])) if "Hires resize" in params else (0, 0)
            sampler = params.get("Hires sampler")
            if sampler is not None or "Hires schedule type" in params:  # (A1111 writes them where they differ)
                sampler = _pass_sampler(str(sampler or params.get("Sampler")),
                                        params.get("Hires schedule type", params.get("Schedule type")))
            file = str(params.get("Hires upscaler file", ""))  # (gone, or another machine's: the name is looked up)
            upscaler = file if file and Path(file).is_file() else str(params.get("Hires upscaler", "Latent"))
            return cls(scale=float(params.get("Hires upscale", 2.0)), resize=resize,
                       upscaler=upscaler, steps=int(params.get("Hires steps", 0)),
                       sampler=sampler, prompt=str(params.get("Hires prompt", "")),
                       negative_prompt=str(params.get("Hires negative prompt", "")),
                       checkpoint=same_checkpoint(str(params.get("Hires checkpoint", ""))))
        except (ValueError, DifftrainError) as reason:
            keys = ("Hires upscale", "Hires resize", "Hires steps", "Hires sampler", "Hires schedule type")
            raise HiresError("infotext", "its infotext's hires fix is unreadable (" + ", ".join(
                f"{key}: {params[key]!r}" for key in keys if key in params) + f"): {reason}") from None


def check_second_model(first, second, name: str) -> None:
    """A hires checkpoint's pipeline takes the first pass's latents: the same UNet input and VAE channels and
    scale (SD 1.x and 2.x alike), or the reason it does not, naming the setting."""
    shapes = [(pipeline.unet.config.in_channels, pipeline.vae.config.latent_channels, pipeline.vae_scale_factor)
              for pipeline in (first, second)]
    if shapes[0] != shapes[1]:
        raise HiresError("checkpoint", f"hires checkpoint {name}: its latents (UNet input channels, VAE channels, "
                                       f"VAE scale) {shapes[1]} are not the first model's {shapes[0]}")


def same_checkpoint(name: str) -> str:
    """A1111's hr_checkpoint_name as a model to load: "" for the first pass's ("Use same checkpoint" in its UI)."""
    return "" if name in ("", "Use same checkpoint") else name


def _pass_sampler(name: str, schedule: str | None) -> str | None:
    """A PNG's hires sampler as far as we have it: without its schedule type, or none (the first pass's), said."""
    from difftrain.sampling.schedulers import resolve_name

    for schedule_type in (schedule, None):
        try:
            resolved = resolve_name(name, schedule_type)
        except DifftrainError as reason:
            missing = reason
            continue
        if schedule_type != schedule:
            log.warning("its hires sampler %s is drawn without its schedule type %s (%s); --hires-sampler picks "
                        "another", name, schedule, missing)
        return resolved
    log.warning("its hires sampler is not repeated (%s): the second pass draws with the first pass's; "
                "--hires-sampler picks another", missing)
    return None


def checked_pass_prompt(text: str, prompt: str) -> str:
    """A hires prompt without its <lora:> tags, which must be the prompt's own (in any order): the LoRAs are
    loaded for both passes (A1111 would switch them between the passes)."""
    from difftrain.sampling.prompts import extract_lora_tags

    stripped, tags = extract_lora_tags(text)
    if text and sorted(tags) != sorted(extract_lora_tags(prompt)[1]):
        raise HiresError("prompt", f"its <lora:...> tags ({tags}) differ from the prompt's: give it the prompt's own "
                                   "tags (the LoRAs act on both passes)")
    return stripped


def pass_prompts(hires: Hires, own_prompt: str, prompt: str, negative_prompt: str) -> tuple[str, str] | None:
    """The (prompt, negative prompt) the second pass encodes for itself (`own_prompt`: the hires prompt without its
    <lora:> tags), or None where the first pass's conditioning serves: the same texts, without a prompt edit whose
    timeline goes on into the second pass."""
    texts = (own_prompt if hires.prompt else prompt, hires.negative_prompt or negative_prompt)
    return texts if "[" in "".join(texts) or texts != (prompt, negative_prompt) else None


def pass_steps(steps: int, strength: float) -> tuple[int, float]:
    """The schedule length and the diffusers img2img strength that take exactly `steps` steps from its
    (len - steps)th point on, as A1111 (`setup_img2img_steps` with steps given) does with its k-diffusion samplers.
    (A1111's DDIM and PLMS place one step fewer at many counts, so these take one fewer.)"""
    length = int(steps / min(strength, 0.999))
    # diffusers takes int(length x strength) steps: half a step above keeps float error from losing one
    return length, min(1.0, (steps + 0.5) / length)


def pass_scheduler(hires: Hires, scheduler, model_config: dict):
    """The second pass's sampler: the first pass's `scheduler`, or the hires sampler made from the model's own
    scheduler config (not the first sampler's, whose Karras or spacing settings would carry over)."""
    from difftrain.sampling.schedulers import make_scheduler

    try:
        return scheduler if hires.sampler is None else make_scheduler(hires.sampler, model_config)
    except DifftrainError as reason:  # (a package it needs, a model it cannot sample)
        raise HiresError("sampler", f"hires sampler {hires.sampler}: {reason}") from None


def check_pass(scheduler, steps: int, strength: float) -> None:
    """Whether `scheduler` can take the second pass of `steps` at `strength`: its schedule within the model's
    timesteps, and a step to take."""
    from difftrain.sampling.schedulers import img2img_steps

    length, pass_strength = pass_steps(steps, strength)
    most = scheduler.config.num_train_timesteps
    if length > most:
        raise HiresError("strength", f"the hires pass's {steps} steps at strength {strength} make a schedule of "
                                     f"{length} steps, past the model's {most}; raise the strength")
    if img2img_steps(scheduler, length, pass_strength) < 1:
        raise HiresError("steps", f"the hires pass's {steps} step(s) at strength {strength} leave this sampler no "
                                  "step to take; raise the hires steps or the strength")


def model_upscaler(hires: Hires, folder: str | Path | None, paths: bool = True,
                   device: torch.device | str = "cpu") -> ImageUpscaler | None:
    """A hires fix's model upscaler (an A1111 name in `folder`, or where `paths` a file's path), loaded on `device`,
    so that a file that is no upscaler is refused before drawing; None for the upscalers without a model."""
    if hires.upscaler in UPSCALERS:
        return None
    try:
        return ImageUpscaler.find(hires.upscaler, folder, device, paths)
    except UpscalerError as reason:
        raise HiresError("upscaler", f"hires upscaler {hires.upscaler!r} is not one of {', '.join(UPSCALERS)}, nor "
                                     f"a model upscaler here: {reason}") from None


def upscale(pipe, latents: torch.Tensor, hires: Hires, target: Target,
            upscaler: ImageUpscaler | None = None, first=None) -> torch.Tensor:
    """The first pass's latents at the target size, cropped as A1111 crops them; `upscaler`: its model upscaler
    (model_upscaler), where it has one. An image upscaler decodes with `first` (the first pass's pipeline;
    default `pipe`) and encodes again with `pipe` (the second pass's: another VAE under a hires checkpoint)."""
    import torch

    if hires.upscaler in LATENT_UPSCALERS:
        mode, antialias = LATENT_UPSCALERS[hires.upscaler]
        latents = torch.nn.functional.interpolate(latents, size=target.latent_size, mode=mode, antialias=antialias)
    else:
        latents = _through_images(first or pipe, pipe, latents, upscaler or ImageUpscaler(hires.upscaler), target)
    ty, tx = target.truncate_y, target.truncate_x
    return latents[:, :, ty // 2:latents.shape[2] - (ty + 1) // 2, tx // 2:latents.shape[3] - (tx + 1) // 2]


def _through_images(decoder, encoder, latents: torch.Tensor, upscaler: ImageUpscaler, target: Target) -> torch.Tensor:
    """Decode, resize as A1111's resize_image does with that upscaler, encode again."""
    from difftrain.sampling.text2image import to_images, to_latents

    # (the encoder takes whole cells; A1111 encodes the odd size and loses the remainder)
    size = (target.latent_size[1] * target.cell, target.latent_size[0] * target.cell)
    lanczos = Image.Resampling.LANCZOS
    resized = []
    for image in to_images(decoder, latents):
        scale = max(target.width / image.width, target.height / image.height)
        if scale > 1:  # the upscaler's own passes, to whole 8 px cells (A1111's Upscaler)
            image = upscaler.enlarge(image, scale)
        for exact in ((target.width, target.height), size):  # resize_image's, then the encoder's whole cells
            image = image.resize(exact, lanczos) if image.size != exact else image
        resized.append(image)
    return to_latents(encoder, resized).to(latents.dtype)


def second_pass(runner, latents: torch.Tensor, conditioning, seeds: list[int], steps: int, guidance_scale: float,
                hires: Hires, target: Target, strength: float, autocast: torch.dtype | None = None,
                noise=None, scheduler=None, upscaler: ImageUpscaler | None = None, first=None,
                **hooks) -> list[Image.Image]:
    """The images of the hires pass over a first pass's `latents` (drawn at `steps` steps by `first`, whose VAE
    decodes them), drawn by `runner`: `first` itself, or with a hires checkpoint that model's.

    `scheduler`: the pass's own sampler (pass_scheduler), else the runner's;
    `conditioning`: the prompts encoded for the second pass's steps (schedule_steps of hires.steps or steps);
    `noise`: the first pass's variation seeds and ENSD (seed_noise.SeedNoise), which A1111 applies to this pass's
    noise too; `upscaler`: its model upscaler (model_upscaler); `hooks`: step callbacks, as the first pass had them."""
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline

    from difftrain.sampling.text2image import sample, to_images

    components = dict(runner.components, **({"scheduler": scheduler} if scheduler is not None else {}))
    img2img = StableDiffusionImg2ImgPipeline(**components, requires_safety_checker=False)
    img2img.set_progress_bar_config(**getattr(runner, "_progress_bar_config", {}))
    length, pass_strength = pass_steps(hires.steps or steps, strength)
    with torch.no_grad():
        upscaled = upscale(runner, latents, hires, target, upscaler, first)
    if (feature_cache := getattr(runner.unet, "feature_cache", None)) is not None:
        feature_cache.reset()  # DeepCache: its deep features are of the first pass's size
    latents = sample(img2img, conditioning, seeds, length, guidance_scale, autocast, noise, image=upscaled,
                     strength=pass_strength, **hooks)
    return to_images(img2img, latents)
