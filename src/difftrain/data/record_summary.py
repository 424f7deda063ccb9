"""What the latent cache's walk learnt of each record of a source, kept so the next start need not read it again.

Filling the cache walks every record to key it by its content's SHA-256 and to collect its
captions. A folder's scan already holds both (folder_index.py); shard, jsonl and Hugging Face
sources do not, so each start of a cached run read the whole data set again: every shard,
downloaded again when it is a URL, and on every process. After a walk, difftrain writes
the hashes and captions it found into the cache directory, keyed by the source's fingerprint
(each file's size and time, or a remote's size and ETag: fingerprint.py, as resume trusts
them) and the settings that decide a record's captions; the next start over the same data
reads that file and only the records it lacks. It is written by a walk of one process (a
launch's second walk, in which each process takes every record), which alone has decoded
every record it needed and so knows which do not decode. That second walk reuses the hashes
its process's first, sharded walk read, so it reads only what the cache lacks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import weakref
from pathlib import Path

import numpy as np
import PIL

from difftrain.atomic import atomic_path
from difftrain.data.images import DECODE_VERSION
from difftrain.data.packed import PackedLists
from difftrain.data.records import KnownRecords, RecordSource, read_order

log = logging.getLogger(__name__)

SUMMARY_VERSION = 1  # bump when what a summary holds, or how records are hashed, changes


class SummaryLookup:
    """What the cache's walk knows of each record without reading it: what `source` knows (a folder scan's hashes),
    else the cache's summary of `source`, looked for at the first record the source does not know itself (a
    folder's scan knows them all: its data is then never fingerprinted here), and written after a walk that had
    to read records to hash them. A record found changed under an unchanged fingerprint makes it stale.

    It also marks the records whose bytes did not decode (BadImage: a JPEG cut short after its header),
    which the next start skips without reading, as it does the reads in between to find the record
    read in their place. A record that could not be read at all (BadRecord: perhaps a passing I/O
    error) is not marked: it is tried again at each start.
    """

    def __init__(self, cache_dir: str | Path, source: RecordSource, enabled: bool = True, reads_records: bool = False,
                 earlier: SummaryLookup | None = None):
        """`enabled` False: only what the source knows (no summary is read or written); `reads_records`: not even
        that (every record is read). `earlier`: the lookup of this process's previous walk over the same source
        (a launch's first, sharded walk), whose hashes and broken records this walk need not read again."""
        self.cache_dir, self.source, self.enabled, self.reads_records = cache_dir, source, enabled, reads_records
        self.path: Path | None = None
        self.summary: KnownRecords | None = None
        self.summary_broken: np.ndarray | None = None
        self.broken = np.zeros(len(source), dtype=bool)  # found in this walk
        self.looked = False
        self.earlier = earlier.walked if earlier is not None else None
        self.earlier_broken = earlier.broken if earlier is not None else None
        if earlier is not None and earlier.looked and earlier.cache_dir == cache_dir:  # its summary, read once
            self.looked, self.path = True, earlier.path
            self.summary, self.summary_broken = earlier.summary, earlier.summary_broken
        # a record was read to be hashed in this walk (or the earlier one, whose hashes this one reuses)
        self.read_to_hash = earlier is not None and earlier.read_to_hash
        self.stale = False
        self.walked: KnownRecords | None = None  # this walk's hashes and captions, once it is over

    def lookup(self, index: int) -> tuple[tuple[bytes, list[str]] | None, bool]:
        """(record `index`'s hash and captions if the source or the summary knows them, whether the summary says
        it does not decode)."""
        if self.reads_records:
            return None, False
        known = self.source.known_record(index)
        if known is not None or not self.enabled:
            return known, False
        if self.earlier is not None:
            if self.earlier_broken[index]:
                self.broken[index] = True  # as found again: this walk's summary holds it
                return None, True
            if (known := self.earlier.known_record(index)) is not None:
                return known, False
        self._look()
        return (self.summary.known_record(index) if self.summary is not None else None), self.known_broken(index)

    def _look(self) -> None:
        if not self.looked:
            self.looked = True
            self.path = summary_path(self.cache_dir, self.source)
            if self.path is not None and (found := load_summary(self.path, len(self.source))) is not None:
                self.summary, self.summary_broken = found

    def known_broken(self, index: int) -> bool:
        return self.summary_broken is not None and bool(self.summary_broken[index])

    def replacement(self, index: int, hashes: np.ndarray) -> int | None:
        """The record read in place of `index`, one that does not decode (the first in read_order that does, as
        ImageDataset._read finds it), when the summary and this walk know it without reading; None: read to
        find it. A record that could not be read at all is read again (the read may succeed now)."""
        if not self.enabled or not (self.broken[index] or self.known_broken(index)):
            return None
        for position in read_order(index, len(hashes), self.source.block(index)):
            if position == index or self.broken[position] or self.known_broken(position):
                continue
            return position if hashes[position].any() else None
        return None

    def finish(self, hashes: np.ndarray, captions: PackedLists, write: bool) -> None:
        """After the walk: drop a stale summary; with `write` (a walk that decoded every record it had to, so
        knows every broken one), save a new one if it was worth it."""
        self.walked = KnownRecords(hashes, captions)
        if self.enabled and self.earlier is not None:
            self._look()  # a walk that knew every record from the earlier one looked for no summary
        if not self.enabled or self.path is None:
            return
        if self.stale:
            self.path.unlink(missing_ok=True)
        elif write and self.summary is None and self.read_to_hash:  # (a damaged one is replaced)
            try:
                save_summary(self.path, hashes, captions, self.broken)
            except OSError as reason:  # a cache: the next start reads the data again, as before
                log.warning("could not write the record summary %s: %s", self.path, reason)
                return
            # The same data read the same way, as it was before it changed (shards added, a file written again):
            # never asked for again, so it goes rather than piling up with every change.
            place = self.path.name.split("-")[0]
            for older in self.path.parent.glob(f"{place}-*.npz"):
                if older != self.path:
                    older.unlink(missing_ok=True)


def summary_path(cache_dir: str | Path, source: RecordSource) -> Path | None:
    """Where the summary of `source` as it is now lives; None where a change could go unseen (a remote shard
    that says neither its size nor its version, or a table's image files), so that every start reads such data,
    as before. Worked out once per opened source: a launch fills the cache twice, and each time is a stat of
    every file (kept beside the source, not in it, so that DataLoader workers are not sent it)."""
    if source not in _KEYS:
        _KEYS[source] = _summary_key(source)
    key = _KEYS[source]
    if key is None:
        return None
    # Named by where the data is and how it is read, then by what it holds, so a new summary of the same
    # place replaces the old one (SummaryLookup.finish).
    place = hashlib.sha256(json.dumps([type(source).__name__, source.location, source.settings]).encode())
    return Path(cache_dir) / "records" / f"{place.hexdigest()[:16]}-{key}.npz"


_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _summary_key(source: RecordSource) -> str | None:
    from difftrain.data.fingerprint import fingerprint

    if source.reads_unlisted_files:
        return None
    found = fingerprint(source)
    if found["unversioned"]:
        return None
    # Whether an image decodes (the broken flags) depends on the decoder too; which record is where, on the index.
    identity = [SUMMARY_VERSION, found["digest"], len(source), type(source).__name__, source.settings,
                DECODE_VERSION, PIL.__version__, hashlib.sha256(source.sizes.tobytes()).hexdigest()]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32]


def load_summary(path: Path, count: int) -> tuple[KnownRecords, np.ndarray] | None:
    """(known records, broken flags) from `path` if it holds a usable summary for `count` records; a damaged one
    is ignored (the records are walked again)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            hashes, offsets, buffer, broken = stored["hashes"], stored["offsets"], stored["buffer"], stored["broken"]
        whole = (hashes.dtype == np.uint8 and hashes.shape == (count, 32) and offsets.dtype == np.int64
                 and offsets.shape == (count + 1,) and buffer.dtype == np.uint8 and offsets[-1] == len(buffer)
                 and broken.dtype == bool and broken.shape == (count,))
    except Exception as reason:  # noqa: BLE001  (empty, cut short, not a zip: EOFError, BadZipFile, ...)
        whole, reason_text = False, f"{type(reason).__name__}: {reason}"
    else:
        reason_text = "it does not fit this data"
    if not whole:
        log.warning("ignoring the record summary %s (%s): the records are read again", path, reason_text)
        return None
    return KnownRecords(hashes, PackedLists.from_arrays(offsets, buffer)), broken


def save_summary(path: Path, hashes: np.ndarray, captions: PackedLists, broken: np.ndarray) -> None:
    offsets, buffer = captions.arrays()
    with atomic_path(path, sync=False) as staging, open(staging, "wb") as out:  # a cache: a lost one is walked again
        np.savez(out, hashes=hashes, offsets=offsets, buffer=buffer, broken=broken)
