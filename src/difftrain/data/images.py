"""Decoding one image file into a clean RGB picture, or saying exactly why not.

Every oddity a scraped folder (or a shard's record) holds ends here as either an RGB
`PIL.Image` or a `BadImage` with a one-line reason; nothing from deep inside PIL reaches
the user. Pixels are in sRGB: an embedded colour profile (a phone's Display P3, a camera's
Adobe RGB, a print CMYK) is applied, as browsers and viewers apply it. Sizes can also be read
from the header alone, which is what indexing a large data set for aspect-ratio buckets needs.
"""

from __future__ import annotations

import io
import warnings
import zlib
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
from PIL import ExifTags, Image, ImageCms, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif")
# What a decode means; caches of what is computed from decoded pixels (latents) key on it.
# "srgb": embedded colour profiles applied (before, a profile was ignored).
DECODE_VERSION = "srgb"
# What a header-only size means; caches of sizes read from headers (shard and table indexes) key on it.
# "tiff-upright": a TIFF's EXIF orientation no longer turned a second time (Pillow's reader already has).
HEADER_SIZE_VERSION = "tiff-upright"


class BadImage(Exception):
    """A file that cannot become a training image; str() is the reason."""


def _to_rgb(image: Image.Image, transparent: int | None = None) -> Image.Image:
    """RGB; `transparent`: the grey value a 16-bit PNG marks transparent (its tRNS), white here as alpha is."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float greyscale: scale the real range to 8 bits instead of clipping at 255. A 16-bit image
        # is always out of 65535 (a dark one too); "I" (32-bit) is how PIL opens some 16-bit PNGs as well, and
        # says nothing of its range: out of 65535 when a value needs it, else out of 255.
        # float32 and in place: a 64-megapixel frame is 256 MB a copy (float64 copies took ~2 GB in one worker).
        array = np.array(image, dtype=np.float32)
        clear = array == transparent if isinstance(transparent, int) and mode != "F" else None
        if mode != "F":
            array /= 65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0
        np.clip(array, 0.0, 1.0, out=array)
        array *= 255.0
        array += 0.5
        if clear is not None:
            array[clear] = 255.0
        return Image.fromarray(array.astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):  # (one colour marked transparent came as RGBA: _decode)
        # Transparent pixels become white, as most viewers show them, not black garbage.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # L, 1, P, CMYK, YCbCr, LAB, HSV: PIL's converters are exact enough.
    return image.convert("RGB")


@lru_cache(maxsize=32)
def _to_srgb(profile: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """The transform from an embedded profile to sRGB for images of `mode`; None for an sRGB profile (nothing to
    do) and for one that is damaged or does not fit the mode: the picture is then taken as stored, as for EXIF."""
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        if ImageCms.getProfileDescription(source).strip().lower().startswith("srgb"):
            return None
        # Perceptual, the profile's default intent and what viewers use for photos.
        output = "RGBA" if mode == "RGBA" else "RGB"
        return ImageCms.buildTransform(source, ImageCms.createProfile("sRGB"), mode, output)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None


def _in_srgb(image: Image.Image, profile: bytes | None) -> Image.Image:
    transform = _to_srgb(profile, image.mode) if profile and image.mode in ("RGB", "RGBA", "CMYK", "L") else None
    if transform is None:
        return image
    try:
        return ImageCms.applyTransform(image, transform)
    except (ImageCms.PyCMSError, ValueError):
        return image


def allow_pixels(max_pixels: int) -> None:
    """Let PIL open images up to `max_pixels` (data.max_image_pixels above its default): PIL refuses any image past
    twice its own limit (~179M pixels) before our check runs, so a larger limit set by the user did nothing. The
    limit only ever grows, process-wide; our own check (check_size) still applies everywhere."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and max_pixels > 2 * limit:
        Image.MAX_IMAGE_PIXELS = -(-max_pixels // 2)


def check_size(width: int, height: int, max_pixels: int, limit: str = "data.max_image_pixels") -> None:
    """Raise BadImage for a size no training image should have; the header alone tells. `limit`: what the user
    calls `max_pixels`."""
    if width < 1 or height < 1:
        raise BadImage(f"degenerate size {width}x{height}")
    if width * height > max_pixels:
        raise BadImage(f"{width}x{height} pixels exceeds {limit}={max_pixels} (possible decompression bomb)")


def load_image(path: str | Path, max_pixels: int = 64_000_000, colour_managed: bool = True) -> Image.Image:
    """Open, fully decode and normalise `path` to an upright RGB image (in sRGB, from its ICC profile, unless not
    `colour_managed`: a label map's colours are labels, which a conversion would shift).

    Raises BadImage for empty, truncated, unreadable or oversized files.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BadImage(f"cannot read file: {exc.strerror}") from None
    if size == 0:
        raise BadImage("empty file (0 bytes)")
    return _decode(path, max_pixels, colour_managed)


def load_image_bytes(data: bytes, max_pixels: int = 64_000_000, colour_managed: bool = True) -> Image.Image:
    """`load_image` for encoded bytes held in memory (a shard record): same checks, same result."""
    if not data:
        raise BadImage("empty image (0 bytes)")
    return _decode(io.BytesIO(data), max_pixels, colour_managed)


def check_decodes(data: bytes, max_pixels: int = 64_000_000) -> None:
    """Raise BadImage unless the whole image decodes, cheaply: a JPEG at 1/8 scale (libjpeg still reads every
    byte, so truncation and broken data show), for a check that need not keep the pixels."""
    if not data:
        raise BadImage("empty image (0 bytes)")
    with _opened(io.BytesIO(data), "decode") as image:
        check_size(*image.size, max_pixels)
        if image.format == "JPEG":
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
        image.load()


def image_size_from_bytes(data: bytes) -> tuple[int, int]:
    """(width, height) as `load_image_bytes` would return it, from the header only (no pixel decode)."""
    if not data:
        raise BadImage("empty image (0 bytes)")
    return _header_size(io.BytesIO(data))


def image_size_from_file(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file from its header, reading a few KB rather than the whole file."""
    try:
        with open(path, "rb") as file:
            return _header_size(file)
    except OSError as exc:
        raise BadImage(f"cannot read file: {exc.strerror}") from None


@contextmanager
def _opened(source: str | Path | BinaryIO, failing: str) -> Iterator[Image.Image]:
    """Image.open with every PIL failure turned into a one-line BadImage ("cannot <failing>: ...")."""
    try:
        with warnings.catch_warnings():
            # PIL warns, then errors, past its own limit; callers apply ours explicitly.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                yield image
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image PIL can identify") from None
    except Image.DecompressionBombError as exc:
        raise BadImage(f"decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Truncated data, broken chunks and bad headers all surface as one of these.
        raise BadImage(f"cannot {failing}: {exc}") from None


# EXIF orientation -> the transpose that makes the picture upright (ImageOps.exif_transpose's table).
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


def _orientation(image: Image.Image) -> int | None:
    try:
        # The base getexif reads what open() (or load()) parsed; PNG's own would decode the pixels.
        return Image.Image.getexif(image).get(ExifTags.Base.Orientation)
    except Exception:  # a broken EXIF block is not a broken picture: take the stored orientation
        return None


def _header_size(source: BinaryIO) -> tuple[int, int]:
    with _opened(source, "read header") as image:
        width, height = image.size
        # Pillow's TIFF reader gives the upright size on open already (and turns the pixels as it loads them).
        orientation = _orientation(image) if image.format != "TIFF" else None
        trailing = image.format == "PNG" and orientation is None and "exif" not in image.info
    if trailing:  # a PNG may keep its EXIF after the pixels, where open() does not look (load() does)
        orientation = _png_trailing_orientation(source)
    # Orientations 5-8 turn the picture a quarter, so the upright image is height x width.
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


# How much of a PNG's end is searched for an eXIf chunk after its pixels: EXIF blocks are a few KB (64 KB at most in a
# JPEG, where they come from); reading the tail alone keeps a header-only size from reading the whole file.
PNG_TAIL_BYTES = 1 << 16


def _png_trailing_orientation(source: BinaryIO) -> int | None:
    """The orientation in an eXIf chunk after a PNG's image data, found in the file's last PNG_TAIL_BYTES (a chunk
    whose CRC checks, so compressed pixels that happen to spell "eXIf" are not taken); None without one. Decoding
    sees it (load() reads the chunks after IDAT), so a header-only size must too, or the bucket and the decoded
    image disagree by a quarter turn. Walking the chunks instead read the whole file (libpng writes 8 KB IDATs):
    x34 the header's time against x2.7 for the tail (benchmarks/header_size.py, 3 MB PNGs, warm cache)."""
    try:
        end = source.seek(0, io.SEEK_END)
        source.seek(max(8, end - PNG_TAIL_BYTES))
        tail = source.read()
        at = tail.rfind(b"eXIf")
        while at >= 4:
            length = int.from_bytes(tail[at - 4:at], "big")
            body, crc = tail[at + 4:at + 4 + length], tail[at + 4 + length:at + 8 + length]
            if len(body) == length and crc == zlib.crc32(b"eXIf" + body).to_bytes(4, "big"):
                exif = Image.Exif()
                exif.load(body)
                return exif.get(ExifTags.Base.Orientation)
            at = tail.rfind(b"eXIf", 0, at)
    except Exception:  # a damaged tail is the decode's to report; the header's size stands
        return None
    return None


def _decode(source: str | Path | BinaryIO, max_pixels: int, colour_managed: bool = True) -> Image.Image:
    with _opened(source, "decode") as image:
        check_size(*image.size, max_pixels)
        image.seek(0)  # first frame of an animated GIF/WebP
        image.load()
        # Transposed here rather than by ImageOps.exif_transpose, which rewrites the EXIF block and raised
        # struct.error on a damaged one (past every except above: a whole scan or run stopped on one photo).
        orientation = _orientation(image)
        upright = image.transpose(UPRIGHT[orientation]) if orientation in UPRIGHT else image
        if "transparency" in image.info and upright.mode in ("P", "RGB", "L"):
            # One colour marked transparent: as alpha before the colour transform, which keeps no such mark.
            upright = upright.convert("RGBA")
        profile = image.info.get("icc_profile") if colour_managed else None
        return _to_rgb(_in_srgb(upright, profile), image.info.get("transparency")).copy()