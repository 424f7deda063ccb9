import gzip
import json
import logging
import tarfile

import pytest

from difftrain.data.folder import DatasetError
from difftrain.data.shards import build_shards, export_folder
from difftrain.data.sources import RecordSource, open_source


def contents(source):
    """(image bytes, captions) per record, in source order."""
    return [(r.data, r.captions) for r in map(source.read, range(len(source)))]


@pytest.mark.parametrize("format, shard_names", [
    ("laion", ["part-00000.gz", "part-00001.gz", "part-00002.gz"]),
    ("webdataset", ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]),
])
def test_folder_to_shards_to_folder_is_lossless(tmp_path, shapes_dir, format, shard_names):
    folder = open_source("folder", shapes_dir, progress=False)
    original = contents(folder)
    assert len(original) == 24 and all(captions for _, captions in original)

    listing = build_shards(folder, tmp_path / "shards", format, records_per_shard=10, progress=False)
    assert listing == tmp_path / "shards" / "filelist.txt"
    assert listing.read_text().split() == shard_names
    sidecars = [f"{name}.index.json" for name in shard_names]  # each shard's index, beside it
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == sorted(shard_names + sidecars + ["filelist.txt"])

    shards = open_source(format, listing, progress=False)
    assert shards.shard_sizes == [10, 10, 4]
    assert contents(shards) == original
    assert (shards.sizes == folder.sizes).all()

    back = export_folder(shards, tmp_path / "back", progress=False)
    again = open_source("folder", back, progress=False)
    assert contents(again) == original
    # Numbered in source order with the extension the bytes say: here the very same names.
    assert sorted(p.name for p in back.glob("*.png")) == sorted(p.name for p in shapes_dir.glob("*.png"))


def test_laion_part_layout_and_plain_text_parts(tmp_path, shapes_dir):
    folder = open_source("folder", shapes_dir, progress=False)
    listing = build_shards(folder, tmp_path / "plain", "laion", records_per_shard=24, gzip=False, progress=False)
    part = tmp_path / "plain" / "part-00000.txt"
    assert listing.read_text() == "part-00000.txt\n"
    lines = part.read_bytes().splitlines()
    assert len(lines) == 24 and lines[0].split(b"\t")[:2] == [b"a red circle", b""]
    assert contents(open_source("laion", listing, progress=False)) == contents(folder)
    # The same data twice gives the same bytes: no timestamps or temp names inside the gzip.
    one = build_shards(folder, tmp_path / "one", "laion", records_per_shard=24, progress=False).parent
    two = build_shards(folder, tmp_path / "two", "laion", records_per_shard=24, progress=False).parent
    assert (one / "part-00000.gz").read_bytes() == (two / "part-00000.gz").read_bytes()
    assert gzip.decompress((one / "part-00000.gz").read_bytes()) == part.read_bytes()


def test_webdataset_members(tmp_path, shapes_dir):
    folder = open_source("folder", shapes_dir, progress=False)
    build_shards(folder, tmp_path / "wds", "webdataset", records_per_shard=24, progress=False)
    with tarfile.open(tmp_path / "wds" / "shard-000000.tar") as tar:
        names = tar.getnames()
        assert names[:3] == ["000000000.png", "000000000.txt", "000000000.json"]
        assert len(names) == 72
        assert tar.extractfile("000000000.txt").read() == b"a red circle"
        meta = json.loads(tar.extractfile("000000000.json").read())
        assert meta == {"captions": ["a red circle"], "source": "000000.png"}
        assert tar.extractfile("000000000.png").read() == (shapes_dir / "000000.png").read_bytes()


def test_several_captions_survive_webdataset_and_folder_and_laion_keeps_the_first(tmp_path, shapes_dir, caplog):
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(
        json.dumps({"image": str(shapes_dir / f"{i:06d}.png"), "caption": [f"first {i}", f"second {i}"]})
        for i in range(5)
    ) + "\n" + json.dumps({"image": str(shapes_dir / "000005.png"), "caption": "only\tone"}) + "\n")
    source = open_source("jsonl", jsonl, progress=False)
    original = contents(source)

    listing = build_shards(source, tmp_path / "wds", "webdataset", records_per_shard=4, progress=False)
    wds = open_source("webdataset", listing, progress=False)
    assert contents(wds) == original

    back = export_folder(wds, tmp_path / "folder", progress=False)
    meta = [json.loads(line) for line in (back / "metadata.jsonl").read_text().splitlines()]
    assert meta[0] == {"file_name": "000000.png", "text": "first 0", "captions": ["first 0", "second 0"]}
    assert meta[5] == {"file_name": "000005.png", "text": "only\tone"}
    assert contents(open_source("folder", back, progress=False)) == original

    # A jsonl source exports straight to a folder too; absolute keys become numbered names.
    direct = export_folder(source, tmp_path / "direct", progress=False)
    assert contents(open_source("folder", direct, progress=False)) == original

    with caplog.at_level(logging.WARNING, logger="difftrain.data.shards"):
        laion = build_shards(source, tmp_path / "laion", "laion", progress=False)
    assert [c for _, c in contents(open_source("laion", laion, progress=False))] == [
        [f"first {i}"] for i in range(5)
    ] + [["only one"]]
    assert "5 records have several captions" in caplog.text
    assert "1 captions held tabs or line breaks" in caplog.text


def test_records_that_break_before_the_build_are_skipped_and_reported(tmp_path, shapes_dir, caplog):
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in shapes_dir.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    source = open_source("folder", copy, progress=False)
    (copy / "000003.png").unlink()
    with caplog.at_level(logging.WARNING, logger="difftrain.data.shards"):
        listing = build_shards(source, tmp_path / "out", "webdataset", records_per_shard=10, progress=False)
    assert "000003.png: cannot read file" in caplog.text
    rebuilt = open_source("webdataset", listing, progress=False)
    assert rebuilt.shard_sizes == [10, 10, 3]
    assert [r.data for r in map(rebuilt.read, range(23))] == [
        p.read_bytes() for p in sorted(copy.glob("*.png"))
    ]


def test_the_build_command_counts_what_it_wrote_not_what_it_read(tmp_path, shapes_dir, capsys):
    from PIL import Image

    from difftrain.cli import main

    Image.new("RGB", (8, 8), "red").save(tmp_path / "odd.ppm")  # decodes, but no image file name covers it
    lines = [json.dumps({"image": str(shapes_dir / "000000.png"), "caption": "a shape"}),
             json.dumps({"image": str(tmp_path / "odd.ppm"), "caption": "odd"})]
    (tmp_path / "list.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["data", "build", str(tmp_path / "list.jsonl"), str(tmp_path / "out"), "--source", "jsonl",
                 "--format", "folder"]) == 0
    said = capsys.readouterr().out
    assert "wrote 1 records from" in said and "; 1 not written" in said and "  not written: " in said
    assert "PPM images cannot be written" in said
    # A record whose own name is a hidden path keeps no such name: a folder scan would pass it over.
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "a.png").write_bytes((shapes_dir / "000001.png").read_bytes())
    (tmp_path / "hidden.jsonl").write_text(json.dumps({"image": ".hidden/a.png", "caption": "hid"}) + "\n")
    assert main(["data", "build", str(tmp_path / "hidden.jsonl"), str(tmp_path / "unhidden"), "--source", "jsonl",
                 "--format", "folder"]) == 0
    back = open_source("folder", tmp_path / "unhidden", progress=False)
    assert [back.read(i).captions for i in range(len(back))] == [["hid"]]


class Interrupted(RecordSource):
    """The first `stop` records of a real source, then the user presses Ctrl-C."""

    def __init__(self, source, stop):
        self.source, self.stop = source, stop
        self.description, self.skipped, self.shard_sizes, self.sizes = "", [], None, source.sizes
        self.uncaptioned = 0

    def __len__(self):
        return len(self.source)

    def read(self, index):
        if index == self.stop:
            raise KeyboardInterrupt
        return self.source.read(index)


def test_an_interrupted_build_leaves_only_complete_shards_and_no_list(tmp_path, shapes_dir):
    from difftrain.data.folder import UNFINISHED

    source = Interrupted(open_source("folder", shapes_dir, progress=False), stop=15)
    with pytest.raises(KeyboardInterrupt):
        build_shards(source, tmp_path / "out", "laion", records_per_shard=10, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [UNFINISHED, "part-00000.gz",
                                                                     "part-00000.gz.index.json"]
    assert len(gzip.decompress((tmp_path / "out" / "part-00000.gz").read_bytes()).splitlines()) == 10
    # A folder of tars needs no list (other tools write none), and a folder of images none either: an unfinished
    # build's were read as a whole data set of the records it had written (800 of 3,000, without a word).
    for kind in ("webdataset", "folder"):
        with pytest.raises(KeyboardInterrupt):
            (build_shards if kind == "webdataset" else export_folder)(
                source, tmp_path / kind, *(["webdataset", 10] if kind == "webdataset" else []), progress=False)
        with pytest.raises(DatasetError, match=f"{tmp_path / kind} is the output of a data build, curate or download "
                                               "that did not finish"):
            open_source(kind, tmp_path / kind, progress=False)
        # and building into it again is refused with what to do (it said "not empty", as for any folder)
        with pytest.raises(DatasetError, match="holds a build that did not finish .* delete the folder and build "
                                               "again, or write to a new folder"):
            export_folder(source, tmp_path / kind, progress=False)
    finished = build_shards(open_source("folder", shapes_dir, progress=False), tmp_path / "done", "webdataset",
                            progress=False)
    assert not (finished.parent / UNFINISHED).exists()
    finished.unlink()  # as another tool leaves a folder of tars: read whole
    assert len(open_source("webdataset", finished.parent, progress=False)) == len(list(shapes_dir.glob("*.png")))


def test_build_refuses_a_used_folder_and_bad_settings(tmp_path, shapes_dir):
    source = open_source("folder", shapes_dir, progress=False)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "old.txt").write_text("x")
    with pytest.raises(DatasetError, match=f"{tmp_path / 'used'} already exists and is not empty"):
        build_shards(source, tmp_path / "used", "laion", progress=False)
    with pytest.raises(DatasetError, match=f"{tmp_path / 'used'} already exists and is not empty"):
        export_folder(source, tmp_path / "used", progress=False)
    with pytest.raises(DatasetError, match="records_per_shard = 0"):
        build_shards(source, tmp_path / "new", "laion", records_per_shard=0, progress=False)
    with pytest.raises(DatasetError, match="choose one of laion, webdataset"):
        build_shards(source, tmp_path / "new", "parquet", progress=False)


def test_data_build_names_every_file_it_skipped_and_refuses_a_used_out_before_reading(tmp_path, shapes_dir, capsys,
                                                                                       monkeypatch):
    """It named the first skipped file alone and pointed to a data report no build writes; a used OUT or a
    --per-shard of 0 was refused only after the whole source was indexed (minutes for a large one)."""
    import shutil

    import difftrain.data.sources as sources
    from difftrain.cli import main

    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    (data / "zero.png").write_bytes(b"")
    (data / "page.jpg").write_text("<html>503</html>")
    with open(data / "metadata.jsonl", "a") as metadata:
        metadata.write("{not json\n")  # a caption problem, which leaves no record out
    lines = len((data / "metadata.jsonl").read_text().splitlines())
    assert main(["data", "build", str(data), str(tmp_path / "out"), "--no-gzip"]) == 0
    out = capsys.readouterr().out
    assert "2 records skipped while reading" in out and "  zero.png: empty file" in out and "  page.jpg: " in out
    assert (f"1 caption problems (no record left out) while reading {data}:\n"
            f"  metadata.jsonl line {lines}: not valid JSON") in out
    assert "see the data report" not in out and f"wrote {len(list(shapes_dir.glob('*.png')))} records" in out
    monkeypatch.setattr(sources, "open_source", lambda *args, **kwargs: pytest.fail("the source was read"))
    assert main(["data", "build", str(data), str(tmp_path / "out")]) == 2
    assert f"{tmp_path / 'out'} already exists and is not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "build", str(data), str(tmp_path / "other"), "--per-shard", "0"])
    assert "argument --per-shard: 0: give 1 or more" in capsys.readouterr().err
