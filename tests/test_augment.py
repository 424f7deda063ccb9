"""data.augment: torchvision's random-resized crop, rotation and colour jitter, seeded per item for exact resume."""

from __future__ import annotations

import colorsys
import itertools
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from difftrain.cli import main
from difftrain.config import AugmentConfig, ConfigError, parse_config
from difftrain.data.augment import (
    Augment,
    AugmentPlan,
    adjust,
    place,
    plan_view,
    random_resized_box,
    render,
    rotation_zoom,
)
from difftrain.data.conditioning import Conditions, Preprocess, to_unit_tensor
from difftrain.data.transforms import CropPlan, plan_crop, prepare_image_for_size, to_tensor
from difftrain.training.run_data import open_images
from test_train_e2e import assert_same_checkpoint

JITTER = {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.1}


def flat(colour: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> Image.Image:
    return Image.new("RGB", size, colour)


def coordinates(width: int = 256, height: int = 256) -> Image.Image:
    """Red = x, green = y: a pixel says where in the image it came from."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], axis=-1).astype(np.uint8))


def smooth_noise(size: int = 96) -> Image.Image:
    noise = np.random.default_rng(0).integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8)
    return Image.fromarray(noise).resize((size, size), Image.Resampling.BICUBIC)


def plans(augment: Augment, count: int = 200, image_size=(64, 64), size=(16, 16)) -> list:
    return [plan_view(image_size, size, "center", True, augment, random.Random(f"0/0/{i}")) for i in range(count)]


# ----------------------------------------------------------------------------- off means unchanged
def test_without_augment_the_plan_and_pixels_are_the_plain_crops_draw_for_draw():
    image = coordinates(60, 40)
    for key in range(20):
        plan = plan_view(image.size, (16, 16), "random", True, None, random.Random(key))
        assert plan == plan_crop(image.size, (16, 16), "random", True, random.Random(key))
        expected, _ = prepare_image_for_size(image, (16, 16), "random", True, random.Random(key))
        assert torch.equal(to_tensor(render(image, (16, 16), plan)), expected)
    assert not AugmentConfig().active


def test_a_config_without_augment_builds_the_same_items_as_before(shapes_dir, tmp_path):
    config = parse_config({"version": 2, "method": "unconditional", "output_dir": str(tmp_path / "run"),
                           "data": {"path": str(shapes_dir), "resolution": 16, "crop": "random"}})
    dataset = open_images(config, progress=False)
    assert dataset.augment is None
    image = Image.open(sorted(shapes_dir.glob("*.png"))[3]).convert("RGB")
    expected, _ = prepare_image_for_size(image, (16, 16), "random", True, random.Random("0/2/3"))
    assert torch.equal(dataset[(2, 0, 3)]["pixel_values"], expected)


def test_probability_is_the_share_of_samples_augmented():
    assert all(isinstance(p, CropPlan) for p in plans(Augment(rotation=10, probability=0.0)))
    share = np.mean([isinstance(p, AugmentPlan) for p in plans(Augment(rotation=10, probability=0.3), count=1000)])
    assert 0.25 < share < 0.35


# ----------------------------------------------------------------------------- colour jitter
def test_brightness_scales_a_flat_image_by_its_factor_drawn_in_range():
    assert np.asarray(adjust(flat((100, 50, 200)), "brightness", 1.2))[0, 0].tolist() == [120, 60, 240]
    factors = []
    for plan in plans(Augment(brightness=0.2)):
        (name, factor), = plan.jitter
        out = np.asarray(render(flat((100, 100, 100), (64, 64)), (16, 16), plan)).astype(float)
        assert name == "brightness" and 0 <= 100 * factor - out.mean() < 1  # PIL's blend truncates
        factors.append(out.mean() / 100)
    assert 0.8 <= min(factors) < 0.83 and 1.17 < max(factors) <= 1.2 and abs(np.mean(factors) - 1) < 0.03


def test_contrast_blends_with_the_grey_mean_and_saturation_with_the_luma():
    halves = np.zeros((8, 8, 3), dtype=np.uint8)
    halves[:, :4], halves[:, 4:] = 50, 150  # grey mean 100
    out = np.asarray(adjust(Image.fromarray(halves), "contrast", 0.5))
    assert out[0, 0].tolist() == [75] * 3 and out[0, -1].tolist() == [125] * 3
    assert np.asarray(adjust(flat((255, 0, 0)), "saturation", 0.0))[0, 0].tolist() == [76] * 3  # 0.299 * 255
    assert np.asarray(adjust(flat((200, 100, 100)), "saturation", 1.0))[0, 0].tolist() == [200, 100, 100]


@pytest.mark.parametrize("factor, hue", [(0.1, 25 / 255), (-0.1, 231 / 255), (0.5, 127 / 255)])
def test_hue_turns_pure_red_to_the_expected_hue(factor, hue):
    """PIL's HSV holds hue in 0..255; a shift of `factor` turns it int(factor * 255) steps, wrapping."""
    red, green, blue = np.asarray(adjust(flat((255, 0, 0)), "hue", factor))[0, 0] / 255
    measured, saturation, value = colorsys.rgb_to_hsv(red, green, blue)
    assert abs(measured - hue) < 1.5 / 255 and saturation > 0.99 and value == 1.0


def test_jitter_factors_stay_in_range_and_come_in_every_order():
    drawn = plans(Augment(**JITTER), count=400)
    orders = {tuple(name for name, _ in plan.jitter) for plan in drawn}
    assert orders == set(itertools.permutations(JITTER))  # torchvision's randperm(4): all 24 orders
    for plan in drawn:
        factors = dict(plan.jitter)
        assert all(0.8 <= factors[name] <= 1.2 for name in ("brightness", "contrast", "saturation"))
        assert -0.1 <= factors["hue"] <= 0.1
    assert not plans(Augment(brightness=0.0, rotation=5))[0].jitter  # 0 is off: not drawn, not applied


# ----------------------------------------------------------------------------- random-resized crop
def test_random_resized_crop_area_and_ratio_measured_on_a_coordinate_pattern():
    image = coordinates()
    areas = []
    for plan in plans(Augment(crop_scale=(0.8, 1.0)), count=40, image_size=image.size, size=(32, 32)):
        left, top, right, bottom = plan.box
        assert 0.8 - 0.01 <= (right - left) * (bottom - top) / 256**2 <= 1.0
        assert 3 / 4 - 0.01 <= (right - left) / (bottom - top) <= 4 / 3 + 0.01
        out = np.asarray(place(image, (32, 32), AugmentPlan(plan.box, 0.0, False, ()))).astype(float)
        # Pixel centres span 31/32 of the crop: stretch the measured span back to the whole crop.
        width = (out[:, -1, 0].mean() - out[:, 0, 0].mean()) * 32 / 31
        height = (out[-1, :, 1].mean() - out[0, :, 1].mean()) * 32 / 31
        assert abs(width - (right - left)) < 2 and abs(height - (bottom - top)) < 2
        assert abs(out[:, 0, 0].mean() - (left + (right - left) / 64)) < 2  # it is where the box says
        areas.append(width * height / 256**2)
    assert 0.78 < min(areas) < 0.85 and 0.95 < max(areas) <= 1.01


def test_crop_ratio_is_relative_to_the_buckets_shape():
    rng = random.Random(0)
    for _ in range(50):
        left, top, right, bottom = random_resized_box((500, 300), (40, 24), (0.5, 1.0), (3 / 4, 4 / 3), rng)
        assert 5 / 3 * 3 / 4 - 0.02 <= (right - left) / (bottom - top) <= 5 / 3 * 4 / 3 + 0.02


def test_random_resized_crop_falls_back_to_torchvisions_central_crop():
    # A 2:1 image has no square-ish crop of 90 % of its area: after 10 tries, the centre, clamped to ratio 4/3.
    assert random_resized_box((200, 100), (16, 16), (0.9, 1.0), (3 / 4, 4 / 3), random.Random(0)) == (33, 0, 166, 100)


# ----------------------------------------------------------------------------- rotation
def test_rotation_by_a_fixed_angle_is_pils_rotate():
    image = smooth_noise()
    for angle in (30.0, -12.5):
        out = np.asarray(place(image, (32, 32), AugmentPlan((32, 32, 64, 64), angle, False, ()))).astype(int)
        expected = np.asarray(image.rotate(angle, Image.Resampling.BICUBIC).crop((32, 32, 64, 64))).astype(int)
        assert np.abs(out - expected).max() <= 1 and np.abs(out - expected).mean() < 0.01  # (exact here today)


def test_rotation_zooms_instead_of_leaving_black_corners():
    # A whole square turned by 15 degrees holds a square 1 / (cos + sin) of its side: the least zoom.
    assert rotation_zoom((64, 64), (0, 0, 64, 64), (16, 16), 15) == pytest.approx(math.cos(0.2618) + math.sin(0.2618), 1e-3)
    assert rotation_zoom((96, 96), (32, 32, 64, 64), (32, 32), 30) == 1.0  # room around the crop: no zoom
    image = flat((200, 100, 50), (40, 30))
    angles = []
    for plan in plans(Augment(rotation=15, crop_scale=(0.8, 1.0)), count=30, image_size=image.size):
        out = np.asarray(render(image, (16, 16), plan)).astype(int)
        assert np.abs(out - [200, 100, 50]).max() == 0, plan
        angles.append(plan.angle)
    assert -15 <= min(angles) < -10 and 10 < max(angles) <= 15


def test_flip_mirrors_the_augmented_view():
    image = smooth_noise()
    plan = AugmentPlan((10, 20, 70, 60), 7.0, False, ())
    mirrored = AugmentPlan((10, 20, 70, 60), 7.0, True, ())
    assert np.array_equal(np.asarray(place(image, (24, 16), plan))[:, ::-1], np.asarray(place(image, (24, 16), mirrored)))


def test_a_conditioning_image_follows_the_geometry_but_not_the_colours():
    image = smooth_noise()
    plan = AugmentPlan((8, 4, 90, 80), 11.0, True, (("brightness", 0.5),))
    conditions = Conditions(Preprocess("mask"), from_records=True, max_pixels=10**8)
    condition = conditions.transform(image, image.size, (16, 16), plan)
    assert torch.equal(condition, to_unit_tensor(place(image, (16, 16), plan, Image.Resampling.NEAREST)))
    assert not torch.equal(condition, to_unit_tensor(render(image, (16, 16), plan)))


# ----------------------------------------------------------------------------- the data set
def augmented_config(data_dir, tmp_path, **data):
    return parse_config({
        "version": 2, "method": "unconditional", "output_dir": str(tmp_path / "run"),
        "data": {"path": str(data_dir), "resolution": 16, "augment": {"crop_scale": [0.5, 1.0], "rotation": 15,
                                                                      **JITTER}, **data},
    })


def test_the_same_key_draws_the_same_augmentation_in_any_process(shapes_dir, tmp_path):
    config = augmented_config(shapes_dir, tmp_path)
    dataset, resumed = open_images(config, progress=False), open_images(config, progress=False)
    assert dataset.augment == Augment(crop_scale=(0.5, 1.0), rotation=15.0, **JITTER)
    first = dataset[(3, 1, 5)]["pixel_values"]
    assert torch.equal(first, dataset[(3, 1, 5)]["pixel_values"])
    assert torch.equal(first, resumed[(3, 1, 5)]["pixel_values"])  # a fresh process (a resumed run) agrees
    assert not torch.equal(first, dataset[(4, 1, 5)]["pixel_values"])  # another epoch, another view
    views = {dataset[(epoch, 0, 5)]["pixel_values"].numpy().tobytes() for epoch in range(8)}
    assert len(views) == 8


def test_augmented_items_take_their_buckets_size(tmp_path):
    folder = tmp_path / "wide"
    folder.mkdir()
    for i in range(4):
        smooth_noise().resize((60, 36)).save(folder / f"{i}.png")
    config = augmented_config(folder, tmp_path, resolution=32, buckets={"enabled": True, "step": 8})
    dataset = open_images(config, progress=False)
    assert dataset.target_size(0) == (40, 24)
    for key in range(4):
        assert dataset[(0, 0, key)]["pixel_values"].shape == (3, 24, 40)


# ----------------------------------------------------------------------------- config
def config_error(data: dict, method: str = "unconditional", **sections) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config({"version": 2, "method": method, "data": {"path": "x", **data}, **sections})
    return str(caught.value)


@pytest.mark.parametrize("augment, message", [
    ({"hue": 0.7}, "data.augment.hue = 0.7: Input should be less than or equal to 0.5"),
    ({"brightness": -0.1}, "data.augment.brightness = -0.1: Input should be greater than or equal to 0"),
    ({"rotation": 200}, "data.augment.rotation = 200: Input should be less than or equal to 180"),
    ({"probability": 1.5}, "data.augment.probability = 1.5: Input should be less than or equal to 1"),
    ({"crop_scale": [1.0, 0.8]}, "data.augment.crop_scale = [1.0, 0.8]: must be [min, max] with 0 < min <= max <= 1"),
    ({"crop_scale": [0.0, 1.0]}, "data.augment.crop_scale = [0.0, 1.0]: must be [min, max] with 0 < min"),
    ({"crop_ratio": [2, 1]}, "data.augment.crop_ratio = [2, 1]: must be [min, max] with 0 < min <= max"),
    ({"rotate": 15}, "unknown key 'data.augment.rotate' (did you mean 'rotation'?)"),
])
def test_augment_settings_out_of_range_are_refused_naming_the_key(augment, message):
    assert message in config_error({"augment": augment})


def test_augment_with_a_latent_cache_is_refused_saying_why_and_what_to_do():
    message = config_error({"augment": {"rotation": 10}, "cache": {"latents": True}}, method="text2image",
                           model={"base": "models/sd"})
    assert "data.augment with data.cache.latents = true: a latent cache stores one view of each image" in message
    assert "turn data.cache.latents off to augment" in message and "rely on data.random_flip" in message
    # A cached text encoder alone stores no pixels: augmentation stays fresh.
    config = parse_config({"version": 2, "method": "text2image", "model": {"base": "models/sd"},
                           "data": {"path": "x", "augment": {"rotation": 10}, "cache": {"text": True}}})
    assert config.data.augment.active


# ----------------------------------------------------------------------------- end to end
def test_augmented_training_resumes_to_the_same_weights(make_config, tmp_path, capsys):
    data = {"crop": "random", "augment": {"crop_scale": [0.6, 1.0], "rotation": 15, **JITTER}}
    straight = make_config("straight", data=data, training={"max_steps": 4}, checkpoint={"every_steps": 2})
    assert main(["train", str(straight), "--no-progress"]) == 0
    halves = make_config("halves", data=data, training={"max_steps": 2}, checkpoint={"every_steps": 2})
    assert main(["train", str(halves), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", str(halves), "--resume", "latest", "--set", "data.augment.rotation=5"]) == 2
    assert "data.augment.rotation: checkpoint has 15.0, this config has 5.0" in capsys.readouterr().err
    assert main(["train", str(halves), "--no-progress", "--set", "training.max_steps=4", "--resume", "latest"]) == 0
    assert_same_checkpoint(tmp_path / "straight/checkpoints/step-00000004", tmp_path / "halves/checkpoints/step-00000004")
