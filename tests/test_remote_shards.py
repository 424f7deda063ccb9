"""Shard sources read from URLs: http(s) from a server on 127.0.0.1, other schemes through fsspec."""

from __future__ import annotations

import importlib.util
import json
import os
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler
from pathlib import Path

import fsspec
import pytest
from conftest import tiny_config, write_config
from http_server import LoopbackServer

from difftrain.config import parse_config
from difftrain.data import remote
from difftrain.data.fingerprint import describe_change, fingerprint
from difftrain.data.folder import DatasetError
from difftrain.data.records import RecordSource
from difftrain.data.shards import build_shards
from difftrain.data.sources import open_source
from difftrain.training.run_data import open_images


class ShardServer(LoopbackServer):
    """Serves a folder, counts requests, and fails the paths it is told to."""

    def __init__(self, root: Path):
        super().__init__(partial(_Handler, directory=str(root)))
        self.hits: Counter[tuple[str, str]] = Counter()  # (method, path)
        self.failures: Counter[str] = Counter()  # path: how many of its next requests are answered 503
        self.missing: set[str] = set()  # paths answered 404

    def gets(self) -> list[str]:
        return sorted(path for method, path in self.hits.elements() if method == "GET")


class _Handler(SimpleHTTPRequestHandler):
    server: ShardServer

    def send_head(self):  # what GET and HEAD share
        self.server.hits[(self.command, self.path)] += 1
        if self.path in self.server.missing:
            self.send_error(404)
            return None
        if self.server.failures[self.path] > 0:
            self.server.failures[self.path] -= 1
            self.send_error(503)
            return None
        return super().send_head()

    def log_message(self, *args) -> None:
        pass  # keep pytest's output to the tests


@pytest.fixture(scope="module")
def served(tmp_path_factory, shapes_dir) -> Path:
    """laion parts and webdataset tars of the 24 shapes, 10 records a shard: 3 shards each."""
    root = tmp_path_factory.mktemp("served")
    images = open_source("folder", shapes_dir, progress=False)
    build_shards(images, root / "laion", "laion", records_per_shard=10, progress=False)
    build_shards(images, root / "wds", "webdataset", records_per_shard=10, progress=False)
    for sidecar in root.glob("*/*.index.json"):
        sidecar.unlink()  # these tests read the shards themselves; the sidecars' own test is below
    return root


@pytest.fixture
def server(served):
    with ShardServer(served).running() as httpd:
        yield httpd


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(remote, "RETRY_DELAYS", (0.01, 0.01, 0.01))


def records(source: RecordSource) -> list[tuple]:
    return [(r.key, r.data, r.captions) for r in map(source.read, range(len(source)))]


def assert_same(local: RecordSource, other: RecordSource) -> None:
    assert local.skipped == other.skipped == []
    assert local.shard_sizes == other.shard_sizes
    assert (local.sizes == other.sizes).all()
    assert records(local) == records(other)


@pytest.mark.parametrize("kind, where", [
    ("laion", "laion/filelist.txt"),
    ("laion", "laion/"),  # a folder URL: its filelist.txt
    ("webdataset", "wds/filelist.txt"),
    ("webdataset", "wds/shard-000002.tar"),
])
def test_http_shards_read_as_the_local_ones(served, server, kind, where):
    local = open_source(kind, served / where, progress=False)
    over_http = open_source(kind, f"{server.url}/{where}", progress=False)
    assert_same(local, over_http)
    assert len(local) == (4 if where.endswith(".tar") else 24)
    assert server.url in over_http.description


def test_a_local_list_may_name_urls(served, server, tmp_path):
    names = (served / "laion" / "filelist.txt").read_text().split()
    listing = tmp_path / "filelist.txt"
    listing.write_text("".join(f"{server.url}/laion/{name}\n" for name in names))
    source = open_source("laion", listing, progress=False)
    local = open_source("laion", served / "laion", progress=False)
    assert [r[1:] for r in records(source)] == [r[1:] for r in records(local)]
    assert source.read(0).key == f"{server.url}/laion/{names[0]}:1"  # labelled as listed, like local paths


def test_a_transient_failure_is_retried(server):
    server.failures["/wds/shard-000001.tar"] = 1
    source = open_source("webdataset", f"{server.url}/wds/filelist.txt", progress=False)
    assert len(source) == 24 and source.skipped == []
    assert server.hits[("GET", "/wds/shard-000001.tar")] == 2


def test_a_missing_shard_is_skipped_naming_its_url_and_is_tried_again_next_open(server, tmp_path):
    server.missing = {"/laion/part-00001.gz"}
    url = f"{server.url}/laion/filelist.txt"
    source = open_source("laion", url, index_dir=tmp_path, progress=False)
    assert len(source) == 14 and source.shard_sizes == [10, 4]
    [(where, reason)] = source.skipped
    assert where == "part-00001.gz"
    assert f"{server.url}/laion/part-00001.gz" in reason and "404" in reason
    server.missing = set()  # back: its failure was not cached
    again = open_source("laion", url, index_dir=tmp_path, progress=False)
    assert (again.shards_indexed, again.shards_from_cache, len(again)) == (1, 2, 24)


def test_a_shard_that_keeps_failing_is_skipped_after_the_retries(server):
    server.failures["/wds/shard-000000.tar"] = 100
    source = open_source("webdataset", f"{server.url}/wds/filelist.txt", progress=False)
    assert len(source) == 14 and server.hits[("GET", "/wds/shard-000000.tar")] == 4
    [(where, reason)] = source.skipped
    assert where == "shard-000000.tar" and "HTTP 503" in reason and "4 tries" in reason


def test_the_index_cache_is_keyed_by_what_the_server_says(served, server, tmp_path):
    url = f"{server.url}/wds/filelist.txt"
    first = open_source("webdataset", url, index_dir=tmp_path, progress=False)
    assert (first.shards_indexed, first.shards_from_cache) == (3, 0)
    server.hits.clear()
    second = open_source("webdataset", url, index_dir=tmp_path, progress=False)
    assert (second.shards_indexed, second.shards_from_cache) == (0, 3)
    assert server.gets() == ["/wds/filelist.txt"]  # each shard was asked about (HEAD), none read
    heads = sum(n for (method, _), n in server.hits.items() if method == "HEAD")
    fingerprint(second)  # resume's fingerprint takes what the open already asked
    assert sum(n for (method, _), n in server.hits.items() if method == "HEAD") == heads == 3
    assert records(second) == records(first)
    # A shard the server reports changed (here its Last-Modified) is indexed again, on its own.
    tar = served / "wds" / "shard-000002.tar"
    os.utime(tar, (tar.stat().st_mtime + 10,) * 2)
    third = open_source("webdataset", url, index_dir=tmp_path, progress=False)
    assert (third.shards_indexed, third.shards_from_cache) == (1, 2)


def test_fsspec_urls_read_as_the_local_ones(served, tmp_path):
    memory = fsspec.filesystem("memory")
    base = f"memory://{tmp_path.name}"
    for name in ("filelist.txt", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"):
        memory.pipe(f"{base}/{name}", (served / "wds" / name).read_bytes())
    try:
        source = open_source("webdataset", f"{base}/filelist.txt", index_dir=tmp_path, progress=False)
        assert_same(open_source("webdataset", served / "wds", progress=False), source)
        again = open_source("webdataset", f"{base}/filelist.txt", index_dir=tmp_path, progress=False)
        assert (again.shards_indexed, again.shards_from_cache) == (0, 3)  # keyed by size and creation time
    finally:
        memory.rm(base, recursive=True)


@pytest.mark.parametrize("url, package", [("s3://bucket/x.tar", "s3fs"), ("gs://bucket/filelist.txt", "gcsfs")])
def test_a_scheme_without_its_package_says_what_to_install(url, package):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed")
    with pytest.raises(DatasetError, match=f"needs the {package} package .*: pip install {package}"):
        open_source("webdataset", url, progress=False)


def test_a_run_trains_on_laion_parts_over_http(server, shapes_dir, tmp_path):
    from difftrain.cli import main

    data = {"source": "laion", "path": f"{server.url}/laion/filelist.txt"}
    raw = tiny_config(shapes_dir, tmp_path / "run", data=data, training={"max_steps": 2})
    config = parse_config(raw)
    dataset = open_images(config, progress=False)
    assert len(dataset) == 24 and dataset[0, 0, 5]["pixel_values"].shape == (3, 16, 16)
    assert open_images(config, progress=False).source.shards_from_cache == 3  # under the run's cache dir
    assert main(["train", str(write_config(tmp_path / "run.yaml", raw)), "--no-progress"]) == 0
    fingerprinted = json.loads((tmp_path / "run/checkpoints/step-00000002/data.json").read_text())["data"]
    assert sorted(fingerprinted["entries"]) == ["part-00000.gz", "part-00001.gz", "part-00002.gz"]
    assert (tmp_path / "run/model/unet/diffusion_pytorch_model.safetensors").is_file()


def test_resume_notices_a_remote_shard_that_changed(served, server):
    source = open_source("laion", f"{server.url}/laion/filelist.txt", progress=False)
    before = fingerprint(source)
    assert all(size > 0 for size, _, _ in before["entries"].values())  # what the server said, not a failed stat
    part = served / "laion" / "part-00001.gz"
    os.utime(part, (part.stat().st_mtime + 20,) * 2)
    assert describe_change(before, fingerprint(source)) == "1 changed size or time (e.g. part-00001.gz)"


def test_remote_shards_use_the_sidecars_beside_them_and_cache_them(tmp_path, shapes_dir):
    build_shards(open_source("folder", shapes_dir, progress=False), tmp_path / "laion", "laion",
                 records_per_shard=10, progress=False)
    with ShardServer(tmp_path).running() as httpd:
        url, cache = f"{httpd.url}/laion/filelist.txt", tmp_path / "cache"
        first = open_source("laion", url, index_dir=cache, progress=False)
        assert (first.shards_from_sidecar, first.shards_indexed, len(first)) == (3, 0, 24)
        assert httpd.gets() == sorted(["/laion/filelist.txt"] + [f"/laion/part-0000{k}.gz.index.json"
                                                                  for k in range(3)])  # no shard
        httpd.hits.clear()
        second = open_source("laion", url, index_dir=cache, progress=False)  # the cache: a HEAD a shard
        assert (second.shards_from_cache, second.shards_from_sidecar, second.shards_indexed) == (3, 0, 0)
        assert httpd.gets() == ["/laion/filelist.txt"]
        # A shard whose size is not the sidecar's is read.
        part = tmp_path / "laion" / "part-00001.gz"
        part.write_bytes(part.read_bytes() + part.read_bytes())  # gzip members in a row: twice the records
        third = open_source("laion", url, progress=False)
        assert (third.shards_from_sidecar, third.shards_indexed, len(third)) == (2, 1, 34)
