"""Conditioning images in the data layer: found, paired, transformed with their image, cached, reported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difftrain.data.cache import CacheEncoders
from difftrain.data.conditioning import Conditions, Preprocess
from difftrain.data.dataset import ImageDataset
from difftrain.data.folder import ConditioningFiles, DatasetError
from difftrain.data.sources import open_source


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    """Asymmetric in every direction: any wrong crop offset or flip shows."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def paired_folder(root: Path, sizes: list[tuple[int, int]], condition_scale: float = 1.0) -> Path:
    """Images of the given sizes, each with a conditioning image that is the same picture
    (at `condition_scale` times its size) under conditioning/, named by the column."""
    (root / "conditioning").mkdir(parents=True)
    lines = []
    for index, (width, height) in enumerate(sizes):
        name = f"{index:03d}.png"
        image = noise_image(width, height, index)
        image.save(root / name)
        scaled = (round(width * condition_scale), round(height * condition_scale))
        image.resize(scaled, Image.Resampling.BICUBIC).save(root / "conditioning" / name)
        lines.append(json.dumps({"file_name": name, "text": f"picture {index}",
                                 "conditioning_image": f"conditioning/{name}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def dataset(root: Path, preprocess: str = "none", crop: str = "random", buckets=None, **files) -> ImageDataset:
    source = open_source("folder", root, progress=False, conditioning=ConditioningFiles(**files))
    conditions = Conditions(Preprocess(preprocess), source.has_conditioning, 64_000_000)
    return ImageDataset(source, 16, crop, True, seed=3, max_pixels=64_000_000, buckets=buckets, conditions=conditions)


def as_uint8(pixels: torch.Tensor) -> torch.Tensor:
    return ((pixels + 1) * 127.5).round().to(torch.uint8)


def test_the_condition_gets_its_image_crop_and_flip_in_every_epoch_and_bucket(tmp_path):
    root = paired_folder(tmp_path / "data", [(48, 24), (24, 40), (30, 30)])
    source_check = open_source("folder", root, progress=False, conditioning=ConditioningFiles())
    assert len(source_check) == 3 and source_check.has_conditioning  # conditioning/ holds no training images
    assert "conditioning images: column 'conditioning_image'" in source_check.description
    for crop, buckets in [("random", None), ("random", lambda index: [(24, 16), (16, 24), (16, 16)][index]),
                          ("center", None)]:
        data = dataset(root, crop=crop, buckets=buckets)
        flipped = []
        for epoch in range(6):
            for index in range(3):
                item = data[(epoch, 0, index)]
                assert item["conditioning_pixels"].dtype == torch.uint8
                assert item["conditioning_pixels"].shape == item["pixel_values"].shape
                # The same picture, the same plan: identical pixels, so crop box and flip agree.
                assert torch.equal(item["conditioning_pixels"], as_uint8(item["pixel_values"]))
                flipped.append(torch.equal(item["pixel_values"], data.plain_pixels(index).flip(-1)))
        if crop == "center":
            assert any(flipped) and not all(flipped)  # both ways were exercised


def test_a_condition_of_another_size_is_stretched_to_its_image_first(tmp_path):
    root = paired_folder(tmp_path / "data", [(48, 24), (24, 40)], condition_scale=0.5)
    data = dataset(root)
    for epoch in range(4):
        for index in range(2):
            item = data[(epoch, 0, index)]
            condition = item["conditioning_pixels"].float()
            target = as_uint8(item["pixel_values"]).float()
            mismatch = as_uint8(item["pixel_values"].flip(-1)).float()
            # Half the resolution blurs it, but it lies on the same pixels: far closer than its mirror image.
            assert (condition - target).abs().mean() < 0.6 * (condition - mismatch).abs().mean()


def test_masks_keep_their_exact_values_through_resizing(tmp_path):
    root = tmp_path / "data"
    (root / "masks").mkdir(parents=True)
    for index in range(2):
        noise_image(40, 40, index).save(root / f"{index}.png")
        mask = Image.new("RGB", (40, 40))
        mask.paste((255, 255, 255), (5, 5, 25, 30))
        mask.paste((10, 200, 30), (25, 0, 40, 12))  # a segmentation label colour
        mask.save(root / "masks" / f"{index}.png")
    data = dataset(root, preprocess="mask", folder=root / "masks")
    assert len(data) == 2  # the masks under the data folder are not training images
    colours = {tuple(c) for c in data[(0, 0, 0)]["conditioning_pixels"].reshape(3, -1).T.tolist()}
    assert colours <= {(0, 0, 0), (255, 255, 255), (10, 200, 30)}


def test_canny_is_computed_from_the_image_when_the_data_names_no_condition(tmp_path):
    from difftrain.data.shapes import write_shapes_dataset

    root = write_shapes_dataset(tmp_path / "shapes", num_images=4, size=32)
    with pytest.raises(DatasetError, match="no conditioning images.*canny"):
        dataset(root)  # preprocess none and no files: nothing to train on
    data = dataset(root, preprocess="canny", crop="center")
    item = data[(0, 0, 1)]
    edges = item["conditioning_pixels"][0]
    assert set(edges.unique().tolist()) == {0, 255}
    # The edges are the shape's outline: on the boundary of the drawn pixels.
    drawn = (item["pixel_values"].std(0) > 0.3) | ((item["pixel_values"] + 1).sum(0) < 4.5)
    assert drawn[edges > 0].float().mean() > 0.4 and edges.float().mean() / 255 < 0.25


def test_missing_and_unreadable_conditions_skip_their_records_and_say_so(tmp_path):
    root = paired_folder(tmp_path / "data", [(20, 20)] * 5)
    (root / "conditioning" / "001.png").unlink()
    lines = (root / "metadata.jsonl").read_text().splitlines()
    entry = json.loads(lines[2])
    del entry["conditioning_image"]
    lines[2] = json.dumps(entry)
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    source = open_source("folder", root, progress=False, conditioning=ConditioningFiles())
    assert len(source) == 3
    reasons = dict(source.skipped)
    assert "conditioning image" in reasons["001.png"] and "does not exist" in reasons["001.png"]
    assert "has no 'conditioning_image'" in reasons["002.png"]
    # One that breaks after indexing is replaced at read time and counted, never fatal.
    data = dataset(root)
    (root / "conditioning" / "003.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    keys = [source.read(i).key for i in range(3)]
    broken = keys.index("003.png")
    item = data[(0, 0, broken)]
    assert len(item["skipped"]) == 1 and item["caption"] != "picture 3"


def test_a_condition_turned_a_quarter_against_its_image_is_skipped_not_stretched(tmp_path, caplog):
    root = paired_folder(tmp_path / "data", [(48, 24), (48, 24)])
    noise_image(24, 48, 0).save(root / "conditioning" / "000.png")  # made from the photo before EXIF turned it
    data = dataset(root, crop="center")
    item = data[(0, 0, 0)]
    assert len(item["skipped"]) == 1 and item["caption"] == "picture 1"
    assert "conditioning image is 24x48, the image 48x24 upright: one of them is turned a quarter" in caplog.text
    # A half-size map of the turned photo, and a map of another shape (a square crop), are caught the same way.
    for size, reason in [((12, 24), "conditioning image is 12x24, the image 48x24 upright: one of them is turned"),
                         ((24, 24), "conditioning image is 24x24, the image 48x24: another shape, so they cannot "
                                    "line up")]:
        noise_image(*size, 0).save(root / "conditioning" / "000.png")
        caplog.clear()
        item = dataset(root, crop="center")[(0, 0, 0)]
        assert len(item["skipped"]) == 1 and reason in caplog.text, caplog.text


def test_canny_finds_an_edge_between_colours_of_equal_brightness():
    from difftrain.data.conditioning import canny

    # Red and green of one grey level: a grey-scale Canny sees nothing here; A1111's, on the colours, an edge.
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[:, :16] = (150, 0, 0)
    image[:, 16:] = (0, 76, 0)
    assert np.ptp(np.asarray(Image.fromarray(image).convert("L"))) <= 1
    edges = np.asarray(canny(Image.fromarray(image), 100, 200))[..., 0]
    assert edges[:, 14:18].max() == 255 and edges[:, 14:18].astype(bool).any(axis=1).all()
    assert edges[:, :12].max() == 0 and edges[:, 20:].max() == 0


def test_jsonl_sources_and_conditioning_folders_pair_by_name(tmp_path):
    root = paired_folder(tmp_path / "data", [(20, 20)] * 3)
    jsonl = tmp_path / "data" / "list.jsonl"
    jsonl.write_text("".join(json.dumps({"image": f"{i:03d}.png", "caption": "x",
                                         "hint": f"conditioning/{i:03d}.png"}) + "\n" for i in range(3)))
    by_column = open_source("jsonl", jsonl, progress=False, conditioning=ConditioningFiles(column="hint"))
    by_folder = open_source("jsonl", jsonl, progress=False,
                            conditioning=ConditioningFiles(folder=tmp_path / "data" / "conditioning"))
    for source in (by_column, by_folder):
        assert source.has_conditioning
        record = source.read(1)
        assert record.conditioning == (root / "conditioning" / "001.png").read_bytes()
    with pytest.raises(DatasetError, match="conditioning folder .* does not exist"):
        open_source("folder", root, progress=False, conditioning=ConditioningFiles(folder=tmp_path / "nope"))
    for folder in (root, tmp_path):  # (every image was left out as a condition: "no usable images under" it)
        with pytest.raises(DatasetError, match=f"the conditioning folder {folder} holds data.path {root}: its files"):
            open_source("folder", root, progress=False, conditioning=ConditioningFiles(folder=folder))


def test_cached_conditions_follow_the_cached_latent_flip(tmp_path):
    root = paired_folder(tmp_path / "data", [(24, 16), (16, 16), (16, 30)])
    data = dataset(root, crop="center")
    # A stand-in "VAE" whose latent is the pixels themselves: what was cached is visible.
    encoders = CacheEncoders(latents=lambda pixels: (pixels, torch.zeros_like(pixels)), latent_tag="identity")
    counts = data.fill_cache(encoders, tmp_path / "cache", progress=False)
    assert counts["conditions computed"] == 6 and counts["latents computed"] == 6
    uncached = dataset(root, crop="center")
    for epoch in range(4):
        for index in range(3):
            item = data[(epoch, 0, index)]
            assert "pixel_values" not in item
            assert torch.equal(item["conditioning_pixels"], as_uint8(item["latent_mean"]))
            # And it is what the uncached path gives for the same (epoch, index).
            assert torch.equal(item["conditioning_pixels"], uncached[(epoch, 0, index)]["conditioning_pixels"])
    # Again: the folder scan hashed each conditioning file as it hashes each image, so nothing is read to find
    # the cached entries (every record was read at each start).
    second = dataset(root, crop="center")
    reads = []
    second.source.read = lambda index, read=second.source.read: reads.append(index) or read(index)
    again = second.fill_cache(encoders, tmp_path / "cache", progress=False)
    assert again["conditions found"] == 6 and again["conditions computed"] == 0 and reads == []
    # A conditioning file changed since: its new hash, so its entries are computed again, and only its.
    noise_image(16, 16, 99).save(root / "conditioning" / "001.png")
    changed = dataset(root, crop="center").fill_cache(encoders, tmp_path / "cache", progress=False)
    assert changed["conditions computed"] == 2 and changed["latents computed"] == 0
    canny = dataset(root, preprocess="canny", crop="center").fill_cache(encoders, tmp_path / "cache", progress=False)
    assert canny["conditions computed"] == 6  # another preprocessor: other entries


def test_generate_and_training_crop_a_condition_the_same_way(tmp_path):
    from difftrain.data.transforms import center_crop

    image = noise_image(50, 30, 1)
    root = tmp_path / "data"
    root.mkdir()
    image.save(root / "a.png")
    image.save(root / "hint.png")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x",
                                                     "conditioning_image": "hint.png"}) + "\n")
    source = open_source("folder", root, progress=False, conditioning=ConditioningFiles())
    data = ImageDataset(source, 16, "center", False, 0, 64_000_000,
                        conditions=Conditions(Preprocess("none"), True, 64_000_000))
    trained = data[(0, 0, 0)]["conditioning_pixels"].permute(1, 2, 0).numpy()
    assert np.array_equal(trained, np.asarray(center_crop(image, (16, 16))))


def test_resume_notices_a_changed_conditioning_image(tmp_path):
    import os

    from difftrain.data.fingerprint import describe_change, fingerprint

    root = paired_folder(tmp_path / "data", [(20, 20)] * 3)
    before = fingerprint(open_source("folder", root, progress=False, conditioning=ConditioningFiles()))
    hint = root / "conditioning" / "001.png"
    noise_image(20, 20, 9).save(hint)
    os.utime(hint, ns=(1, 1))
    after = fingerprint(open_source("folder", root, progress=False, conditioning=ConditioningFiles()))
    assert "001.png (conditioning)" in describe_change(before, after)


def test_pairing_edge_cases_dotted_names_self_conditions_empty_values_and_huge_files(tmp_path):
    root = tmp_path / "data"
    (root / "hints" / "sub").mkdir(parents=True)
    (root / "sub").mkdir()
    for name in ("img.001.png", "img.png", "sub/a.png"):
        noise_image(12, 12, len(name)).save(root / name)
        noise_image(12, 12, 100 + len(name)).save(root / "hints" / name)
    by_folder = open_source("folder", root, progress=False, conditioning=ConditioningFiles(folder=root / "hints"))
    pairs = {by_folder.read(i).key: by_folder.read(i).conditioning for i in range(len(by_folder))}
    assert set(pairs) == {"img.001.png", "img.png", "sub/a.png"}  # hints/ holds no training images
    assert all(pairs[name] == (root / "hints" / name).read_bytes() for name in pairs)  # img.001 is not img

    # A condition that is an image of the set itself (a tile ControlNet) stays a training image;
    # an empty column value is reported as a missing one.
    lines = [{"file_name": "img.png", "text": "a", "conditioning_image": "img.png"},
             {"file_name": "img.001.png", "text": "b", "conditioning_image": ""},
             {"file_name": "sub/a.png", "text": "c", "conditioning_image": "hints/sub/a.png"}]
    (root / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    by_column = open_source("folder", root, progress=False, conditioning=ConditioningFiles())
    assert sorted(by_column.read(i).key for i in range(len(by_column))) == ["img.png", "sub/a.png"]
    assert "has no 'conditioning_image'" in dict(by_column.skipped)["img.001.png"]
    # A conditioning image over the pixel limit is skipped at start, like an image would be.
    Image.new("RGB", (300, 300)).save(root / "hints" / "sub" / "a.png")
    small = open_source("folder", root, progress=False, max_pixels=10_000, conditioning=ConditioningFiles())
    assert "decompression" in dict(small.skipped)["sub/a.png"] or "pixels" in dict(small.skipped)["sub/a.png"]


def test_a_record_that_breaks_at_decode_is_read_as_its_stand_in_in_its_own_bucket(tmp_path):
    """A header-only check lets a cut-off JPEG through; alone in its bucket it used to leave the cached run
    nothing to read there (and a resume the same). It reads what the uncached path reads in its place, with
    that record's caption, and once the file is mended, its own pixels."""
    import io

    root = tmp_path / "data"
    root.mkdir()
    for index in range(3):
        noise_image(16, 16, index).save(root / f"{index}.png")
    wide = io.BytesIO()
    noise_image(256, 64, 9).save(wide, "JPEG", quality=95)
    (root / "3.jpg").write_bytes(wide.getvalue()[: len(wide.getvalue()) // 2])  # the header survives
    # First: the records after it in the walk are of another size, which its stand-in must not take.
    (root / "list.jsonl").write_text("".join(json.dumps({"image": name, "caption": f"caption {name}"}) + "\n"
                                            for name in ("3.jpg", "0.png", "1.png", "2.png")))
    source = open_source("jsonl", root / "list.jsonl", progress=False)
    assert len(source) == 4  # jsonl sources check headers only
    sizes = {0: (32, 8), 1: (16, 16), 2: (16, 16), 3: (16, 16)}

    def cached() -> tuple[ImageDataset, dict]:
        data = ImageDataset(source, 16, "center", False, seed=3, max_pixels=64_000_000, buckets=sizes.get)
        encoders = CacheEncoders(latents=lambda pixels: (pixels, torch.zeros_like(pixels)), latent_tag="identity",
                                 texts=lambda captions: torch.zeros(len(captions), 2), text_tag="zeros")
        return data, data.fill_cache(encoders, tmp_path / "cache", progress=False)

    data, counts = cached()
    assert counts["skipped"] == 1 and counts["latents computed"] == 4  # three own, one stand-in at 32 x 8
    uncached = ImageDataset(source, 16, "center", False, seed=3, max_pixels=64_000_000, buckets=sizes.get)
    item, plain = data[(0, 0, 0)], uncached[(0, 0, 0)]
    assert item["latent_mean"].shape == (3, 8, 32)  # its own bucket's size
    assert torch.equal(item["latent_mean"], plain["pixel_values"]) and item["caption"] == plain["caption"]
    stand_in = uncached._read(0)[0]  # (records.read_order)
    assert item["caption"] == f"caption {stand_in - 1}.png" and len(item["skipped"]) == len(plain["skipped"]) == 1
    assert cached()[1]["latents computed"] == 0  # a resume finds it all
    (root / "3.jpg").write_bytes(wide.getvalue())  # mended: its own latent, not the stand-in's, from now on
    source = open_source("jsonl", root / "list.jsonl", progress=False)
    data, counts = cached()
    assert counts["latents computed"] == 1 and data[(0, 0, 0)]["caption"] == "caption 3.jpg"
    assert torch.equal(data[(0, 0, 0)]["latent_mean"],
                       ImageDataset(source, 16, "center", False, seed=3, max_pixels=64_000_000,
                                    buckets=sizes.get)[(0, 0, 0)]["pixel_values"])


def test_images_waiting_for_the_encoder_stay_within_a_budget_whatever_the_buckets(tmp_path, monkeypatch):
    from difftrain.data import dataset as dataset_module

    root = paired_folder(tmp_path / "data", [(16, 16), (32, 8), (8, 32), (16, 16), (24, 16)])
    monkeypatch.setattr(dataset_module, "PENDING_VALUES", 3 * 16 * 16 * 2)  # two 16 x 16 views
    batches = []

    def encode(pixels):
        batches.append(len(pixels))
        return pixels, torch.zeros_like(pixels)

    data = dataset(root, crop="center", buckets=lambda index: [(16, 16), (32, 8), (8, 32), (16, 16), (24, 16)][index])
    counts = data.fill_cache(CacheEncoders(latents=encode, latent_tag="identity"), tmp_path / "cache", progress=False)
    assert counts["latents computed"] == 10 and sum(batches) == 10
    assert max(batches) <= 2 and len(batches) >= 5  # without the budget: 4 batches, one per bucket, at the end


def test_a_label_map_keeps_its_stored_colours_whatever_its_colour_profile(tmp_path):
    """A segmentation map saved with an ICC profile (Adobe RGB here) was turned to sRGB like a photo: every label
    colour moved, and the labels with it. Label maps (mask, segmentation) are read as stored, in training and in
    generate; a photo's condition still is colour-managed."""
    from test_images import adobe_rgb_profile

    from difftrain.data.images import load_image, load_image_bytes
    from difftrain.generate.controlnet import ControlUnit, conditioning_image

    labels = [(60, 170, 80), (200, 120, 40), (30, 60, 200), (255, 0, 0)]
    label_map = Image.new("RGB", (4, 1))
    label_map.putdata(labels)
    label_map = label_map.resize((16, 16), Image.Resampling.NEAREST)
    root = paired_folder(tmp_path / "data", [(16, 16)])
    label_map.save(root / "conditioning" / "000.png", icc_profile=adobe_rgb_profile())
    stored = {tuple(c) for c in np.asarray(label_map).reshape(-1, 3)}
    for preprocess, managed in (("segmentation", False), ("none", True)):
        data = dataset(root, preprocess=preprocess, crop="center")
        record = data.source.read(0)
        condition = data.conditions.load(record, load_image_bytes(record.data))
        assert ({tuple(c) for c in np.asarray(condition).reshape(-1, 3)} == stored) is not managed, preprocess
    unit = ControlUnit(model=None, image=str(root / "conditioning" / "000.png"), scale=1.0, preprocess="segmentation")
    drawn = conditioning_image(unit, 16, 16)
    assert {tuple(c) for c in np.asarray(drawn).reshape(-1, 3)} == stored
    # and a run's validation pairs, its previews' conditions (they were colour-managed)
    from types import SimpleNamespace

    from difftrain.data.conditioning import Preprocess
    from difftrain.methods.controlnet import ControlNetTraining

    trainer_side = SimpleNamespace(preprocess=Preprocess("segmentation"))
    previewed = ControlNetTraining._condition_at(trainer_side, str(root / "conditioning" / "000.png"), 16)
    assert {tuple(c) for c in np.asarray(previewed).reshape(-1, 3)} == stored
    assert np.abs(np.asarray(load_image(root / "conditioning" / "000.png"), dtype=int)
                  - np.asarray(label_map, dtype=int)).max() > 20  # a photo's decode still converts it
