"""What a data set is made of, compactly: enough to notice on resume that it changed, and to say how.

Each file a source reads (an image, or a whole shard) is listed with its size and
modification time, plus a checksum of any captions held outside it (metadata.jsonl,
.txt files). Hashing contents would catch more but costs a full read of the data at every
start; size + mtime is what rsync and make trust too. A copy that did not keep mtimes
(`cp` without `-p`) reads as changed: resume with --allow-data-change after checking.
A shard read from a URL is listed with what the remote says of it instead: its size and a
checksum of its ETag or Last-Modified (remote.py).
"""

from __future__ import annotations

import hashlib
import os
import zlib

from difftrain.data.remote import is_url, remote_identity
from difftrain.data.sources import RecordSource

# Above this many files a checkpoint keeps only the digest: the file list would outweigh a LoRA.
MAX_LISTED = 100_000


def fingerprint(source: RecordSource) -> dict:
    return fingerprint_and_layout(source)[0]


def fingerprint_and_layout(source: RecordSource) -> tuple[dict, str]:
    """The fingerprint a checkpoint keeps, and the source's layout: what must agree between machines reading
    the same data under the same record indices (records, files by name, sizes, captions; not their times, as a
    copy without `-p` is the same data, nor an absolute cache path, which differs between machines)."""
    entries: dict[str, list[int]] = {}
    known = source.remote_versions()
    for key, path, captions in source.stored_files():
        size, mtime = _size_and_time(path, known)
        entries[key] = [size, mtime, zlib.crc32("\x00".join(captions).encode("utf-8"))]
    digest = hashlib.sha256(repr(sorted(entries.items())).encode()).hexdigest()
    shape = sorted((os.path.basename(key) if os.path.isabs(key) else key, size, captions)
                   for key, (size, _, captions) in entries.items())
    unversioned = sum(-1 in (size, mtime) for size, mtime, _ in entries.values())  # unknown: a change goes unseen
    return ({"records": len(source), "files": len(entries), "digest": digest, "unversioned": unversioned,
             "entries": entries if len(entries) <= MAX_LISTED else None},
            hashlib.sha256(repr((len(source), shape)).encode()).hexdigest())


def _size_and_time(path: str, known: dict[str, tuple | None]) -> tuple[int, int]:
    """A file's size and mtime, or for a URL its size and a checksum of its version (from `known` when the
    source asked the remote while opening); -1 for what is unknown."""
    if is_url(path):
        found = known[path] if path in known else remote_identity(path)
        if found is None:
            return -1, -1
        _, size, version = found
        return (-1 if size is None else size), (-1 if version is None else zlib.crc32(version.encode("utf-8")))
    try:
        stat = os.stat(path)
    except OSError:
        return -1, -1
    return stat.st_size, stat.st_mtime_ns


def describe_change(saved: dict, now: dict) -> str | None:
    """None when the two fingerprints agree, else one line naming what differs."""
    if saved["digest"] == now["digest"]:
        return None
    if saved.get("entries") is None or now.get("entries") is None:
        return f"{saved['files']:,} files then, {now['files']:,} now, and their sizes, times or captions differ"
    old, new = saved["entries"], now["entries"]
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    common = set(old) & set(new)
    changed = sorted(k for k in common if old[k][:2] != new[k][:2])
    recaptioned = sorted(k for k in common if old[k][2] != new[k][2] and k not in changed)
    parts = [
        f"{len(names)} {what} (e.g. {', '.join(names[:3])})"
        for names, what in ((added, "added"), (removed, "removed"), (changed, "changed size or time"),
                            (recaptioned, "with other captions"))
        if names
    ]
    return "; ".join(parts) or None  # equal entries give equal digests: not reached
