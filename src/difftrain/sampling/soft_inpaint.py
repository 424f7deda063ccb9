"""A1111's soft inpainting (its built-in "Soft Inpainting" script, 1.8+): a blurred mask's grey edge blends.

Hard inpainting rounds the mask: each latent pixel is either redrawn or kept. Soft inpainting keeps
the mask's greys and, after guidance, blends every denoised estimate with the init latents through
the mask raised to a power that grows with the noise level (step_mask: the original holds early
and lets go late), keeping the vectors' magnitudes (latent_blend: a plain mix of two latents is
greyer than either). Once sampled, the original is laid over the result through a mask made of
how far each latent pixel moved (composite_masks), not through the painted mask, so what the
draw left alone shows the original's pixels. The formulas and constants are A1111's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

# Each setting's A1111 infotext label and the range of its slider (which the API's values are held to).
_SETTINGS = {
    "schedule_bias": ("Soft inpainting schedule bias", 0.0, 8.0),
    "preservation_strength": ("Soft inpainting preservation strength", 0.0, 8.0),
    "transition_contrast_boost": ("Soft inpainting transition contrast boost", 1.0, 32.0),
    "mask_influence": ("Soft inpainting mask influence", 0.0, 1.0),
    "difference_threshold": ("Soft inpainting difference threshold", 0.0, 8.0),
    "difference_contrast": ("Soft inpainting difference contrast", 0.0, 8.0),
}
ENABLED_LABEL = "Soft inpainting enabled"


@dataclass(frozen=True)
class SoftInpainting:
    """The six settings, with A1111's defaults, in the order of its script's arguments."""
    schedule_bias: float = 1.0  # A1111's mask_blend_power: above 1 the original holds more in the early steps
    preservation_strength: float = 0.5  # mask_blend_scale: how strongly part-masked latents keep the original
    transition_contrast_boost: float = 4.0  # inpaint_detail_preservation: the blend's magnitude power
    mask_influence: float = 0.0  # composite_mask_influence: how much the mask biases the difference threshold
    difference_threshold: float = 0.5  # composite_difference_threshold: the change at which the original is half
    difference_contrast: float = 2.0  # composite_difference_contrast: how sharp that transition is

    def problems(self) -> list[tuple[str, str]]:
        """(setting, why) for each value outside A1111's slider range."""
        return [(name, f"{value}: from {low:g} to {high:g}") for name, value in asdict(self).items()
                for _, low, high in [_SETTINGS[name]] if not low <= value <= high]

    def infotext(self) -> dict:
        return {ENABLED_LABEL: True, **{_SETTINGS[name][0]: f"{value:g}" for name, value in asdict(self).items()}}

    @classmethod
    def from_infotext(cls, params: dict) -> SoftInpainting | None:
        if str(params.get(ENABLED_LABEL, "")).lower() != "true":
            return None
        return cls(**{field.name: float(params.get(_SETTINGS[field.name][0], field.default)) for field in fields(cls)})


def step_mask(settings: SoftInpainting, redraw: torch.Tensor, sigma) -> torch.Tensor:
    """The redraw mask of the step at noise level `sigma` (A1111's get_modified_nmask): a grey g becomes
    g ** (sigma ** bias x strength), nearer 0 (keep) at high noise; 0 and 1 stay."""
    return torch.pow(redraw, float(sigma) ** settings.schedule_bias * settings.preservation_strength)


def latent_blend(settings: SoftInpainting, init: torch.Tensor, current: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """init x (1 - t) + current x t, rescaled per pixel to the power mean (power: the contrast boost) of the two
    vectors' lengths, computed in float64 as A1111 does for the large powers."""
    t_pixel = t[:, :1]
    mixed = init * (1 - t) + current * t
    length = torch.linalg.vector_norm(mixed, dim=1, keepdim=True).double() + 1e-5
    power = settings.transition_contrast_boost
    wanted = (torch.linalg.vector_norm(init, dim=1, keepdim=True).double().pow(power) * (1 - t_pixel)
              + torch.linalg.vector_norm(current, dim=1, keepdim=True).double().pow(power) * t_pixel).pow(1 / power)
    return mixed * (wanted / length).to(mixed.dtype)


def gaussian_kernel(stddev_radius: float = 1.0, max_radius: int = 2) -> np.ndarray:
    """A1111's thresholded Gaussian: 1 at the centre, falling to 0 one pixel past `max_radius`, (2r+1)^2."""
    def gaussian(square):
        return np.exp(-square / stddev_radius ** 2)

    floor = gaussian((max_radius + 1.0) ** 2)
    offsets = np.arange(-max_radius, max_radius + 1, dtype=np.float64)
    square = offsets[:, None] ** 2 + offsets[None, :] ** 2
    return np.maximum(0.0, (gaussian(square) - floor) / (1 - floor))


def weighted_histogram_filter(image: np.ndarray, kernel: np.ndarray, percentile_min: float, percentile_max: float,
                              min_width: float = 1.0) -> np.ndarray:
    """A1111's weighted histogram filter, vectorised (its own is a Python loop per pixel): each pixel becomes the
    mean of the values of its window that fall in [percentile_min, percentile_max] of the window's weight, the
    values sorted and stacked by their kernel weights; a window narrower than `min_width` is widened about its
    centre and kept inside the stack. Beyond the image's edges the window has nothing (not padding)."""
    radius_y, radius_x = kernel.shape[0] // 2, kernel.shape[1] // 2
    pad = ((radius_y, kernel.shape[0] - 1 - radius_y), (radius_x, kernel.shape[1] - 1 - radius_x))
    windows = np.lib.stride_tricks.sliding_window_view
    values = windows(np.pad(image.astype(np.float64), pad), kernel.shape).reshape(*image.shape, -1)
    inside = windows(np.pad(np.ones(image.shape), pad), kernel.shape).reshape(*image.shape, -1)
    weights = inside * kernel.reshape(-1)  # (what lies outside weighs 0: it takes no room in the stack)
    order = np.argsort(values, axis=-1, kind="stable")
    values, weights = np.take_along_axis(values, order, -1), np.take_along_axis(weights, order, -1)
    top = np.cumsum(weights, axis=-1)
    bottom, total = top - weights, top[..., -1:]
    low, high = total * percentile_min, total * percentile_max
    narrow = high - low < min_width
    centre = (low + high) / 2
    low, high = np.where(narrow, centre - min_width / 2, low), np.where(narrow, centre + min_width / 2, high)
    over = narrow & (high > total)
    low, high = np.where(over, total - min_width, low), np.where(over, total, high)
    under = narrow & (low < 0)
    low, high = np.where(under, 0.0, low), np.where(under, min_width, high)
    overlap = np.clip(np.minimum(high, top) - np.maximum(low, bottom), 0, None)
    weight = overlap.sum(-1)
    mean = (values * overlap).sum(-1) / np.where(weight != 0, weight, 1)
    return np.where(weight != 0, mean, 0).astype(image.dtype)


def smootherstep(x: np.ndarray) -> np.ndarray:
    return x * x * x * (x * (6 * x - 15) + 10)


def composite_masks(settings: SoftInpainting, redraw: torch.Tensor, init: torch.Tensor,
                    latents: torch.Tensor) -> np.ndarray:
    """Each sampled image's overlay mask at the latents' size (uint8, 255: the drawn pixels show), from how far its
    latents moved from `init` (A1111's apply_adaptive_masks, before its resize and blur: generate/inpaint.py)."""
    mask = torch.clamp(redraw[0, 0].float(), 0, 1).cpu().numpy()
    scalar = 1 - mask ** (settings.preservation_strength / 2)
    scalar = 0.5 * (1 - settings.mask_influence) + scalar * settings.mask_influence
    half_distance = settings.difference_threshold * (scalar / (1.00001 - scalar))
    distances = torch.linalg.vector_norm(latents.float() - init.float(), dim=1).cpu().numpy()
    kernel = gaussian_kernel(stddev_radius=1.5, max_radius=2)
    masks = []
    for distance in distances:
        distance = weighted_histogram_filter(distance, kernel, 0.9, 1.0)
        distance = weighted_histogram_filter(distance, kernel, 0.25, 0.75)
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):  # (a threshold of 0: every change counts)
            kept = smootherstep(1 / (1 + (distance / half_distance) ** settings.difference_contrast))
        masks.append((255.0 * (1 - np.nan_to_num(kept))).astype(np.uint8))
    return np.stack(masks)
