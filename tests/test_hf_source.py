"""data.source = hf: Hugging Face data sets (save_to_disk folders, parquet, streamed parquet), offline."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before datasets is imported: nothing here may touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config, write_config
from difftrain.cli import main
from difftrain.config import ConfigError, parse_config
from difftrain.data.folder import DatasetError
from difftrain.data.hf import HFOptions
from difftrain.data.images import load_image_bytes
from difftrain.data.sources import open_source
from test_train_e2e import assert_same_checkpoint

datasets = pytest.importorskip("datasets")

USABLE = 24  # the shapes images; each data set adds one corrupt image and one row with a non-string caption
CORRUPT_ROW, NUMBER_CAPTION_ROW = 24, 25


@pytest.fixture(autouse=True)
def offline_cache(tmp_path, monkeypatch):
    """load_dataset converts parquet into the datasets cache: keep it in the test's folder, and stay offline."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def shapes_table(shapes_dir) -> datasets.Dataset:
    """The shapes images as PIL images (stored as PNG by the Image feature) with their captions, then a
    corrupt image and a caption that is a number; captions are Json so one column can hold both."""
    entries = [json.loads(line) for line in (shapes_dir / "metadata.jsonl").read_text().splitlines()]
    images: list = [Image.open(shapes_dir / e["file_name"]).convert("RGB") for e in entries]
    captions: list = [e["text"] for e in entries]
    images += [{"bytes": b"these bytes are no image", "path": None}, images[0]]
    captions += ["a broken download", 5]
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Json()})
    return datasets.Dataset.from_dict({"image": images, "caption": captions}, features=features)


def write_parquet(table, folder, parts: int):
    folder.mkdir(parents=True)
    bounds = np.linspace(0, len(table), parts + 1).astype(int)
    for number, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        table.select(range(start, stop)).to_parquet(str(folder / f"part-{number}.parquet"))
    return folder


def test_parquet_written_without_hugging_face_metadata_reads_its_image_structs(tmp_path, shapes_dir):
    """pandas, pyarrow and polars write an image column as a plain {bytes, path} struct (no Image feature)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    entries = [json.loads(line) for line in (shapes_dir / "metadata.jsonl").read_text().splitlines()][:5]
    images = [{"bytes": (shapes_dir / e["file_name"]).read_bytes(), "path": e["file_name"]} for e in entries]
    (tmp_path / "plain").mkdir()
    pq.write_table(pa.table({"image": images, "caption": [e["text"] for e in entries]}),
                   tmp_path / "plain" / "part-0.parquet")
    source = open_source("hf", tmp_path / "plain", progress=False)
    assert len(source) == 5 and source.skipped == []
    assert [source.read(i).captions for i in range(5)] == [[e["text"]] for e in entries]
    assert source.read(0).data == images[0]["bytes"]


def read_all(source):
    return [source.read(i) for i in range(len(source))]


def assert_shapes(source, shapes_dir, key_prefix: str):
    entries = [json.loads(line) for line in (shapes_dir / "metadata.jsonl").read_text().splitlines()]
    records = read_all(source)
    assert len(source) == USABLE and (source.sizes == 16).all() and source.uncaptioned == 0
    assert [r.captions for r in records] == [[e["text"]] for e in entries]
    expected = np.asarray(Image.open(shapes_dir / entries[3]["file_name"]).convert("RGB"))
    assert np.array_equal(np.asarray(load_image_bytes(records[3].data)), expected)
    assert records[3].key == f"{key_prefix}3"
    corrupt, number = (reason for _, reason in source.skipped)
    assert corrupt == "not an image PIL can identify"
    assert number == "'caption': a caption must be a string or a list of strings, found int"


def test_save_to_disk_folder_dataset_dict_split_and_index_cache(tmp_path, shapes_dir, monkeypatch):
    table = shapes_table(shapes_dir)
    table.save_to_disk(str(tmp_path / "saved"))
    source = open_source("hf", tmp_path / "saved", index_dir=tmp_path / "index", progress=False)
    assert source.shard_sizes is None  # random access
    assert_shapes(source, shapes_dir, "row:")
    assert [where for where, _ in source.skipped] == [f"row {CORRUPT_ROW}", f"row {NUMBER_CAPTION_ROW}"]
    assert source.description.startswith("hf save_to_disk folder: 24 records, 2 skipped")

    # Opened again, the sizes come from the index cache (keyed by the table's fingerprint): no row is read.
    import difftrain.data.hf as hf

    with monkeypatch.context() as patch:
        patch.setattr(hf, "_index_table", lambda *args: pytest.fail("indexed again"))
        again = open_source("hf", tmp_path / "saved", index_dir=tmp_path / "index", progress=False)
    assert np.array_equal(again.sizes, source.sizes) and again.skipped == source.skipped
    with monkeypatch.context() as patch:  # sizes read from headers under another meaning are not reused
        patch.setattr(hf, "HEADER_SIZE_VERSION", "next")
        patch.setattr(hf, "_index_table", lambda *args: pytest.fail("indexed again"))
        with pytest.raises(pytest.fail.Exception, match="indexed again"):
            open_source("hf", tmp_path / "saved", index_dir=tmp_path / "index", progress=False)

    datasets.DatasetDict({"train": table, "test": table.select(range(5))}).save_to_disk(str(tmp_path / "dict"))
    test = open_source("hf", tmp_path / "dict", hf=HFOptions(split="test"), progress=False)
    assert len(test) == 5 and test.read(4).key == "test:4"
    with pytest.raises(DatasetError, match="data.split = 'valid': .*dict holds the splits train, test"):
        open_source("hf", tmp_path / "dict", hf=HFOptions(split="valid"), progress=False)
    without = open_source("hf", tmp_path / "dict", hf=HFOptions(caption_column=None), progress=False)
    assert len(without) == USABLE + 1 and without.uncaptioned == USABLE + 1  # the number caption is not read
    assert len(open_source("hf", tmp_path / "dict", captions="none", progress=False)) == USABLE + 1


def test_parquet_file_folder_and_glob(tmp_path, shapes_dir):
    folder = write_parquet(shapes_table(shapes_dir), tmp_path / "parquet", parts=2)
    source = open_source("hf", folder, progress=False)
    assert_shapes(source, shapes_dir, "train:")
    assert [where for where, _ in source.skipped] == [f"train row {CORRUPT_ROW}", f"train row {NUMBER_CAPTION_ROW}"]
    assert source.stored_files() == [(str(p), str(p), []) for p in sorted(folder.glob("*.parquet"))]
    glob = open_source("hf", f"{folder}/*.parquet", progress=False)
    assert [r.data for r in read_all(glob)] == [r.data for r in read_all(source)]
    one = open_source("hf", folder / "part-0.parquet", progress=False)
    assert len(one) == 13


def test_a_folder_cloned_from_the_hub_trains_on_its_split_alone(tmp_path, shapes_dir, capsys):
    """A Hub repository's files name their splits (data/train-00000-of-00001.parquet beside data/test-...): the test
    split was trained on too, and a data.split the folder does not hold read every file."""
    table = shapes_table(shapes_dir).select(range(12))
    (tmp_path / "clone" / "data").mkdir(parents=True)
    table.select(range(9)).to_parquet(str(tmp_path / "clone" / "data" / "train-00000-of-00001.parquet"))
    table.select(range(9, 12)).to_parquet(str(tmp_path / "clone" / "data" / "test-00000-of-00001.parquet"))
    expected = datasets.load_dataset(str(tmp_path / "clone"))  # how datasets itself splits the folder
    assert {name: len(split) for name, split in expected.items()} == {"train": 9, "test": 3}
    for streaming in (False, True):
        train = open_source("hf", tmp_path / "clone", hf=HFOptions(streaming=streaming), progress=False)
        test = open_source("hf", tmp_path / "clone", hf=HFOptions(split="test", streaming=streaming), progress=False)
        assert [r.captions for r in read_all(train)] == [[caption] for caption in expected["train"]["caption"]]
        assert [r.captions for r in read_all(test)] == [[caption] for caption in expected["test"]["caption"]]
        with pytest.raises(DatasetError, match="data.split = 'validation': .* named as the splits train, test"):
            open_source("hf", tmp_path / "clone", hf=HFOptions(split="validation", streaming=streaming),
                        progress=False)
    # The same files at the folder's top (datasets names those splits otherwise), through `data build`: the
    # messages name its flags, and --caption-key '' reads no captions.
    from difftrain.cli import main

    flat = tmp_path / "flat"
    shutil.copytree(tmp_path / "clone" / "data", flat)
    assert main(["data", "build", str(flat), str(tmp_path / "v"), "--source", "hf", "--split", "validation"]) == 2
    assert "--split 'validation': the parquet files of" in capsys.readouterr().err
    assert main(["data", "build", str(flat), str(tmp_path / "c"), "--source", "hf", "--caption-key", "text"]) == 2
    err = capsys.readouterr().err
    assert "--caption-key 'text': the data set" in err and "(--caption-key '' reads it without captions)" in err, err
    assert main(["data", "build", str(flat), str(tmp_path / "n"), "--source", "hf", "--caption-key", ""]) == 0
    assert "9 records, 9 without caption" in capsys.readouterr().out


def test_image_column_of_paths_bytes_or_path_only_image_values(tmp_path, shapes_dir):
    names = sorted(p.name for p in shapes_dir.glob("*.png"))[:3]
    (tmp_path / "data" / "img").mkdir(parents=True)
    for name in names:
        (tmp_path / "data" / "img" / name).write_bytes((shapes_dir / name).read_bytes())
    stored = [(shapes_dir / name).read_bytes() for name in names]
    features = datasets.Features({"file": datasets.Value("string"), "raw": datasets.Value("binary"),
                                  "picture": datasets.Image(), "text": datasets.Json()})
    table = datasets.Dataset.from_dict({
        "file": [f"img/{names[0]}", str(tmp_path / "data" / "img" / names[1]), "img/missing.png"],
        "raw": stored,
        "picture": [str(tmp_path / "data" / "img" / name) for name in names],  # Image values that name files
        "text": [["one", "uno"], "two", None],
    }, features=features)
    table.to_parquet(str(tmp_path / "data" / "table.parquet"))
    path = tmp_path / "data" / "table.parquet"

    by_path = open_source("hf", path, hf=HFOptions(image_column="file", caption_column="text"), progress=False)
    assert [r.data for r in read_all(by_path)] == stored[:2]  # relative paths are read beside the parquet file
    assert "cannot read the image file" in by_path.skipped[0][1] and "missing.png" in by_path.skipped[0][1]
    raw = open_source("hf", path, hf=HFOptions(image_column="raw", caption_column="text"), progress=False)
    assert [r.data for r in read_all(raw)] == stored
    assert [r.captions for r in read_all(raw)] == [["one", "uno"], ["two"], []] and raw.uncaptioned == 1
    named = open_source("hf", path, hf=HFOptions(image_column="picture", caption_column=None), progress=False)
    assert [r.data for r in read_all(named)] == stored
    # Image files the table names are not in the data's fingerprint: such sources get no record summary.
    from difftrain.data.record_summary import summary_path

    assert by_path.reads_unlisted_files and named.reads_unlisted_files and not raw.reads_unlisted_files
    assert summary_path(tmp_path, by_path) is None and summary_path(tmp_path, raw) is not None


def test_a_saved_data_set_named_from_home_reads_its_relative_image_paths(tmp_path, shapes_dir, monkeypatch):
    names = sorted(p.name for p in shapes_dir.glob("*.png"))[:2]
    (tmp_path / "saved" / "img").mkdir(parents=True)
    for name in names:
        (tmp_path / "saved" / "img" / name).write_bytes((shapes_dir / name).read_bytes())
    datasets.Dataset.from_dict({"file": [f"img/{name}" for name in names], "text": ["a", "b"]}).save_to_disk(
        str(tmp_path / "saved"))
    monkeypatch.setenv("HOME", str(tmp_path))
    source = open_source("hf", "~/saved", hf=HFOptions(image_column="file", caption_column="text"), progress=False)
    assert [r.data for r in read_all(source)] == [(shapes_dir / name).read_bytes() for name in names]


def test_clear_errors_for_columns_paths_and_hub_ids_offline(tmp_path, shapes_dir, monkeypatch):
    shapes_table(shapes_dir).add_column("label", list(range(26))).save_to_disk(str(tmp_path / "saved"))
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "datasets", None)  # not installed
        with pytest.raises(DatasetError, match=r"datasets package: pip install 'difftrain\[data\]'"):
            open_source("hf", tmp_path / "saved", progress=False)
    columns = "its columns: image, caption, label"
    missing = f"data.image_column = 'img': the data set .*saved has no such column; {columns}"
    with pytest.raises(DatasetError, match=missing):
        open_source("hf", tmp_path / "saved", hf=HFOptions(image_column="img"), progress=False)
    with pytest.raises(DatasetError, match=f"data.caption_column = 'text': .*{columns} .data.captions: none reads"):
        open_source("hf", tmp_path / "saved", hf=HFOptions(caption_column="text"), progress=False)
    with pytest.raises(DatasetError, match="data.image_column = 'label': .* holds Value\\('int64'\\), not images"):
        open_source("hf", tmp_path / "saved", hf=HFOptions(image_column="label"), progress=False)
    with pytest.raises(DatasetError, match="data.revision = 'v1' applies to a Hub data set; .*saved is local"):
        open_source("hf", tmp_path / "saved", hf=HFOptions(revision="v1"), progress=False)
    with pytest.raises(DatasetError, match="streaming: true: .*save_to_disk, which is read in place"):
        open_source("hf", tmp_path / "saved", hf=HFOptions(streaming=True), progress=False)
    with pytest.raises(DatasetError, match="gone.parquet does not exist; with data.source = 'hf'"):
        open_source("hf", tmp_path / "gone.parquet", progress=False)
    with pytest.raises(DatasetError, match="matches no file"):
        open_source("hf", f"{tmp_path}/*.parquet", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds neither a data set written by save_to_disk .* nor .parquet files"):
        open_source("hf", tmp_path / "empty", progress=False)
    for streaming in (False, True):
        with pytest.raises(DatasetError, match="'someone/no-such-data' is no local folder or file, and loading it as "
                                               "a Hugging Face Hub data set failed \\(HF_HUB_OFFLINE is set"):
            open_source("hf", "someone/no-such-data", hf=HFOptions(streaming=streaming), progress=False)


def test_streamed_parquet_is_a_shard_source_indexed_once_and_readable_in_workers(tmp_path, shapes_dir):
    from torch.utils.data import DataLoader

    from test_sources import Records

    folder = write_parquet(shapes_table(shapes_dir), tmp_path / "parquet", parts=3)
    options = HFOptions(streaming=True)
    source = open_source("hf", folder, hf=options, index_dir=tmp_path / "index", progress=False)
    assert source.shard_sizes == [8, 9, 7]  # the last file holds the corrupt image and the number caption
    assert source.shards_indexed == 3
    assert_shapes(source, shapes_dir, "part-0.parquet:")
    assert source.read(23).key == "part-2.parquet:6" and source.shard_loads == 3
    assert [where for where, _ in source.skipped] == ["part-2.parquet row 7", "part-2.parquet row 8"]
    assert source.description.startswith("hf shards: 3 shards, 24 records, 2 skipped")
    again = open_source("hf", folder, hf=options, index_dir=tmp_path / "index", progress=False)
    assert (again.shards_indexed, again.shards_from_cache) == (0, 3)

    # Pickled into DataLoader workers, each worker streams the shards it needs, whole.
    expected = [(r.key, r.data, r.captions) for r in read_all(source)]
    assert not any(data in pickle.dumps(source) for _, data, _ in expected)
    loader = DataLoader(Records(source), batch_size=None, num_workers=2)
    assert [(k, d, c) for k, d, c in loader] == expected


def test_config_keys_and_streaming_rules():
    data = parse_config({"data": {"path": "owner/name", "source": "hf"}}).data
    assert (data.image_column, data.caption_column, data.split, data.hf_config, data.revision, data.streaming) == (
        "image", "caption", "train", None, None, False)
    assert parse_config({"data": {"path": "x", "source": "hf", "caption_column": None}}).data.caption_column is None
    with pytest.raises(ConfigError, match="data.streaming = true applies to data.source = hf, not folder"):
        parse_config({"data": {"path": "x", "streaming": True}})
    buckets = {"path": "x", "source": "hf", "buckets": {"enabled": True, "step": 8}}
    parse_config({"data": buckets})  # random access: buckets as for a folder
    parse_config({"data": {**buckets, "streaming": True}})  # shards: buckets batch group by group


def train(config, *options: str) -> None:
    assert main(["train", str(config), "--no-progress", "--set", "data.source=hf", *options]) == 0


@pytest.mark.parametrize("form", ["save_to_disk", "parquet"])
def test_training_through_the_cli_skips_counts_and_reports_bad_rows(tmp_path, shapes_dir, capsys, form):
    table = shapes_table(shapes_dir)
    if form == "save_to_disk":
        data = tmp_path / "saved"
        table.save_to_disk(str(data))
    else:
        data = write_parquet(table, tmp_path / "parquet", parts=2)
    config = write_config(tmp_path / "c.yaml", tiny_config(data, tmp_path / "run", training={"max_steps": 2}))
    train(config)
    assert "24 records, 2 skipped at start" in capsys.readouterr().out
    report = (tmp_path / "run" / "data_report.txt").read_text()
    assert f"row {CORRUPT_ROW}: not an image" in report
    assert f"row {NUMBER_CAPTION_ROW}: 'caption': a caption must be a string" in report


def test_streamed_training_stopped_and_resumed_equals_an_uninterrupted_run(tmp_path, shapes_dir, capsys):
    data = write_parquet(shapes_table(shapes_dir), tmp_path / "parquet", parts=3)
    streamed = ("--set", "data.streaming=true")
    # 8 steps of 4 cross from epoch 0 (24 records, 6 batches) into epoch 1; the stop is mid-epoch.
    sections = {"data": {"crop": "random"}, "checkpoint": {"every_steps": 4}}
    straight = write_config(tmp_path / "straight.yaml",
                            tiny_config(data, tmp_path / "straight", training={"max_steps": 8}, **sections))
    train(straight, *streamed)
    halves = write_config(tmp_path / "halves.yaml",
                          tiny_config(data, tmp_path / "halves", training={"max_steps": 4}, **sections))
    train(halves, *streamed)
    capsys.readouterr()
    train(halves, *streamed, "--set", "training.max_steps=8", "--resume", "latest")
    assert "at step 4 (epoch 0, batch 4)" in capsys.readouterr().out
    last = "checkpoints/step-00000008"
    assert_same_checkpoint(tmp_path / "straight" / last, tmp_path / "halves" / last)


def test_data_build_converts_a_hf_data_set_to_laion_parts(tmp_path, shapes_dir, capsys):
    table = shapes_table(shapes_dir)
    table.save_to_disk(str(tmp_path / "saved"))
    out = tmp_path / "laion"
    assert main(["data", "build", str(tmp_path / "saved"), str(out), "--source", "hf", "--per-shard", "10"]) == 0
    assert "2 records skipped while reading" in capsys.readouterr().out
    parts = open_source("laion", out / "filelist.txt", progress=False)
    original = open_source("hf", tmp_path / "saved", progress=False)
    assert parts.shard_sizes == [10, 10, 4]
    assert [(r.data, r.captions) for r in read_all(parts)] == [(r.data, r.captions) for r in read_all(original)]
