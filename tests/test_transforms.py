import random

import numpy as np
from PIL import Image

from difftrain.data.buckets import assign_buckets, make_buckets
from difftrain.data.transforms import prepare_image, prepare_image_for_size, resize_shorter_side, to_tensor


def striped(width=60, height=30):
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, : width // 2] = (255, 0, 0)  # left half red, right half black
    return Image.fromarray(array)


def test_shorter_side_is_resized_keeping_aspect():
    assert resize_shorter_side(striped(60, 30), 16).size == (32, 16)
    assert resize_shorter_side(striped(30, 90), 10).size == (10, 30)


def test_center_crop_is_square_and_centered():
    tensor = prepare_image(striped(60, 30), 16, "center", flip=False, rng=random.Random(0))
    assert tuple(tensor.shape) == (3, 16, 16)
    assert tensor.min() >= -1 and tensor.max() <= 1
    assert tensor[0, :, 0].mean() > 0.9 and tensor[0, :, -1].mean() < -0.9  # red left, black right


def test_random_crop_and_flip_follow_the_rng():
    image = striped(60, 30)
    crops = {prepare_image(image, 16, "random", True, random.Random(seed)).numpy().tobytes() for seed in range(12)}
    assert len(crops) > 2  # different seeds, different crops/flips
    a = prepare_image(image, 16, "random", True, random.Random("0/1/2"))
    b = prepare_image(image, 16, "random", True, random.Random("0/1/2"))
    assert a.equal(b)  # the same (seed, epoch, index) always gives the same sample


def test_flip_mirrors():
    image = striped(32, 32)
    rng = random.Random(0)
    while True:  # find a seed state that flips
        state = rng.getstate()
        if rng.random() < 0.5:
            break
    rng.setstate(state)
    flipped = prepare_image(image, 32, "center", True, rng)
    assert flipped[0, :, -1].mean() > 0.9 and flipped[0, :, 0].mean() < -0.9


def test_to_tensor_range():
    tensor = to_tensor(Image.new("RGB", (2, 2), (0, 255, 128)))
    assert tensor[0].eq(-1).all() and tensor[1].eq(1).all()


def test_square_crop_box_is_in_the_resized_image():
    _, box = prepare_image_for_size(striped(60, 30), (16, 16), "center", False, random.Random(0))
    assert box == (8, 0, 24, 16)  # resized to 32x16, the middle 16 columns


def test_wide_image_into_a_wide_bucket_keeps_all_its_content():
    image = striped(1000, 500)
    tensor, box = prepare_image_for_size(image, (64, 32), "random", False, random.Random(0))
    assert tuple(tensor.shape) == (3, 32, 64) and box == (0, 0, 64, 32)
    assert tensor.equal(to_tensor(image.resize((64, 32), Image.Resampling.BICUBIC, reducing_gap=3.0)))
    # 1001x500 is 2:1 only after rounding: still nothing cut.
    assert prepare_image_for_size(striped(1001, 500), (64, 32), "random", False, random.Random(0))[1] == box


def test_portrait_into_a_tall_bucket_keeps_all_its_content():
    buckets = make_buckets(512)
    size = buckets[assign_buckets(np.array([(600, 1000)]), buckets)[0]]
    assert size == (384, 640)  # 3:5 exactly
    image = striped(600, 1000)
    tensor, box = prepare_image_for_size(image, size, "center", False, random.Random(0))
    assert tuple(tensor.shape) == (3, 640, 384) and box == (0, 0, 384, 640)
    assert tensor[0, :, 0].mean() > 0.9 and tensor[0, :, -1].mean() < -0.9  # both edges survive


def test_wide_image_into_a_square_is_cropped_on_its_long_side_only():
    rng = random.Random(5)
    boxes = {prepare_image_for_size(striped(90, 30), (32, 32), "random", False, rng)[1] for _ in range(50)}
    assert {top for (_, top, _, _) in boxes} == {0}
    assert {right - left for (left, _, right, _) in boxes} == {32}
    assert min(left for (left, *_) in boxes) >= 0 and max(right for (*_, right, _) in boxes) <= 96
    assert len(boxes) > 10


def test_an_extreme_aspect_ratio_is_cropped_before_it_is_resized():
    """A 600x4 strip covering 64x64 would resize whole to 9600x64 (a 3000x4 one to 384000x512 at 512 px, 0.6 GB)
    to keep 64x64 of it: the crop's source box alone is resized, to what the whole resize and crop give."""
    from difftrain.data.transforms import EXTREME_COVER, apply_plan, plan_crop, resize_to_cover

    rng = np.random.default_rng(0)
    strip = Image.fromarray(rng.integers(0, 256, (4, 600, 3), dtype=np.uint8))
    for crop, seed in (("center", 0), ("random", 3)):
        plan = plan_crop(strip.size, (64, 64), crop, True, random.Random(seed))
        assert plan.resized[0] * plan.resized[1] > EXTREME_COVER * 64 * 64
        whole = resize_to_cover(strip, (64, 64)).crop(plan.box)
        whole = whole.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if plan.flipped else whole
        difference = np.abs(np.asarray(apply_plan(strip, (64, 64), plan), dtype=int) - np.asarray(whole, dtype=int))
        assert difference.shape == (64, 64, 3) and difference.mean() < 1 and difference.max() <= 8, (
            crop, difference.mean(), difference.max())
