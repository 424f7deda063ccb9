"""`difftrain data curate` on data the tests make, with tiny CLIP / aesthetic / captioning models they train.

The CLIP (conftest.tiny_clip) and the BLIP captioner here are trained for a few seconds on
the shapes captions, enough for CLIP to tell a right caption from a wrong colour and for
BLIP to caption shapes it was not trained on; the aesthetic predictor has LAION's exact
layout with random weights, checked against the same arithmetic done by hand.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difftrain.cli import main
from difftrain.curate.tiny import laion_layout_predictor
from difftrain.data.shapes import COLOURS
from difftrain.data.sources import open_source

MISMATCHED = range(10, 20)  # records whose caption names the wrong colour
UNCAPTIONED = range(40, 48)  # records with no caption at all


def _wrong_colour(text: str) -> str:
    colours = list(COLOURS)
    for colour in colours:
        if colour in text:
            return text.replace(colour, colours[(colours.index(colour) + 2) % 4])
    raise AssertionError(text)


@pytest.fixture(scope="module")
def messy(tmp_path_factory, shapes32) -> Path:
    """The 48 shapes with 10 wrong captions and 8 missing ones, an exact copy, a resized JPEG copy,
    a tiny image, a too-wide one and a broken file."""
    folder = tmp_path_factory.mktemp("messy")
    rows = [json.loads(line) for line in (shapes32 / "metadata.jsonl").read_text().splitlines()]
    lines = []
    for number, row in enumerate(rows):
        shutil.copy(shapes32 / row["file_name"], folder / row["file_name"])
        if number in UNCAPTIONED:
            continue
        text = _wrong_colour(row["text"]) if number in MISMATCHED else row["text"]
        lines.append({"file_name": row["file_name"], "text": text})
    shutil.copy(shapes32 / rows[1]["file_name"], folder / "dup_a.png")
    lines.append({"file_name": "dup_a.png", "text": rows[1]["text"]})
    Image.open(shapes32 / rows[2]["file_name"]).convert("RGB").resize((48, 48)).save(folder / "near_b.jpg", quality=70)
    lines.append({"file_name": "near_b.jpg", "text": rows[2]["text"]})
    Image.new("RGB", (8, 8), "red").save(folder / "small.png")
    Image.new("RGB", (96, 32), "blue").save(folder / "wide.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 20)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def _curate(messy: Path, out: Path, *flags: str) -> dict:
    assert main(["data", "curate", str(messy), str(out), "--cache-dir", str(out.parent / "cache"), "--no-progress",
                 *flags]) == 0
    return json.loads((out.parent / f"{out.name}-report" / "report.json").read_text())


def _scores(out: Path) -> dict[str, dict]:
    lines = (out.parent / f"{out.name}-report" / "scores.jsonl").read_text().splitlines()
    return {row["key"]: row for row in map(json.loads, lines)}


def test_sizes_copies_and_near_copies_are_dropped_with_reasons_and_the_rest_written(messy, tmp_path, capsys):
    out = tmp_path / "clean"
    report = _curate(messy, out, "--dedupe", "exact,phash", "--phash-distance", "1", "--min-size", "16",
                     "--max-aspect", "2.5")
    assert report["counts"] == {"records": 53, "kept": 48, "captioned": 0,
                                "dropped": {"read": 1, "size": 2, "duplicate": 2}}
    rows = _scores(out)
    assert rows["broken.png"]["step"] == "read"
    assert rows["small.png"]["reason"] == "shorter side 8 px < 16"
    assert rows["wide.png"]["reason"] == "aspect ratio 3.00 > 2.5"
    # identical bytes: the first in source order stays; a resized copy: the larger stays (--keep largest)
    assert rows["dup_a.png"]["reason"] == "copy of 000001.png" and rows["dup_a.png"]["duplicate_of"] == "000001.png"
    assert rows["000002.png"]["duplicate_of"] == "near_b.jpg"
    assert rows["000002.png"]["scores"]["near-duplicate_score"] <= 1
    assert "53 records: 48 kept, dropped: 1 read, 2 size, 2 duplicate." in capsys.readouterr().out
    # the output is a folder difftrain reads, captions kept
    written = open_source("folder", out, progress=False)
    assert len(written) == 48 and written.uncaptioned == len(UNCAPTIONED)
    assert sorted(p.name for p in out.glob("*.*") if p.suffix != ".jsonl")[-1] == "near_b.jpg"
    report_dir = tmp_path / "clean-report"
    with Image.open(report_dir / "histograms.png") as image:
        assert image.size == (520, 220)  # one panel: no CLIP or aesthetic score was measured
        assert (200, 70, 60) in {colour for _, colour in image.getcolors(4096)}  # the size drops' red bars
    sheet = (report_dir / "contact_sheet.html").read_text()
    assert sheet.count("<img") == 48 + 2 + 2 + 2  # kept, size drops, duplicates each beside the one kept
    assert "dropped: duplicate" in sheet and "kept instead" in sheet
    # as shards: the same records, readable through the shard source
    shards = tmp_path / "shards"
    _curate(messy, shards, "--dedupe", "exact,phash", "--phash-distance", "1", "--min-size", "16",
            "--max-aspect", "2.5", "--format", "webdataset", "--per-shard", "20")
    assert len(open_source("webdataset", shards / "filelist.txt", progress=False)) == 48


def test_clip_filter_drops_the_mismatched_captions_and_a_new_threshold_needs_no_model(messy, tiny_clip, tmp_path,
                                                                                      monkeypatch):
    out = tmp_path / "clip"
    report = _curate(messy, out, "--clip", str(tiny_clip), "--clip-min", "0.0")
    rows = _scores(out)
    right = [rows[f"{n:06d}.png"]["scores"]["clip"] for n in range(40) if n not in MISMATCHED]
    wrong = [rows[f"{n:06d}.png"]["scores"]["clip"] for n in MISMATCHED]
    assert "clip" not in rows[f"{UNCAPTIONED[0]:06d}.png"]["scores"]  # nothing to compare with
    assert report["not_judged_by_clip"] == len(UNCAPTIONED) + 2  # and small.png, wide.png
    threshold = (sum(right) / len(right) + sum(wrong) / len(wrong)) / 2
    assert sum(right) / len(right) > sum(wrong) / len(wrong) + 0.2
    # A trigger word goes on after the filter: it changes no score, and an uncaptioned record stays unjudged.
    prefixed = _curate(messy, tmp_path / "prefixed", "--clip", str(tiny_clip), "--clip-min", "0.0",
                       "--caption-prefix", "sks, ")
    assert {key: row["scores"].get("clip") for key, row in _scores(tmp_path / "prefixed").items()} == \
        {key: row["scores"].get("clip") for key, row in rows.items()}
    assert prefixed["not_judged_by_clip"] == report["not_judged_by_clip"]
    # the same CLIP numbers as `difftrain eval`'s CLIP score (x100, clamped at 0)
    from difftrain.evaluate.clip_score import ClipScorer

    first = rows["000000.png"]
    direct = ClipScorer(tiny_clip).scores([Image.open(messy / "000000.png")], first["captions"])
    assert direct.item() == pytest.approx(100 * max(first["scores"]["clip"], 0), abs=0.2)

    # a second run at the chosen threshold: every embedding is in the cache, so no CLIP is loaded
    def no_model(*args, **kwargs):
        raise AssertionError("CLIP loaded although every embedding was cached")

    monkeypatch.setattr(ClipScorer, "__init__", no_model)
    again = _curate(messy, tmp_path / "clip2", "--clip", str(tiny_clip), "--clip-min", f"{threshold:.4f}")
    assert "clip image" not in again["timings"] and "clip text" not in again["timings"]
    dropped = {row["key"] for row in again["dropped"] if row["step"] == "clip"}
    mismatched = {f"{n:06d}.png" for n in MISMATCHED}
    assert len(dropped & mismatched) >= 8 and len(dropped - mismatched) <= 2
    assert all(row["reason"].startswith("CLIP image-caption cosine") for row in again["dropped"] if row["step"] == "clip")


def test_aesthetic_scores_are_laions_arithmetic_and_the_threshold_drops_exactly_those_below(messy, tiny_clip,
                                                                                             tmp_path):
    from difftrain.curate.scorers import AestheticPredictor, CurateError
    from difftrain.evaluate.clip_score import ClipScorer

    torch.manual_seed(3)
    mlp = laion_layout_predictor(32)
    weights = tmp_path / "aesthetic.pth"
    torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, weights)
    names = [f"{n:06d}.png" for n in range(48)]
    with torch.no_grad():
        embeddings = ClipScorer(tiny_clip).image_embeddings([Image.open(messy / name) for name in names])
        expected = dict(zip(names, mlp(torch.nn.functional.normalize(embeddings, dim=-1)).squeeze(-1).tolist()))
        # What curate scores: the embeddings as its cache stores them (float16), then LAION's arithmetic.
        stored = embeddings.half().float()
        scored = dict(zip(names, mlp(torch.nn.functional.normalize(stored, dim=-1)).squeeze(-1).tolist()))
    # Between two scores, never on one: a score lying on the threshold would land on either side by rounding.
    ordered = sorted(scored.values())
    threshold = (ordered[23] + ordered[24]) / 2
    out = tmp_path / "pretty"
    _curate(messy, out, "--clip", str(tiny_clip), "--aesthetic", str(weights), "--aesthetic-min", str(threshold))
    rows = _scores(out)
    for name in names:
        assert rows[name]["scores"]["aesthetic"] == pytest.approx(expected[name], abs=2e-3)  # fp16 cache
        assert rows[name]["scores"]["aesthetic"] == pytest.approx(scored[name], abs=1e-5)
    below = {name for name, score in scored.items() if score < threshold}
    assert len(below) == 24 and {name for name in names if rows[name].get("step") == "aesthetic"} == below
    # the first release's single Linear loads too; a predictor for another CLIP width is refused by name
    torch.save({"weight": torch.ones(1, 32), "bias": torch.zeros(1)}, tmp_path / "v1.pth")
    assert AestheticPredictor(tmp_path / "v1.pth")(torch.ones(2, 32)).shape == (2,)
    torch.save({f"layers.{k}": v for k, v in laion_layout_predictor(768).state_dict().items()}, tmp_path / "l14.pth")
    with pytest.raises(CurateError, match="takes 768-wide CLIP embeddings, the CLIP given makes 32"):
        AestheticPredictor(tmp_path / "l14.pth")(embeddings)
    # a pickle that would run code is refused, not executed
    torch.save({"layers.0.weight": _Hostile()}, tmp_path / "hostile.pth")
    with pytest.raises(CurateError, match="cannot read it"):
        AestheticPredictor(tmp_path / "hostile.pth")


class _Hostile:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory, shapes32) -> Path:
    """A BLIP captioner trained for 150 steps on the first 36 shapes: it captions those right (the rest it has
    never seen, and 4 seconds of training do not generalise far)."""
    from difftrain.curate.tiny import tiny_blip as build

    rows = [json.loads(line) for line in (shapes32 / "metadata.jsonl").read_text().splitlines()][:36]
    folder = tmp_path_factory.mktemp("tiny-blip")
    torch.manual_seed(0)
    model, processor = build(sorted({word for row in rows for word in row["text"].split()}), folder)
    batch = processor(images=[Image.open(shapes32 / row["file_name"]).convert("RGB") for row in rows],
                      text=[row["text"] for row in rows], return_tensors="pt", padding=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                     attention_mask=batch["attention_mask"], labels=batch["input_ids"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_captions_fill_the_missing_ones_and_the_modes_and_trigger_word_apply(messy, shapes32, tiny_blip, tmp_path):
    truth = {row["file_name"]: row["text"]
             for row in map(json.loads, (shapes32 / "metadata.jsonl").read_text().splitlines())}
    out = tmp_path / "filled"
    report = _curate(messy, out, "--caption", str(tiny_blip), "--caption-prefix", "shp, ")
    assert report["counts"]["captioned"] == 51  # every kept record: the trigger word goes everywhere
    written = {row["file_name"]: row["text"] for row in map(json.loads, (out / "metadata.jsonl").read_text().splitlines())}
    unseen = [f"{n:06d}.png" for n in UNCAPTIONED]  # never in the captioner's training set
    # the captions are what transformers' own generate gives for these images (greedy)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor, model = AutoProcessor.from_pretrained(tiny_blip), AutoModelForImageTextToText.from_pretrained(tiny_blip)
    inputs = processor(images=[Image.open(messy / name).convert("RGB") for name in unseen], return_tensors="pt")
    # 31: what the curate's 40 leaves room for in the tiny decoder's 32 positions after the start token
    direct = processor.batch_decode(model.generate(**inputs, max_new_tokens=31, do_sample=False), skip_special_tokens=True)
    assert [written[name] for name in unseen] == ["shp, " + text for text in direct]
    assert all(text.startswith("a ") for text in direct)
    assert written["000000.png"] == "shp, a red circle"  # fill-missing keeps the caption it had
    assert written[f"{MISMATCHED[0]:06d}.png"] == "shp, " + _wrong_colour(truth[f"{MISMATCHED[0]:06d}.png"])
    # replace: every caption is the model's (from the cache: same model, same images); append: both
    replaced = tmp_path / "replaced"
    _curate(messy, replaced, "--caption", str(tiny_blip), "--caption-mode", "replace")
    rows = {row["file_name"]: row["text"] for row in map(json.loads, (replaced / "metadata.jsonl").read_text().splitlines())}
    assert sum(rows[f"{n:06d}.png"] == truth[f"{n:06d}.png"] for n in MISMATCHED) >= 8  # wrong colours fixed
    appended = tmp_path / "appended"
    _curate(messy, appended, "--caption", str(tiny_blip), "--caption-mode", "append")
    rows = {row["file_name"]: row["text"] for row in map(json.loads, (appended / "metadata.jsonl").read_text().splitlines())}
    assert rows["000000.png"].startswith("a red circle, a ")


def test_the_clip_filter_judges_the_captions_the_output_will_hold(messy, tiny_clip, tiny_blip, tmp_path):
    _curate(messy, tmp_path / "judged", "--clip", str(tiny_clip), "--clip-min", "-1")
    judged = _scores(tmp_path / "judged")
    right = [judged[f"{n:06d}.png"]["scores"]["clip"] for n in range(40) if n not in MISMATCHED]
    wrong = [judged[f"{n:06d}.png"]["scores"]["clip"] for n in MISMATCHED]
    threshold = f"{(sum(right) / len(right) + sum(wrong) / len(wrong)) / 2:.4f}"
    # The wrong colours are captioned anew (replace): judged on the new captions, they pass; the uncaptioned
    # records get captions and are judged too.
    report = _curate(messy, tmp_path / "replaced", "--clip", str(tiny_clip), "--clip-min", threshold,
                     "--caption", str(tiny_blip), "--caption-mode", "replace")
    dropped = {row["key"] for row in report["dropped"] if row["step"] == "clip"}
    assert len(dropped & {f"{n:06d}.png" for n in MISMATCHED}) <= 2 and report["not_judged_by_clip"] == 0
    rows = _scores(tmp_path / "replaced")
    assert all("clip" in rows[f"{n:06d}.png"]["scores"] for n in UNCAPTIONED)


def test_a_captioner_that_never_ends_its_caption_stops_at_its_position_table(shapes32, tmp_path):
    """An untrained decoder rarely writes its end token: asked for more tokens than its 32 positions hold,
    it gives its longest caption instead of an index error from deep inside its embedding."""
    from difftrain.curate.scorers import Captioner
    from difftrain.curate.tiny import tiny_blip as build

    model, processor = build(["a", "red", "circle"], tmp_path / "blip")
    head = model.text_decoder.cls.predictions.decoder
    with torch.no_grad():  # a head that always writes "a"
        head.weight.zero_()
        head.bias.zero_()[processor.tokenizer.convert_tokens_to_ids("a")] = 1.0
    model.save_pretrained(tmp_path / "blip")
    processor.save_pretrained(tmp_path / "blip")
    captioner = Captioner(tmp_path / "blip", max_new_tokens=100)
    captions = captioner([Image.open(shapes32 / "000000.png"), Image.open(shapes32 / "000001.png")])
    lengths = [len(processor.tokenizer(text, add_special_tokens=False).input_ids) for text in captions]
    assert lengths == [31, 31], captions  # 32 positions less the start token


def test_sharded_runs_fill_the_cache_and_the_final_run_matches_one_run(messy, tiny_clip, tmp_path, monkeypatch):
    flags = ["--clip", str(tiny_clip), "--clip-min", "0.3", "--dedupe", "exact,clip", "--clip-duplicate", "0.99"]
    for index in range(3):
        assert main(["data", "curate", str(messy), str(tmp_path / "sharded"), "--cache-dir", str(tmp_path / "cache"),
                     "--no-progress", "--shard", f"{index}/3", *flags]) == 0
    assert not (tmp_path / "sharded").exists()  # a shard only fills the cache

    from difftrain.evaluate.clip_score import ClipScorer

    loaded = []
    original = ClipScorer.__init__
    monkeypatch.setattr(ClipScorer, "__init__", lambda self, *a, **k: (loaded.append(1), original(self, *a, **k))[1])
    merged = _curate(messy, tmp_path / "sharded", *flags)
    assert loaded == []  # every record's embeddings came from the shards
    single = _curate(messy, tmp_path / "single", *flags[:-4], "--dedupe", "exact,clip", "--clip-duplicate", "0.99",
                     "--cache-dir", str(tmp_path / "cache-single"))
    assert merged["counts"] == single["counts"]
    assert {r["key"]: r["reason"] for r in merged["dropped"]} == {r["key"]: r["reason"] for r in single["dropped"]}
    assert any(r["reason"].startswith("similar image of") for r in merged["dropped"])


def test_bad_settings_and_inputs_get_a_message_naming_them(messy, tmp_path, capsys, monkeypatch):
    cases = [
        (["--aesthetic-min", "6.5"], "--aesthetic-min needs --aesthetic"),
        (["--dedupe", "exact,fuzzy"], "--dedupe fuzzy: not a kind of duplicate"),
        (["--shard", "3/2"], "--shard 3/2: give i/N with 0 <= i < N"),
        (["--shard", "half"], "--shard half: give it as i/N"),
        (["--clip", str(tmp_path), "--clip-min", "0.2"], "cannot load it"),
        (["--caption", str(tmp_path / "no-blip")], f"{tmp_path / 'no-blip'}: no such folder, and not a Hugging Face"),
        (["--aesthetic", str(tmp_path / "none.pth"), "--aesthetic-min", "5", "--clip", str(tmp_path)], "no such file"),
        (["--min-size", "9999"], "every record was dropped (1 read, 52 size), nothing written to"),
        (["--clip-min", "28"], "--clip-min 28.0: a cosine of image and caption, in [-1, 1]"),
        (["--batch-size", "0"], "--batch-size 0 / --per-shard 1000: give at least 1"),
        (["--caption-mode", "replace"], "--caption-mode set how a captioner writes, and none was given: add --caption"),
        (["--report", str(tmp_path / "out" / "report")], "its thumbnails would be read as training images"),
        # (it wrote report.json, histograms.png, ... among them: the data's folder gained an image)
        (["--report", str(messy)], f"--report {messy} holds other files than a curate report (000000.png, "),
        (["--min-size", "9999"], "every record was dropped (1 read, 52 size)"),  # the earlier report written over
    ]
    for flags, message in cases:
        assert main(["data", "curate", str(messy), str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
                     "--no-progress", *flags]) == 2
        assert message in capsys.readouterr().err, flags
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x.txt").write_text("mine")
    assert main(["data", "curate", str(messy), str(tmp_path / "taken"), "--no-progress",
                 "--cache-dir", str(tmp_path / "cache")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    # Every record dropped: the report with the scores is still written; OUT is not created.
    assert (tmp_path / "out-report" / "report.json").is_file() and not (tmp_path / "out").exists()

    # --force never deletes the data being curated: not the source itself, nor a folder above it, nor one
    # reached through a link, nor the jsonl a source was listed in; nor the folder the command runs in.
    before = sorted(path.name for path in messy.iterdir())
    (tmp_path / "linked").symlink_to(messy)
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "list.jsonl").write_text(json.dumps({"image": str(messy / "000000.png"), "caption": "x"}))
    for source, out in [(messy, messy), (messy, messy.parent), (tmp_path / "linked", messy),
                        (tmp_path / "list" / "list.jsonl", tmp_path / "list")]:
        kind = ["--source", "jsonl"] if source.suffix == ".jsonl" else []
        assert main(["data", "curate", str(source), str(out), "--force", "--no-progress", *kind,
                     "--cache-dir", str(tmp_path / "cache")]) == 2
        assert "holds the data being curated" in capsys.readouterr().err, (source, out)
    assert sorted(path.name for path in messy.iterdir()) == before
    monkeypatch.chdir(tmp_path / "list")
    assert main(["data", "curate", str(messy), ".", "--force", "--no-progress",
                 "--cache-dir", str(tmp_path / "cache")]) == 2
    assert "is the current folder or holds it" in capsys.readouterr().err

    # A run that fails after --force was given leaves OUT as it was.
    assert main(["data", "curate", str(messy), str(tmp_path / "taken"), "--force", "--min-size", "9999",
                 "--no-progress", "--cache-dir", str(tmp_path / "cache")]) == 2
    assert (tmp_path / "taken" / "x.txt").read_text() == "mine"
    assert main(["data", "curate", str(messy), str(tmp_path / "taken"), "--force", "--no-progress",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    assert not (tmp_path / "taken" / "x.txt").exists() and (tmp_path / "taken" / "metadata.jsonl").is_file()
    assert sorted(p.name for p in (tmp_path / "taken").iterdir() if p.name.startswith(".")) == [".difftrain-lock"]


def test_a_jsonl_source_with_a_caption_that_is_not_text_is_reported_not_fatal(messy, tmp_path):
    lines = [json.dumps({"image": str(messy / "000000.png"), "caption": "a red circle"}),
             json.dumps({"image": str(messy / "000003.png"), "caption": 17}),
             json.dumps({"image": str(messy / "broken.png"), "caption": "broken"})]
    (tmp_path / "list.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert main(["data", "curate", str(tmp_path / "list.jsonl"), str(out), "--source", "jsonl", "--no-progress",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    report = json.loads((tmp_path / "out-report" / "report.json").read_text())
    assert report["counts"]["kept"] == 1 and report["counts"]["dropped"] == {"read": 2}
    reasons = {row["key"]: row["reason"] for row in report["dropped"]}
    assert reasons == {"list.jsonl line 2": "'caption': a caption must be a string or a list of strings, found int",
                       "list.jsonl line 3": f"{messy / 'broken.png'}: cannot read header: Truncated File Read"}


def test_a_caption_file_that_cannot_be_read_is_a_caption_problem_not_a_dropped_record(tmp_path, capsys):
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for name, colour in (("a", (200, 0, 0)), ("b", (0, 0, 200))):
        Image.new("RGB", (32, 32), colour).save(data / f"{name}.png")
    (data / "a.txt").write_text("a red square")
    (data / "b.txt").write_bytes("un carré bleu".encode("latin-1"))
    # (an OUT or report inside the data would be read as more of it next time)
    for inside in (["data", "curate", str(data), str(data / "curated")],
                   ["data", "curate", str(data), str(tmp_path / "out"), "--report", str(data / "report")]):
        assert main([*inside, "--no-progress", "--cache-dir", str(tmp_path / "cache")]) == 2
        assert f"is inside the folder being curated ({data})" in capsys.readouterr().err
    out = tmp_path / "out"
    assert main(["data", "curate", str(data), str(out), "--no-progress", "--cache-dir", str(tmp_path / "cache")]) == 0
    printed = capsys.readouterr().out
    assert "2 records: 2 kept, dropped: none." in printed
    assert "1 caption problems while reading" in printed and "b.txt: not valid UTF-8" in printed
    report = json.loads((tmp_path / "out-report" / "report.json").read_text())
    assert report["counts"]["kept"] == 2 and report["counts"]["dropped"] == {} and report["dropped"] == []
    assert [p["where"] for p in report["caption_problems"]] == ["b.txt"]
    assert "1 caption problems" in report["input"]
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".png") == ["a.png", "b.png"]


def test_under_accelerate_launch_each_rank_takes_a_slice_and_rank_0_writes(messy, tmp_path):
    import sqlite3
    import subprocess

    from launches import accelerate_launch, finish

    out = tmp_path / "launched"
    launched = accelerate_launch("--multi_gpu", "--num_processes", "2", "-m", "difftrain", "data", "curate",
                                 str(messy), str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress",
                                 "--dedupe", "exact,phash", "--phash-distance", "1", "--min-size", "16",
                                 stderr=subprocess.PIPE)
    stdout, stderr = finish(launched)
    assert launched.returncode == 0, stderr[-3000:]
    assert stdout.count("records:") == 1  # one summary: rank 0's
    report = json.loads((tmp_path / "launched-report" / "report.json").read_text())
    assert report["counts"] == {"records": 53, "kept": 49, "captioned": 0,
                                "dropped": {"read": 1, "size": 1, "duplicate": 2}}
    with sqlite3.connect(tmp_path / "cache" / "features.sqlite") as db:  # both slices' hashes, each image once
        assert db.execute("SELECT COUNT(*) FROM features WHERE space = 'phash:srgb'").fetchone()[0] == 50


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="no chromium on this machine (Debian: apt install chromium)")
def test_the_contact_sheet_shows_every_thumbnail_in_a_real_browser(messy, tmp_path):
    from playwright.sync_api import sync_playwright

    out = tmp_path / "sheet"
    _curate(messy, out, "--dedupe", "exact,phash", "--phash-distance", "1", "--min-size", "16")
    sheet = tmp_path / "sheet-report" / "contact_sheet.html"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium") or shutil.which("chromium-browser"),
                                             headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        page.goto(sheet.as_uri())
        shown = page.evaluate("[...document.images].map(i => i.complete && i.naturalWidth)")
        headings = page.eval_on_selector_all("h2", "hs => hs.map(h => h.textContent)")
        artefacts = Path(__file__).parent / "artefacts"
        artefacts.mkdir(exist_ok=True)
        page.screenshot(path=str(artefacts / "curate-contact-sheet.png"), full_page=True)
        browser.close()
    # 49 kept, small.png, two duplicates each beside the one kept; broken.png has no picture to show
    assert len(shown) == 49 + 1 + 2 * 2
    assert all(shown)  # every thumbnail decoded
    assert sorted(set(shown)) == [8, 32, 48, 96]  # thumbnails never enlarge
    assert headings == ["kept", "dropped: read", "dropped: size", "dropped: duplicate"]


def test_a_hugging_face_dataset_is_curated_like_any_source(messy, tmp_path):
    from datasets import Dataset, Image as ImageFeature

    names = ["000000.png", "dup_a.png", "000001.png", "small.png"]
    table = Dataset.from_dict({"image": [str(messy / n) for n in names], "text": ["a", "b", "c", "d"]})
    table.cast_column("image", ImageFeature()).save_to_disk(str(tmp_path / "saved"))
    out = tmp_path / "from-hf"
    assert main(["data", "curate", str(tmp_path / "saved"), str(out), "--source", "hf", "--caption-key", "text",
                 "--min-size", "16", "--no-progress", "--cache-dir", str(tmp_path / "cache")]) == 0
    rows = _scores(out)
    assert [row.get("reason", "") for row in rows.values()] == ["", "", "copy of row:1", "shorter side 8 px < 16"]
    assert len(open_source("folder", out, progress=False)) == 2
    # --dedupe '' asks for no duplicate search at all: the byte copy stays
    assert main(["data", "curate", str(tmp_path / "saved"), str(tmp_path / "all"), "--source", "hf", "--dedupe", "",
                 "--caption-key", "text", "--min-size", "16", "--no-progress", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert len(open_source("folder", tmp_path / "all", progress=False)) == 3


def test_each_record_is_read_once_per_pass_and_decoded_once(messy, tmp_path, monkeypatch):
    from collections import Counter

    from difftrain.curate import pipeline
    from difftrain.curate.items import CurateOptions

    source = open_source("folder", messy, progress=False)
    reads, decodes, original_read, original_decode = Counter(), Counter(), source.read, pipeline.load_image_bytes
    source.read = lambda index: (reads.update([index]), original_read(index))[1]
    monkeypatch.setattr(pipeline, "load_image_bytes", lambda data, *a: (decodes.update([data]), original_decode(data, *a))[1])
    options = CurateOptions(dedupe=("exact", "phash"), phash_distance=1, min_size=16, cache_dir=tmp_path / "cache",
                            progress=False)
    result = pipeline.curate(source, tmp_path / "out", options)
    kept = {item.index for item in result.items if item.step is None}
    # the read pass, the write (kept records only) and at most one thumbnail in the contact sheet
    assert all(reads[i] <= 2 + (i in kept) for i in range(len(source))) and max(reads.values()) == 3
    assert max(decodes.values()) == 1  # phash decodes each distinct image once: dup_a.png is 000001.png's bytes
    assert len(decodes) == 50  # 48 shapes, near_b.jpg, wide.png (small.png fails the size limit, broken.png its header)


def test_an_image_cut_short_after_its_header_is_dropped_without_any_model(tmp_path):
    import io as _io

    from PIL import Image

    photo = _io.BytesIO()
    Image.effect_noise((64, 48), 60).convert("RGB").save(photo, "JPEG", quality=90)
    (tmp_path / "whole.jpg").write_bytes(photo.getvalue())
    (tmp_path / "cut.jpg").write_bytes(photo.getvalue()[: len(photo.getvalue()) // 2])  # header intact
    lines = [json.dumps({"image": str(tmp_path / name), "caption": name}) for name in ("whole.jpg", "cut.jpg")]
    (tmp_path / "list.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["data", "curate", str(tmp_path / "list.jsonl"), str(tmp_path / "out"), "--source", "jsonl",
                 "--no-progress", "--cache-dir", str(tmp_path / "cache")]) == 0  # exact dedupe only: no decode needed
    report = json.loads((tmp_path / "out-report" / "report.json").read_text())
    assert report["counts"]["kept"] == 1 and report["counts"]["dropped"] == {"read": 1}
    assert "truncated" in report["dropped"][0]["reason"]


def test_records_without_a_file_name_are_written_by_their_format_and_one_that_cannot_be_is_counted(tmp_path):
    """A laion part's records have no file name: a folder or tar takes each one's extension from its bytes.
    Phone cameras' JPEGs open as MPO, scanners' as TIFF; a format no file name covers is dropped as "write",
    where the counts see it, not skipped by the writer behind them."""
    import base64
    import io as _io

    from PIL import Image

    lines = []
    for name, extra in (("JPEG", {}), ("MPO", {"save_all": True, "append_images": [Image.new("RGB", (64, 48))]}),
                        ("TIFF", {}), ("PPM", {})):
        data = _io.BytesIO()
        Image.effect_noise((64, 48), 60).convert("RGB").save(data, name, **extra)
        lines.append(f"a {name} photo\t\t{base64.b64encode(data.getvalue()).decode()}\n")
    (tmp_path / "part-0.txt").write_text("".join(lines))
    (tmp_path / "filelist.txt").write_text("part-0.txt\n")
    assert main(["data", "curate", str(tmp_path / "filelist.txt"), str(tmp_path / "out"), "--source", "laion",
                 "--no-progress", "--cache-dir", str(tmp_path / "cache")]) == 0
    report = json.loads((tmp_path / "out-report" / "report.json").read_text())
    assert report["counts"]["kept"] == 3 and report["counts"]["dropped"] == {"write": 1}
    assert "PPM images cannot be written as files" in report["dropped"][0]["reason"]
    assert sorted(path.name for path in (tmp_path / "out").iterdir() if not path.name.startswith(".")) == [
        "000000.jpg", "000001.jpg", "000002.tif", "metadata.jsonl"]
    assert Image.open(tmp_path / "out" / "000001.jpg").format == "MPO"


def test_a_record_that_breaks_before_it_is_written_is_counted_not_written(messy, tmp_path):
    from difftrain.curate.items import CurateOptions
    from difftrain.curate.pipeline import curate
    from difftrain.curate.report import counts
    from difftrain.data.records import BadRecord
    from difftrain.data.sources import open_source

    source = open_source("folder", messy, progress=False)
    reads = {}
    plain_read = source.read

    def read(index):  # record 0 reads once (measured), then its file is gone (the write)
        reads[index] = reads.get(index, 0) + 1
        if index == 0 and reads[index] > 1:
            raise BadRecord("000000.png: deleted while curating")
        return plain_read(index)

    source.read = read
    result = curate(source, tmp_path / "out", CurateOptions(cache_dir=tmp_path / "cache", progress=False))
    summary = counts(result.items)
    written = [path for path in (tmp_path / "out").iterdir() if path.suffix in (".png", ".jpg")]
    assert summary["dropped"]["read"] == 2 and summary["kept"] == len(written)  # the broken file and this one
    assert not (tmp_path / "out" / "000000.png").exists()
    # A file rewritten between its measure and its write: not written with the other image's scores.
    changed = {1: Image.new("RGB", (48, 48), (9, 200, 9))}

    def read_changed(index):
        reads[index] = reads.get(index, 0) + 1
        record = plain_read(index)
        if index in changed and reads[index] > 1:
            replaced = io.BytesIO()
            changed[index].save(replaced, "PNG")
            record.data = replaced.getvalue()
        return record

    reads.clear()
    source.read = read_changed
    result = curate(source, tmp_path / "again", CurateOptions(cache_dir=tmp_path / "cache", progress=False))
    dropped = {item.key: item.reason for item in result.items if item.step == "read"}
    assert "changed since it was measured in this run" in dropped["000001.png"]
    assert not (tmp_path / "again" / "000001.png").exists()


def test_identical_images_match_at_a_cosine_of_one_and_an_empty_caption_keeps_the_old(monkeypatch):
    from difftrain.curate.cache import pack_vector, unpack_vector
    from difftrain.curate.dedupe import embedding_groups
    from difftrain.curate.pipeline import _combine

    rng = np.random.default_rng(0)
    vectors = [unpack_vector(pack_vector(v)) for v in rng.standard_normal((200, 32)).astype(np.float32)]
    units = np.stack([v / np.linalg.norm(v) for v in vectors + vectors[:100]])  # the first 100 twice, as cached
    groups = embedding_groups(units, 1.0)
    assert sorted(sorted(group) for group in groups if len(group) > 1) == [[i, 200 + i] for i in range(100)]
    # In tiles of rows and columns (memory flat in the number of images), the groups of the whole matrix.
    import difftrain.curate.dedupe as dedupe

    near = units[:60] + 0.35 * rng.standard_normal((60, 32)).astype(np.float32) / np.sqrt(32)
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    mixed = np.concatenate([units[:60], near])
    whole = sorted(map(sorted, embedding_groups(mixed, 0.9)))
    monkeypatch.setattr(dedupe, "_BLOCK", 7)
    monkeypatch.setattr(dedupe, "_COLUMNS", 11)
    assert sorted(map(sorted, embedding_groups(mixed, 0.9))) == whole and any(len(group) > 1 for group in whole)
    # A captioner that wrote nothing (its end token first) leaves the record's captions as they were.
    for mode in ("replace", "append", "fill-missing"):
        assert _combine(["a red circle"], " ", mode) == ["a red circle"]
    assert _combine([], "", "fill-missing") == []
