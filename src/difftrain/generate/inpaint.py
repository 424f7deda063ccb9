"""Inpainting as A1111's img2img inpaint tab draws it, with any Stable Diffusion model.

The mask (white: redraw) is made binary, blurred and resized as A1111 1.x does
(`StableDiffusionProcessingImg2Img.init`, with cv2's Gaussian blur itself); the masked
content is filled as its four modes fill it; "only masked" draws the mask's padded box at
the output size and pastes it back. While sampling, every denoised estimate keeps the init
image's latents outside the mask (A1111's CFGDenoiser blend, done here on the UNet's output:
the prediction is replaced by the one whose estimate is the init latents there), the final
latents are blended once more, and the decoded image is laid over the original through the
blurred mask, so what is outside the mask comes back pixel for pixel.

Inpainting models (sd-v1-5-inpainting's 9-channel UNet) are given the mask and the masked
image's latents too (sampling/text2image.image_conditioning), as A1111 gives them.

Soft inpainting (sampling/soft_inpaint.py) keeps the mask's greys instead of rounding them, and
lays the original over each result through a mask of how far that result's latents moved.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from difftrain.data.transforms import center_crop
from difftrain.errors import DifftrainError
from difftrain.sampling.soft_inpaint import SoftInpainting

log = logging.getLogger(__name__)

# A1111's "Masked content", in the order of its API's inpainting_fill (0-3).
FILLS = ("fill", "original", "latent noise", "latent nothing")
# A1111's img2img "Resize mode", in the order of its API's resize_mode (0-3).
LATENT_UPSCALE = "just resize (latent upscale)"  # the image's own-size latents, interpolated to the drawing size
RESIZE_MODES = ("just resize", "crop and resize", "resize and fill", LATENT_UPSCALE)


class InpaintError(DifftrainError):
    """A mask or inpainting setting that cannot work."""


def load_mask(source, name: str, max_pixels: int = 64_000_000) -> Image.Image:
    """The mask (a path or an open file) as it is, its alpha kept: a transparent-background mask marks the area by
    its alpha. `name` says where it came from in a refusal (a flag, a request field)."""
    from difftrain.data.images import BadImage, check_size

    try:
        with Image.open(source) as opened:
            check_size(*opened.size, max_pixels)
            image = ImageOps.exif_transpose(opened)
            image.load()
    except (OSError, ValueError, BadImage, Image.DecompressionBombError) as reason:
        raise InpaintError(f"{name}: not a mask this can read ({reason})") from None
    return image


def binary_mask(image: Image.Image, round_alpha: bool = True) -> Image.Image:
    """A1111's create_binary_mask: an image with any transparency is its alpha, cut at 128 (as it is without
    `round_alpha`: soft inpainting); anything else its luminance as it is. (A grey or palette image with
    transparency counts as RGBA, and a 16-bit one is scaled to 8 bits: A1111's convert("L") would clip its greys
    to white.)"""
    if image.mode in ("LA", "PA", "La") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = Image.fromarray((np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257).round().astype(np.uint8))
    if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
        alpha = image.split()[-1].convert("L")
        return alpha.point(lambda value: 255 if value > 128 else 0) if round_alpha else alpha
    return image.convert("L")


def blur_mask(mask: Image.Image, blur_x: int, blur_y: int) -> Image.Image:
    """cv2's Gaussian blur along x, then along y, with A1111's kernel size for each radius."""
    import cv2

    pixels = np.array(mask)
    if blur_x > 0:
        pixels = cv2.GaussianBlur(pixels, (2 * int(2.5 * blur_x + 0.5) + 1, 1), blur_x)
    if blur_y > 0:
        pixels = cv2.GaussianBlur(pixels, (1, 2 * int(2.5 * blur_y + 0.5) + 1), blur_y)
    return Image.fromarray(pixels)


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill": the masked area painted with ever finer blurs of the colours around it."""
    painted = Image.new("RGBA", image.size)
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            painted.alpha_composite(blurred)
    return painted.convert("RGB")


def crop_region(mask: Image.Image, padding: int) -> tuple[int, int, int, int] | None:
    """The box of the mask's non-zero pixels, `padding` wider on each side within the image; None for a blank mask."""
    box = mask.getbbox()
    if box is None or not padding:
        return box
    x1, y1, x2, y2 = box
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, mask.width), min(y2 + padding, mask.height)


def expand_crop_region(region: tuple[int, int, int, int], width: int, height: int, image_width: int,
                       image_height: int) -> tuple[int, int, int, int]:
    """A1111's expand_crop_region: the box grown on its short side to the drawing size's aspect, kept inside the
    image (a 128x32 box drawn at 512x512 becomes 128x128)."""
    x1, y1, x2, y2 = region
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _grown(y1, y2, (x2 - x1) / (width / height), image_height)
    else:
        x1, x2 = _grown(x1, x2, (y2 - y1) * (width / height), image_width)
    return x1, y1, x2, y2


def _grown(low: int, high: int, desired: float, limit: int) -> tuple[int, int]:
    difference = int(desired - (high - low))
    low, high = low - difference // 2, high + difference - difference // 2
    if high >= limit:
        low, high = low - (high - limit), limit
    if low < 0:
        low, high = 0, high - low
    return low, min(high, limit)


def resize_and_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """A1111's resize mode 2 ("Resize and fill"): fit inside, the bands left filled with the edge rows or columns
    stretched."""
    ratio, source_ratio = width / height, image.width / image.height
    source_w = width if ratio < source_ratio else image.width * height // image.height
    source_h = height if ratio >= source_ratio else image.height * width // image.width
    resized = image.resize((source_w, source_h), Image.Resampling.LANCZOS)
    result = Image.new(image.mode if image.mode in ("L", "RGB") else "RGB", (width, height))
    result.paste(resized, box=(width // 2 - source_w // 2, height // 2 - source_h // 2))
    if ratio < source_ratio and (band := height // 2 - source_h // 2) > 0:
        result.paste(resized.resize((width, band), box=(0, 0, width, 0)), box=(0, 0))
        result.paste(resized.resize((width, band), box=(0, resized.height, width, resized.height)),
                     box=(0, band + source_h))
    elif ratio > source_ratio and (band := width // 2 - source_w // 2) > 0:
        result.paste(resized.resize((band, height), box=(0, 0, 0, height)), box=(0, 0))
        result.paste(resized.resize((band, height), box=(resized.width, 0, resized.width, height)),
                     box=(band + source_w, 0))
    return result


def overlay_of(original: Image.Image, mask: Image.Image) -> Image.Image:
    """`original` where `mask` is black, transparent where white (RGBA): what is laid over a drawn image."""
    overlay = Image.new("RGBa", original.size)
    overlay.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    return overlay.convert("RGBA")


def resize_image(image: Image.Image, mode: str, width: int, height: int) -> Image.Image:
    """An init image (or its mask) at width x height by A1111's resize mode: stretched, cropped to the aspect
    (centre), or fitted inside with the edges stretched into the bands."""
    if mode == "crop and resize":
        return center_crop(image, (width, height), Image.Resampling.LANCZOS)
    if mode == "resize and fill":
        return resize_and_fill(image, width, height)
    return image.resize((width, height), Image.Resampling.LANCZOS)


@dataclass
class Inpainting:
    """One init image and mask made ready to draw at width x height."""
    image: Image.Image  # what the VAE encodes: the init image (cropped to the box, filled) at the drawing size
    mask: Image.Image  # the blurred mask at the drawing size: its latent-size cut is what is redrawn
    overlay: Image.Image  # the original outside the mask (RGBA, the init image's size), laid over each result
    paste_to: tuple[int, int, int, int] | None  # "only masked": where the drawn box goes back (x, y, w, h)
    fill: str
    original: Image.Image  # the init image at the overlay's size (soft inpainting lays it again)
    soft: SoftInpainting | None = None

    def latent_mask(self, height: int, width: int) -> torch.Tensor:
        """1 where the latents are redrawn, 0 where the init image's are kept: A1111's nmask (rounded, unless soft),
        (1, 1, h, w)."""
        reduced = np.asarray(self.mask.convert("RGB").resize((width, height)), dtype=np.float32)[:, :, 0] / 255
        return torch.from_numpy(reduced if self.soft is not None else np.around(reduced))[None, None]

    def latent_mask_for(self, pipe, pixels: torch.Tensor, latents: torch.Tensor):
        """What sampling needs of this inpainting (sampling/masked.LatentMask) for `pipe`, whose VAE turned `pixels`
        (this image, [-1, 1]) into `latents`: for an inpainting model, the masked image's conditioning too (A1111
        rounds the mask for it, unless soft)."""
        from difftrain.sampling.masked import LatentMask
        from difftrain.sampling.text2image import image_conditioning, is_inpainting_model

        size = tuple(latents.shape[-2:])
        conditioning = None
        if is_inpainting_model(pipe):
            mask = np.asarray(self.mask, dtype=np.float32) / 255
            mask = torch.from_numpy(mask if self.soft is not None else np.around(mask))[None, None]
            conditioning = image_conditioning(pipe, size, pixels, mask)
        return LatentMask(self.latent_mask(*size), self.fill, conditioning, self.soft)

    def fit(self, make) -> Image.Image:
        """An image to draw beside this one (a ControlNet's), `make(width, height)`: at the drawing size, or for
        "only masked" made at the init image's size and cut to the box as the init image is (A1111's ControlNet
        extension cuts its maps so)."""
        if self.paste_to is None:
            return make(*self.image.size)
        x, y, w, h = self.paste_to
        return resize_and_fill(make(*self.overlay.size).crop((x, y, x + w, y + h)), *self.image.size)

    def finish(self, image: Image.Image, changed: np.ndarray | None = None) -> Image.Image:
        """A drawn image put back: the box pasted where it came from, then the original laid over it. `changed`:
        soft inpainting's mask of this image (sampling/soft_inpaint.composite_masks), through which the original
        is laid instead of the painted mask (resized to the drawing, blurred and put into the box as A1111 does)."""
        overlay = self.overlay
        if changed is not None:
            mask = resize_and_fill(Image.fromarray(changed), *self.image.size).filter(ImageFilter.GaussianBlur(4))
            overlay = overlay_of(self.original, self._put_back(mask, Image.new("L", self.original.size)))
        if self.paste_to is not None:
            image = self._put_back(image, Image.new("RGBA", self.overlay.size))
        image = image.convert("RGBA")
        image.alpha_composite(overlay)
        return image.convert("RGB")

    def _put_back(self, drawn: Image.Image, base: Image.Image) -> Image.Image:
        """`drawn` (the drawing's size) on `base` where the box came from, or itself for the whole picture."""
        if self.paste_to is None:
            return drawn
        x, y, w, h = self.paste_to
        base.paste(center_crop(drawn, (w, h), Image.Resampling.LANCZOS), (x, y))  # A1111's resize mode 1
        return base


def prepare(init: Image.Image, mask: Image.Image, width: int, height: int, blur: tuple[int, int] = (4, 4),
            invert: bool = False, fill_mode: str = "original", only_masked: bool = False,
            padding: int = 32, soft: SoftInpainting | None = None,
            resize_mode: str = "just resize") -> Inpainting | None:
    """A1111's img2img init for an inpaint: `init` an RGB image, `mask` as loaded (white or opaque: redraw). None
    for a blank mask under "only masked", which A1111 too draws as plain img2img. `resize_mode` (RESIZE_MODES) brings
    the whole picture to the drawing size ("only masked" draws the box, resized and filled, as A1111 does)."""
    if fill_mode not in FILLS:
        raise InpaintError(f"masked content {fill_mode!r}: choose one of {', '.join(FILLS)}")
    if mask.size != init.size:  # A1111's canvas draws the mask on the image itself; a file of its own may differ
        mask = mask.resize(init.size, Image.Resampling.LANCZOS)
    mask = binary_mask(mask, round_alpha=soft is None)
    if invert:
        mask = ImageOps.invert(mask)
    mask = blur_mask(mask, *blur)
    region = crop_region(mask, padding) if only_masked else None
    if only_masked and region is None:
        log.warning("the mask is blank: \"only masked\" has no area to draw, so the whole image is drawn as img2img "
                    "(as A1111 does)")
        return None
    if region is not None:
        region = expand_crop_region(region, width, height, mask.width, mask.height)
        overlay_mask = mask
        mask = resize_and_fill(mask.crop(region), width, height)
        x1, y1, x2, y2 = region
        paste_to = (x1, y1, x2 - x1, y2 - y1)
        image = resize_and_fill(init.crop(region), width, height)
    else:
        mask = resize_image(mask, resize_mode, width, height).convert("L")
        overlay_mask = Image.fromarray(np.clip(np.asarray(mask, dtype=np.float32) * 2, 0, 255).astype(np.uint8))
        paste_to, init = None, resize_image(init, resize_mode, width, height)
        image = init
    if fill_mode != "original":
        image = fill(image, mask)
    return Inpainting(image, mask.convert("L"), overlay_of(init, overlay_mask), paste_to, fill_mode, init, soft)
