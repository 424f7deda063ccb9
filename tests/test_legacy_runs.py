"""Run folders written before manifests and config versions still generate, sample and resume.

The fixture (tests/fixtures/before-manifest, see its README) was trained and drawn from by
the last commit before the change; today's code must give the same pixels.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difftrain.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "before-manifest"


@pytest.fixture
def legacy(tmp_path, monkeypatch) -> Path:
    """The fixture's runs, beside the base model and data they were trained on (paths in their configs are relative)."""
    from difftrain.data.shapes import write_shapes_dataset
    from difftrain.models.tiny_sd import write_tiny_sd

    shutil.copytree(FIXTURE / "runs", tmp_path / "runs")
    write_tiny_sd(tmp_path / "base", seed=0)
    write_shapes_dataset(tmp_path / "data", num_images=12, size=16, seed=0)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def assert_same_pixels(new: Path, old: Path) -> None:
    difference = np.abs(pixels(new) - pixels(old))
    assert difference.max() <= 1, f"{new} differs from {old} by up to {difference.max()} levels"


@pytest.mark.parametrize(
    "run, args, expected",
    [
        # (expected/lora/00000-3.png, drawn with Euler a, keeps the old placement of Euler's steps, which began at
        # the config's "leading" t = 751 of 4 steps; since 2026-12-05 they begin at t = 999 as A1111's do. Karras
        # sigmas never depended on it: the old commit drew lora-karras/ in 2026-12-05, see make.sh.)
        ("lora", ["--prompt", "a red circle", "--seed", "3", "--scheduler", "DPM++ 2M Karras"],
         "lora-karras/00000-3.png"),
        ("ti", ["--prompt", "a photo of <sq>", "--seed", "5", "--scheduler", "DPM++ 2M Karras"], "ti/00000-5.png"),
    ],
)
def test_old_runs_generate_the_same_pixels(legacy, run, args, expected):
    out = legacy / "out" / run
    size = ["--width", "32", "--height", "32", "--steps", "4", "--no-progress"]
    assert main(["generate", f"runs/{run}", *args, *size, "--out", str(out)]) == 0
    assert not (legacy / "runs" / run / "model" / "difftrain.json").exists()  # read as it is, never rewritten
    assert_same_pixels(next(out.glob("*.png")), FIXTURE / "expected" / expected)


def test_an_old_checkpoint_samples_the_same_pixels_and_resumes(legacy):
    out = legacy / "grid.png"
    assert main(["sample", "runs/uncond", "--num", "4", "--steps", "4", "--seed", "0", "--scheduler", "euler",
                 "--out", str(out)]) == 0
    # Since 2026-12-06 image i is drawn from seed + i (it was one generator for the grid), so only the first cell,
    # seed 0's first draw either way, is still the old commit's; Euler adds no noise after the start.
    first_cell = (slice(2, 130), slice(2, 130))  # make_grid: a 2 px gutter, 16 px samples shown at 128
    difference = np.abs(pixels(out)[first_cell] - pixels(FIXTURE / "expected" / "uncond-checkpoint.png")[first_cell])
    assert difference.max() <= 1, difference.max()
    config = legacy / "runs" / "uncond" / "checkpoints" / "step-00000002" / "config.yaml"
    # The data was written again just now (same pixels, new file times): the resume check sees that.
    resume = ["--resume", "latest", "--allow-data-change", "--set", "training.max_steps=4", "--no-progress"]
    assert main(["train", str(config), *resume]) == 0
    assert (legacy / "runs" / "uncond" / "model" / "difftrain.json").is_file()


def test_the_old_configs_are_migrated(legacy):
    from difftrain.config import CONFIG_VERSION, load_config

    for run in ("lora", "ti", "uncond"):
        config = load_config(legacy / "runs" / run / "config.yaml")
        assert config.version == CONFIG_VERSION
