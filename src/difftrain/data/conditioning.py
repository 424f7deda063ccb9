"""Conditioning images (ControlNet): where a record's comes from, and how it follows its image.

A record's conditioning image is a file it carries (see folder.ConditioningFiles) or, when
the data holds none, the training image itself; a preprocessor may then turn it into what
the model reads (canny edges, a depth map, a pose). It goes through exactly the transform
its image goes through - the same cover-resize, crop box and flip, and with data.augment the
same random-resized crop and rotation (colour jitter is the image's alone) - so an edge or a mask
stays on the pixels it describes. A conditioning image of another size but the same shape as its
image (a half-size map) is first scaled to the image's size, then cropped with it; one of another
shape is skipped and reported, as it cannot line up. Preprocessors run after the
crop, at the training size: the same order `difftrain generate` uses, so a model sees at
inference the edges it was trained on. Values are [0, 1], as diffusers' ControlNet
pipelines feed them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from difftrain.data.augment import AugmentPlan, place
from difftrain.data.folder import DatasetError
from difftrain.data.images import BadImage, load_image_bytes
from difftrain.data.transforms import CropPlan

PASS_THROUGH = ("none", "mask", "segmentation")  # the file is the condition as it is
# Model-based annotators, through controlnet_aux, with weights from a local folder.
ANNOTATORS = {"depth": "MidasDetector", "pose": "OpenposeDetector", "lineart": "LineartDetector"}
PREPROCESSORS = (*PASS_THROUGH, "canny", *ANNOTATORS)
# Label maps must keep their exact colours: no interpolated in-between labels at the edges.
NEAREST = ("mask", "segmentation")


@dataclass(frozen=True)
class Preprocess:
    """What turns a (cropped) conditioning image into the condition: a name and its settings."""

    name: str = "none"
    low_threshold: int = 100  # canny
    high_threshold: int = 200
    annotator_path: str | None = None  # depth / pose / lineart: a local folder with the annotator's weights

    def check(self, where: str) -> None:
        if self.name not in PREPROCESSORS:
            raise DatasetError(f"{where} = {self.name!r}: choose one of {', '.join(PREPROCESSORS)}")
        if self.name in ANNOTATORS:
            annotator(self.name, self.annotator_path, where)  # fails now, not at the first batch (then cached)

    @property
    def computes(self) -> bool:
        """Whether it makes a condition from any image (so the training image can be its input)."""
        return self.name not in PASS_THROUGH

    @property
    def colour_managed(self) -> bool:
        """Whether the file is turned to sRGB by its ICC profile: not a label map, whose colours are the labels."""
        return self.name not in NEAREST

    @property
    def resample(self) -> Image.Resampling:
        return Image.Resampling.NEAREST if self.name in NEAREST else Image.Resampling.BICUBIC

    def tag(self) -> list:
        """What a cached condition depends on besides its image (annotator weights by folder name)."""
        return [self.name, self.low_threshold, self.high_threshold, self.annotator_path,
                *(["rgb"] if self.name == "canny" else []),  # canny's maps once came from grey
                *(["unmanaged"] if not self.colour_managed else [])]  # label maps were once converted to sRGB

    def __call__(self, image: Image.Image) -> Image.Image:
        if self.name == "canny":
            return canny(image, self.low_threshold, self.high_threshold)
        if self.name in ANNOTATORS:
            size = image.size
            result = annotator(self.name, self.annotator_path)(
                image, detect_resolution=min(size), image_resolution=min(size))
            return result.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        return image


def canny(image: Image.Image, low: int, high: int) -> Image.Image:
    """OpenCV's Canny edges, white on black, as the ControlNet canny models were trained on: of the colour
    image, as the original annotator, A1111 and controlnet_aux run it (OpenCV takes each pixel's strongest
    channel gradient), so an edge between two colours of equal brightness is found."""
    import cv2

    edges = cv2.Canny(np.asarray(image.convert("RGB")), low, high)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def annotator(name: str, path: str | None, where: str = "preprocess"):
    """controlnet_aux's detector for `name`, its weights read from the local folder `path` (once per process)."""
    if not path:
        raise DatasetError(f"{where} = {name}: set the annotator's weights folder (a local copy of "
                           "lllyasviel/Annotators); nothing is downloaded during training")
    try:
        import controlnet_aux  # noqa: F401
    except ImportError:
        raise DatasetError(f"{where} = {name} needs the controlnet_aux package (pip install controlnet_aux, "
                           "which brings torchvision); or precompute the conditioning images and use "
                           "preprocess none") from None
    return _load_annotator(name, path)


@lru_cache(maxsize=4)
def _load_annotator(name: str, path: str):
    import controlnet_aux

    return getattr(controlnet_aux, ANNOTATORS[name]).from_pretrained(path)


# A1111's ControlNet resize modes by our short names. Training crops, so "crop" is what models learn from.
RESIZE_MODES = {"crop": "Crop and Resize", "resize": "Just Resize", "fill": "Resize and Fill"}


def condition_image(image: Image.Image, size: tuple[int, int], preprocess: Preprocess,
                    resize: str = "crop") -> Image.Image:
    """A whole conditioning image as a model reads it at `size` (masks resized nearest): "crop" covers the
    size and cuts out the middle, "resize" stretches it, then the preprocessor runs; "fill" fits it inside,
    preprocessed, and pads the rest with the median colour of its border, as A1111's extension does (padding
    first would draw an edge along the seam). Validation pairs, `difftrain generate` and its measures all use
    this."""
    from difftrain.data.transforms import center_crop

    if resize == "crop":
        return preprocess(center_crop(image, size, preprocess.resample))
    if resize == "resize":
        return preprocess(image.resize(size, preprocess.resample))
    scale = min(size[0] / image.width, size[1] / image.height)
    inner = preprocess(image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                    preprocess.resample)).convert("RGB")
    pixels = np.asarray(inner)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    canvas = Image.new("RGB", size, tuple(int(v) for v in np.median(border, axis=0)))
    canvas.paste(inner, ((size[0] - inner.width) // 2, (size[1] - inner.height) // 2))
    return canvas


def load_condition(path: str, preprocess: Preprocess) -> Image.Image:
    """A conditioning image file decoded for `preprocess`: a label map without its colour profile."""
    from difftrain.data.images import load_image

    return load_image(path, colour_managed=preprocess.colour_managed)


def at_processor_res(image: Image.Image, resolution: int, preprocess: Preprocess) -> Image.Image:
    """The whole image's condition made at `resolution` (its short side), as A1111's extension runs a preprocessor
    at "Preprocessor Resolution" before the map is fitted to the drawing (condition_image); an edge map is then
    thresholded back to binary (`binarised`, as the extension's high_quality_resize does, without its thinning)."""
    scale = resolution / min(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resample = Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.BOX  # cv2's INTER_CUBIC / INTER_AREA
    return preprocess(image.convert("RGB").resize(size, resample))


def binarised(image: Image.Image) -> Image.Image:
    """A resized binary map (edges) back to black and white at Otsu's threshold."""
    import cv2

    grey = np.asarray(image.convert("L"))
    _, binary = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return Image.fromarray(np.stack([binary] * 3, axis=-1))


def _same_shape(size: tuple[int, int], other: tuple[int, int]) -> bool:
    """Whether `size` scales onto `other` within rounding: a pixel, or 1 % of the side."""
    scaled_width = size[0] * other[1] / size[1]
    return abs(scaled_width - other[0]) <= max(1.0, 0.01 * other[0])


def grey(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (N)CHW RGB as uint8 one-channel grey, exactly as PIL's convert("L") gives it at inference (ITU-R
    601-2 luma in PIL's 16-bit fixed point)."""
    red, green, blue = pixels.to(torch.int32).unbind(-3)
    return ((red * 19595 + green * 38470 + blue * 7471 + 0x8000) >> 16).to(torch.uint8).unsqueeze(-3)


def to_unit_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 CHW: how conditions are built and cached; the batch divides by 255."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


class Conditions:
    """Each record's conditioning image, decoded and transformed with its image.

    `from_records`: the records carry a file each; otherwise the image is its own input
    and the preprocessor must compute something from it.
    """

    def __init__(self, preprocess: Preprocess, from_records: bool, max_pixels: int, source_kind: str = "folder",
                 column: str = "conditioning_image"):
        if not from_records and not preprocess.computes:
            if source_kind in ("laion", "webdataset"):
                raise DatasetError(
                    f"no conditioning images: data.source = {source_kind} carries none (conditioning files are "
                    "read beside folder, jsonl and hf sources); export the data with `difftrain data build --format "
                    "folder`, or use a preprocess that computes them from the images (canny)")
            if source_kind == "hf":
                raise DatasetError(
                    f"no conditioning images: the data set has no column {column!r} (conditioning_column); name "
                    "its column of conditioning images, or use a preprocess that computes them from the images "
                    "(canny)")
            raise DatasetError(
                f"no conditioning images: no record names one in the conditioning column {column!r} "
                "(conditioning_column) and no conditioning folder is set; add the column (e.g. "
                f"\"{column}\": \"conditioning/0001.png\" in metadata.jsonl), set the folder, or a preprocess that "
                "computes them from the images (canny)")
        self.preprocess, self.from_records, self.max_pixels = preprocess, from_records, max_pixels

    def load(self, record, image: Image.Image) -> Image.Image:
        """The record's conditioning image as stored; raises BadImage naming it if it cannot be read."""
        if not self.from_records:
            return image
        if record.conditioning is None:
            raise BadImage(f"{record.key}: no conditioning image")
        try:
            condition = load_image_bytes(record.conditioning, self.max_pixels, self.preprocess.colour_managed)
        except BadImage as reason:
            raise BadImage(f"its conditioning image: {reason}") from None
        if not _same_shape(condition.size, image.size):
            shown = (f"its conditioning image is {condition.width}x{condition.height}, "
                     f"the image {image.width}x{image.height}")
            if _same_shape(condition.size, image.size[::-1]):
                # A map made from the stored pixels of a photo that EXIF turns upright (or the reverse).
                raise BadImage(f"{shown} upright: one of them is turned a quarter (EXIF rotation applied to one "
                               "only); save both upright")
            # Stretched onto its image, an edge or a mask would land off the pixels it describes.
            raise BadImage(f"{shown}: another shape, so they cannot line up; crop or pad both alike")
        return condition

    def transform(self, condition: Image.Image, image_size: tuple[int, int], size: tuple[int, int],
                  plan: CropPlan | AugmentPlan) -> torch.Tensor:
        """uint8 CHW at `size`: stretched to its image's size if it differs, then `plan`, then the preprocessor."""
        if condition.size != image_size:
            condition = condition.resize(image_size, self.preprocess.resample)
        return to_unit_tensor(self.preprocess(place(condition, size, plan, self.preprocess.resample)))

    def digest(self, record) -> bytes:
        """What a cached condition of this record depends on besides size and flip."""
        data = record.conditioning if self.from_records and record.conditioning is not None else b""
        return hashlib.sha256(data).digest()
