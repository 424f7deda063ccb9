"""Features computed once per image content and kept across runs (`--cache-dir`).

Every model output curation needs (CLIP embeddings, captions, perceptual hashes) is a pure
function of (the model, the image bytes or the caption). Keyed by the model's identity and
a sha256 of the content, it survives re-runs with other thresholds, renamed files and
other sources holding the same images, and sharded runs share it: each process fills its
slice and the final step reads every slice back without loading a model.

SQLite because it is in the standard library, takes concurrent writers from several
processes (WAL), and looks keys up without reading the rest into memory.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Iterable

import numpy as np

_BATCH = 500  # keys per SELECT: SQLite's default limit on host parameters is 999


class FeatureCache:
    def __init__(self, folder: str | Path):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "features.sqlite"
        # Another process may hold the write lock for a batch; waiting a minute is cheaper than failing.
        self._db = sqlite3.connect(self.path, timeout=60)
        self._set_up(time.monotonic() + 60)

    def _set_up(self, deadline: float) -> None:
        # Switching to WAL needs the database to itself and does not wait on the busy timeout, so
        # ranks opening a new cache together (accelerate launch) retry until the first has set it up.
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("CREATE TABLE IF NOT EXISTS features "
                                 "(space TEXT, key TEXT, value BLOB, PRIMARY KEY (space, key))")
                self._db.commit()
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def get(self, space: str, keys: Iterable[str]) -> dict[str, bytes]:
        keys, found = list(dict.fromkeys(keys)), {}
        for start in range(0, len(keys), _BATCH):
            chunk = keys[start:start + _BATCH]
            rows = self._db.execute(f"SELECT key, value FROM features WHERE space = ? AND key IN "
                                    f"({','.join('?' * len(chunk))})", [space, *chunk])
            found.update(rows)
        return found

    def put(self, space: str, items: dict[str, bytes]) -> None:
        self._db.executemany("INSERT OR REPLACE INTO features VALUES (?, ?, ?)",
                             [(space, key, value) for key, value in items.items()])
        self._db.commit()

    def close(self) -> None:
        self._db.close()


def pack_vector(vector: np.ndarray) -> bytes:
    # float16 halves the cache; cosines move by ~1e-3 at most, far below any threshold's meaning
    return np.asarray(vector, dtype=np.float16).tobytes()


def unpack_vector(value: bytes) -> np.ndarray:
    return np.frombuffer(value, dtype=np.float16).astype(np.float32)


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def model_identity(model: str | Path, *extra: object) -> str:
    """A cache space name that changes when the model's weights or settings do.

    A local folder or file is named by its resolved path, its config and each weight
    file's size and mtime (hashing gigabytes of weights per run would cost more than the
    cache saves); a hub id by itself (a new revision is a new snapshot folder to load).
    """
    path = Path(model)
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        stamp = [(str(p.relative_to(path)) if p != path else p.name, p.stat().st_size, p.stat().st_mtime_ns)
                 for p in files]
        name = f"{path.resolve()}:{hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]}"
    else:
        name = str(model)
    return ":".join([name, *(str(e) for e in extra)])
