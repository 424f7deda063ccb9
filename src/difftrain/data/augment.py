"""Training-time augmentation (`data.augment`): random-resized crop, rotation, colour jitter.

Parameters mean what torchvision's transforms of the same name mean (torchvision itself is
not used: PIL and numpy only):

- RandomResizedCrop(scale, ratio): up to 10 tries draw an area share uniformly from `scale`
  and an aspect ratio log-uniformly from `ratio`; the first crop of that area and ratio that
  fits the image is placed uniformly at random (integer box); if none fits, the central
  crop of the whole image clamped to the ratio range. The crop is then resized to the output
  size (bicubic and antialiased, as every resize here). One difference: `ratio` is relative
  to the output's own aspect (a bucket's shape), so 1 means undistorted in a 2:1 bucket too;
  for square outputs this is torchvision's ratio.
- RandomRotation(degrees): an angle uniform in [-degrees, +degrees], counter-clockwise about
  the centre, as PIL's `Image.rotate`. Unlike torchvision (which fills the corners with
  black) the view is zoomed in just enough that the rotated frame holds only image pixels.
- ColorJitter(brightness, contrast, saturation, hue): factors uniform in [max(0, 1-b), 1+b]
  (likewise contrast and saturation) and a hue shift uniform in [-h, h] (h <= 0.5, in turns
  of the hue circle), applied in a random order, each as torchvision's PIL path does it:
  brightness blends with black, contrast with the grey mean of the image, saturation with
  its greyscale (ITU-R 601-2 luma), hue shifts the H channel of PIL's HSV (mod 256).

Order per sample: crop (random-resized, or the plain centre/random crop of `data.crop`),
rotation, flip, then colour jitter. Every draw comes from the item's `random.Random`, which
the data set seeds from (seed, epoch, index), so resume redraws exactly the same views.
A conditioning image (ControlNet) takes the same crop, rotation and flip through `place`;
colour jitter is the training image's alone, since a mask or an edge map is not a photo.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance

from difftrain.data.transforms import CropPlan, apply_plan, plan_crop, resample_box, source_box

RRC_TRIES = 10  # torchvision's RandomResizedCrop.get_params
KERNEL_REACH = 2  # pixels: bicubic's support radius, so a patch's edge never stands in for the image beyond it


@dataclass(frozen=True)
class Augment:
    """The settings of `data.augment`; a zero (or None) turns its augmentation off."""

    crop_scale: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    rotation: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    probability: float = 1.0


@dataclass(frozen=True)
class AugmentPlan:
    """What `render` does to one image, decided from its size and the rng alone.

    `box` is (left, top, right, bottom) in the source image's own pixels, before any resize;
    `jitter` lists (adjustment, factor) in the order they are applied.
    """

    box: tuple[float, float, float, float]
    angle: float
    flipped: bool
    jitter: tuple[tuple[str, float], ...]


# ----------------------------------------------------------------------------- planning
def plan_view(image_size: tuple[int, int], size: tuple[int, int], crop: str, flip: bool,
              augment: Augment | None, rng: random.Random) -> CropPlan | AugmentPlan:
    """The plain crop plan without augmentation (the very draws it always made, so a run without
    `data.augment` is unchanged), else the augmentation plan."""
    if augment is None or (augment.probability < 1 and rng.random() >= augment.probability):
        return plan_crop(image_size, size, crop, flip, rng)
    if augment.crop_scale is not None:
        box = random_resized_box(image_size, size, augment.crop_scale, augment.crop_ratio, rng)
    else:
        box = source_box(image_size, plan_crop(image_size, size, crop, False, rng))
    flipped = flip and rng.random() < 0.5
    angle = rng.uniform(-augment.rotation, augment.rotation) if augment.rotation else 0.0
    return AugmentPlan(box, angle, flipped, plan_jitter(augment, rng))


def random_resized_box(image_size: tuple[int, int], size: tuple[int, int], scale: tuple[float, float],
                       ratio: tuple[float, float], rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, with `ratio` relative to the output's aspect."""
    width, height = image_size
    aspect = size[0] / size[1]
    low, high = ratio[0] * aspect, ratio[1] * aspect
    area = width * height
    for _ in range(RRC_TRIES):
        target = area * rng.uniform(*scale)
        shape = math.exp(rng.uniform(math.log(low), math.log(high)))
        w, h = round(math.sqrt(target * shape)), round(math.sqrt(target / shape))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            return left, top, left + w, top + h
    w, h = width, height
    if width / height < low:
        h = round(width / low)
    elif width / height > high:
        w = round(height * high)
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def plan_jitter(augment: Augment, rng: random.Random) -> tuple[tuple[str, float], ...]:
    """ColorJitter.get_params: a random order of the adjustments in use, then their factors."""
    ranges = {
        "brightness": (max(0.0, 1 - augment.brightness), 1 + augment.brightness),
        "contrast": (max(0.0, 1 - augment.contrast), 1 + augment.contrast),
        "saturation": (max(0.0, 1 - augment.saturation), 1 + augment.saturation),
        "hue": (-augment.hue, augment.hue),
    }
    used = [name for name, (low, high) in ranges.items() if low != high]
    order = rng.sample(used, len(used))
    factors = {name: rng.uniform(*ranges[name]) for name in used}
    return tuple((name, factors[name]) for name in order)


# ----------------------------------------------------------------------------- rendering
def render(image: Image.Image, size: tuple[int, int], plan: CropPlan | AugmentPlan) -> Image.Image:
    """The training image of `plan` at `size` (width, height): geometry, then colour."""
    image = place(image, size, plan)
    if isinstance(plan, AugmentPlan):
        for name, factor in plan.jitter:
            image = adjust(image, name, factor)
    return image


def place(image: Image.Image, size: tuple[int, int], plan: CropPlan | AugmentPlan,
          resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
    """Crop, rotate and flip as `plan` says, no colour: for an image and its conditioning image alike."""
    if isinstance(plan, CropPlan):
        return apply_plan(image, size, plan, resample)
    if plan.angle:
        image = rotated_view(image, plan.box, size, plan.angle, resample)
    else:
        image = resample_box(image, plan.box, size, resample)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if plan.flipped else image


def rotation_zoom(image_size: tuple[int, int], box: tuple[float, float, float, float], size: tuple[int, int],
                  angle: float) -> float:
    """The least zoom (>= 1) about the box's centre at which the view rotated by `angle` lies inside the image.

    Zooming instead of filling keeps black corners out of training (a model learns whatever it
    is shown, black wedges included), and it takes only what the image lacks: a crop with room
    around it rotates unzoomed, a full-image crop is cut to its largest inscribed rotated frame.
    """
    (width, height), (w, h) = image_size, size
    scale_x, scale_y = (box[2] - box[0]) / w, (box[3] - box[1]) / h  # source pixels per output pixel
    centre_x, centre_y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    cos, sin = abs(math.cos(math.radians(angle))), abs(math.sin(math.radians(angle)))
    # Half the rotated frame's bounding box, and the room to the nearest border, in output pixels.
    reach_x, reach_y = (cos * w + sin * h) / 2, (sin * w + cos * h) / 2
    room_x, room_y = min(centre_x, width - centre_x) / scale_x, min(centre_y, height - centre_y) / scale_y
    return max(1.0, reach_x / room_x, reach_y / room_y)


def rotated_view(image: Image.Image, box: tuple[float, float, float, float], size: tuple[int, int],
                 angle: float, resample: Image.Resampling) -> Image.Image:
    """The view of `box` at `size`, rotated by `angle` degrees counter-clockwise about its centre (PIL's sense).

    Two steps: the patch the rotated view covers is first resized to the view's scale (an
    antialiased resize: PIL's affine transform samples points, and would alias when a large
    image is shrunk), then rotated by an affine transform at that scale.
    """
    w, h = size
    zoom = rotation_zoom(image.size, box, size, angle)
    step_x, step_y = (box[2] - box[0]) / w / zoom, (box[3] - box[1]) / h / zoom  # source pixels per patch pixel
    centre_x, centre_y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    # Half the rotated view's bounding box, plus the 2 pixels a bicubic kernel reads beyond a point.
    reach_x, reach_y = (abs(cos) * w + abs(sin) * h) / 2 + KERNEL_REACH, (abs(sin) * w + abs(cos) * h) / 2 + KERNEL_REACH
    # The patch lies on the grid of the whole image resized to the view's scale, so a view at the
    # image's own scale on whole pixels is copied, not interpolated: then it is PIL's rotate exactly.
    region = (max(0.0, math.floor(centre_x / step_x - reach_x) * step_x),
              max(0.0, math.floor(centre_y / step_y - reach_y) * step_y),
              min(float(image.width), math.ceil(centre_x / step_x + reach_x) * step_x),
              min(float(image.height), math.ceil(centre_y / step_y + reach_y) * step_y))
    patch_size = round((region[2] - region[0]) / step_x), round((region[3] - region[1]) / step_y)
    patch = resample_box(image, region, patch_size, resample)
    # Output pixel p -> patch: (p - centre) turned as Image.rotate maps its output to its input.
    kx, ky = patch_size[0] / (region[2] - region[0]), patch_size[1] / (region[3] - region[1])  # per source pixel
    a, b, d, e = kx * step_x * cos, -kx * step_x * sin, ky * step_y * sin, ky * step_y * cos
    c = kx * (centre_x - region[0]) - a * w / 2 - b * h / 2
    f = ky * (centre_y - region[1]) - d * w / 2 - e * h / 2
    return patch.transform(size, Image.Transform.AFFINE, (a, b, c, d, e, f), resample=resample)


def adjust(image: Image.Image, name: str, factor: float) -> Image.Image:
    """One ColorJitter adjustment, as torchvision's functional PIL path computes it."""
    if name == "brightness":
        return ImageEnhance.Brightness(image).enhance(factor)
    if name == "contrast":
        return ImageEnhance.Contrast(image).enhance(factor)
    if name == "saturation":
        return ImageEnhance.Color(image).enhance(factor)
    return shift_hue(image, factor)


def shift_hue(image: Image.Image, factor: float) -> Image.Image:
    """Hue turned by `factor` of the circle in PIL's 8-bit HSV, wrapping (torchvision's adjust_hue for PIL)."""
    hue, saturation, value = image.convert("HSV").split()
    # int() truncates toward zero as torchvision's float -> uint8 cast does; % 256 is its wrap-around.
    turned = (np.asarray(hue, dtype=np.int32) + int(factor * 255)) % 256
    hue = Image.fromarray(turned.astype(np.uint8), "L")
    return Image.merge("HSV", (hue, saturation, value)).convert(image.mode)
