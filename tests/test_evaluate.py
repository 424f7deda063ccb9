"""`difftrain eval` and evaluation during training, on the real metric networks with random weights.

The Inception network is torch-fidelity's own class and LPIPS our layout of lpips' one,
both with weights the tests make (nothing is downloaded); the CLIP is a tiny one trained
here for a few steps on the shapes captions.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config, write_config
from PIL import Image, ImageFilter
from test_text2image import tiny_sd  # noqa: F401  (the fixture)

from difftrain.cli import main
from difftrain.evaluate.inception import InceptionFeatures, prepare, write_random_inception
from difftrain.evaluate.lpips import LPIPS, load_lpips, pairwise_diversity, to_tensor, write_random_lpips
from difftrain.evaluate.metrics import Statistics, frechet_distance, frechet_distance_of, kernel_inception_distance
from difftrain.evaluate.weights import INCEPTION, EvalError, find_weights


@pytest.fixture(scope="session")
def networks(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("eval-networks")
    write_random_inception(folder / "inception.safetensors")
    write_random_lpips(folder)
    return {"inception": folder / "inception.safetensors", "alexnet": folder / "alexnet.safetensors",
            "lpips": folder / "lpips.safetensors"}


@pytest.fixture(scope="session")
def inception(networks) -> InceptionFeatures:
    return InceptionFeatures(networks["inception"], batch_size=48)


def _images(folder: Path) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]


def _flags(networks: dict[str, Path]) -> list[str]:
    return ["--inception-weights", str(networks["inception"]), "--alexnet-weights", str(networks["alexnet"]),
            "--lpips-weights", str(networks["lpips"]), "--no-progress"]


# ----------------------------------------------------------------------------- the networks
def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise_and_blur(inception, shapes32):
    images = _images(shapes32)[:8]  # 7 sets of 8 through Inception at 299 px: most of this test's time
    rng = np.random.default_rng(0)

    def noisy(image, sigma):
        array = np.asarray(image, dtype=np.float64) + rng.normal(0, sigma, (32, 32, 3))
        return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))

    sets = {"clean": images}
    sets |= {f"noise {s}": [noisy(im, s) for im in images] for s in (10, 40, 100)}
    sets |= {f"blur {r}": [im.filter(ImageFilter.GaussianBlur(r)) for im in images] for r in (0.6, 1.5, 3)}
    everything = [im for group in sets.values() for im in group]
    features, _ = inception(everything, 32)
    by_set = dict(zip(sets, features.split(8)))
    clean = by_set["clean"]
    scale = np.trace(Statistics.of(clean).sigma)  # the eigenvalues of a rank-7 product leave rounding of ~1e-6 of this
    assert frechet_distance(Statistics.of(clean), Statistics.of(clean.clone())) == pytest.approx(0, abs=1e-5 * scale)
    for kind, levels in (("noise", (10, 40, 100)), ("blur", (0.6, 1.5, 3))):
        # The n x n route (equal to the general one: test_eval_metrics.py): 3 s less per FID than 2048 x 2048.
        fids = [frechet_distance_of(by_set[f"{kind} {lv}"], Statistics.of(clean)) for lv in levels]
        kids = [kernel_inception_distance(by_set[f"{kind} {lv}"], clean, subsets=20)["mean"] for lv in levels]
        assert 0 < fids[0] < fids[1] < fids[2], (kind, fids)
        assert kids[0] < kids[1] < kids[2], (kind, kids)


def test_the_resize_rule_crops_to_a_square_and_resizes_both_sides_alike():
    wide = Image.new("RGB", (60, 40), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 10, 40))  # a blue band on the left, cropped away by the centre crop
    array = prepare(wide, 32)
    assert array.shape == (32, 32, 3) and array.dtype == np.uint8
    assert (array[..., 0] > 250).all() and (array[..., 2] < 5).all()
    assert prepare(Image.new("L", (32, 32), 7), 32)[0, 0].tolist() == [7, 7, 7]


def test_lpips_is_a_distance_and_loads_the_reference_layouts(networks):
    network, info = load_lpips(networks["alexnet"], networks["lpips"])
    assert info["backbone"]["standard"] is False and info["min_size"] == 64
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    slight = Image.fromarray(np.clip(np.asarray(base, dtype=np.int16) + 8, 0, 255).astype(np.uint8))
    other = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    x = to_tensor([base, base, slight, other])
    assert x.shape == (4, 3, 64, 64)  # upsampled to LPIPS' minimum size
    d = network(x[[0, 0, 0]], x[[1, 2, 3]])
    assert d[0] == 0 and 0 < d[1] < d[2]
    assert network(x[[3]], x[[0]]).item() == pytest.approx(d[2].item(), rel=1e-5)  # symmetric
    assert pairwise_diversity(network, [base, base, base]) == 0
    assert pairwise_diversity(network, [base, other]) == pytest.approx(d[2].item(), rel=1e-5)
    assert pairwise_diversity(network, [base]) is None
    assert pairwise_diversity(network, [base, other.resize((48, 40))]) > 0  # sizes differ: compared at the first's
    # The key names are torchvision's AlexNet (features.N) and lpips' heads (linK.model.1): those files load as they are.
    assert {k for k in LPIPS().state_dict() if k.startswith("lin")} == {f"lin{i}.model.1.weight" for i in range(5)}
    with pytest.raises(EvalError, match="do not fit"):
        load_lpips(networks["lpips"], networks["lpips"])  # heads given as the backbone


def test_missing_weights_offline_name_the_file_its_hash_and_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("DIFFTRAIN_INCEPTION_WEIGHTS", "DIFFTRAIN_WEIGHTS_DIR"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(EvalError) as error:
        find_weights(INCEPTION)
    message = str(error.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in message and "6726825d" in message
    assert "https://github.com/toshas/torch-fidelity/releases" in message and "offline" in message
    # the libraries' own cache counts: a file in torch.hub's checkpoints folder is found
    cached = tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION.filename
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert find_weights(INCEPTION) == cached
    with pytest.raises(EvalError, match="does not exist"):
        find_weights(INCEPTION, tmp_path / "nowhere.pth")


def test_clip_score_ranks_matching_prompts_over_mismatched_ones(tiny_clip, shapes32):
    from difftrain.data.shapes import COLOURS
    from difftrain.evaluate.clip_score import ClipScorer

    scorer = ClipScorer(tiny_clip)
    rows = [json.loads(line) for line in (shapes32 / "metadata.jsonl").read_text().splitlines()]
    images = [Image.open(shapes32 / row["file_name"]) for row in rows]
    matching = [row["text"] for row in rows]
    colours = list(COLOURS)
    wrong = [text.replace(c, colours[(colours.index(c) + 2) % 4]) for text in matching for c in colours if c in text]
    right, mismatched = scorer.scores(images, matching), scorer.scores(images, wrong)
    assert right.abs().max() <= 100
    # A set's score is torchmetrics': the mean of 100 x cos, then clamped at 0 (not each pair clamped first).
    assert scorer.score(images, wrong) == pytest.approx(max(mismatched.mean().item(), 0.0), rel=1e-6)
    assert right.mean() > mismatched.mean() + 5
    assert (right > mismatched).float().mean() > 0.8
    with pytest.raises(EvalError, match="cannot load"):
        ClipScorer(shapes32)  # a folder that holds no CLIP
    # through the command: a folder of images with their captions, CLIP score only (no reference needed)
    out = shapes32.parent / "clip-eval"
    assert main(["eval", str(shapes32), "--metrics", "clip", "--clip-model", str(tiny_clip), "--out", str(out),
                 "--no-progress"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["metrics"]["clip_score"] == pytest.approx(right.mean().item(), rel=1e-4)
    assert result["settings"]["networks"]["clip"]["model"] == str(tiny_clip)


# ----------------------------------------------------------------------------- difftrain eval
def test_eval_on_a_folder_of_images_reports_caches_and_skips_bad_reference_files(networks, shapes32, tmp_path, capsys):
    from difftrain.data.shapes import write_shapes_dataset

    generated = write_shapes_dataset(tmp_path / "generated", num_images=16, size=32, seed=7)
    reference = tmp_path / "reference"
    reference.mkdir()
    for path in sorted(shapes32.glob("*.png"))[:40]:
        (reference / path.name).write_bytes(path.read_bytes())
    (reference / "broken.png").write_bytes(b"\x89PNG not really")
    Image.new("RGB", (48, 40), (200, 30, 30)).save(reference / "odd-size.png")  # resized by the rule
    cache = tmp_path / "cache"
    argv = ["eval", str(generated), "--reference", str(reference), "--cache-dir", str(cache), *_flags(networks)]
    # By default every metric the inputs allow: these images have captions, so CLIP score too, whose
    # network is not on this offline machine. That is said before any work is done.
    assert main([*argv, "--out", str(tmp_path / "default")]) == 2
    assert "CLIP model openai/clip-vit-large-patch14: cannot load it" in capsys.readouterr().err
    assert not (tmp_path / "default").exists()
    argv += ["--metrics", "fid,kid,is,prc,lpips"]
    assert main([*argv, "--out", str(tmp_path / "first")]) == 0
    shown = capsys.readouterr().out
    first = json.loads((tmp_path / "first" / "eval.json").read_text())
    metrics = first["metrics"]
    assert metrics["images"] == 16 and metrics["fid"] > 0 and metrics["kid_subset_size"] == 16
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1 and metrics["is"] >= 1
    assert metrics["lpips_diversity"] > 0  # the folder's captions group its images by prompt
    assert "clip_score" not in metrics
    assert first["reference"]["images"] == 41 and first["reference"]["from_cache"] is False
    assert any("broken.png" in item[0] for item in first["reference"]["skipped_images"])
    assert first["settings"]["networks"]["inception"]["weights"]["standard"] is False
    assert any("other than the published weights" in w and "inception.safetensors" in w for w in first["warnings"])
    assert "centre crop" in first["settings"]["resize_rule"] and first["settings"]["size"] == 32
    assert any("41 images" in w and "2048" in w for w in first["warnings"])
    assert any("this IS is capped at 1" in w for w in first["warnings"])  # 16 images in 10 splits
    assert any("precision/recall of 16 images against 41" in w for w in first["warnings"])
    assert "FID" in shown and "report" in shown
    report = (tmp_path / "first" / "report.html").read_text()
    assert "FID" in report and "grids/000.png" in report and (tmp_path / "first" / "grids" / "000.png").is_file()
    # Again: the reference features come from the cache, and the numbers are the same.
    assert main([*argv, "--out", str(tmp_path / "second")]) == 0
    second = json.loads((tmp_path / "second" / "eval.json").read_text())
    assert second["reference"]["from_cache"] is True
    assert second["metrics"]["fid"] == pytest.approx(metrics["fid"], rel=1e-9)
    # ... and so do the measured folder's: the same 16 files, whose features are cached by their bytes as well
    assert (first["generation"]["features_from_cache"], second["generation"]["features_from_cache"]) == (False, True)
    assert second["metrics"]["is"] == pytest.approx(metrics["is"], rel=1e-9)
    # A report may not go inside the folder it measures, and a report folder is not measured by its grids.
    assert main([*argv, "--out", str(generated / "report")]) == 2
    assert "is inside the folder being measured" in capsys.readouterr().err
    assert main([argv[0], str(tmp_path / "first"), *argv[2:], "--out", str(tmp_path / "again")]) == 2
    assert f"is an eval report of {generated} (it holds grids, not the images)" in capsys.readouterr().err
    # Changing one reference image's bytes makes a new cache entry; one measured image's too.
    Image.new("RGB", (32, 32), (1, 2, 3)).save(reference / "odd-size.png")
    Image.new("RGB", (32, 32), (3, 2, 1)).save(next(generated.glob("*.png")))
    assert main([*argv[:-2], "--out", str(tmp_path / "third"), "--metrics", "fid"]) == 0
    third = json.loads((tmp_path / "third" / "eval.json").read_text())
    assert third["reference"]["from_cache"] is False and third["generation"]["features_from_cache"] is False


def test_no_eval_writes_over_a_users_images_a_report_it_measures_or_its_reference(
        networks, shapes32, tiny_sd, tmp_path, capsys):  # noqa: F811
    """A folder eval writes eval.json beside the images/ it measured: a later eval of a model into the same --out
    took that as its own earlier output and deleted the user's images. Measuring an earlier report into itself
    (the default --out eval) wrote over it; an --out inside the reference became reference images."""
    import shutil

    project = tmp_path / "project"
    shutil.copytree(shapes32, project / "images")
    count = len(list((project / "images").glob("*.png")))
    flags = [*_flags(networks), "--cache-dir", str(tmp_path / "cache"), "--metrics", "is"]
    assert main(["eval", str(project / "images"), "--out", str(project), *flags]) == 0
    capsys.readouterr()
    assert main(["eval", str(tiny_sd), "--prompt", "a red circle", "--num-images", "2", "--steps", "2",
                 "--out", str(project), *flags]) == 2
    assert "holds files that no earlier eval drew" in capsys.readouterr().err
    assert len(list((project / "images").glob("*.png"))) == count
    report = (project / "eval.json").read_text()
    assert main(["eval", str(project), "--out", str(project), *flags]) == 2
    assert "is inside the folder being measured" in capsys.readouterr().err and (project / "eval.json").read_text(
        ) == report
    assert main(["eval", str(tiny_sd), "--prompt", "a red circle", "--reference", str(shapes32), "--out",
                 str(shapes32 / "eval"), *flags]) == 2
    assert "is inside the --reference folder" in capsys.readouterr().err and not (shapes32 / "eval").exists()


def test_eval_statistics_files_round_trip_and_refuse_what_does_not_compare(networks, shapes32, tmp_path, capsys):
    stats = tmp_path / "shapes-stats.safetensors"
    common = ["--cache-dir", str(tmp_path / "cache"), *_flags(networks), "--metrics", "fid,kid"]
    generated = tmp_path / "generated"
    generated.mkdir()
    for path in sorted(shapes32.glob("*.png"))[40:]:
        (generated / path.name).write_bytes(path.read_bytes())
    assert main(["eval", str(generated), "--reference", str(shapes32), "--save-reference", str(stats),
                 "--out", str(tmp_path / "a"), *common]) == 0
    assert main(["eval", str(generated), "--reference", str(stats), "--out", str(tmp_path / "b"), *common]) == 0
    a, b = (json.loads((tmp_path / x / "eval.json").read_text())["metrics"] for x in ("a", "b"))
    assert b["fid"] == pytest.approx(a["fid"], rel=1e-9) and b["kid"] == pytest.approx(a["kid"], rel=1e-9)
    # The same images as laion shards: the cache is keyed by content, so they cost nothing and give the same FID.
    from difftrain.data.shards import build_shards
    from difftrain.data.sources import open_source

    shards = build_shards(open_source("folder", shapes32, progress=False), tmp_path / "laion", "laion", records_per_shard=20)
    assert main(["eval", str(generated), "--reference", str(shards), "--reference-source", "laion",
                 "--out", str(tmp_path / "laion-eval"), *common]) == 0
    laion = json.loads((tmp_path / "laion-eval" / "eval.json").read_text())
    assert laion["reference"]["from_cache"] is True and laion["metrics"]["fid"] == pytest.approx(a["fid"], rel=1e-12)
    # A jsonl reference whose lines name their fields otherwise (Hugging Face's metadata.jsonl: file_name, text)
    jsonl = ["eval", str(generated), "--reference", str(shapes32 / "metadata.jsonl"), "--reference-source", "jsonl"]
    capsys.readouterr()
    assert main([*jsonl, "--out", str(tmp_path / "j"), *common]) == 2
    assert "name the key that holds it with --reference-image-key" in capsys.readouterr().err
    assert main([*jsonl, "--reference-image-key", "file_name", "--reference-caption-key", "text",
                 "--out", str(tmp_path / "j"), *common]) == 0
    assert json.loads((tmp_path / "j" / "eval.json").read_text())["metrics"]["fid"] == pytest.approx(a["fid"],
                                                                                                      rel=1e-12)
    # ... and without captions: FID needs none, and the advice is eval's own flag (it was a run's data.captions)
    assert main([*jsonl, "--reference-image-key", "file_name", "--out", str(tmp_path / "k"), *common]) == 2
    assert ("name the caption's key with --reference-caption-key, or --reference-caption-key '' reads the data "
            "without captions") in capsys.readouterr().err
    assert main([*jsonl, "--reference-image-key", "file_name", "--reference-caption-key", "", "--out",
                 str(tmp_path / "k"), *common]) == 0
    assert json.loads((tmp_path / "k" / "eval.json").read_text())["metrics"]["fid"] == pytest.approx(a["fid"],
                                                                                                      rel=1e-12)
    # A folder measured: its caption problems are warned of, and its messages name eval's target, not data.path
    import shutil

    captioned = tmp_path / "captioned"
    captioned.mkdir()
    for image in sorted(generated.glob("*.png"))[:2]:
        shutil.copy(image, captioned / image.name)
    (captioned / image.with_suffix(".txt").name).write_bytes("café".encode("latin-1"))
    assert main(["eval", str(captioned), "--metrics", "is", "--out", str(tmp_path / "c"), *common[:-2]]) == 0
    warned = json.loads((tmp_path / "c" / "eval.json").read_text())["warnings"]
    assert any("1 caption problem(s)" in text and "not valid UTF-8" in text for text in warned), warned
    (captioned / ".difftrain-unfinished").touch()
    assert main(["eval", str(captioned), "--metrics", "is", "--out", str(tmp_path / "u"), *common[:-2]]) == 2
    assert f"target: {captioned} is the output of a data build" in capsys.readouterr().err
    # another tool's mu/sigma .npz: FID only
    from safetensors.torch import load_file

    saved = load_file(stats)
    np.savez(tmp_path / "other.npz", mu=saved["mu"].numpy(), sigma=saved["sigma"].numpy())
    assert main(["eval", str(generated), "--reference", str(tmp_path / "other.npz"), "--out", str(tmp_path / "c"),
                 *common]) == 0
    c = json.loads((tmp_path / "c" / "eval.json").read_text())
    assert c["metrics"]["fid"] == pytest.approx(a["fid"], rel=1e-6) and "kid" not in c["metrics"]
    assert any("mu and sigma only" in w for w in c["warnings"])
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))  # another network's features
    capsys.readouterr()
    assert main(["eval", str(generated), "--reference", str(tmp_path / "small.npz"), "--out", str(tmp_path / "s"),
                 *common]) == 2
    assert "are not statistics of InceptionV3's 2048-d pool features" in capsys.readouterr().err
    # a compressed .npz damaged at the start of mu's deflate stream (zlib's own error, not an OSError)
    import struct
    import zipfile

    np.savez_compressed(tmp_path / "damaged.npz", mu=saved["mu"].numpy(), sigma=saved["sigma"].numpy())
    damaged = bytearray((tmp_path / "damaged.npz").read_bytes())
    at = zipfile.ZipFile(tmp_path / "damaged.npz").getinfo("mu.npy").header_offset
    at += 30 + sum(struct.unpack("<HH", damaged[at + 26:at + 30]))  # past the local header, its name and extra
    damaged[at:at + 8] = b"\xff" * 8
    (tmp_path / "damaged.npz").write_bytes(bytes(damaged))
    capsys.readouterr()
    assert main(["eval", str(generated), "--reference", str(tmp_path / "damaged.npz"), "--out", str(tmp_path / "d"),
                 *common]) == 2
    assert "damaged.npz: not a statistics .npz of plain arrays" in capsys.readouterr().err
    np.savez(tmp_path / "pickled.npz", mu=np.array([{"a": 1}], dtype=object), sigma=np.eye(2))  # needs unpickling
    assert main(["eval", str(generated), "--reference", str(tmp_path / "pickled.npz"), "--out", str(tmp_path / "p"),
                 *common]) == 2
    assert "not a statistics .npz of plain arrays" in capsys.readouterr().err
    # --save-reference writes safetensors, so it must be named so (an .npz name could not be read back), and it
    # needs a reference to compute (one that is a statistics file already has nothing to save)
    for flags, said in ((["--reference", str(shapes32), "--save-reference", str(tmp_path / "x.npz")],
                         "give the file a .safetensors name"),
                        (["--reference", str(stats), "--save-reference", str(tmp_path / "x.safetensors")],
                         "is one already")):
        assert main(["eval", str(generated), *flags, "--out", str(tmp_path / "n"), *common]) == 2
        assert said in capsys.readouterr().err
    # ... and a metric that uses it: without one there would be nothing to save
    assert main(["eval", str(generated), "--reference", str(shapes32), "--save-reference",
                 str(tmp_path / "x.safetensors"), "--out", str(tmp_path / "n"), *common, "--metrics", "is"]) == 2
    assert "--metrics is uses no reference" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
    # statistics at another size, or from other Inception weights, do not compare: refused
    capsys.readouterr()
    assert main(["eval", str(generated), "--reference", str(stats), "--size", "64", "--out", str(tmp_path / "d"),
                 *common]) == 2
    assert "computed at 32 px" in capsys.readouterr().err
    other_weights = tmp_path / "other-inception.safetensors"
    write_random_inception(other_weights, seed=1)
    flags = [*common]
    flags[flags.index("--inception-weights") + 1] = str(other_weights)
    assert main(["eval", str(generated), "--reference", str(stats), "--out", str(tmp_path / "e"), *flags]) == 2
    assert "other Inception weights" in capsys.readouterr().err


def test_eval_of_a_text_to_image_model_draws_what_generate_draws(networks, tmp_path, capsys):
    from difftrain.models.tiny_sd import write_tiny_sd

    model = write_tiny_sd(tmp_path / "tiny-sd")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n  \na blue square\n")
    out = tmp_path / "eval"
    argv = ["eval", str(model), "--prompts", str(prompts), "--num-images", "6", "--images-per-prompt", "3",
            "--steps", "3", "--scheduler", "Euler a", "--metrics", "is,lpips", "--out", str(out), *_flags(networks)]
    # --device is where it draws as well as where it measures: a device that is not there is refused first.
    assert main([*argv, "--device", "cuda:3"]) == 2
    assert "--device cuda:3: there is no such CUDA device here" in capsys.readouterr().err
    assert not (out / "images").exists()
    assert main([*argv, "--device", "cpu"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["generation"]["prompts"] == 2 and result["generation"]["scheduler"] == "Euler a"
    assert any("2 blank line(s) skipped" in w for w in result["warnings"])
    assert result["metrics"]["images"] == 6 and result["metrics"]["lpips_diversity"] > 0
    # image 4 is the second of "a blue square", seed 4: `difftrain generate` gives the same pixels
    assert main(["generate", str(model), "--prompt", "a blue square", "--seed", "4", "--steps", "3",
                 "--scheduler", "Euler a", "--out", str(tmp_path / "gen"), "--no-progress"]) == 0
    evaluated = np.asarray(Image.open(out / "images" / "00004-4.png"), dtype=np.int16)
    generated = np.asarray(Image.open(next((tmp_path / "gen").glob("*.png"))), dtype=np.int16)
    assert np.abs(evaluated - generated).max() <= 1
    from difftrain.generate.infotext import parse_infotext, read_png_infotext

    assert parse_infotext(read_png_infotext(out / "images" / "00004-4.png"))[0] == "a blue square"
    # Drawn again into the same --out with other seeds: the earlier images go (`difftrain eval OUT` measures the
    # folder, and would have mixed them in); a folder of images no eval wrote is refused, never emptied.
    again = [*argv[:argv.index("--num-images")], "--num-images", "3", *argv[argv.index("--num-images") + 2:]]
    assert main([*again, "--seed", "10", "--device", "cpu"]) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00000-10.png", "00001-11.png", "00002-12.png"]
    foreign = tmp_path / "foreign-out"
    (foreign / "images").mkdir(parents=True)
    (foreign / "images" / "mine.png").write_bytes(b"x")
    assert main([*argv[:argv.index("--out")], "--out", str(foreign), *_flags(networks)]) == 2
    assert "holds files that no earlier eval drew" in capsys.readouterr().err
    assert (foreign / "images" / "mine.png").exists()
    capsys.readouterr()
    assert main(["eval", str(model), "--metrics", "fid", "--prompt", "x", *_flags(networks),
                 "--out", str(tmp_path / "x")]) == 2
    assert "give --reference" in capsys.readouterr().err
    assert main(["eval", str(model), "--metrics", "fid,sharpness", *_flags(networks)]) == 2
    assert "unknown metric(s) sharpness" in capsys.readouterr().err
    assert main(["eval", str(model), "--metrics", "is", *_flags(networks), "--out", str(tmp_path / "y")]) == 2
    assert "needs prompts" in capsys.readouterr().err
    assert main(["eval", str(model), "--metrics", "is", "--prompt", "a fox <lora:shapes:1>", *_flags(networks),
                 "--out", str(tmp_path / "z")]) == 2
    assert "names a LoRA: evaluate the LoRA's run folder" in capsys.readouterr().err
    # A reference statistics file that cannot serve is refused before any image is drawn, not after hours of it.
    np.savez(tmp_path / "other.npz", mu=np.zeros(64), sigma=np.eye(64))
    assert main(["eval", str(model), "--metrics", "fid", "--prompt", "x", "--reference", str(tmp_path / "other.npz"),
                 *_flags(networks), "--out", str(tmp_path / "early")]) == 2
    assert "are not statistics of InceptionV3's 2048-d pool features" in capsys.readouterr().err
    assert not (tmp_path / "early").exists()


def test_clip_reads_a_prompt_without_its_a1111_syntax():
    from difftrain.evaluate.scores import plain_text

    assert plain_text("a (red:1.3) [fox] BREAK in the \\(snow\\) <lora:shapes:0.8>") == "a red fox in the (snow)"
    # Prompt editing as the text the last steps draw; a caption's "AND" and trailing ":30" are words.
    assert plain_text("a [red:blue:0.5] clock AND a square at 10:30") == "a blue clock AND a square at 10:30"


# ----------------------------------------------------------------------------- during training
@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory) -> Path:
    """One feature cache for the runs below: the shapes reference (24 images through Inception at 299 px, ~5 s)
    is computed by the first and read by the rest, as a user's runs share difftrain's cache."""
    return tmp_path_factory.mktemp("eval-cache")


def _eval_section(networks: dict[str, Path], cache: Path, **extra) -> dict:
    return {"every_steps": 2, "num_images": 8, "metrics": ["fid", "kid", "lpips"], "steps": 3,
            "scheduler": "ddim", "batch_size": 4, "reference_max": 24, "cache_dir": str(cache),
            "inception_weights": str(networks["inception"]), "alexnet_weights": str(networks["alexnet"]),
            "lpips_weights": str(networks["lpips"]), **extra}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "model" / "unet" / "diffusion_pytorch_model.safetensors")


def test_evaluation_during_training_changes_no_weight_and_keeps_the_best(networks, shapes_dir, tmp_path,
                                                                          reference_cache):
    from difftrain.config import load_config
    from difftrain.training.evaluation import read_eval_history
    from difftrain.training.trainer import train

    plain = write_config(tmp_path / "plain.yaml", tiny_config(shapes_dir, tmp_path / "plain",
                                                              checkpoint={"every_steps": 2, "keep_last": 1}))
    train(load_config(plain), progress=False)
    # Checkpoints every 4 steps, evaluation every 2: a best found between checkpoints gets its checkpoint then.
    evaluated_config = tiny_config(shapes_dir, tmp_path / "evaluated", eval=_eval_section(networks, reference_cache),
                                   checkpoint={"every_steps": 4, "keep_last": 1, "keep_best": "kid:max"})
    evaluated = write_config(tmp_path / "evaluated.yaml", evaluated_config)
    random.seed(123)  # global generators must come out of evaluation as they went in
    result = train(load_config(evaluated), progress=False)
    plain_weights, evaluated_weights = _weights(tmp_path / "plain"), _weights(tmp_path / "evaluated")
    assert all(torch.equal(plain_weights[k], evaluated_weights[k]) for k in plain_weights)

    run = result.run_dir
    history = read_eval_history(run / "metrics.jsonl")
    assert [h["step"] for h in history] == [2, 4]
    assert all(h["fid"] > 0 and h["images"] == 8 and "lpips_diversity" in h for h in history)
    assert (run / "eval.png").is_file() and (run / "model-best" / "difftrain.json").is_file()
    best_step = max(history, key=lambda h: h["kid"])["step"]
    assert best_step == 2  # (the worse one), between checkpoints: the path under test
    state = json.loads((run / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["best"]["step"] == best_step and state["best"]["metric"] == "kid"
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert kept == sorted({f"step-{best_step:08d}", "step-00000004"})  # keep_last 1, plus the best

    # The last step's number is what `difftrain eval` gives on the final model (the same EMA weights) with the
    # same settings: evaluation during training measures what users get.
    out = tmp_path / "cli"
    assert main(["eval", str(run), "--reference", str(shapes_dir), "--reference-max", "24", "--num-images", "8",
                 "--batch-size", "4", "--steps", "3", "--scheduler", "ddim", "--metrics", "fid,kid",
                 "--cache-dir", str(reference_cache), "--out", str(out), *_flags(networks)]) == 0
    cli = json.loads((out / "eval.json").read_text())
    assert cli["reference"]["from_cache"] is True  # the reference the run measured against (or an earlier run)
    assert cli["metrics"]["fid"] == pytest.approx(history[-1]["fid"], rel=1e-6)
    assert cli["metrics"]["kid"] == pytest.approx(history[-1]["kid"], rel=1e-6)


def test_a_class_models_evaluation_in_training_measures_what_difftrain_eval_measures(networks, shapes_dir, tmp_path,
                                                                                     reference_cache):
    """Both draw every class in turn at the model's guidance (model.class_guidance, kept in its manifest)."""
    from difftrain.config import load_config
    from difftrain.training.evaluation import read_eval_history
    from difftrain.training.trainer import train

    config = tiny_config(shapes_dir, tmp_path / "classes", model={"preset": "tiny", "classes": "captions"},
                         eval=_eval_section(networks, reference_cache, metrics=["fid"]))
    run = train(load_config(write_config(tmp_path / "classes.yaml", config)), progress=False).run_dir
    history = read_eval_history(run / "metrics.jsonl")
    out = tmp_path / "cli"
    assert main(["eval", str(run), "--reference", str(shapes_dir), "--reference-max", "24", "--num-images", "8",
                 "--batch-size", "4", "--steps", "3", "--scheduler", "ddim", "--metrics", "fid",
                 "--cache-dir", str(reference_cache), "--out", str(out), *_flags(networks)]) == 0
    cli = json.loads((out / "eval.json").read_text())
    assert cli["generation"]["classes"] == 12 and cli["generation"]["cfg"] == 3.0
    assert cli["metrics"]["fid"] == pytest.approx(history[-1]["fid"], rel=1e-6)


# The second span of each is two 75-token chunks (BREAK) at strong weights: a change the tiny model shows.
EDITED = ["a [red circle:(blue square:1.8) BREAK (green:1.8):1]", "a [(blue:1.8)|red BREAK (square:1.8)]"]


def test_text_to_image_evaluation_during_training_measures_what_difftrain_eval_measures(networks, shapes_dir, tmp_path,
                                                                                         reference_cache):
    from difftrain.config import load_config
    from difftrain.models.tiny_sd import write_tiny_sd
    from difftrain.training.evaluation import read_eval_history
    from difftrain.training.trainer import train

    base = write_tiny_sd(tmp_path / "tiny-sd")
    config = tiny_config(shapes_dir, tmp_path / "sd-run", method="text2image", model={"base": str(base)},
                         # A1111's prompt editing and alternation, drawn step by step on both sides.
                         eval=_eval_section(networks, reference_cache, num_images=4, images_per_prompt=2,
                                            metrics=["fid", "kid", "lpips"], batch_size=2, prompts=EDITED),
                         checkpoint={"every_steps": 2, "keep_last": 1, "keep_best": "lpips_diversity"},
                         # The previews' negative prompt is theirs: evaluation draws with eval.negative_prompt ("").
                         sample={"every_steps": 1000, "prompts": ["a red circle"], "steps": 2, "scheduler": "ddim",
                                 "negative_prompt": "a blue square"})
    config["model"].pop("preset")
    config["training"].update(max_steps=2, learning_rate=1e-4, lr_warmup_steps=0)
    run = train(load_config(write_config(tmp_path / "sd.yaml", config)), progress=False).run_dir
    [history] = read_eval_history(run / "metrics.jsonl")
    assert history["images"] == 4 and history["lpips_diversity"] > 0 and history["best"] is True
    assert (run / "model-best" / "difftrain.json").is_file()
    # The same prompts, seeds, sampler and size through `difftrain eval`:
    out, prompts = tmp_path / "cli", tmp_path / "prompts.txt"
    prompts.write_text("\n".join(EDITED) + "\n")
    assert main(["eval", str(run), "--reference", str(shapes_dir), "--reference-max", "24", "--num-images", "4",
                 "--prompts", str(prompts),
                 "--images-per-prompt", "2", "--batch-size", "2", "--steps", "3", "--scheduler", "ddim", "--cfg", "7.5",
                 "--width", "16", "--height", "16", "--metrics", "fid,kid,lpips", "--cache-dir", str(reference_cache),
                 "--out", str(out), *_flags(networks)]) == 0
    cli = json.loads((out / "eval.json").read_text())["metrics"]
    for name in ("fid", "kid", "lpips_diversity"):
        assert cli[name] == pytest.approx(history[name], rel=1e-4), name
    # With latents and text cached (the encoders leave the device in training) and no previews, evaluation
    # still has both encoders, and the same run measures the same.
    config.update(output_dir=str(tmp_path / "cached-run"), sample={"every_steps": 1000, "prompts": []},
                  data={**config["data"], "cache": {"latents": True, "text": True}})
    cached = train(load_config(write_config(tmp_path / "cached.yaml", config)), progress=False).run_dir
    [cached_history] = read_eval_history(cached / "metrics.jsonl")
    for name in ("fid", "kid", "lpips_diversity"):
        assert cached_history[name] == pytest.approx(history[name], rel=1e-3), name


def test_resume_with_evaluation_on_is_exact_and_keeps_the_best(networks, shapes_dir, tmp_path, reference_cache):
    from difftrain.config import load_config
    from difftrain.training.trainer import train

    section = _eval_section(networks, reference_cache, metrics=["fid"])
    whole = write_config(tmp_path / "whole.yaml", tiny_config(
        shapes_dir, tmp_path / "whole", eval=section, checkpoint={"every_steps": 2, "keep_last": 1, "keep_best": "fid"}))
    train(load_config(whole), progress=False)
    halves = tiny_config(shapes_dir, tmp_path / "halves", eval=section,
                         checkpoint={"every_steps": 2, "keep_last": 1, "keep_best": "fid"})
    halves["training"]["max_steps"] = 2
    train(load_config(write_config(tmp_path / "first-half.yaml", halves)), progress=False)
    halves["training"]["max_steps"] = 4
    train(load_config(write_config(tmp_path / "second-half.yaml", halves)), progress=False, resume="latest")
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "halves")
    assert all(torch.equal(a[k], b[k]) for k in a)
    best = [json.loads((run / "checkpoints" / "step-00000004" / "state.json").read_text())["best"]
            for run in (tmp_path / "whole", tmp_path / "halves")]
    assert best[0] == best[1]


def test_a_resume_from_an_earlier_checkpoint_sets_aside_the_left_branchs_model_best(networks, shapes_dir, tmp_path,
                                                                                  reference_cache, monkeypatch,
                                                                                  capsys):
    from signal_probe import signalling_step_done

    from difftrain.training import trainer

    config = write_config(tmp_path / "run.yaml", tiny_config(
        shapes_dir, tmp_path / "run", eval=_eval_section(networks, reference_cache, metrics=["fid"]),
        checkpoint={"every_steps": 2, "keep_last": 2, "keep_best": "fid"}))
    assert main(["train", str(config), "--no-progress"]) == 0
    run = tmp_path / "run"
    # As when the branch's best came at step 4 (the first evaluation, at 2, is always a best).
    manifest = json.loads((run / "model-best" / "difftrain.json").read_text())
    manifest["trained"]["at_step"] = 4
    (run / "model-best" / "difftrain.json").write_text(json.dumps(manifest))
    assert json.loads((run / "checkpoints/step-00000002/state.json").read_text())["best"]["step"] == 2
    monkeypatch.setattr(trainer._LoopTimer, "step_done", signalling_step_done(1))  # stop after one step
    assert main(["train", str(config), "--no-progress", "--resume", str(run / "checkpoints/step-00000002")]) == 130
    assert "model-best-step-00000004" in capsys.readouterr().out
    assert not (run / "model-best").exists() and (run / "checkpoints/abandoned/model-best-step-00000004").is_dir()


def test_a_run_whose_metric_networks_are_missing_is_refused_before_it_trains(shapes_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty torch.hub cache
    for name in ("DIFFTRAIN_INCEPTION_WEIGHTS", "DIFFTRAIN_WEIGHTS_DIR"):
        monkeypatch.delenv(name, raising=False)
    config = tiny_config(shapes_dir, tmp_path / "r", eval={"every_steps": 2})
    assert main(["train", str(write_config(tmp_path / "r.yaml", config)), "--no-progress"]) == 2
    assert "weights-inception-2015-12-05-6726825d.pth" in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoints").exists()
    from difftrain.models.tiny_sd import write_tiny_sd

    config = tiny_config(shapes_dir, tmp_path / "c", method="text2image", model={"base": str(write_tiny_sd(tmp_path / "sd"))},
                         eval={"every_steps": 2, "metrics": ["clip"], "clip_model": "someone/not-cached-clip"})
    config["model"].pop("preset")
    assert main(["train", str(write_config(tmp_path / "c.yaml", config)), "--no-progress"]) == 2
    assert "someone/not-cached-clip: not in the Hugging Face cache" in capsys.readouterr().err
    config = tiny_config(shapes_dir, tmp_path / "u", eval={"every_steps": 2, "metrics": ["clip"]})
    assert main(["train", str(write_config(tmp_path / "u.yaml", config)), "--no-progress"]) == 2
    assert "an unconditional model draws without prompts" in capsys.readouterr().err


def test_a_reference_or_prompts_that_cannot_be_had_refuse_the_run_before_it_trains(networks, shapes_dir, tmp_path,
                                                                                     capsys):
    """Found at the first evaluation, these stopped a run hours in, before that step's checkpoint was written."""
    config = tiny_config(shapes_dir, tmp_path / "r", eval=_eval_section(networks, tmp_path / "cache",
                                                                         reference=str(tmp_path / "no-such-folder")))
    assert main(["train", str(write_config(tmp_path / "r.yaml", config)), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"eval.reference: {tmp_path / 'no-such-folder'} is not a folder" in err and "data.path" not in err
    assert not (tmp_path / "r" / "checkpoints").exists()
    from difftrain.models.tiny_sd import write_tiny_sd

    config = tiny_config(shapes_dir, tmp_path / "c", method="text2image", model={"base": str(write_tiny_sd(tmp_path / "sd"))},
                         eval=_eval_section(networks, tmp_path / "cache"))
    config["model"].pop("preset")
    config["data"]["captions"] = "none"
    assert main(["train", str(write_config(tmp_path / "c.yaml", config)), "--no-progress"]) == 2
    assert "needs prompts: set eval.prompts" in capsys.readouterr().err
    assert not (tmp_path / "c" / "checkpoints").exists()


def test_prompts_sampled_from_captions_repeat_no_record_while_any_is_left(shapes_dir):
    from difftrain.evaluate.reference import open_records

    records = open_records(shapes_dir)
    captions = records.sample_captions(len(records), seed=3)
    every = {tuple(records.source.read(i).captions) for i in records.indices}
    assert len(captions) == len(records) and len(set(captions)) == len(every)
    assert records.sample_captions(len(records), seed=3) == captions != records.sample_captions(len(records), seed=4)


def test_eval_config_errors_name_the_key(shapes_dir, tmp_path, capsys):
    config = tiny_config(shapes_dir, tmp_path / "r", checkpoint={"keep_best": "fid"})
    assert main(["config", "check", str(write_config(tmp_path / "a.yaml", config))]) == 2
    assert "checkpoint.keep_best = 'fid': set eval.every_steps" in capsys.readouterr().err
    config = tiny_config(shapes_dir, tmp_path / "r", checkpoint={"keep_best": "clip_score"}, eval={"every_steps": 5})
    assert main(["config", "check", str(write_config(tmp_path / "b.yaml", config))]) == 2
    assert "add clip to eval.metrics" in capsys.readouterr().err
    config = tiny_config(shapes_dir, tmp_path / "r", eval={"every_steps": 5, "metrics": ["fid", "sharpness"]})
    assert main(["config", "check", str(write_config(tmp_path / "c.yaml", config))]) == 2
    assert "eval.metrics.1" in capsys.readouterr().err


def test_our_inception_leaves_no_empty_torch_fidelity_package_behind():
    """A user's own `import torch_fidelity` later in the process must get the real package (or its real error)."""
    import subprocess
    import sys

    code = ("import sys; from difftrain.evaluate.inception import _inception_class; _inception_class(); "
            "print('torch_fidelity' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_the_report_shows_a_sample_of_a_large_evaluation(tmp_path):
    """An FID-30k run (one image per prompt) wrote 30k grids; 50k unconditional images one 2.5 GB grid."""
    from difftrain.evaluate.report import REPORT_GROUPS, REPORT_IMAGES, write_report
    from difftrain.evaluate.scores import Group

    tile = Image.new("RGB", (8, 8), (200, 0, 0))
    groups = [Group(f"prompt {i}", [tile]) for i in range(REPORT_GROUPS + 8)]
    result = {"metrics": {"images": len(groups)}, "target": "model", "generation": {}, "settings": {}, "warnings": []}
    page = write_report(tmp_path / "many", result, groups).read_text()
    assert len(list((tmp_path / "many" / "grids").glob("*.png"))) == REPORT_GROUPS and "8 more prompts" in page
    write_report(tmp_path / "one", result, [Group(None, [tile] * (REPORT_IMAGES * 4))])
    grid = Image.open(tmp_path / "one" / "grids" / "000.png")
    assert grid.size == (8 * (128 + 2) + 2, REPORT_IMAGES // 8 * (128 + 2) + 2)  # 8 columns of 8 px shown at 128


def test_eval_keeps_image_names_not_images_and_measures_what_held_images_measure(networks, shapes32, tmp_path):
    """FID-30k at 512 px held ~24 GB of images until the end: eval now holds names and reads each image when a
    metric takes it, decoded as before, so the numbers are those of the images held in memory."""
    from difftrain.evaluate.run import EvalOptions, _read_folder
    from difftrain.evaluate.scores import Group, Networks, Scorer, StoredImages

    folder = tmp_path / "twelve"
    folder.mkdir()
    for path in sorted(shapes32.glob("*.png"))[:12]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "metadata.jsonl").write_text((shapes32 / "metadata.jsonl").read_text())  # captions: groups by prompt
    groups = _read_folder(str(folder), EvalOptions(), [], progress=False)
    assert sum(len(group.images) for group in groups) == 12
    assert all(isinstance(group.images, StoredImages) for group in groups)
    assert [size for group in groups for size in group.sizes()] == [(32, 32)] * 12
    held = [Group(group.prompt, list(group.images)) for group in groups]
    assert all(isinstance(image, Image.Image) for group in held for image in group.images)
    # What is read back is the folder's images, each once (not only what the same reader reads twice).
    from difftrain.data.images import load_image

    def pixels(images) -> list[bytes]:
        return sorted(np.asarray(image).tobytes() for image in images)

    assert pixels(image for group in held for image in group.images) == pixels(map(load_image, folder.glob("*.png")))
    scorer = Scorer(["is", "lpips"], Networks(inception=str(networks["inception"]), alexnet=str(networks["alexnet"]),
                                              lpips=str(networks["lpips"])))
    stored, in_memory = scorer.score(groups, 32, None), scorer.score(held, 32, None)
    assert stored == in_memory and stored["images"] == 12 and stored["is"] >= 1


def test_a_folders_prompts_come_from_each_pngs_infotext_whatever_its_pixel_mode(tmp_path):
    """Decoding RGBA, 16-bit or colour-managed PNGs to sRGB RGB makes new images without the file's text: the
    prompt is read from the file, so such images are grouped (for CLIP score and LPIPS) with their prompt."""
    from PIL import PngImagePlugin

    from difftrain.evaluate.run import EvalOptions, _read_folder

    def write(name: str, image: Image.Image, prompt: str) -> None:
        text = PngImagePlugin.PngInfo()
        text.add_text("parameters", f"{prompt}\nSteps: 3, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 8x8")
        image.save(tmp_path / name, pnginfo=text)

    write("rgb.png", Image.new("RGB", (8, 8), (200, 10, 10)), "a red circle")
    write("rgba.png", Image.new("RGBA", (8, 8), (200, 10, 10, 128)), "a red circle")
    write("deep.png", Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)), "a grey square")
    groups = _read_folder(str(tmp_path), EvalOptions(), [], progress=False)
    assert sorted((group.prompt, len(group.images)) for group in groups) == [("a grey square", 1), ("a red circle", 2)]


def test_lpips_diversity_of_a_large_group_compares_a_seeded_sample_of_its_images():
    """All pairs of 50k unconditional images are 1.25e9 LPIPS evaluations, their tensors far past memory."""
    from difftrain.evaluate.scores import LPIPS_MAX_IMAGES, diversity_sample

    images = [Image.new("RGB", (4, 4), (i, 0, 0)) for i in range(LPIPS_MAX_IMAGES + 50)]
    sample = diversity_sample(images)
    assert len(sample) == LPIPS_MAX_IMAGES and len({image.getpixel((0, 0)) for image in sample}) == LPIPS_MAX_IMAGES
    assert [image.getpixel((0, 0)) for image in diversity_sample(images)] == [im.getpixel((0, 0)) for im in sample]
    assert diversity_sample(images[:LPIPS_MAX_IMAGES]) == images[:LPIPS_MAX_IMAGES]
