"""A1111's infotext: the generation settings stored in a PNG's `parameters` text chunk.

The layout, written by AUTOMATIC1111's `create_infotext` and read by its
`parse_generation_parameters` (and by every tool that imports A1111 images):

    a castle on a hill, sunset
    Negative prompt: blurry, lowres
    Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: 6ce0161689

The prompt (any number of lines), then an optional `Negative prompt:` line (which may also
run over several lines), then one line of `Key: value` pairs joined by ", ". A value
holding a comma, a colon or a newline is written as a JSON string.

A1111's quirks, kept on both sides so that text moves between the two unchanged:

- The last line counts as parameters only if it holds at least three `Key: value` pairs;
  otherwise it is part of the prompt. `format_infotext` therefore refuses one or two.
- Prompt lines are stripped of surrounding spaces, and a prompt line that starts with
  `Negative prompt:` starts the negative prompt.
- A value equal to its key is written as the bare key (A1111 does this for flags), which
  the parser then skips, as A1111's does.
- Sizes are `WxH`: `parse_size` turns one into (width, height); `typed_params` does it for
  `Size` and converts the other well-known numbers.

Where A1111's writer loses a value its own parser would otherwise change (an empty value,
surrounding spaces, a value in quotes), this writer quotes it; A1111 reads those back the
same, so the output stays A1111's format.
"""

from __future__ import annotations

import json
import re
from typing import BinaryIO
from pathlib import Path

from difftrain.atomic import atomic_path
from difftrain.errors import DifftrainError

PARAMETERS_KEY = "parameters"  # the PNG text chunk A1111 writes and reads
NEGATIVE = "Negative prompt:"

# A1111's own patterns (modules/infotext_utils.py): a pair is a key of word characters,
# spaces, '-' or '/', then either a JSON string or everything up to the next comma.
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_KEY = re.compile(r"\w[\w \-/]+")
_SIZE = re.compile(r"^(\d+)x(\d+)$")

# Well-known keys and their types, for `typed_params`; sizes become (width, height).
TYPES: dict[str, type] = {
    "Steps": int,
    "CFG scale": float,
    "Seed": int,
    "Subseed": int,
    "Subseed strength": float,
    "Denoising strength": float,
    "Clip skip": int,
    "Hires steps": int,
    "Hires upscale": float,
    "Eta": float,
    "ENSD": int,
}
SIZES = ("Size", "Hires resize", "First pass size")


class InfotextError(DifftrainError):
    pass


def _needs_quotes(text: str) -> bool:
    if "," in text or ":" in text or "\n" in text:  # A1111's rule
        return True
    # What A1111's parser would read differently if left bare.
    return text == "" or text != text.strip() or text.startswith('"')


def quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False) if _needs_quotes(text) else text


def unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:  # A1111 keeps what is not valid JSON as it stands
        return text


def _value_text(key: str, value) -> str:
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return f"{value[0]}x{value[1]}"
    if isinstance(value, (tuple, list, dict, set)):
        raise InfotextError(f"infotext value for {key!r} must be text or a number, not {type(value).__name__}")
    return str(value)


def recorded_path(spec: str) -> str:
    """A file or folder as an infotext records it for --from-png: absolute where it is a local one (a relative path
    found nothing when --from-png ran from another folder), else as given (a hub id, a name)."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def format_infotext(prompt: str, negative_prompt: str = "", params: dict | None = None) -> str:
    """The `parameters` text for one image, exactly as A1111 writes it.

    `params` keeps its order; None values are left out (as in A1111); a (width, height)
    pair becomes `WxH`. Numbers are written with str(): 7 gives "7", 7.0 gives "7.0".
    """
    pairs = []
    for key, value in (params or {}).items():
        if value is None:
            continue
        if not isinstance(key, str) or not _KEY.fullmatch(key) or key != key.strip():
            raise InfotextError(
                f"infotext key {key!r} cannot be read back: a key is two or more letters, digits, "
                "spaces, '_', '-' or '/', starting with a letter, digit or '_'"
            )
        text = _value_text(key, value)
        pairs.append(key if text == key else f"{key}: {quote(text)}")
    if 0 < len(pairs) < 3:
        raise InfotextError(
            f"infotext needs at least 3 parameters, got {len(pairs)} ({', '.join(pairs)}): "
            "A1111 reads a shorter last line as part of the prompt"
        )
    negative = f"\n{NEGATIVE} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{', '.join(pairs)}".strip()


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, params) from a `parameters` text, the way A1111 reads it.

    Values are strings, unquoted but otherwise as written (`Size` stays "512x768"); see
    `typed_params` for numbers. Unlike A1111 no UI defaults are added, and an empty value
    is kept as "" where A1111 drops the key.
    """
    *lines, last = text.strip().split("\n")
    if len(_PAIR.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    done_with_prompt = False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE):
            done_with_prompt = True  # for good: a later line with the prefix loses it, as in A1111
            line = line[len(NEGATIVE):].strip()
        (negative if done_with_prompt else prompt).append(line)
    params = {key: unquote(value) for key, value in _PAIR.findall(last)}
    return _join(prompt), _join(negative), params


def _join(lines: list[str]) -> str:
    # A1111 adds the "\n" only once the text so far is not empty, so leading blank lines go.
    text = ""
    for line in lines:
        text += ("" if text == "" else "\n") + line
    return text


def parse_size(value: str) -> tuple[int, int]:
    """Turn "512x768" into (512, 768)."""
    match = _SIZE.match(value.strip())
    if match is None:
        raise InfotextError(f"not a size: {value!r} (expected WIDTHxHEIGHT, e.g. 512x768)")
    return int(match.group(1)), int(match.group(2))


def typed_params(params: dict[str, str]) -> dict[str, object]:
    """params with the well-known numbers converted and sizes as (width, height)."""
    typed: dict[str, object] = dict(params)
    for key, value in params.items():
        try:
            if key in SIZES:
                typed[key] = parse_size(value)
            elif key in TYPES:
                typed[key] = TYPES[key](value)
        except ValueError:
            raise InfotextError(f"infotext {key}: {value!r} is not a {TYPES[key].__name__}") from None
    return typed


def _png_info(infotext: str | dict[str, str]):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, text in ({PARAMETERS_KEY: infotext} if isinstance(infotext, str) else infotext).items():
        info.add_text(key, text)  # tEXt when Latin-1 will do, iTXt (UTF-8) otherwise
    return info


def text_chunks(data: bytes) -> dict[str, str]:
    """A PNG's text chunks (those after the image data too), {} for other images or bytes PIL cannot read:
    what A1111 keeps on an image it postprocesses."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return dict(getattr(image, "text", {}))  # (PNG's `text` reads the chunks after the image data too)
    except Exception:  # (the image's own decode reports what is wrong with it)
        return {}


def write_png(image, path: str | Path, infotext: str | dict[str, str]) -> Path:
    """Save a PIL image as PNG with `infotext` in its `parameters` chunk (or {key: text} chunks), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=_png_info(infotext))
    return path


def png_bytes(image, infotext: str | dict[str, str]) -> bytes:
    """The PNG `write_png` would write, in memory (what a server sends)."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=_png_info(infotext))
    return buffer.getvalue()


def read_png_infotext(source: str | Path | BinaryIO, name: str | None = None) -> str:
    """The `parameters` text of a PNG written by A1111, difftrain or any tool that follows them (a file, or
    `name`d bytes in a file object)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(source) if isinstance(source, (str, Path)) else source
    name = name or str(path)
    try:
        with Image.open(path) as image:
            image.load()  # text chunks after the image data are read only with it
            text = getattr(image, "text", {}).get(PARAMETERS_KEY)
            kind = image.format
    except FileNotFoundError:
        raise InfotextError(f"{name}: no such file") from None
    except UnidentifiedImageError:
        raise InfotextError(f"{name}: not an image") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InfotextError(f"{name}: cannot be read ({exc})") from None
    if kind != "PNG":
        raise InfotextError(f"{name}: a {kind} image; infotext is read from PNG files only")
    if text is None:
        raise InfotextError(
            f"{name}: no {PARAMETERS_KEY!r} text chunk (not saved by A1111 or difftrain, or its metadata was stripped)"
        )
    return text
