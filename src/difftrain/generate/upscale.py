"""AUTOMATIC1111's model upscalers: found by the names its UI and PNGs use, run in its tiles, to its sizes.

A name is a file's stem in the upscalers folder (A1111 lists its ESRGAN folder so: "4x-UltraSharp"),
or one of A1111's Real-ESRGAN names ("R-ESRGAN 4x+" is RealESRGAN_x4plus.pth there); `generate` also
takes a file's path. The image goes through the network as A1111 1.8+ runs it (modules/upscaler_utils
`upscale_with_model` on the CPU path, images.split_grid and combine_grid): channels in BGR order,
tiles of 192 px overlapping by 8 (its ESRGAN_tile and ESRGAN_tile_overlap defaults), each tile's
output clipped and truncated to 8 bits, the tiles blended over the overlap with a linear mask; then
`Upscaler.upscale`'s loop: up to three passes until the image covers the target, a Lanczos resize to
it (each side floored to whole 8 px).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from PIL import Image

from difftrain.errors import UpscalerError

if TYPE_CHECKING:
    import torch

SUFFIXES = (".safetensors", ".pth", ".pt")  # an upscaler's files (A1111's ESRGAN folder: .pth, .pt, .safetensors)
# A1111's image upscalers that need no model of their own (resize_image's "None": a plain Lanczos resize at the end).
IMAGE_UPSCALERS = {"None": None, "Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
TILE, OVERLAP = 192, 8  # A1111's ESRGAN_tile and ESRGAN_tile_overlap defaults
# A1111's Real-ESRGAN names and the files its realesrgan_model.py downloads for them.
REAL_ESRGAN = {
    "R-ESRGAN General 4xV3": "realesr-general-x4v3",
    "R-ESRGAN General WDN 4xV3": "realesr-general-wdn-x4v3",
    "R-ESRGAN AnimeVideo": "realesr-animevideov3",
    "R-ESRGAN 4x+": "RealESRGAN_x4plus",
    "R-ESRGAN 4x+ Anime6B": "RealESRGAN_x4plus_anime_6B",
    "R-ESRGAN 2x+": "RealESRGAN_x2plus",
}


def is_path(value: str) -> bool:
    """Whether an upscaler setting names a file rather than an A1111 name (a folder in it, or a weights suffix)."""
    return "/" in value or "\\" in value or value.lower().endswith(SUFFIXES)


def a1111_name(value: str) -> str:
    """The name A1111 knows an upscaler file by (its Real-ESRGAN name, else the stem); a name stays itself."""
    if not is_path(value):
        return value
    stem = Path(value).stem
    return next((name for name, file in REAL_ESRGAN.items() if file == stem), stem)


def upscaler_files(folder: str | Path | None) -> dict[str, Path]:
    """A1111 name -> file, for every upscaler file in `folder` and in its ESRGAN/ and RealESRGAN/ (so A1111's
    models folder works, without taking its checkpoints and LoRAs for upscalers)."""
    if folder is None:
        return {}
    places = [Path(folder), Path(folder) / "ESRGAN", Path(folder) / "RealESRGAN"]
    files = sorted(path for place in places if place.is_dir() for path in place.iterdir()
                   if path.suffix.lower() in SUFFIXES and path.is_file())
    return {a1111_name(str(path)): path for path in files}


def find_upscaler(value: str, folder: str | Path | None, paths: bool = True) -> Path:
    """The file an upscaler setting names: a path (where `paths`), or an A1111 name in `folder`."""
    if paths and is_path(value):
        if not Path(value).is_file():
            raise UpscalerError(f"upscaler {value} does not exist")
        if Path(value).suffix.lower() not in SUFFIXES:
            raise UpscalerError(f"upscaler {value}: give a {', '.join(SUFFIXES)} file")
        return Path(value)
    found = upscaler_files(folder)
    if value in found:
        return found[value]
    expected = f" ({REAL_ESRGAN[value]}.pth)" if value in REAL_ESRGAN else ""
    listed = f"; there: {', '.join(found)}" if found else ("" if Path(folder or ".").is_dir() else " (no such folder)")
    builtin = next((name for name in IMAGE_UPSCALERS if name.lower() == value.lower()), None)
    hint = f"; the built-in one is {builtin!r}" if builtin else f"; built in: {', '.join(IMAGE_UPSCALERS)}"
    raise UpscalerError(f"upscaler {value!r}: no such model file{expected} in {folder}{listed}{hint}")


@functools.lru_cache(maxsize=2)
def _loaded(path: Path, stamp: tuple[int, int]):
    from difftrain.models.upscalers import load_upscaler

    return load_upscaler(path)


def load(path: Path):
    """The network in `path`, kept while the file is unchanged (a server draws many images with one)."""
    stat = path.stat()
    return _loaded(path.resolve(), (stat.st_size, stat.st_mtime_ns))


def split_grid(image: Image.Image, tile: int, overlap: int) -> list[tuple[int, list[tuple[int, Image.Image]]]]:
    """A1111's images.split_grid: rows of (y, [(x, tile)]), spread evenly; an image smaller than a tile is one
    tile padded with black before it (A1111 crops from a negative offset)."""
    cols = max(1, math.ceil((image.width - overlap) / (tile - overlap)))  # (A1111 draws nothing at 8 px or less)
    rows = max(1, math.ceil((image.height - overlap) / (tile - overlap)))
    dx = (image.width - tile) / (cols - 1) if cols > 1 else 0
    dy = (image.height - tile) / (rows - 1) if rows > 1 else 0
    grid = []
    for row in range(rows):
        y = image.height - tile if int(row * dy) + tile >= image.height else int(row * dy)
        tiles = []
        for col in range(cols):
            x = image.width - tile if int(col * dx) + tile >= image.width else int(col * dx)
            tiles.append((x, image.crop((x, y, x + tile, y + tile))))
        grid.append((y, tiles))
    return grid


def combine_grid(grid: list, tile: int, size: tuple[int, int], overlap: int) -> Image.Image:
    """A1111's images.combine_grid: each tile pasted over the one before it through a linear ramp `overlap` wide."""
    import numpy as np

    ramp = (np.arange(overlap, dtype=np.float32) * 255 / overlap).astype(np.uint8)
    mask_w = Image.fromarray(np.repeat(ramp[None, :], tile, axis=0), "L")
    mask_h = Image.fromarray(np.repeat(ramp[:, None], size[0], axis=1), "L")
    combined = Image.new("RGB", size)
    for y, row in grid:
        line = Image.new("RGB", (size[0], tile))
        for x, piece in row:
            if x == 0:
                line.paste(piece, (0, 0))
                continue
            line.paste(piece.crop((0, 0, overlap, tile)), (x, 0), mask=mask_w)
            line.paste(piece.crop((overlap, 0, tile, tile)), (x + overlap, 0))
        if y == 0:
            combined.paste(line, (0, 0))
            continue
        combined.paste(line.crop((0, 0, size[0], overlap)), (0, y), mask=mask_h)
        combined.paste(line.crop((0, overlap, size[0], tile)), (0, y + overlap))
    return combined


def _run(network, image: Image.Image) -> Image.Image:
    """A1111's upscale_pil_patch: BGR in [0, 1] through the network, clipped and truncated to 8 bits, RGB again."""
    import numpy as np
    import torch

    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1].transpose(2, 0, 1)) / 255
    parameter = next(network.parameters())
    with torch.inference_mode():
        out = network(torch.from_numpy(bgr)[None].to(parameter.device, parameter.dtype))[0]
    pixels = np.clip(255.0 * np.moveaxis(out.float().cpu().numpy(), 0, 2), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(pixels[:, :, ::-1]), "RGB")


def upscale_once(network: torch.nn.Module, image: Image.Image, tile: int = TILE, overlap: int = OVERLAP,
                 progress: bool = False) -> Image.Image:
    """One pass of the network over `image` in A1111's tiles (tile 0: the whole image at once); `progress`: a bar
    over the tiles (a large image through a 4x ESRGAN takes minutes on a CPU)."""
    if tile <= 0:
        return _run(network, image)
    from tqdm.auto import tqdm

    grid = split_grid(image, tile, overlap)
    factor = None
    outputs = []
    with tqdm(total=sum(len(row) for _, row in grid), desc="tiles", unit="tile", leave=False,
              disable=not progress) as bar:
        for y, row in grid:
            pieces = []
            for x, piece in row:
                out = _run(network, piece)
                factor = out.width // piece.width
                pieces.append((x * factor, out))
                bar.update()
            outputs.append((y * factor, pieces))
    return combine_grid(outputs, tile * factor, (image.width * factor, image.height * factor), overlap * factor)


def upscale(one_pass: Callable[[Image.Image], Image.Image], image: Image.Image, scale: float) -> Image.Image:
    """A1111's Upscaler.upscale: `one_pass` (a model's, or a resize by `scale`) until the image covers `scale`
    times its size (at most three passes), then a Lanczos resize to that size floored to whole 8 px."""
    target = (int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8))
    if min(target) < 1:  # (PIL's resize refused it with a traceback, which stopped a batch)
        raise UpscalerError(f"{image.width}x{image.height} at scale {scale:g} is {target[0]}x{target[1]} once floored "
                            "to whole 8 px: give a larger scale")
    for index in range(3):
        if image.width >= target[0] and image.height >= target[1] and (index > 0 or scale != 1):
            break
        before = image.size
        image = one_pass(image)
        if image.size == before:
            break
    return image if image.size == target else image.resize(target, Image.Resampling.LANCZOS)


class ImageUpscaler:
    """One of A1111's image upscalers, ready to enlarge: None, Lanczos, Nearest or a model's network."""

    def __init__(self, name: str, network: torch.nn.Module | None = None):
        self.name, self.network = name, network

    @classmethod
    def find(cls, setting: str, folder: str | Path | None, device: torch.device | str = "cpu",
             paths: bool = True) -> ImageUpscaler:
        """The upscaler a setting names (find_upscaler), its network loaded on `device`."""
        if setting in IMAGE_UPSCALERS:
            return cls(setting)
        path = find_upscaler(setting, folder, paths)
        return cls(a1111_name(str(path)), load(path).to(device))

    @property
    def enlarges(self) -> bool:
        """False for A1111's "None", which gives the image back as it is."""
        return self.network is not None or IMAGE_UPSCALERS.get(self.name) is not None

    @property
    def scale(self) -> int | None:
        """The network's own factor (None for a resize)."""
        return None if self.network is None else self.network.scale

    def enlarge(self, image: Image.Image, scale: float, tile: int = TILE, overlap: int = OVERLAP,
                progress: bool = False) -> Image.Image:
        """A1111's Upscaler.upscale with this upscaler (its "None" gives the image back as it is)."""
        resample = IMAGE_UPSCALERS.get(self.name)
        if not self.enlarges:
            return image

        def one_pass(picture: Image.Image) -> Image.Image:
            if self.network is not None:
                return upscale_once(self.network, picture, tile, overlap, progress)
            return picture.resize((int(picture.width * scale), int(picture.height * scale)), resample=resample)

        return upscale(one_pass, image, scale)


def check_extras(first: ImageUpscaler, scale: float | None = None, size: tuple[int, int] | None = None,
                 tile: int = TILE, visibility: float = 0.0) -> float:
    """The scale `extras` enlarges by (the model's own where none is given), or the setting that cannot work."""
    by = scale if scale is not None else float(first.scale or 0)
    if size is None and not (0 < by <= 16 and math.isfinite(by)):
        raise UpscalerError(f"scale {scale}: from above 0 to 16" if scale is not None else
                            f"scale: {first.name} has no factor of its own; give one")
    if size is not None and not all(8 <= side <= 8192 for side in size):
        raise UpscalerError(f"resize {size[0]}x{size[1]}: each side from 8 to 8192 px")
    if tile < 0 or 0 < tile <= 2 * OVERLAP:
        raise UpscalerError(f"tile {tile}: 0 (the whole image at once) or above {2 * OVERLAP} px")
    if not 0 <= visibility <= 1:  # (Image.blend extrapolates past 1; A1111's slider is 0-1)
        raise UpscalerError(f"upscaler-2-visibility {visibility}: from 0 to 1")
    return by


def extras(image: Image.Image, first: ImageUpscaler, scale: float | None = None, size: tuple[int, int] | None = None,
           crop: bool = True, second: ImageUpscaler | None = None, visibility: float = 0.0,
           tile: int = TILE, progress: bool = False) -> tuple[Image.Image, dict]:
    """A1111's Extras "Upscale" (scripts/postprocessing_upscale.py): `image` enlarged `scale` times (default: the
    first model's own factor), or to cover `size` and, where `crop`, cut to it around the middle; a second
    upscaler's result blended in at `visibility`. Returns the image and the infotext A1111 writes for it."""
    params: dict = {}

    def enlarged(upscaler: ImageUpscaler) -> Image.Image:
        if size is not None:
            params["Postprocess upscale to"] = f"{size[0]}x{size[1]}"
            result = upscaler.enlarge(image, max(size[0] / image.width, size[1] / image.height), tile, OVERLAP,
                                      progress)
            if crop:
                canvas = Image.new("RGB", size)
                canvas.paste(result, (size[0] // 2 - result.width // 2, size[1] // 2 - result.height // 2))
                params["Postprocess crop to"] = f"{size[0]}x{size[1]}"
                result = canvas
            return result
        params["Postprocess upscale by"] = f"{by:g}"
        return upscaler.enlarge(image, by, tile, OVERLAP, progress)

    by = check_extras(first, scale, size, tile)
    if not first.enlarges:
        return image, {}  # A1111's "None" as Upscaler 1: the Upscale script does nothing
    result = enlarged(first)
    params["Postprocess upscaler"] = first.name
    if second is not None and second.enlarges and visibility > 0:  # (its "None" blended a smaller image: a traceback)
        result = Image.blend(result, enlarged(second).convert(result.mode), visibility)
        params["Postprocess upscaler 2"] = second.name
    return result, params


def postprocessing_text(params: dict) -> str:
    """A1111's "postprocessing" text: its extras' settings as `key: value` pairs."""
    from difftrain.generate.infotext import quote

    return ", ".join(f"{key}: {quote(str(value))}" for key, value in params.items())


def upscale_files(images: list[str | Path], out: str | Path, first: ImageUpscaler, progress: bool = True,
                  **settings) -> tuple[list[Path], list[tuple[str, str]]]:
    """`extras` over image files (a folder: its images), each written to `out` as PNG keeping its `parameters` text,
    with A1111's "postprocessing" text beside it. Returns (files written, (image, why) for each image skipped): one
    unreadable image does not stop the rest."""
    from tqdm.auto import tqdm

    from difftrain.data.images import IMAGE_EXTENSIONS, BadImage, load_image_bytes
    from difftrain.generate.infotext import PARAMETERS_KEY, text_chunks, write_png

    check_extras(first, settings.get("scale"), settings.get("size"), settings.get("tile", TILE),
                 settings.get("visibility", 0.0))  # before any work
    # A folder stands for its images (not those of folders under it), in name order.
    images = [path for source in map(Path, images) for path in (
        sorted(inside for inside in source.iterdir() if inside.suffix.lower() in IMAGE_EXTENSIONS and inside.is_file())
        if source.is_dir() else [source])]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    targets = _output_names(images, out)
    written, skipped = [], []
    for source, target in tqdm(list(zip(images, targets)), desc=f"upscaling ({first.name})", unit="img",
                               disable=not progress):
        try:
            data = Path(source).read_bytes()
            image = load_image_bytes(data)
            result, params = extras(image, first, progress=progress, **settings)
        except (OSError, BadImage, UpscalerError) as reason:
            skipped.append((str(source), reason.strerror if isinstance(reason, OSError) else str(reason)))
            continue
        # A1111 keeps the image's generation parameters beside what it did to it.
        texts = {key: text for key, text in text_chunks(data).items() if key == PARAMETERS_KEY}
        if params:
            texts["postprocessing"] = postprocessing_text(params)
        written.append(write_png(result, target, texts))
    return written, skipped


def _output_names(images: list[Path], out: Path) -> list[Path]:
    """Each image's output, `out/STEM.png`, chosen before anything is written: never an input (--out the inputs'
    folder: rgb.png would have been replaced, and read back upscaled), a file already there, or another image's
    (rgb.jpg beside rgb.png, or one name in two folders), which get -1, -2, ..."""
    inputs = {Path(image).resolve() for image in images}
    taken: set[Path] = set()
    names = []
    for image in images:
        stem, number = Path(image).stem, 0
        target = out / f"{stem}.png"
        while target.resolve() in inputs or target.resolve() in taken or target.exists():
            number += 1
            target = out / f"{stem}-{number}.png"
        taken.add(target.resolve())
        names.append(target)
    return names
