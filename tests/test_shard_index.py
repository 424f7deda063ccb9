"""The index written beside each shard (`part-00000.gz.index.json`): `data build` writes it, opening
uses it and reads no shard, and whatever it cannot vouch for (a changed shard, another max_pixels,
a damaged file) is read from the shard as before, with the very same result."""

from __future__ import annotations

import gzip
import json
import logging
import os

import numpy as np
import pytest
from test_sources import laion_line, make_laion, png

from difftrain.data.records import SIDECAR_SUFFIX
from difftrain.data.shards import build_shards
from difftrain.data.sources import LaionSource, WebDatasetSource, open_source

CLASSES = {"laion": LaionSource, "webdataset": WebDatasetSource}


def opened(kind, path, **settings):
    return open_source(kind, path, progress=False, **settings)


def read_cold(kind, path, monkeypatch, **settings):
    """The source as it opens with no sidecar at all: every shard read."""
    with monkeypatch.context() as patch:
        patch.setattr(CLASSES[kind], "sidecars", False)
        return opened(kind, path, **settings)


def same(a, b) -> None:
    assert (len(a), a.shard_sizes, a.skipped, a.uncaptioned, a.description) == \
        (len(b), b.shard_sizes, b.skipped, b.uncaptioned, b.description)
    assert np.array_equal(a.sizes, b.sizes) and a.sizes.dtype == b.sizes.dtype


@pytest.fixture(scope="module", params=["laion", "webdataset"])
def built(request, tmp_path_factory, shapes_dir):
    """(kind, filelist) of the 24 shapes built into 3 shards with their sidecars."""
    out = tmp_path_factory.mktemp("built") / request.param
    images = opened("folder", shapes_dir)
    return request.param, build_shards(images, out, request.param, records_per_shard=10, progress=False)


def test_build_writes_a_sidecar_per_shard_and_an_open_reads_none(built, tmp_path, monkeypatch):
    kind, listing = built
    names = listing.read_text().split()
    for name in names:
        sidecar = json.loads((listing.parent / f"{name}{SIDECAR_SUFFIX}").read_text())
        assert (sidecar["format"], sidecar["kind"], sidecar["label"]) == ("difftrain-shard-index", kind, name)
        assert sidecar["size"] == (listing.parent / name).stat().st_size
    source = opened(kind, listing, index_dir=tmp_path / "cache")
    assert (source.shards_from_sidecar, source.shards_from_cache, source.shards_indexed) == (3, 0, 0)
    assert not (tmp_path / "cache").exists()  # nothing to cache: the sidecars are the index
    assert "shard indexes: 3 beside the shards, 0 from the cache, 0 read now" in source.report_lines()
    same(source, read_cold(kind, listing, monkeypatch))
    assert source.read(23).data and source.shard_loads == 1


def test_captions_none_uses_the_sidecar_too(built, monkeypatch):
    kind, listing = built
    source = opened(kind, listing, captions="none")
    assert source.shards_from_sidecar == 3 and source.uncaptioned == 24
    same(source, read_cold(kind, listing, monkeypatch, captions="none"))


def test_a_shard_changed_after_build_is_read_again(tmp_path, shapes_dir):
    listing = build_shards(opened("folder", shapes_dir), tmp_path / "out", "laion", records_per_shard=10,
                           progress=False)
    part = tmp_path / "out" / "part-00001.gz"
    part.write_bytes(gzip.compress(laion_line("new", png(size=(30, 3)))))  # another size: not trusted
    source = opened("laion", listing)
    assert (source.shards_from_sidecar, source.shards_indexed) == (2, 1)
    assert source.shard_sizes == [10, 1, 4] and source.sizes[10].tolist() == [30, 3]
    assert source.read(10).captions == ["new"]


def test_max_pixels_a_record_exceeds_reads_that_shard_and_reports_as_before(tmp_path, monkeypatch):
    listing = make_laion(tmp_path / "data")  # part p, line i: (6 + i) x (5 + p) pixels
    for part in sorted((tmp_path / "data").glob("*.gz")):
        LaionSource.write_sidecar(part)
    assert opened("laion", listing).shards_from_sidecar == 3
    source = opened("laion", listing, max_pixels=60)  # 9x6 = 54 in part 1 passes, 8x7 = 56 in part 2, 9x7 not
    assert (source.shards_from_sidecar, source.shards_indexed) == (2, 1)
    same(source, read_cold("laion", listing, monkeypatch, max_pixels=60))
    assert source.skipped == [("part-00002.gz line 4", "9x7 pixels exceeds data.max_image_pixels=60 "
                                                       "(possible decompression bomb)")]


def test_skipped_records_and_a_list_naming_the_shard_by_another_path(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    part = tmp_path / "data" / "part-00000.gz"
    part.write_bytes(gzip.compress(laion_line("a", png()) + b"only\tone column\n" + laion_line("", png())))
    LaionSource.write_sidecar(part)
    listing = tmp_path / "list.txt"
    listing.write_text("data/part-00000.gz\n")
    source = opened("laion", listing)
    assert source.shards_from_sidecar == 1 and source.uncaptioned == 1
    assert source.skipped[0][0] == "data/part-00000.gz line 2"  # labelled as the list names it
    same(source, read_cold("laion", listing, monkeypatch))
    # Without captions a skipped record might be a bad caption's doing: the shard is read.
    assert opened("laion", listing, captions="none").shards_indexed == 1


@pytest.mark.parametrize("damage", [
    "{not json", json.dumps({"format": "difftrain-shard-index", "version": 99}), json.dumps([1, 2]),
    "positions",
])
def test_a_damaged_sidecar_is_ignored_with_a_warning(tmp_path, monkeypatch, caplog, damage):
    listing = make_laion(tmp_path / "data")
    for part in sorted((tmp_path / "data").glob("*.gz")):
        LaionSource.write_sidecar(part)
    sidecar = tmp_path / "data" / f"part-00001.gz{SIDECAR_SUFFIX}"
    if damage == "positions":  # valid JSON of the right kind, but its lists disagree
        raw = json.loads(sidecar.read_text())
        raw["positions"] = raw["positions"][:-1]
        damage = json.dumps(raw)
    sidecar.write_text(damage)
    with caplog.at_level(logging.WARNING):
        source = opened("laion", listing)
    assert (source.shards_from_sidecar, source.shards_indexed) == (2, 1)
    assert f"ignoring 1 shard index file(s) this difftrain cannot use, e.g. {sidecar}" in caplog.text
    assert "Delete the files" in caplog.text
    same(source, read_cold("laion", listing, monkeypatch))


def test_a_sidecar_of_another_kind_is_not_used(tmp_path, shapes_dir):
    listing = build_shards(opened("folder", shapes_dir), tmp_path / "out", "webdataset", records_per_shard=10,
                           progress=False)
    shard = tmp_path / "out" / "shard-000000.tar"
    sidecar = tmp_path / "out" / f"shard-000000.tar{SIDECAR_SUFFIX}"
    raw = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**raw, "kind": "laion"}))
    source = opened("webdataset", listing)
    assert (source.shards_from_sidecar, source.shards_indexed) == (2, 1)
    assert source.shard_sizes == [10, 10, 4] and source.read(0).key.startswith(f"{shard.name}:")


def test_a_tar_edited_in_place_to_the_same_size_is_read_again(tmp_path, shapes_dir):
    listing = build_shards(opened("folder", shapes_dir), tmp_path / "out", "webdataset", records_per_shard=10,
                           progress=False)
    shard = tmp_path / "out" / "shard-000000.tar"
    size = shard.stat().st_size
    data = bytearray(shard.read_bytes())
    start = data.index(b"\x89PNG")  # the first image member's bytes: made garbage, tar blocks unchanged
    data[start:start + 8] = b"garbage!"
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # coarse clocks
    assert shard.stat().st_size == size
    source = opened("webdataset", listing)
    assert (source.shards_from_sidecar, source.shards_indexed) == (2, 1)
    assert len(source) == 23 and "not an image" in source.skipped[0][1]


def test_data_index_writes_sidecars_for_shards_another_tool_wrote(tmp_path, shapes_dir, monkeypatch, capsys):
    from difftrain.cli import main

    listing = build_shards(opened("folder", shapes_dir), tmp_path / "parts", "laion", records_per_shard=10,
                           progress=False)
    for sidecar in listing.parent.glob(f"*{SIDECAR_SUFFIX}"):
        sidecar.unlink()  # as img2dataset leaves them
    assert opened("laion", listing).shards_from_sidecar == 0
    # the wrong format is refused before any index is written (every record would be unreadable)
    assert main(["data", "index", str(listing), "--format", "webdataset", "--no-progress"]) == 2
    assert "part-00000.gz: not a tar, so no webdataset shard; give --format laion" in capsys.readouterr().err
    assert not list(listing.parent.glob(f"*{SIDECAR_SUFFIX}"))
    assert main(["data", "index", str(listing), "--format", "laion", "--no-progress"]) == 0
    assert "wrote 3 index file(s)" in capsys.readouterr().out
    source = opened("laion", listing)
    assert (source.shards_from_sidecar, source.shards_indexed) == (3, 0)
    same(source, read_cold("laion", listing, monkeypatch))
    # A .tar that is no tar (an empty download, an error page) is a damaged shard, not laion's: the folder's good
    # tars are indexed, and so is it, as holding nothing (what a run finds reading it).
    tars = tmp_path / "tars"
    listing = build_shards(opened("folder", shapes_dir), tars, "webdataset", records_per_shard=10, progress=False)
    for sidecar in tars.glob(f"*{SIDECAR_SUFFIX}"):
        sidecar.unlink()
    (tars / "shard-000009.tar").write_text("<html>503 Service Unavailable</html>")
    listing.write_text(listing.read_text() + "shard-000009.tar\n")
    assert main(["data", "index", str(tars), "--format", "webdataset", "--no-progress"]) == 0
    assert "shard-000009.tar: not readable as a tar (empty or damaged)" in capsys.readouterr().out
    source = opened("webdataset", tars)
    assert (source.shards_from_sidecar, source.shards_indexed, len(source)) == (4, 0, 24)
    assert source.skipped[-1] == ("shard-000009.tar", "unreadable: truncated header; nothing in it is used")
