"""The shapes judge: every image of the set passes with its own caption; what a failed model draws does not."""

import json
import random
import subprocess
import sys

import numpy as np
from PIL import Image, ImageDraw

from difftrain.cli import main
from difftrain.data.shapes import draw_shape, write_shapes_dataset
from difftrain.data.shapes_judge import judge_image
from difftrain.sampling.images import make_grid


def test_every_image_of_the_set_is_clean_and_named_by_its_caption(tmp_path):
    out = write_shapes_dataset(tmp_path / "shapes", num_images=240, size=32, seed=7)
    for line in (out / "metadata.jsonl").read_text().splitlines():
        record = json.loads(line)
        verdict = judge_image(Image.open(out / record["file_name"]))
        assert verdict.clean, (record, verdict.problems)
        assert f"a {verdict.colour} {verdict.shape}" == record["text"]


def _failures() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    blank = Image.new("RGB", (32, 32), (240, 240, 240))
    canvas = Image.new("RGB", (32, 32), (240, 240, 240))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([3, 3, 11, 11], fill=(220, 40, 40))
    draw.rectangle([19, 19, 28, 28], fill=(220, 40, 40))
    two_tone = Image.new("RGB", (32, 32), (240, 240, 240))
    draw = ImageDraw.Draw(two_tone)
    draw.rectangle([6, 6, 25, 15], fill=(220, 40, 40))
    draw.rectangle([6, 16, 25, 25], fill=(40, 80, 220))
    brown = Image.new("RGB", (32, 32), (240, 240, 240))
    ImageDraw.Draw(brown).rectangle([6, 6, 25, 25], fill=(120, 70, 20))
    bar = Image.new("RGB", (32, 32), (240, 240, 240))
    ImageDraw.Draw(bar).rectangle([4, 12, 28, 18], fill=(40, 180, 60))
    return {"noise": noise, "blank": blank, "two pieces": canvas, "two colours": two_tone, "brown": brown,
            "bar": bar}


def test_what_a_failed_model_draws_is_not_clean():
    problems = {name: judge_image(image).problems for name, image in _failures().items()}
    assert all(problems.values()), problems
    assert "separate pieces" in problems["two pieces"][0]
    assert any("not one colour" in p for p in problems["two colours"])
    assert any("not a palette colour" in p for p in problems["brown"])
    assert any("not square" in p for p in problems["bar"])
    # A ring and a frame overlap their solid shapes by more than MIN_OVERLAP: the holes say it
    for draw in ("ellipse", "rectangle"):
        hollow = Image.new("RGB", (64, 64), "white")
        getattr(ImageDraw.Draw(hollow), draw)([10, 10, 54, 54], fill=(220, 30, 30))
        getattr(ImageDraw.Draw(hollow), draw)([25, 25, 39, 39], fill="white")
        assert any(p.startswith("hollow (") for p in judge_image(hollow).problems), draw


def test_cli_judges_a_grid_cell_by_cell(tmp_path, capsys):
    good = [draw_shape(random.Random(i), 32, "blue", "circle") for i in range(3)]
    grid = tmp_path / "grid.png"
    make_grid(good + [_failures()["noise"]], columns=2).save(grid)
    command = ["data", "judge-shapes", str(grid), "--grid", "2x2"]
    # As `make demo` runs it, in its own process; the exit codes below in this one (a process costs 2.5 s).
    result = subprocess.run([sys.executable, "-m", "difftrain", *command], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "3/4 cells are clean" in result.stdout
    assert result.stdout.count("blue circle") == 3
    assert main(command + ["--min-clean", "4"]) == 1
    capsys.readouterr()
    assert main(command[:-1] + ["4by4"]) == 2
    assert "give columns x rows" in capsys.readouterr().err
