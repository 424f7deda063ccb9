"""Decoding one image file into a clean RGB picture, or saying exactly why not.

Every oddity a scraped folder holds ends here as either an RGB `PIL.Image` or a
`BadImage` with a one-line reason; nothing from deep inside PIL reaches the user.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


class BadImage(Exception):
    """A file that cannot become a training image; str() is the reason."""


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float greyscale: scale the real range to 8 bits instead of clipping at 255.
        array = np.asarray(image, dtype=np.float64)
        if mode != "F":
            array = array / (65535.0 if array.max() > 255 else 255.0)
        array = np.clip(array, 0.0, 1.0)
        return Image.fromarray((array * 255.0 + 0.5).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels become white, as most viewers show them, not black garbage.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # L, 1, P, CMYK, YCbCr, LAB, HSV: PIL's converters are exact enough.
    return image.convert("RGB")


def load_image(path: str | Path, max_pixels: int = 64_000_000) -> Image.Image:
    """Open, fully decode and normalise `path` to an upright RGB image.

    Raises BadImage for empty, truncated, unreadable or oversized files.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BadImage(f"cannot read file: {exc.strerror}") from None
    if size == 0:
        raise BadImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL warns, then errors, past its own limit; we apply ours explicitly below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width < 1 or height < 1:
                    raise BadImage(f"degenerate size {width}x{height}")
                if width * height > max_pixels:
                    raise BadImage(
                        f"{width}x{height} pixels exceeds data.max_image_pixels={max_pixels} "
                        "(possible decompression bomb)"
                    )
                image.seek(0)  # first frame of an animated GIF/WebP
                image.load()
                image = ImageOps.exif_transpose(image) or image
                return _to_rgb(image).copy()
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image PIL can identify") from None
    except Image.DecompressionBombError as exc:
        raise BadImage(f"decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Truncated data, broken chunks and bad headers all surface as one of these.
        raise BadImage(f"cannot decode: {exc}") from None
