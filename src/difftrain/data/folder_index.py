"""What decoding each image of a folder gave, remembered under `index_dir` so a start decodes only what changed.

Decoding every image is what makes a folder scan slow (a 1M-photo folder takes hours), and
it is the only costly part: listing, captions and conditioning files are read afresh every
time. So the index holds, per image (its path relative to the folder), the file's size and
mtime in ns with the decode's outcome: the upright (width, height), or the reason it is
skipped, and the SHA-256 of the bytes decoded. An entry counts only while size and mtime
still match; images that are new or changed are decoded again, and files gone from the
folder drop out when the index is rewritten. The hash is what the latent cache's keys are
made of, so a cached run's start reads no image it has already encoded (dataset.py).

Ranks share the file: it is replaced in one atomic rename, so a reader sees a complete old
or new index, never half of one, and two ranks writing at once each write a complete one
(the last rename wins). A file that does not parse is ignored and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from difftrain.atomic import write_text
from difftrain.data.images import BadImage, load_image_bytes

log = logging.getLogger(__name__)

INDEX_VERSION = 1  # bump when what an entry means changes (e.g. load_image accepts or rejects other files)
# An entry whose mtime is this close to the index write is not stored: a file rewritten again
# within the file system's timestamp granularity (2 s on FAT/SMB) could keep its size and mtime.
SETTLE_NS = 2_000_000_000

Outcome = tuple[int, int] | str  # the upright (width, height), or why the image is skipped
DIGEST_HEX = 64  # a SHA-256 as hex


def keyed_path(index_dir: Path, kind: str, identity: list, suffix: str = ".json") -> Path:
    """Where an index of `kind` is cached under `index_dir`: named by the hash of everything it depends on
    (folders here, shards in records.py, Hugging Face tables in hf.py), so a change misses it."""
    digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()
    return index_dir / f"{kind}-{digest[:40]}{suffix}"


def index_file(index_dir: Path, root: Path, max_pixels: int) -> Path:
    """Where the index of the folder `root` lives; max_pixels is part of the key since it decides skips."""
    return keyed_path(index_dir, "folder", [INDEX_VERSION, str(root.resolve()), max_pixels])


def _valid_entry(entry: object) -> bool:
    # A skipped image's entry has no digest; so has an image's in an index written before digests were kept
    # (its outcome is used, its bytes are hashed again).
    if not (isinstance(entry, list) and len(entry) in (3, 4) and all(type(v) is int for v in entry[:2])):
        return False
    outcome = entry[2]
    if isinstance(outcome, str):
        return len(entry) == 3
    digest_ok = len(entry) == 3 or (isinstance(entry[3], str) and len(entry[3]) == DIGEST_HEX)
    return digest_ok and isinstance(outcome, list) and len(outcome) == 2 and all(type(v) is int and v > 0
                                                                                  for v in outcome)


def read_index(path: Path) -> dict[str, list]:
    """name -> [size, mtime_ns, [width, height] or reason, sha256 hex] from the index at `path`; an absent,
    damaged or other-version file reads as empty, so it is rebuilt."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(stored, dict) or stored.get("version") != INDEX_VERSION or not isinstance(stored.get("files"), dict):
        return {}
    return {name: entry for name, entry in stored["files"].items() if _valid_entry(entry)}


def _read(image: Path) -> bytes | str:
    """The file's bytes, or why they cannot be read (the reasons load_image gives)."""
    try:
        data = image.read_bytes()
    except OSError as exc:
        return f"cannot read file: {exc.strerror}"
    return data or "empty file (0 bytes)"


def decode_outcome(image: Path, max_pixels: int) -> list:
    """The check every training image passes, a full decode (truncation shows only there), as the end of an
    index entry: [[width, height], SHA-256 hex of the bytes decoded (hashed here, where they are in memory
    anyway)], or [why it is skipped]."""
    data = _read(image)
    if isinstance(data, str):
        return [data]
    try:
        return [list(load_image_bytes(data, max_pixels).size), hashlib.sha256(data).hexdigest()]
    except BadImage as reason:
        return [str(reason)]


def _with_digest(entry: list, image: Path) -> list:
    """An unchanged image's entry from an index without digests, with its digest (its bytes hashed, not decoded)."""
    data = _read(image)
    return entry if isinstance(data, str) else [*entry, hashlib.sha256(data).hexdigest()]


def _as_found(end: list) -> tuple[Outcome, bytes | None]:
    """An entry's end ([size, digest], [size] or [reason]) as (outcome, digest bytes or None)."""
    outcome, digest = end[0], end[1] if len(end) > 1 else None
    return (tuple(outcome) if isinstance(outcome, list) else outcome), (bytes.fromhex(digest) if digest else None)


class ImageChecks:
    """Each image's decode outcome, from the index when its file is unchanged; counts which was which."""

    def __init__(self, root: Path, max_pixels: int, index_dir: Path | None):
        self._max_pixels = max_pixels
        self.path = index_file(index_dir, root, max_pixels) if index_dir is not None else None
        self._known = read_index(self.path) if self.path is not None else {}
        self._seen: dict[str, list] = {}
        self.decoded = 0
        self.from_index = 0

    def outcome(self, image: Path, name: str) -> tuple[Outcome, bytes | None]:
        """(the decode's outcome, the SHA-256 of the image's bytes; None for a skipped image)."""
        try:
            stat = image.stat()
        except OSError:  # gone since listing: the decode reports why, and there is nothing to remember
            self.decoded += 1
            return _as_found(decode_outcome(image, self._max_pixels))
        # Stamped before the decode: a file rewritten during it mismatches next time, so it is never trusted stale.
        stamp = [stat.st_size, stat.st_mtime_ns]
        entry = self._known.get(name)
        if entry is not None and entry[:2] == stamp:
            self.from_index += 1
            if len(entry) == 3 and isinstance(entry[2], list):
                entry = _with_digest(entry, image)
        else:
            self.decoded += 1
            entry = [*stamp, *decode_outcome(image, self._max_pixels)]
        self._seen[name] = entry
        return _as_found(entry[2:])

    def save(self) -> None:
        """Rewrite the index with the images this scan saw (so removed files are forgotten), if anything changed."""
        if self.path is None:
            return
        settled = time.time_ns() - SETTLE_NS
        files = {name: entry for name, entry in self._seen.items() if entry[1] < settled}
        if files == self._known:
            return
        try:
            write_text(self.path, json.dumps({"version": INDEX_VERSION, "files": files}), sync=False)
        except OSError as exc:  # only the next start is slower: it decodes again
            log.warning("cannot write the folder index %s (%s); the next start decodes every image again; "
                        "make its folder writable to keep it", self.path, exc.strerror)

    def summary(self) -> str:
        return (f"folder index: {self.decoded:,} images decoded (new or changed), "
                f"{self.from_index:,} taken from the index ({self.path})")
