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
import io
import json
import logging
from pathlib import Path

import numpy as np

from difftrain.atomic import write_bytes
from difftrain.data.packed import PackedLists
from difftrain.data.records import RecordSource

log = logging.getLogger(__name__)

SUMMARY_VERSION = 1  # bump when what a summary holds, or how records are hashed, changes


class RecordSummary:
    """Per record: the SHA-256 of its data (zeros where the walk could not read it) and its captions."""

    def __init__(self, hashes: np.ndarray, captions: PackedLists):
        self.hashes, self.captions = hashes, captions

    def known_record(self, index: int) -> tuple[bytes, list[str]] | None:
        if not self.hashes[index].any():
            return None
        return self.hashes[index].tobytes(), self.captions[index]


def summary_path(cache_dir: str | Path, source: RecordSource) -> Path:
    from difftrain.data.fingerprint import fingerprint

    identity = [SUMMARY_VERSION, fingerprint(source)["digest"], len(source), type(source).__name__, source.settings]
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32]
    return Path(cache_dir) / "records" / f"{key}.npz"


def load_summary(path: Path, count: int) -> RecordSummary | None:
    """The summary at `path` if there is a usable one for `count` records; a damaged one is ignored (walked again)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            hashes, offsets, buffer = stored["hashes"], stored["offsets"], stored["buffer"]
    except (OSError, ValueError, KeyError) as reason:
        log.warning("ignoring the record summary %s (%s): the records are read again", path, reason)
        return None
    if hashes.shape != (count, 32) or len(offsets) != count + 1:
        return None
    return RecordSummary(hashes, PackedLists.from_arrays(offsets, buffer))


def save_summary(path: Path, hashes: np.ndarray, captions: PackedLists) -> None:
    offsets, buffer = captions.arrays()
    out = io.BytesIO()
    np.savez(out, hashes=hashes, offsets=offsets, buffer=buffer)
    write_bytes(path, out.getvalue(), sync=False)  # a cache: a lost one is walked again
