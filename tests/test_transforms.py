import random

import numpy as np
from PIL import Image

from difftrain.data.transforms import prepare_image, resize_shorter_side, to_tensor


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
