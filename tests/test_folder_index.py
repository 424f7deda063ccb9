"""The folder index: a start decodes only images that are new or changed, and opens the same source as a fresh scan."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

import difftrain.data.folder_index as folder_index
from difftrain.data.folder_index import index_file, read_index
from difftrain.data.shapes import write_shapes_dataset
from difftrain.data.sources import open_source

MAX_PIXELS = 64_000_000
HOUR_AGO = time.time_ns() - 3600 * 10**9


def settle(root: Path, when: int = HOUR_AGO) -> None:
    """Give every file an mtime well before now: the index does not store files written in the last seconds."""
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, ns=(when, when))


@pytest.fixture
def decodes(monkeypatch) -> Counter:
    """Counts each full decode by file name."""
    counts: Counter = Counter()
    real = folder_index.decode_outcome

    def counting(path, max_pixels=MAX_PIXELS):
        counts[Path(path).name] += 1
        return real(path, max_pixels)

    monkeypatch.setattr(folder_index, "decode_outcome", counting)
    return counts


def folder(root: Path, captions: str = "metadata") -> Path:
    """Six shapes, a corrupt file, an empty one and a truncated one; captions from metadata.jsonl or .txt files."""
    write_shapes_dataset(root, num_images=6, size=16)
    (root / "corrupt.png").write_bytes(b"not an image at all")
    (root / "empty.png").write_bytes(b"")
    (root / "truncated.png").write_bytes((root / "000000.png").read_bytes()[:60])
    if captions == "txt":
        (root / "metadata.jsonl").unlink()
        for image in root.glob("0*.png"):
            image.with_suffix(".txt").write_text(f"caption of {image.stem}")
    settle(root)
    return root


def open_folder(root: Path, index_dir: Path | None, **options):
    return open_source("folder", root, index_dir=index_dir, progress=False, **options)


def snapshot(source) -> dict:
    """Everything a folder source hands training and reports (its per-record strings packed: workers share them)."""
    from difftrain.data.packed import PackedLists, PackedStrings

    assert isinstance(source._keys, PackedStrings) and isinstance(source._captions, PackedLists)
    conditioning = source._conditioning
    return {"description": source.description, "keys": list(source._keys), "paths": list(source._paths),
            "captions": list(source._captions), "sizes": source.sizes.tolist(), "skipped": source.skipped,
            "conditioning": None if conditioning is None else list(conditioning),
            "digests": [source.known_record(index)[0].hex() for index in range(len(source))]}


def fresh(root: Path, **options) -> dict:
    return snapshot(open_folder(root, None, **options))


def test_second_open_decodes_nothing_and_opens_the_same_source(tmp_path, decodes, capsys):
    root, index = folder(tmp_path / "data"), tmp_path / "index"
    first = snapshot(open_folder(root, index))
    assert sum(decodes.values()) == 9  # every file, once
    decodes.clear()

    second = open_source("folder", root, index_dir=index, progress=True)
    assert not decodes
    assert "0 images decoded (new or changed), 9 taken from the index" in capsys.readouterr().err
    assert snapshot(second) == first == fresh(root)
    reasons = dict(second.skipped)
    assert reasons["empty.png"] == "empty file (0 bytes)" and "corrupt.png" in reasons and "truncated.png" in reasons
    # What the latent cache keys on, known without reading the files again.
    assert second.known_record(0) == (hashlib.sha256((root / "000000.png").read_bytes()).digest(),
                                      second.read(0).captions)


def test_an_index_written_before_digests_hashes_its_images_without_decoding_them(tmp_path, decodes):
    root, index = folder(tmp_path / "data"), tmp_path / "index"
    open_folder(root, index)
    path = index_file(index, root, MAX_PIXELS)
    stored = json.loads(path.read_text())
    stored["files"] = {name: entry[:3] for name, entry in stored["files"].items()}
    path.write_text(json.dumps(stored))
    decodes.clear()
    reopened = snapshot(open_folder(root, index))
    assert not decodes and reopened == fresh(root)
    assert all(len(entry) == 4 for name, entry in read_index(path).items() if name.startswith("0"))


def test_max_pixels_keys_its_own_index(tmp_path, decodes):
    root, index = folder(tmp_path / "data"), tmp_path / "index"
    Image.new("RGB", (8, 8)).save(root / "small.png")
    settle(root)
    open_folder(root, index)
    decodes.clear()
    source = open_folder(root, index, max_pixels=100)  # only the 8x8 image is within the limit now
    assert sum(decodes.values()) == 10
    assert list(source._keys) == ["small.png"] and snapshot(source) == fresh(root, max_pixels=100)


def test_modified_added_deleted_and_corrupted_files_are_seen(tmp_path, decodes):
    root, index = folder(tmp_path / "data"), tmp_path / "index"
    open_folder(root, index)
    decodes.clear()

    later = HOUR_AGO + 5 * 10**9
    Image.new("RGB", (20, 12), (0, 90, 0)).save(root / "000001.png")
    Image.new("RGB", (8, 24), (9, 9, 9)).save(root / "added.png")
    (root / "000002.png").unlink()
    (root / "000003.png").write_bytes(b"\x89PNG broken now")
    for name in ("000001.png", "added.png", "000003.png"):
        os.utime(root / name, ns=(later, later))
    source = open_folder(root, index)

    assert set(decodes) == {"000001.png", "added.png", "000003.png"} and sum(decodes.values()) == 3
    assert snapshot(source) == fresh(root)
    assert "000003.png" in dict(source.skipped) and "added.png" in source._keys
    entries = read_index(index_file(index, root, MAX_PIXELS))
    assert "000002.png" not in entries and entries["added.png"][2] == [8, 24]
    decodes.clear()
    open_folder(root, index)
    assert not decodes


def test_same_size_corruption_with_new_mtime_is_decoded_again(tmp_path, decodes):
    root, index = folder(tmp_path / "data"), tmp_path / "index"
    open_folder(root, index)
    image = root / "000004.png"
    data = bytearray(image.read_bytes())
    data[40] ^= 0xFF  # same length, broken pixels (the PNG CRC no longer matches)
    image.write_bytes(bytes(data))
    later = HOUR_AGO + 10**9
    os.utime(image, ns=(later, later))
    decodes.clear()
    source = open_folder(root, index)
    assert dict(decodes) == {"000004.png": 1}
    assert "000004.png" in dict(source.skipped)
    assert snapshot(source) == fresh(root)


@pytest.mark.parametrize("kind", ["txt", "metadata"])
def test_changed_caption_is_seen_without_decoding(tmp_path, decodes, kind):
    root, index = folder(tmp_path / "data", captions=kind), tmp_path / "index"
    open_folder(root, index)
    decodes.clear()
    if kind == "txt":
        (root / "000000.txt").write_text("a new caption")
    else:
        meta = root / "metadata.jsonl"
        meta.write_text(meta.read_text().replace('"a red circle"', '"a new caption"', 1))
    source = open_folder(root, index)
    assert not decodes
    assert source._captions[source._keys.index("000000.png")] == ["a new caption"]
    assert snapshot(source) == fresh(root)


def test_recently_written_files_are_not_trusted(tmp_path, decodes):
    """A file rewritten within the clock's granularity could keep its size and mtime: it is decoded until it settles."""
    root, index = folder(tmp_path / "data"), tmp_path / "index"
    Image.new("RGB", (8, 8)).save(root / "fresh.png")  # mtime: now
    open_folder(root, index)
    decodes.clear()
    open_folder(root, index)
    assert dict(decodes) == {"fresh.png": 1}


@pytest.mark.parametrize("damage", [b"", b'{"version": 1, "files": {"000000.png": [', b"\x00\xff garbage",
                                    b"[1, 2]", b'{"version": 1, "files": []}',
                                    b'{"version": 1, "files": {"000000.png": [1, "x", [0, 0]], "000001.png": 7}}'])
def test_damaged_index_is_ignored_and_rebuilt(tmp_path, decodes, damage):
    root, index = folder(tmp_path / "data"), tmp_path / "index"
    open_folder(root, index)
    path = index_file(index, root, MAX_PIXELS)
    path.write_bytes(damage)
    decodes.clear()
    source = open_folder(root, index)
    assert decodes["000000.png"] == 1 and decodes["000001.png"] == 1
    assert snapshot(source) == fresh(root)
    assert len(read_index(path)) == 9  # rewritten whole
    decodes.clear()
    open_folder(root, index)
    assert not decodes


def test_folder_without_index_dir_writes_nothing(tmp_path, decodes):
    root = folder(tmp_path / "data")
    before = sorted(p.name for p in root.rglob("*"))
    open_folder(root, None)
    open_folder(root, None)
    assert sum(decodes.values()) == 18
    assert sorted(p.name for p in root.rglob("*")) == before


def _open_in_process(root: str, index: str, barrier, results) -> None:
    barrier.wait()  # both start scanning at the same moment, with no index yet
    results.put(snapshot(open_source("folder", root, index_dir=index, progress=False)))


def test_two_processes_opening_at_once_share_a_valid_index(tmp_path):
    root, index = tmp_path / "data", tmp_path / "index"
    write_shapes_dataset(root, num_images=300, size=16)
    (root / "corrupt.png").write_bytes(b"garbage")
    settle(root)
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_open_in_process, args=(str(root), str(index), barrier, results))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    got = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0

    expected = fresh(root)
    assert got == [expected, expected]
    path = index_file(index, root, MAX_PIXELS)
    stored = json.loads(path.read_text())
    assert stored["version"] == folder_index.INDEX_VERSION and len(stored["files"]) == 301
    assert not [p for p in index.iterdir() if p.name.endswith(".tmp")]  # no staging file left behind
    assert snapshot(open_folder(root, index)) == expected


def test_resolving_each_folder_once_matches_a_full_resolve(tmp_path, monkeypatch):
    """Captions are matched by resolved path; the scan's per-folder resolve must agree with Path.resolve."""
    import difftrain.data.folder as folder_module

    root = tmp_path / "data"
    for name in ("real/a.png", "b.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(root / name)
    (root / "linked.png").symlink_to(root / "real" / "a.png")
    (root / "real" / "up").symlink_to(root)  # a folder link: files through it are the folder's own
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(entry) for entry in [
        {"file_name": "real/../b.png", "text": "bee"}, {"file_name": "linked.png", "text": "ay"},
        {"file_name": "real/up/gone.png", "text": "missing"}]))
    ours = fresh(root)
    monkeypatch.setattr(folder_module, "path_resolver", lambda: Path.resolve)
    assert ours == fresh(root)
    assert dict(zip(ours["keys"], ours["captions"])) == {"b.png": ["bee"], "linked.png": ["ay"], "real/a.png": ["ay"]}
    assert [reason for _, reason in ours["skipped"]] == ["listed in metadata.jsonl line 3 but the file does not exist"]
