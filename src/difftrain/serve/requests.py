"""The request bodies of A1111's `/sdapi/v1/txt2img` and `img2img`, as its clients send them.

Clients send every field A1111 knows (webuiapi sends ~50); the ones we do not implement
are accepted at their defaults and refused, naming the field, when they ask for something
(face restoration, scripts, inpainting masks). Limits are the
server's, checked before a job is queued.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import math
from dataclasses import dataclass, fields
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from difftrain.errors import DifftrainError


class RequestError(DifftrainError):
    """A request that cannot be served as sent; `field` names what to change (HTTP 422)."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field, self.status = field, status


@dataclass
class Limits:
    max_width: int = 1024
    max_height: int = 1024
    max_steps: int = 150
    max_batch_size: int = 8
    max_n_iter: int = 16
    max_prompt_chars: int = 4000
    max_queue: int = 16
    max_body_bytes: int = 20 * 2**20


class _A1111Body(BaseModel):
    # No infinity or NaN in a number field (JSON's 1e400 parses as infinity): a job drew, and then its answer
    # could not be written as JSON.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, body: Any) -> Any:
        """A1111 declares every field optional, so clients send `"seed": null` for "the default"."""
        return {key: value for key, value in body.items() if value is not None} if isinstance(body, dict) else body


CHURN_DEFAULTS = {"s_churn": 0, "s_tmin": 0, "s_tmax": 0, "s_noise": 1}
# A1111 settings a request may override that would change its image, which difftrain does not draw: their
# defaults (what a request may send).
OVERRIDES_REFUSED = {"s_min_uncond": 0, "token_merging_ratio": 0, "token_merging_ratio_hr": 0}
# The eta a sampler draws with when the request gives none: DDIM's, then the ancestral and SDE samplers'.
ETA_SETTINGS = ("eta_ddim", "eta_ancestral")


class Txt2ImgRequest(_A1111Body):
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    sampler_name: Optional[str] = None
    sampler_index: Optional[str] = None  # older clients' name for sampler_name
    scheduler: Optional[str] = None  # A1111 1.9+ schedule type: Automatic, Karras, Exponential, Uniform
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    batch_size: int = 1
    n_iter: int = 1
    override_settings: dict[str, Any] = Field(default_factory=dict)
    send_images: bool = True
    save_images: bool = False
    denoising_strength: float = 0.75  # the hires pass's (txt2img), img2img's
    enable_hr: bool = False  # A1111's hires fix (generate/hires.py)
    hr_scale: float = 2.0
    hr_upscaler: Optional[str] = None  # None: Latent, A1111's default mode
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_sampler_name: Optional[str] = None  # None (or "Use same sampler"): the first pass's
    hr_scheduler: Optional[str] = None
    hr_prompt: str = ""  # "": the first pass's
    hr_negative_prompt: str = ""
    # Accepted so clients can send them; refused when they ask for something (see `check`).
    hr_checkpoint_name: Optional[str] = None
    firstphase_width: int = 0
    firstphase_height: int = 0
    restore_faces: Optional[bool] = False
    tiling: Optional[bool] = False
    refiner_checkpoint: Optional[str] = None
    refiner_switch_at: Optional[float] = None
    # k-diffusion's churn (Euler, Heun, DPM2): A1111's defaults as webuiapi sends them (s_tmax 0 meaning no limit)
    s_churn: Optional[float] = None
    s_tmin: Optional[float] = None
    s_tmax: Optional[float] = None
    s_noise: Optional[float] = None
    # A1111's eta: DDIM's (its "Eta DDIM", default 0) reaches DDIM; an ancestral or SDE sampler draws only its
    # default, 1 (what webuiapi sends whatever the sampler); None: the sampler's own
    eta: Optional[float] = None
    subseed: int = -1  # A1111's variation seed (sampling/seed_noise.py)
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    script_name: Optional[str] = None
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)  # ControlNet units only (serve/control.py)
    disable_extra_networks: bool = False  # the prompt's <lora:...> tags are removed and not applied
    override_settings_restore_afterwards: bool = True
    # Refused when they ask for something (see `check`): A1111's negative-prompt skipping, and its ways of taking
    # a request's settings from an infotext or its first pass from an image.
    s_min_uncond: Optional[float] = None
    infotext: Optional[str] = None
    firstpass_image: Optional[str] = None

    def check(self, limits: Limits) -> None:
        for field, value, top in (("width", self.width, limits.max_width), ("height", self.height, limits.max_height)):
            if not 64 <= value <= top or value % 8:
                raise RequestError(field, f"{value}: must be a multiple of 8 from 64 to {top}")
        for field, value, top in (("steps", self.steps, limits.max_steps),
                                  ("batch_size", self.batch_size, limits.max_batch_size),
                                  ("n_iter", self.n_iter, limits.max_n_iter)):
            if not 1 <= value <= top:
                raise RequestError(field, f"{value}: must be from 1 to {top} on this server")
        for field in ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt"):
            if len(getattr(self, field)) > limits.max_prompt_chars:
                raise RequestError(field, f"longer than this server's {limits.max_prompt_chars} characters")
        if not 0 <= self.cfg_scale <= 30:
            raise RequestError("cfg_scale", f"{self.cfg_scale}: must be from 0 to 30")
        for field in ("seed", "subseed"):  # the last image's is 2**32 - 1
            if not -1 <= getattr(self, field) <= 2**32 - self.batch_size * self.n_iter:
                raise RequestError(field, f"{getattr(self, field)}: -1 (random) or from 0 to 2**32 - batch_size * "
                                          "n_iter")
        if not 0 <= self.subseed_strength <= 1:
            raise RequestError("subseed_strength", f"{self.subseed_strength}: from 0 to 1")
        for field, side, top in zip(("seed_resize_from_w", "seed_resize_from_h"), self.seed_resize_from or (),
                                    (limits.max_width, limits.max_height)):
            if not 8 <= side <= top:
                raise RequestError(field, f"{side}: from 8 to {top} on this server (-1: off)")
        check_clip_skip(self.override_settings.get("CLIP_stop_at_last_layers"),
                        "override_settings.CLIP_stop_at_last_layers")
        check_ensd(self.override_settings.get("eta_noise_seed_delta"), "override_settings.eta_noise_seed_delta")
        unsupported = [("restore_faces", self.restore_faces, "face restoration"), ("tiling", self.tiling, "tiling"),
                       ("script_name", self.script_name, "scripts"),
                       ("firstphase_width", self.firstphase_width or self.firstphase_height,
                        "the pre-1.0 hires fix (first phase size); give width, height and hr_scale or hr_resize_x/y")]
        unsupported += [("refiner_checkpoint", self.refiner_checkpoint not in (None, "", "None"), "the refiner"),
                        ("s_min_uncond", self.s_min_uncond, "skipping the negative prompt (s_min_uncond)"),
                        ("infotext", self.infotext, "taking the settings from an infotext"),
                        ("firstpass_image", self.firstpass_image, "a hires fix from a given first pass"),
                        ("override_settings_restore_afterwards", self.override_settings and
                         not self.override_settings_restore_afterwards, "keeping a request's override_settings "
                         "(POST them to /sdapi/v1/options to keep them)")]
        for name, default in OVERRIDES_REFUSED.items():
            if self.override_settings.get(name, default) != default:
                raise RequestError(f"override_settings.{name}", f"{self.override_settings[name]!r}: not served by "
                                                                f"difftrain; leave it at {default!r}")
        for name in ETA_SETTINGS:
            value = self.override_settings.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise RequestError(f"override_settings.{name}", f"{value!r}: a number from 0 to 1")
        unsupported += [(name, getattr(self, name) not in (None, default), "stochastic churn (s_churn, s_tmin, "
                         f"s_tmax, s_noise: {', '.join(map(str, CHURN_DEFAULTS.values()))})")
                        for name, default in CHURN_DEFAULTS.items()]
        for field, value, what in unsupported:
            if value:
                raise RequestError(field, f"{what} is not served by difftrain; leave it at its default")
        if not isinstance(self, Img2ImgRequest) and any(name.lower() == SOFT_INPAINTING for name in
                                                        self.alwayson_scripts):
            raise RequestError("alwayson_scripts", "soft inpainting is img2img's (A1111 has it in its inpaint tab)")
        if self.enable_hr:
            self._check_hires(limits)
        if self.save_images:
            raise RequestError("save_images", "this server keeps no images; they are returned in the response")

    def soft_inpainting(self):
        """A1111's Soft Inpainting script's settings from `alwayson_scripts` (sampling/soft_inpaint.py), None when
        not sent or off: {"soft inpainting": {"args": [enabled, schedule bias, preservation strength, transition
        contrast boost, mask influence, difference threshold, difference contrast]}}, the numbers left out taking
        A1111's defaults (as its API fills a short list)."""
        from difftrain.sampling.soft_inpaint import SoftInpainting

        entry = next((value for name, value in self.alwayson_scripts.items() if name.lower() == SOFT_INPAINTING), None)
        if entry is None:
            return None
        field = f"alwayson_scripts.{SOFT_INPAINTING}.args"
        args = entry.get("args") if isinstance(entry, dict) else None
        numbers = args[1:] if isinstance(args, list) else []
        if not isinstance(args, list) or not args or len(numbers) > 6 or not all(
                isinstance(number, (int, float)) and not isinstance(number, bool) for number in numbers):
            raise RequestError(field, "a list: [enabled, schedule bias, preservation strength, transition contrast "
                                      "boost, mask influence, difference threshold, difference contrast]")
        if not args[0]:
            return None
        settings = SoftInpainting(*map(float, numbers))
        for name, why in settings.problems()[:1]:
            index = [setting.name for setting in fields(SoftInpainting)].index(name) + 1  # (after `enabled`)
            raise RequestError(f"{field}[{index}]", f"{name.replace('_', ' ')} {why}")
        return settings

    def _check_hires(self, limits: Limits) -> None:
        if not 0.0 < self.denoising_strength <= 1.0:
            raise RequestError("denoising_strength", f"{self.denoising_strength}: the hires pass's, in (0, 1]")
        if not 0 <= self.hr_second_pass_steps <= limits.max_steps:
            raise RequestError("hr_second_pass_steps", f"{self.hr_second_pass_steps}: 0 (the steps') to "
                                                       f"{limits.max_steps} on this server")
        with self.hires_fields():
            width, height = self.hires.check(self.width, self.height, max(limits.max_width, limits.max_height)).size
        if width > limits.max_width or height > limits.max_height:
            raise RequestError(self.hires_sizing_field,
                               f"the hires fix draws {width}x{height}: this server draws at most "
                               f"{limits.max_width}x{limits.max_height}")

    @property
    def hires_sizing_field(self) -> str:
        """The field that sets the hires fix's size: hr_scale, or hr_resize_x/y when they are given."""
        return "hr_scale" if (self.hr_resize_x, self.hr_resize_y) == (0, 0) else "hr_resize_x"

    @contextlib.contextmanager
    def hires_fields(self):
        """A hires fix refused names the request's field for what to change."""
        from difftrain.generate.hires import HiresError

        fields = {"upscaler": "hr_upscaler", "steps": "hr_second_pass_steps", "resize": "hr_resize_x",
                  "checkpoint": "hr_checkpoint_name",
                  "strength": "denoising_strength", "sampler": "hr_sampler_name", "prompt": "hr_prompt"}
        try:
            yield
        except HiresError as reason:
            raise RequestError(fields.get(reason.setting, self.hires_sizing_field), str(reason)) from None

    @property
    def seed_resize_from(self) -> tuple[int, int] | None:
        """(width, height) the seeds' noise is drawn at, as A1111 reads the two: on where both are above 0."""
        size = (self.seed_resize_from_w, self.seed_resize_from_h)
        return size if min(size) > 0 else None

    @property
    def hires(self):
        """The hires fix asked for, or None."""
        from difftrain.generate.hires import Hires, same_checkpoint

        if not self.enable_hr:
            return None
        return Hires(scale=self.hr_scale, resize=(self.hr_resize_x, self.hr_resize_y),
                     upscaler=self.hr_upscaler or "Latent", steps=self.hr_second_pass_steps, sampler=self.hr_sampler,
                     prompt=self.hr_prompt, negative_prompt=self.hr_negative_prompt,
                     checkpoint=same_checkpoint(self.hr_checkpoint_name or ""))

    @property
    def hr_sampler(self) -> str | None:
        """The hires pass's own sampler, resolved (A1111: hr_sampler_name or the sampler, in hr_scheduler or the
        schedule type), or None where it is the first pass's."""
        from difftrain.sampling.schedulers import SCHEDULERS, resolve_name

        same = (None, "", "Use same sampler", "Use same scheduler")
        sampler = self.hr_sampler_name if self.hr_sampler_name not in same else None
        schedule = self.hr_scheduler if self.hr_scheduler not in same else None
        if sampler is None and schedule is None:
            return None
        try:
            first = resolve_name(self.sampler, self.scheduler or (None if self.sampler in SCHEDULERS else "Automatic"))
        except DifftrainError as reason:
            raise RequestError("sampler_name", str(reason)) from None
        name = sampler or self.sampler
        # A1111's hr_scheduler defaults to the request's schedule type, which its API takes from an old-style sampler
        # name ("DPM++ 2M Karras") when none (or Automatic) is sent.
        suffix = next((kind for kind in ("Karras", "Exponential") if self.sampler.endswith(f" {kind}")), None)
        first_schedule = self.scheduler if (self.scheduler or "automatic").lower() != "automatic" else suffix
        try:
            resolve_name(name)
        except DifftrainError as reason:
            raise RequestError("hr_sampler_name" if sampler else "sampler_name", str(reason)) from None
        try:
            resolved = resolve_name(name, schedule or first_schedule or (None if name in SCHEDULERS else "Automatic"))
        except DifftrainError as reason:
            raise RequestError("hr_scheduler" if schedule else "hr_sampler_name", str(reason)) from None
        return None if resolved == first else resolved

    @property
    def sampler(self) -> str:
        return self.sampler_name or self.sampler_index or "Euler"  # A1111's API default (sampler_index)


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] = Field(default_factory=list)
    resize_mode: int = 0
    # Inpainting (generate/inpaint.py), with A1111's API defaults: "Only masked" with no padding, masked content 0.
    mask: Optional[str] = None
    mask_blur: Optional[int] = None  # both sides' blur when given
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    inpainting_fill: int = 0  # fill, original, latent noise, latent nothing
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: Optional[float] = None
    mask_round: bool = True  # A1111 1.8+: the binary mask and latent mask rounded
    include_init_images: bool = False  # the response's parameters echo init_images and mask (A1111: not by default)

    def check(self, limits: Limits) -> None:
        if self.enable_hr:  # (A1111's img2img has no such field: a client sends it to txt2img)
            raise RequestError("enable_hr", "the hires fix is txt2img's; img2img draws at width x height")
        super().check(limits)
        if len(self.init_images) != 1:
            raise RequestError("init_images", f"{len(self.init_images)} images: give exactly one")
        if self.initial_noise_multiplier not in (None, 1.0):  # (A1111 scales img2img's noise with or without a mask)
            raise RequestError("initial_noise_multiplier", f"{self.initial_noise_multiplier}: only 1 (A1111's "
                                                           "default) is served")
        if self.mask:
            self.check_inpainting()
        self.soft_inpainting()  # (sent without a mask, it does nothing, as in A1111; but it must be well formed)
        if self.resize_mode not in (0, 1, 2, 3):
            raise RequestError("resize_mode", f"{self.resize_mode}: 0 just resize, 1 crop and resize, 2 resize and "
                                              "fill, 3 just resize (latent upscale)")
        if self.resize_mode == 3 and self.mask:
            raise RequestError("resize_mode", "3 (latent upscale) resizes the image's latents, which a mask and "
                                              "the original laid back do not follow: give 0-2 with a mask")
        if not 0.0 < self.denoising_strength <= 1.0:
            raise RequestError("denoising_strength", f"{self.denoising_strength}: must be in (0, 1]")
        # (the image itself is decoded once, and the steps the sampler takes checked, by the engine's precheck)

    @property
    def blur(self) -> tuple[int, int]:
        return (self.mask_blur, self.mask_blur) if self.mask_blur is not None else (self.mask_blur_x, self.mask_blur_y)

    def check_inpainting(self) -> None:
        for name, value in (("mask_blur", self.mask_blur), ("mask_blur_x", self.mask_blur_x),
                            ("mask_blur_y", self.mask_blur_y)):
            if value is not None and not 0 <= value <= 64:
                raise RequestError(name, f"{value}: from 0 to 64 px")
        if self.blur[0] != self.blur[1]:
            raise RequestError("mask_blur_y", f"{self.blur[1]} beside mask_blur_x {self.blur[0]}: one blur for both "
                                              "sides is served; send mask_blur")
        if self.inpainting_fill not in range(4):
            raise RequestError("inpainting_fill", f"{self.inpainting_fill}: 0 fill, 1 original, 2 latent noise, 3 "
                                                  "latent nothing")
        if not 0 <= self.inpaint_full_res_padding <= 256:
            raise RequestError("inpaint_full_res_padding", f"{self.inpaint_full_res_padding}: from 0 to 256 px")
        if self.inpainting_mask_invert not in (0, 1):
            raise RequestError("inpainting_mask_invert", f"{self.inpainting_mask_invert}: 0 (inpaint masked) or 1 "
                                                         "(inpaint not masked)")
        if not self.mask_round and self.soft_inpainting() is None:
            raise RequestError("mask_round", "false: an unrounded mask is served with soft inpainting only (which "
                                             "rounds none)")


EXTRAS_MAX_SIDE = 4096  # an upscaled image's sides at most (A1111 has no limit; a server needs one)


class ExtrasRequest(_A1111Body):
    """A1111's Extras (ExtrasBaseRequest): its Upscale part; face restoration is refused."""

    resize_mode: int = 0  # 0: upscaling_resize times; 1: to upscaling_resize_w x upscaling_resize_h
    show_extras_results: bool = True
    gfpgan_visibility: float = 0.0
    codeformer_visibility: float = 0.0
    codeformer_weight: float = 0.0
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = 0.0
    upscale_first: bool = False

    def check(self) -> None:
        for field in ("gfpgan_visibility", "codeformer_visibility"):
            if getattr(self, field) > 0:
                raise RequestError(field, "face restoration is not served by difftrain; leave it at 0")
        if self.resize_mode not in (0, 1):
            raise RequestError("resize_mode", f"{self.resize_mode}: 0 (upscaling_resize times) or 1 (to "
                                              "upscaling_resize_w x upscaling_resize_h)")
        if not 0 <= self.extras_upscaler_2_visibility <= 1:
            raise RequestError("extras_upscaler_2_visibility", f"{self.extras_upscaler_2_visibility}: from 0 to 1")

    @property
    def size(self) -> tuple[int, int] | None:
        return (self.upscaling_resize_w, self.upscaling_resize_h) if self.resize_mode == 1 else None

    def check_output(self, width: int, height: int) -> None:
        """The upscaled size of a width x height image within EXTRAS_MAX_SIDE (the field to change named)."""
        size = self.size or (int(width * self.upscaling_resize), int(height * self.upscaling_resize))
        field = "upscaling_resize" if self.resize_mode == 0 else "upscaling_resize_w"
        if max(size) > EXTRAS_MAX_SIDE:
            raise RequestError(field, f"{width}x{height} upscaled to {size[0]}x{size[1]}: this server upscales to "
                                      f"at most {EXTRAS_MAX_SIDE} px a side")
        if min(size) < 1:
            raise RequestError(field, f"{width}x{height} resized to {size[0]}x{size[1]}: an image needs a pixel a "
                                      "side")


class ExtrasSingleImageRequest(ExtrasRequest):
    image: str = ""


class ExtrasFile(BaseModel):
    data: str
    name: str = ""


class ExtrasBatchImagesRequest(ExtrasRequest):
    imageList: list[ExtrasFile] = Field(default_factory=list)  # noqa: N815 (A1111's field name)

    def decoded_images(self) -> list:
        """The batch's images, decoded once the headers say that all of them together hold no more pixels than
        one request image may (a 4096 x 4096 PNG of one colour is 78 KB of base64: a 20 MB body held 268)."""
        from difftrain.data.images import BadImage, image_size_from_bytes

        if not self.imageList:
            raise RequestError("imageList", "no images: send at least one {data, name}")
        files, total = [], 0
        for i, item in enumerate(self.imageList):
            files.append(decode_base64(item.data, f"imageList[{i}].data"))
            try:
                width, height = image_size_from_bytes(files[-1])
            except BadImage as reason:
                raise RequestError(f"imageList[{i}].data", str(reason)) from None
            total += width * height
        if total > REQUEST_MAX_PIXELS:
            raise RequestError("imageList", f"{len(self.imageList)} images of {total:,} pixels in all: a batch holds "
                                            f"at most {REQUEST_MAX_PIXELS:,}, one 4096x4096 image's; send it in parts")
        return [image_from_bytes(data, f"imageList[{i}].data", keep_text=True) for i, data in enumerate(files)]


def check_ensd(value, field: str) -> None:
    """A1111's eta_noise_seed_delta, per request or for the server: unset, or an integer."""
    if value is not None and not (type(value) is int and abs(value) < 2**32):  # (not a JSON true)
        raise RequestError(field, f"{value!r}: an integer")


def check_clip_skip(value, field: str) -> None:
    """A1111's CLIP_stop_at_last_layers, per request or for the server: unset, or 1 to 12."""
    if value is not None and not (isinstance(value, int) and 1 <= value <= 12):
        raise RequestError(field, f"{value!r}: an integer from 1 to 12")


SOFT_INPAINTING = "soft inpainting"  # the script's title, lower-cased as A1111's API matches script names

# A request's image (init image, control image) is decoded when the job is queued and held until it runs; a few
# KB of PNG can decode to gigabytes, so the cap is far below training's: 4096 x 4096, ~50 MB as RGB.
REQUEST_MAX_PIXELS = 4096 * 4096


def decode_image(text: str, field: str, colour_managed: bool = True, keep_text: bool = False):
    """A base64 image (raw or a data URL) as RGB (a label map's colours as stored: not `colour_managed`); URLs are
    never fetched. `keep_text`: its PNG text chunks in its `info` (A1111 keeps them on an image it upscales)."""
    return image_from_bytes(decode_base64(text, field), field, colour_managed, keep_text)


def image_from_bytes(data: bytes, field: str, colour_managed: bool = True, keep_text: bool = False):
    """`decode_image` of a file's bytes already decoded from base64."""
    from difftrain.data.images import BadImage, load_image_bytes
    from difftrain.generate.infotext import text_chunks

    try:
        image = load_image_bytes(data, REQUEST_MAX_PIXELS, colour_managed)
    except BadImage as reason:
        raise RequestError(field, str(reason)) from None
    if keep_text:
        image.info = text_chunks(data)
    return image


def decode_mask(text: str, field: str):
    """A base64 inpainting mask, its alpha kept (generate.inpaint.load_mask)."""
    import io

    from difftrain.generate.inpaint import InpaintError, load_mask

    try:
        return load_mask(io.BytesIO(decode_base64(text, field)), field, REQUEST_MAX_PIXELS)
    except InpaintError as reason:
        raise RequestError(field, str(reason).removeprefix(f"{field}: ")) from None


def decode_base64(text: str, field: str) -> bytes:
    """The bytes of a base64 file (raw or a data URL); URLs are never fetched."""
    if text.startswith(("http://", "https://", "file:")):
        raise RequestError(field, "images are sent as base64 or data URLs; this server fetches no URL")
    if text.startswith("data:"):
        text = text.split(",", 1)[-1]
    try:
        # Line breaks allowed (base64.encodebytes and many tools wrap at 76 characters), nothing else.
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(field, "not valid base64") from None
