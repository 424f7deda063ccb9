"""What the latent cache's walk learnt of each record of a source, kept so the next start need not read it again.

Filling the cache walks every record to key it by its content's SHA-256 and to collect its
captions. A folder's scan already holds both (folder_index.py); shard, jsonl and Hugging Face
sources do not, so each start of a cached run read the whole data set again: every shard,
downloaded again when it is a URL, and on every process. After a walk, each process writes
the hashes and captions it found into the cache directory, keyed by the source's fingerprint
(each file's size and time, or a remote's size and ETag: fingerprint.py, as resume trusts
them) and the settings that decide a record's captions; the next start over the same data
reads that file and only the records it lacks (unreadable ones, found again each start).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from difftrain.atomic import atomic_path
from difftrain.data.packed import PackedLists
from difftrain.data.records import KnownRecords, RecordSource

log = logging.getLogger(__name__)

SUMMARY_VERSION = 1  # bump when what a summary holds, or how records are hashed, changes


class SummaryLookup:
    """The cache's summary of `source`, looked for at the first record the source does not know itself (a
    folder's scan knows them all: its data is then never fingerprinted here), and written after a walk that had
    to read records to hash them. A record found changed under an unchanged fingerprint makes it stale."""

    def __init__(self, cache_dir: str | Path, source: RecordSource):
        self.cache_dir, self.source = cache_dir, source
        self.path: Path | None = None
        self.summary: KnownRecords | None = None
        self.looked = False
        self.read_to_hash = False  # a record was read to be hashed in this walk
        self.stale = False

    def known_record(self, index: int) -> tuple[bytes, list[str]] | None:
        if not self.looked:
            self.looked = True
            self.path = summary_path(self.cache_dir, self.source)
            self.summary = load_summary(self.path, len(self.source)) if self.path is not None else None
        return self.summary.known_record(index) if self.summary is not None else None

    def finish(self, hashes: np.ndarray, captions: PackedLists, write: bool) -> None:
        """After the walk: drop a stale summary; with `write` (one process), save a new one if it was worth it."""
        if self.path is None:
            return
        if self.stale:
            self.path.unlink(missing_ok=True)
        elif write and self.summary is None and self.read_to_hash:
            save_summary(self.path, hashes, captions)


def summary_path(cache_dir: str | Path, source: RecordSource) -> Path | None:
    """Where the summary of `source` as it is now lives; None where a change could go unseen (a remote shard
    that says neither its size nor its version), so that every start reads such data, as before."""
    from difftrain.data.fingerprint import fingerprint

    found = fingerprint(source)
    if found["unversioned"]:
        return None
    identity = [SUMMARY_VERSION, found["digest"], len(source), type(source).__name__, source.settings]
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32]
    return Path(cache_dir) / "records" / f"{key}.npz"


def load_summary(path: Path, count: int) -> KnownRecords | None:
    """The summary at `path` if there is a usable one for `count` records; a damaged one is ignored (walked again)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            hashes, offsets, buffer = stored["hashes"], stored["offsets"], stored["buffer"]
        whole = (hashes.dtype == np.uint8 and hashes.shape == (count, 32) and offsets.dtype == np.int64
                 and offsets.shape == (count + 1,) and buffer.dtype == np.uint8 and offsets[-1] == len(buffer))
    except Exception as reason:  # noqa: BLE001  (empty, cut short, not a zip: EOFError, BadZipFile, ...)
        whole, reason_text = False, f"{type(reason).__name__}: {reason}"
    else:
        reason_text = "it does not fit this data"
    if not whole:
        log.warning("ignoring the record summary %s (%s): the records are read again", path, reason_text)
        return None
    return KnownRecords(hashes, PackedLists.from_arrays(offsets, buffer))


def save_summary(path: Path, hashes: np.ndarray, captions: PackedLists) -> None:
    offsets, buffer = captions.arrays()
    with atomic_path(path, sync=False) as staging, open(staging, "wb") as out:  # a cache: a lost one is walked again
        np.savez(out, hashes=hashes, offsets=offsets, buffer=buffer)
