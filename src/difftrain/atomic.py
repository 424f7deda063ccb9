"""Files and folders written so that a crash never leaves half a one under the real name.

Every writer in difftrain goes through here. A file is written beside its target under a
hidden `.tmp` name (never an image or safetensors suffix, so no scan mistakes a leftover
for data), flushed to disk, given the mode the user's umask asks for and renamed into
place; a rename is atomic on POSIX file systems. A folder is built beside its target and
swapped in by `replace_dir`, which keeps the old folder until the new one has its name, so
at every instant one complete copy exists under a name `recover_dir` knows.

This module is a leaf: it imports nothing of difftrain's.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def occupied(path: str | Path) -> bool:
    """Whether a writer that fills a new folder at `path` would replace something: a file, or a folder holding
    anything."""
    path = Path(path)
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def _current_umask() -> int:
    # Linux reports it without changing it; elsewhere set-and-restore (racy only against
    # another thread creating a file in that instant).
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode open() would give a new file: temp-file helpers (and safetensors) use 0600."""
    return 0o666 & ~_current_umask()


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    directory = os.open(path, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def seal_tree(path: Path) -> None:
    """Give every file under `path` the umask's mode and flush it, then every folder, deepest first."""
    folders, mode = [path], file_mode()
    for item in sorted(Path(path).rglob("*")):
        if item.is_file():
            os.chmod(item, mode)  # safetensors writes 0600: a UI running as another user could not read it
            fsync_file(item)
        elif item.is_dir():
            folders.append(item)
    for folder in reversed(folders):
        fsync_dir(folder)


def staging_name(path: Path) -> Path:
    """A hidden sibling of `path`, unique to this process and call."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


@contextmanager
def atomic_path(path: str | Path, sync: bool = True) -> Iterator[Path]:
    """A temporary path beside `path` to write to; on success it becomes `path` in one rename.

    `sync=False` skips the fsyncs, for data that is cheap to recompute (caches, indexes).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_name(path)
    try:
        yield tmp
        if sync:
            fsync_file(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
        if sync:
            fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes, sync: bool = True) -> Path:
    with atomic_path(path, sync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str, sync: bool = True) -> Path:
    return write_bytes(path, text.encode("utf-8"), sync)


def write_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None,
                      sync: bool = True) -> Path:
    """Tensors (moved to the CPU, made contiguous) as one safetensors file, written atomically."""
    from safetensors.torch import save_file

    with atomic_path(path, sync) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)


def _old_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def replace_dir(staging: Path, final: Path) -> Path:
    """Make the complete folder `staging` the folder `final`, never with a moment of neither.

    The old `final` is renamed aside first and deleted only once the new one has its name;
    a crash between the two renames leaves the old one under `.NAME.old`, which
    `recover_dir` puts back.
    """
    staging, final = Path(staging), Path(final)
    seal_tree(staging)
    old = _old_name(final)
    if final.exists():
        if old.exists():  # an earlier swap finished but died before it could clean up
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(staging, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


def recover_dir(final: Path) -> None:
    """Undo what a crash inside `replace_dir` left: the old folder back if the new one never arrived."""
    final, old = Path(final), _old_name(Path(final))
    if not old.exists():
        return
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(old, final)


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """A fresh hidden folder beside `final` to build its replacement in; swapped in on success."""
    final = Path(final)
    staging = final.with_name(f".{final.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        replace_dir(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def recover_dirs(parent: Path) -> None:
    """After a crash: restore every folder in `parent` a killed `atomic_dir` had moved aside, and
    delete the half-built replacements (the folders they were to replace are intact)."""
    parent = Path(parent)
    for old in parent.glob(".*.old"):
        recover_dir(parent / old.name[1 : -len(".old")])
    for leftover in parent.glob(".*.staging"):
        shutil.rmtree(leftover, ignore_errors=True)


# For a folder whose parent may not be writable (a mounted volume): its new entries are built in a hidden
# folder inside it and swapped in entry by entry, through a journal that makes the swap resumable.
CONTENTS_STAGING = ".difftrain-partial"  # the new entries while they are written
CONTENTS_OLD = ".difftrain-replaced"  # the old entries while the new ones move in
CONTENTS_TRASH = ".difftrain-trash"  # the old entries once the swap is done, until deleted (a prefix)
CONTENTS_LOCK = ".difftrain-lock"  # held by whoever writes, swaps or repairs the folder's contents
# In CONTENTS_STAGING: every new entry is written; in CONTENTS_OLD: every old entry has left the folder.
_COMPLETE = ".complete"


def is_bookkeeping(name: str) -> bool:
    """Whether an entry of a swapped folder is the swap's own, not content."""
    return name in (CONTENTS_STAGING, CONTENTS_OLD, CONTENTS_LOCK) or name.startswith(CONTENTS_TRASH)


def _trashes(final: Path) -> list[Path]:
    return sorted(final.glob(f"{CONTENTS_TRASH}*"))


@contextmanager
def contents_lock(final: Path, waiting_note: str | None = None) -> Iterator[None]:
    """Hold the folder's lock (a file inside it): one writer or repairer at a time, across processes.
    `waiting_note` is printed if another holds it, before waiting for it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(Path(final) / CONTENTS_LOCK, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting_note:
                import sys

                print(waiting_note, file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def replace_contents(final: Path) -> None:
    """Make the entries of `final` those written into `final / CONTENTS_STAGING` (call it holding
    `contents_lock`).

    Nothing is deleted before every new entry is complete on disk and every old one set aside, so a crash
    at any instant leaves either the old entries or the new ones once `recover_contents` has run.
    """
    staging = Path(final) / CONTENTS_STAGING
    seal_tree(staging)
    write_bytes(staging / _COMPLETE, b"")
    _roll_forward(Path(final))


def _roll_forward(final: Path) -> None:
    staging, old = final / CONTENTS_STAGING, final / CONTENTS_OLD
    if not (old / _COMPLETE).exists():
        old.mkdir(exist_ok=True)
        for entry in final.iterdir():
            if not is_bookkeeping(entry.name):
                os.replace(entry, old / entry.name)
        write_bytes(old / _COMPLETE, b"")
    for entry in staging.iterdir():
        if entry.name != _COMPLETE:
            os.replace(entry, final / entry.name)
    fsync_dir(final)
    # The one step that marks the swap done (from here on only deletions remain), to a name no earlier trash
    # holds: one a failed deletion left (files held open on NFS) would make the rename fail.
    os.replace(old, final / f"{CONTENTS_TRASH}-{uuid.uuid4().hex[:8]}")
    _clear(final)


def _clear(final: Path) -> None:
    shutil.rmtree(final / CONTENTS_STAGING, ignore_errors=True)  # first: a trash without it means "done"
    for trash in _trashes(final):
        shutil.rmtree(trash, ignore_errors=True)


def recover_contents(final: Path) -> bool:
    """Finish or undo a `replace_contents` a crash interrupted; True if there was one (call it holding
    `contents_lock`, so a writer still at work is not taken for a crashed one).

    Complete new entries are swapped in; a half-written set is deleted and the old entries stay.
    """
    final = Path(final)
    staging, old = final / CONTENTS_STAGING, final / CONTENTS_OLD
    marker_only = not staging.exists() or all(entry.name == _COMPLETE for entry in staging.iterdir())
    if _trashes(final) and not old.exists() and marker_only:  # done; only its clean-up was cut short
        _clear(final)
        return True
    if (staging / _COMPLETE).exists() or (old / _COMPLETE).exists():
        _roll_forward(final)
        return True
    found = staging.exists() or old.exists()
    if old.exists():  # set aside without a complete new set (not a state replace_contents leaves): put it back
        for entry in old.iterdir():
            if entry.name != _COMPLETE and not (final / entry.name).exists():
                os.replace(entry, final / entry.name)
        shutil.rmtree(old)
    shutil.rmtree(staging, ignore_errors=True)
    return found


def interrupted_contents(final: Path) -> bool:
    """Whether `final` holds what an interrupted (or running) `replace_contents` leaves."""
    final = Path(final)
    return (final / CONTENTS_STAGING).exists() or (final / CONTENTS_OLD).exists() or bool(_trashes(final))
