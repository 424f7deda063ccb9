"""A folder's contents replaced from inside it survive a crash at every step of the swap."""

import os

import pytest
from PIL import Image

from difftrain import atomic
from difftrain.atomic import CONTENTS_OLD, CONTENTS_STAGING, recover_contents, replace_contents
from difftrain.data.sources import open_source


class Crash(Exception):
    pass


def _contents(folder):
    """The folder's content: every file but the swap's own bookkeeping (hidden, which no data reader reads)."""
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.relative_to(folder).parts[0].startswith(".difftrain-")}


def _folder_with_staged_output(root):
    out = root / "out"
    (out / "sub").mkdir(parents=True)
    (out / "a.txt").write_text("old a")
    (out / "sub" / "x.txt").write_text("old x")
    staging = out / CONTENTS_STAGING
    (staging / "sub").mkdir(parents=True)
    (staging / "b.txt").write_text("new b")
    (staging / "sub" / "x.txt").write_text("new x")
    (staging / "metadata.jsonl").write_text("new metadata")
    return out


OLD = {"a.txt": "old a", "sub/x.txt": "old x"}
NEW = {"b.txt": "new b", "sub/x.txt": "new x", "metadata.jsonl": "new metadata"}


def test_a_crash_at_any_rename_leaves_the_old_entries_or_the_new_ones(tmp_path, monkeypatch):
    real_replace, outcomes = os.replace, []
    for crash_at in range(20):
        calls = []

        def replace(src, dst, crash_at=crash_at, calls=calls):
            if len(calls) == crash_at:
                raise Crash()
            calls.append(src)
            real_replace(src, dst)

        out = _folder_with_staged_output(tmp_path / str(crash_at))
        monkeypatch.setattr(atomic.os, "replace", replace)
        try:
            replace_contents(out)
            finished = True
        except Crash:
            finished = False
        monkeypatch.setattr(atomic.os, "replace", real_replace)
        if finished:
            assert not recover_contents(out)
            assert _contents(out) == NEW
            break
        assert recover_contents(out)
        contents = _contents(out)
        assert contents in (OLD, NEW), (crash_at, contents)
        assert not (out / CONTENTS_STAGING).exists() and not (out / CONTENTS_OLD).exists()
        outcomes.append(contents == NEW)
    # the first rename writes the marker: before it the old entries stay, after it the new ones arrive
    assert outcomes[0] is False and all(outcomes[1:]) and len(outcomes) >= 6, outcomes


def test_a_crash_while_deleting_the_old_entries_leaves_the_new_ones(tmp_path, monkeypatch):
    """Once the old entries are set aside as trash only deletions remain; a kill among them must not be read
    as a swap that never happened (which would put old entries back beside new ones)."""
    real_rmtree = atomic.shutil.rmtree
    for crash_on in range(2):  # deleting the emptied staging folder, then the trash
        out = _folder_with_staged_output(tmp_path / str(crash_on))
        calls = []

        def rmtree(path, *args, crash_on=crash_on, calls=calls, **kwargs):
            calls.append(path)
            if len(calls) == crash_on + 1:
                raise Crash()
            real_rmtree(path, *args, **kwargs)

        monkeypatch.setattr(atomic.shutil, "rmtree", rmtree)
        with pytest.raises(Crash):
            replace_contents(out)
        monkeypatch.setattr(atomic.shutil, "rmtree", real_rmtree)
        assert recover_contents(out) and _contents(out) == NEW
        assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_a_half_written_output_is_deleted_and_the_old_entries_stay(tmp_path):
    out = _folder_with_staged_output(tmp_path)  # no completion marker: the writer died mid-way
    assert recover_contents(out)
    assert _contents(out) == OLD


def test_reading_a_folder_a_killed_curate_left_finishes_the_swap_first(tmp_path, capsys):
    out = tmp_path / "data"
    (out / CONTENTS_STAGING).mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(out / "old.png")
    for name in ("new1.png", "new2.png"):
        Image.new("RGB", (8, 8), "blue").save(out / CONTENTS_STAGING / name)
    (out / CONTENTS_STAGING / ".complete").write_bytes(b"")
    (out / CONTENTS_OLD).mkdir()  # killed after setting the old image aside, before noting it
    os.replace(out / "old.png", out / CONTENTS_OLD / "old.png")
    source = open_source("folder", out, captions="none", progress=False)
    assert len(source) == 2 and sorted(p.name for p in out.iterdir()) == [".difftrain-lock", "new1.png", "new2.png"]
    assert "held an interrupted curate output" in capsys.readouterr().err


def test_an_interrupted_output_that_cannot_be_put_right_names_the_folder(tmp_path, monkeypatch):
    out = _folder_with_staged_output(tmp_path)
    (out / CONTENTS_STAGING / ".complete").write_bytes(b"")

    def read_only(path, *args):  # what a read-only mount answers (this test may run as root, who could write)
        raise PermissionError(30, "Read-only file system", str(path))

    monkeypatch.setattr(atomic.os, "replace", read_only)
    with pytest.raises(ValueError, match=f"{out} holds an interrupted curate output .* write access"):
        open_source("folder", out, captions="none", progress=False)


def test_a_reader_waits_for_a_curate_still_writing_instead_of_deleting_its_work(tmp_path, capsys):
    import threading
    import time

    from difftrain.atomic import contents_lock

    out = tmp_path / "data"
    (out / CONTENTS_STAGING).mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(out / "old.png")
    Image.new("RGB", (8, 8), "blue").save(out / CONTENTS_STAGING / "new.png")  # being written: no marker yet
    opened = []
    with contents_lock(out):  # the writer
        reader = threading.Thread(target=lambda: opened.append(open_source("folder", out, captions="none",
                                                                           progress=False)))
        reader.start()
        time.sleep(0.5)
        assert reader.is_alive() and (out / CONTENTS_STAGING / "new.png").exists()  # waiting, nothing deleted
        replace_contents(out)  # the writer finishes
    reader.join(10)
    assert len(opened[0]) == 1 and sorted(p.name for p in out.glob("*.png")) == ["new.png"]
    assert "waiting for a `difftrain data curate` writing into" in capsys.readouterr().err


def test_a_trash_an_earlier_swap_could_not_delete_does_not_stop_or_confuse_the_next(tmp_path, monkeypatch):
    from difftrain.atomic import CONTENTS_TRASH

    out = _folder_with_staged_output(tmp_path)
    (out / CONTENTS_TRASH / "held").mkdir(parents=True)  # files a reader held open on NFS
    (out / CONTENTS_TRASH / "held" / "x").write_text("old")
    real_rmtree = atomic.shutil.rmtree
    monkeypatch.setattr(atomic.shutil, "rmtree", lambda path, *a, **k: None if path.name.startswith(CONTENTS_TRASH)
                        else real_rmtree(path, *a, **k))  # trash deletions keep failing
    replace_contents(out)
    assert _contents(out) == NEW  # the stale trash's entries are not content (hidden), and nothing old came back
    assert not (out / CONTENTS_OLD).exists() and not (out / CONTENTS_STAGING).exists()
    # A swap cut short with old entries set aside beside a stale trash is rolled forward, not taken for done.
    out = _folder_with_staged_output(tmp_path / "second")
    (out / CONTENTS_TRASH).mkdir()
    (out / CONTENTS_STAGING / ".complete").write_bytes(b"")
    (out / CONTENTS_OLD).mkdir()
    for name in ("a.txt", "sub"):
        os.replace(out / name, out / CONTENTS_OLD / name)
    (out / CONTENTS_OLD / ".complete").write_bytes(b"")
    os.replace(out / CONTENTS_STAGING / "b.txt", out / "b.txt")  # phase 2 had begun
    monkeypatch.setattr(atomic.shutil, "rmtree", real_rmtree)
    assert recover_contents(out) and _contents(out) == NEW
