"""What a record is, the interface every record source implements, and the base of shard sources.

This sits below the sources themselves (sources.py: folders, jsonl, laion, webdataset;
hf.py: Hugging Face data sets), so each of them builds on it and `open_source` can
dispatch to all of them without an import cycle.

Indexing a shard source streams each shard once with flat memory. With `index_dir`, each
shard's index is cached under a hash of its path, size and mtime (or whatever
`ShardSource._identity` says names a shard), so opening the same data again reads no
shard, and a changed shard is indexed again on its own. A shard may be a URL (remote.py):
it is then known by what the remote says of it, and one that could not be fetched is
reported but not cached, so the next open tries it again.

Shards written by difftrain (`data build`, `data download`) also carry their index beside
them: `part-00000.gz.index.json` next to `part-00000.gz` (see `write_sidecar`), so even a
run's first open over 10,000 shards reads one small JSON file per shard instead of every
shard. An open takes the sidecar first (for a URL: after the cache, whose key costs one
HEAD while the sidecar costs a GET), then the cache, then reads the shard.

The sidecar is JSON, one per shard, so processes writing shards in parallel never share a
file, and a shard rewritten by a resumed download gets its own new sidecar:
  {"format": "difftrain-shard-index", "version": INDEX_VERSION, "kind": "laion" | "webdataset",
   "label": the shard's file name, "size": its size in bytes, "mtime_ns": its mtime,
   "positions": [...], "sizes": [width, height, width, height, ...] (one pair a position),
   "skipped": [[where, reason], ...], "uncaptioned": count}
that is, what the reader's own indexing finds with captions read and no pixel limit. It is
trusted while a local shard has the size and mtime it records (a tar edited in place often
keeps its size: tars are padded to blocks; a copy that keeps mtimes, `cp -p`, `rsync -a`,
keeps its sidecars usable), and a remote shard the size (its ETag or time cannot be known
when the sidecar is written); and only when it answers for this open's settings: a record
over `max_pixels`, or skipped records when captions are not read (a bad caption may be
why), send that shard to the reader instead.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
import tarfile
import zlib
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from difftrain.atomic import write_text
from difftrain.data.folder import DatasetError, caption_problem_lines
from difftrain.data.folder_index import keyed_path
from difftrain.data.images import HEADER_SIZE_VERSION, BadImage, check_size, image_size_from_bytes
from difftrain.data.remote import ShardUnreachable, is_url, read_text, remote_identity
from difftrain.data.setting_names import DATA_KEYS, SettingNames

log = logging.getLogger(__name__)

INDEX_VERSION = 1  # bump when the cached index layout or meaning changes
SIDECAR_FORMAT = "difftrain-shard-index"
SIDECAR_SUFFIX = ".index.json"  # part-00000.gz -> part-00000.gz.index.json
_NO_PIXEL_LIMIT = 2**62  # a sidecar lists every record whose header reads; max_pixels is applied at open
# Anything that means "this shard file is broken from here on"; the records before it still count.
SHARD_ERRORS = (OSError, EOFError, tarfile.TarError, zlib.error)
Shard = Path | str  # a local file, or a URL (always a str: a Path would fold its "//")


class BadRecord(Exception):
    """A record that cannot be read as stored; str() is the one-line reason, naming the record."""


@dataclass
class RawRecord:
    key: str  # stable id for reports and caches: "cats/001.png", "part-00003.gz:17", "shard-000001.tar:000000017"
    data: bytes  # the encoded image exactly as stored
    captions: list[str]  # zero or more; the trainer picks one per sample
    conditioning: bytes | None = None  # its conditioning image file, encoded, for sources that hold one


class KnownRecords:
    """Per record, what the latent cache needs of it without reading it: the SHA-256 of its data (all zeros where
    it is not known) and its captions. A folder scan's (sources.FileSource), or an earlier walk's (record_summary)."""

    def __init__(self, hashes: np.ndarray, captions):
        self.hashes, self.captions = hashes, captions  # (N, 32) uint8; a sequence of caption lists

    def known_record(self, index: int) -> tuple[bytes, list[str]] | None:
        if not self.hashes[index].any():
            return None
        return self.hashes[index].tobytes(), self.captions[index]


class RecordSource(ABC):
    description: str  # one line for the run summary
    skipped: list[tuple[str, str]]  # (where, reason) for everything left out while indexing
    # (where, reason) for what was wrong but left no record out (a folder's unreadable caption file)
    notes: Sequence[tuple[str, str]] = ()
    shard_sizes: list[int] | None  # None: cheap random access; else usable records per shard, in order
    sizes: np.ndarray  # (N, 2) int32 upright (width, height) per record
    uncaptioned: int  # records with no caption at all
    has_conditioning: bool = False  # every record carries a conditioning image file

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def read(self, index: int) -> RawRecord:
        """Record `index` (0 <= index < len); raises BadRecord if it cannot be read as stored."""

    # What decides each record's captions besides the files themselves (open_source's arguments): part of the
    # key of the cache's record summary (record_summary.py).
    settings: str = ""
    location: str = ""  # where the data is (open_source's path, resolved where it is local)
    # Whether records are read from files that stored_files does not list (a table's image paths): a change to
    # them goes unseen by the fingerprint, so such a source gets no record summary.
    reads_unlisted_files: bool = False

    def block(self, index: int) -> tuple[int, int] | None:
        """The records [start, stop) read together with record `index` (its shard), for read_order; None: each
        record is read on its own."""
        return None

    def known_record(self, index: int) -> tuple[bytes, list[str]] | None:
        """What the latent cache needs of record `index` without reading it, the SHA-256 of its data and its
        captions, when this source already holds both (a folder scan hashes each image it decodes); None: the
        cache reads the record."""
        return None

    knows_conditions: bool = False  # known_condition answers for every record

    def known_condition(self, index: int) -> bytes | None:
        """The SHA-256 of record `index`'s conditioning file without reading it, when the source holds it."""
        return None

    def stored_files(self) -> list[tuple[str, str, list[str]]]:
        """(key, path, captions held outside the file) for each file the records come from
        (resume compares them); a source with no files of its own lists none."""
        return []

    def remote_versions(self) -> dict[str, tuple | None]:
        """URL -> what the remote said of it while this source was opened (remote.remote_identity), so
        the resume fingerprint need not ask every remote shard again."""
        return {}

    def report_lines(self) -> list[str]:
        lines = [self.description]
        if self.skipped:
            lines.append(f"{len(self.skipped)} skipped:")
            lines += [f"  {where}: {reason}" for where, reason in self.skipped]
        return lines + caption_problem_lines(list(self.notes))


def read_order(index: int, count: int, block: tuple[int, int] | None = None) -> Iterator[int]:
    """Where to read for record `index`: itself, then every other record once, in an order scattered by `index`.

    A record that cannot be read is replaced by the first readable one in this order. Searching on from
    `index + 1` gave a whole broken shard (a thousand records) one and the same replacement, a thousand copies
    of one image an epoch; each broken record now probes its own places (double hashing: a start and a stride
    prime to `count`, both from `index`). Deterministic, so the cached and uncached paths and every process agree.

    `block`: the records [start, stop) of the shard `index` is in (RecordSource.block), probed first: a shard
    source reads a whole shard for any record of it, and a stand-in from another shard cost two whole reads
    (that shard's, then this one's again for the next record). Records of a shard that broke whole fail at once
    from memory, so its records still find their stand-ins scattered over the others.
    """
    yield index
    start, stop = block or (0, count)
    yield from (start + position for position in _scattered(index, stop - start) if start + position != index)
    if block is not None:
        yield from (position for position in _scattered(index, count) if not start <= position < stop)


def _scattered(index: int, count: int) -> Iterator[int]:
    """0 .. count - 1 once each, from a start by a stride prime to `count`, both drawn from `index`."""
    start, stride = _mix(index) % count, 1 + _mix(index + count) % max(count - 1, 1)
    while math.gcd(stride, count) != 1:
        stride += 1
    for step in range(count):
        yield (start + step * stride) % count


def _mix(value: int) -> int:
    """splitmix64's finaliser: neighbouring integers to unrelated 64-bit ones."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


_MASK64 = (1 << 64) - 1


def caption_list(value: object) -> list[str]:
    """A stored caption value (a string or a list of strings) as a list without blank entries."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise BadRecord(f"a caption must be a string or a list of strings, found {type(value).__name__}")
    return [_encodable(item) for item in value if item.strip()]


def is_utf8(text: str) -> bool:
    """Whether `text` encodes as UTF-8: not if it holds a lone surrogate (a byte read with surrogateescape, or
    half an emoji cut off in scraped JSON)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _encodable(text: str) -> str:
    """`text` with each lone surrogate as U+FFFD: one would stop the tokenizer, the fingerprint and every file
    write mid-run."""
    return text if is_utf8(text) else text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def describe_records(
    head: str, count: int, noun: str, skipped: int, uncaptioned: int, shards: str = "", where: str = "",
    caption_problems: int = 0,
) -> str:
    """e.g. "laion parts: 3 parts, 2,400 records, 2 skipped (see the data report) (data/laion/filelist.txt)"."""
    text = f"{head}: " + (f"{shards}, " if shards else "") + f"{count:,} {noun}"
    if uncaptioned:
        text += f", {uncaptioned:,} without caption"
    if skipped:
        text += f", {skipped:,} skipped"
    if caption_problems:
        text += f", {caption_problems:,} caption problems"
    if skipped or caption_problems:
        text += " (see the data report)"
    return text + (f" ({where})" if where else "")


@dataclass
class ShardEntry:
    position: int  # where in the shard: a line number (laion) or a sample ordinal (webdataset)
    key: str
    where: str  # how a report names it
    record: RawRecord | None
    problem: str | None = None


class ShardSource(RecordSource):
    """Records stored in shard files read front to back.

    The last `shards_in_memory` shards read stay in memory (least recently used goes first):
    1 suits the shard-blocked order, and a sampler that mixes K shards needs K, or each
    switch between them would read a shard again.
    """

    kind = ""
    sidecars = False  # whether shards of this kind may carry their index beside them (write_sidecar)
    shard_noun = "shard"
    noun = "records"
    position_noun = "record"

    def __init__(self, path: Shard, use_captions: bool, max_pixels: int, index_dir: Path | None, progress: bool,
                 names: SettingNames = DATA_KEYS):
        self._use_captions = use_captions
        self._max_pixels = max_pixels
        shards, self.skipped = self._shard_list(path, names)
        self.shards_indexed = 0  # shards streamed by this open
        self.shards_from_cache = 0  # shards whose index came from index_dir
        self.shards_from_sidecar = 0  # shards whose index came from beside the shard (write_sidecar)
        self._unusable_sidecars: list[tuple[str, str]] = []  # (file, why): said once, not once a shard
        self.shard_loads = 0  # shards read by read() in this process
        self._remote_versions: dict[str, tuple | None] = {}
        self._labels: list[str] = []
        self._paths: list[str] = []
        self._positions: list[np.ndarray] = []
        sizes: list[np.ndarray] = []
        self.uncaptioned = 0
        bar = tqdm(shards, desc=f"indexing {self.kind} shards", unit="shard", disable=not progress, leave=False)
        for label, shard in bar:
            index = self._index(label, shard, index_dir)
            self.skipped += [tuple(item) for item in index["skipped"]]
            self.uncaptioned += index["uncaptioned"]
            if len(index["positions"]):  # a shard with no usable record is left out of the order altogether
                self._labels.append(label)
                self._paths.append(str(shard))
                self._positions.append(np.asarray(index["positions"], dtype=np.int64))
                sizes.append(np.asarray(index["sizes"], dtype=np.int32).reshape(-1, 2))
        if self._unusable_sidecars:
            (where, why), count = self._unusable_sidecars[0], len(self._unusable_sidecars)
            log.warning("ignoring %d shard index file(s) this difftrain cannot use, e.g. %s (%s); those shards were "
                        "read instead. Delete the files, or write the shards again with `difftrain data build`",
                        count, where, why)
        if not self._positions:
            detail = f"; e.g. {self.skipped[0][0]}: {self.skipped[0][1]}" if self.skipped else ""
            raise DatasetError(f"no usable records in {path}{detail}")
        self.shard_sizes = [len(p) for p in self._positions]
        self._ends = np.cumsum(self.shard_sizes).tolist()
        self.sizes = np.concatenate(sizes)
        counted = f"{len(self._labels)} {self.shard_noun}" + ("s" if len(self._labels) != 1 else "")
        if len(shards) > len(self._labels):
            counted += f" (and {len(shards) - len(self._labels)} with no usable record)"
        self.description = describe_records(
            f"{self.kind} {self.shard_noun}s", len(self), self.noun, len(self.skipped), self.uncaptioned,
            shards=counted, where=str(path),
        )
        self.shards_in_memory = 1
        self._loaded: OrderedDict[int, list[RawRecord | str]] = OrderedDict()

    # What a kind provides: its list of shards (`names`: what its messages call the settings, setting_names.py),
    # and the entries of one shard in order.
    def _shard_list(self, path: Shard, names: SettingNames) -> tuple[list[tuple[str, Shard]], list[tuple[str, str]]]:
        raise NotImplementedError

    def _entries(self, label: str, path: Shard) -> Iterator[ShardEntry]:
        raise NotImplementedError

    def __len__(self) -> int:
        return self._ends[-1]

    def stored_files(self) -> list[tuple[str, str, list[str]]]:
        return [(label, path, []) for label, path in zip(self._labels, self._paths)]  # captions are inside

    def remote_versions(self) -> dict[str, tuple | None]:
        return self._remote_versions

    def report_lines(self) -> list[str]:
        lines = super().report_lines()
        lines.insert(1, f"shard indexes: {self.shards_from_sidecar} beside the shards, {self.shards_from_cache} "
                        f"from the cache, {self.shards_indexed} read now")
        return lines

    def __getstate__(self) -> dict:
        # A worker process gets the index, not the parent's loaded shards (nor any open file: none is kept).
        state = self.__dict__.copy()
        state["_loaded"] = OrderedDict()
        return state

    def block(self, index: int) -> tuple[int, int]:
        shard = bisect.bisect_right(self._ends, index)
        return self._ends[shard - 1] if shard else 0, self._ends[shard]

    def read(self, index: int) -> RawRecord:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} is out of range for a source of {len(self)} records")
        shard = bisect.bisect_right(self._ends, index)
        item = self._shard(shard)[index - (self._ends[shard - 1] if shard else 0)]
        if isinstance(item, str):
            raise BadRecord(item)
        return item

    def _shard(self, shard: int) -> list[RawRecord | str]:
        if shard in self._loaded:
            self._loaded.move_to_end(shard)
            return self._loaded[shard]
        while len(self._loaded) >= self.shards_in_memory:
            self._loaded.popitem(last=False)  # let old shards go before the new one is read
        self._loaded[shard] = self._load(shard)
        return self._loaded[shard]

    def _load(self, shard: int) -> list[RawRecord | str]:
        """Every usable record of one shard, in index order; a str stands for one that broke since."""
        label, location, wanted = self._labels[shard], self._paths[shard], self._positions[shard]
        path = location if is_url(location) else Path(location)
        self.shard_loads += 1
        found: dict[int, RawRecord | str] = {}
        targets = set(wanted.tolist())
        broken = "the shard has fewer records than when it was indexed"
        try:
            for entry in self._entries(label, path):
                if entry.position in targets:
                    found[entry.position] = entry.record or f"{entry.where}: {entry.problem}"
        except SHARD_ERRORS as exc:
            broken = f"the shard is unreadable there: {exc}"
        gone = f"is gone ({broken}); open the data again"
        return [found.get(p) or f"{label}: {self.position_noun} {p} {gone}" for p in wanted.tolist()]

    def _identity(self, label: str, path: Shard) -> list | None:
        """What a shard's cached index is keyed by: its path, size and mtime, or for a URL what the remote
        says of it; None (not cached) if it is no file or the remote cannot say."""
        if isinstance(path, str):
            found = self._remote_versions[path] = remote_identity(path)
            return None if found is None else [INDEX_VERSION, HEADER_SIZE_VERSION, self.kind, label, *found,
                                                self._max_pixels, self._use_captions]
        if not path.is_file():  # a shard gone since listing is reported by the indexing
            return None
        stat = path.stat()
        return [INDEX_VERSION, HEADER_SIZE_VERSION, self.kind, label, str(path.resolve()), stat.st_size,
                stat.st_mtime_ns, self._max_pixels, self._use_captions]

    def _index(self, label: str, path: Shard, index_dir: Path | None) -> dict:
        # A local sidecar costs a stat and one small read, less than the cache's key; a remote one costs a
        # request, so a URL asks the cache first.
        remote = isinstance(path, str)
        if self.sidecars and not remote and (index := self._from_sidecar(label, path)) is not None:
            return index
        cache = None
        identity = self._identity(label, path) if index_dir is not None else None
        if identity is not None:
            cache = keyed_path(index_dir, self.kind, identity)
            try:
                index = json.loads(cache.read_text())
                if index.get("version") == INDEX_VERSION:
                    self.shards_from_cache += 1
                    return index
            except (OSError, ValueError, AttributeError):
                pass  # not cached yet, or a damaged entry: index the shard again
        if self.sidecars and remote and (index := self._from_sidecar(label, path)) is not None:
            if cache is not None:
                # the next open asks no sidecar again
                write_text(cache, json.dumps({**index, "positions": index["positions"].tolist(),
                                              "sizes": index["sizes"].tolist()}), sync=False)
            return index
        index = self._index_shard(label, path)
        self.shards_indexed += 1
        unreachable = index.pop("unreachable")
        if cache is not None and not unreachable:  # a fetch that failed is tried again at the next open
            write_text(cache, json.dumps(index), sync=False)  # an index is cheap to rebuild
        return index

    def _index_shard(self, label: str, path: Shard) -> dict:
        positions: list[int] = []
        sizes: list[tuple[int, int]] = []
        skipped: list[tuple[str, str]] = []
        uncaptioned = 0
        unreachable = False
        try:
            for entry in self._entries(label, path):
                if entry.record is None:
                    skipped.append((entry.where, entry.problem or "unreadable"))
                    continue
                try:
                    width, height = image_size_from_bytes(entry.record.data)
                    check_size(width, height, self._max_pixels)
                except BadImage as reason:
                    skipped.append((entry.where, str(reason)))
                    continue
                positions.append(entry.position)
                sizes.append((width, height))
                uncaptioned += not entry.record.captions
        except SHARD_ERRORS as exc:
            kept = f"the {len(positions)} records before it are used" if positions else "nothing in it is used"
            skipped.append((label, f"unreadable: {exc}; {kept}"))
            unreachable = isinstance(exc, ShardUnreachable)
        return {"version": INDEX_VERSION, "positions": positions, "sizes": sizes, "skipped": skipped,
                "uncaptioned": uncaptioned, "unreachable": unreachable}

    # --- the index beside each shard (see the module docstring) ---------------------------------

    @classmethod
    def _bare(cls) -> "ShardSource":
        """A reader with no shard list and no open: enough for _shard_list, _entries and _index_shard."""
        reader = cls.__new__(cls)
        reader._use_captions, reader._max_pixels = True, _NO_PIXEL_LIMIT
        return reader

    @classmethod
    def list_shards(cls, path: Shard, names: SettingNames = DATA_KEYS) -> tuple[list[tuple[str, Shard]],
                                                                                list[tuple[str, str]]]:
        """(label, shard) of every shard `path` names, and (entry, problem) of those it names wrongly."""
        return cls._bare()._shard_list(path, names)

    @classmethod
    def write_sidecar(cls, shard: Path) -> Path:
        """Index the local `shard` as this kind's reader would and write that beside it; return the sidecar.

        For writers of shards (`data build`, `data download`), just after the shard got its final name.
        """
        index = cls._bare()._index_shard(shard.name, shard)
        del index["unreachable"]  # a local file: a break is a fact about the shard, kept in skipped
        stat = shard.stat()
        sidecar = {"format": SIDECAR_FORMAT, **index, "kind": cls.kind, "label": shard.name,
                   "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                   "sizes": [side for pair in index["sizes"] for side in pair]}  # flat: half the time to read
        # Not synced: a sidecar lost or torn by a crash is ignored at open (with a warning) and the shard read.
        return write_text(sidecar_path(shard), json.dumps(sidecar, separators=(",", ":"), ensure_ascii=False),
                          sync=False)

    def _from_sidecar(self, label: str, path: Shard) -> dict | None:
        """The shard's index from its sidecar, for this open's settings; None if there is none to trust."""
        # Strings, not Paths: at 10,000 shards pathlib's own work is a good part of this loop.
        where = sidecar_path(path) if isinstance(path, str) else os.fspath(path) + SIDECAR_SUFFIX
        if where is None:
            return None
        try:
            if isinstance(path, str):
                text = read_text(where)  # first: without a sidecar (a 404) the shard's size is not needed
                # [url, size, version]: asked by the cache lookup before, else now (and, as without a cache,
                # not kept for the resume fingerprint)
                found = self._remote_versions[path] if path in self._remote_versions else remote_identity(path)
                size = None if found is None else found[1]
                mtime = None  # a remote's times are its own: the size alone vouches (see the module docstring)
            else:
                stat = os.stat(path)
                size, mtime = stat.st_size, stat.st_mtime_ns
                with open(where, "rb") as file:
                    text = file.read()  # json reads UTF-8 bytes itself
        except OSError:
            return None  # no sidecar (the usual case for data not written by difftrain), or no shard
        try:
            index = self._checked_sidecar(json.loads(text))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:  # UnicodeDecodeError is a ValueError
            self._unusable_sidecars.append((str(where), f"{type(exc).__name__}: {exc}"))
            return None
        # A remote that does not say a size cannot vouch for the sidecar either.
        if index["size"] != size or (mtime is not None and index.get("mtime_ns") != mtime):
            log.debug("%s: the shard changed since its sidecar was written; reading the shard", label)
            return None
        return self._for_settings(index, label)

    def _checked_sidecar(self, raw: object) -> dict:
        """`raw` if it is a sidecar of this kind and version in the layout it should have; else ValueError."""
        if not isinstance(raw, dict) or raw.get("format") != SIDECAR_FORMAT:
            raise ValueError("no difftrain-shard-index format field")
        if raw.get("version") != INDEX_VERSION or raw.get("kind") != self.kind:
            raise ValueError(f"version {raw.get('version')} of kind {raw.get('kind')!r}, "
                             f"expected version {INDEX_VERSION} of kind {self.kind!r}")
        sizes = np.asarray(raw["sizes"], dtype=np.int64)
        positions = np.asarray(raw["positions"], dtype=np.int64)
        if positions.ndim != 1 or sizes.shape != (2 * len(positions),) or (sizes < 1).any():
            raise ValueError("sizes is not a flat list of width, height for each of positions")
        sizes = sizes.reshape(-1, 2)
        skipped = [(str(where), str(reason)) for where, reason in raw["skipped"]]
        if not isinstance(raw["label"], str) or not isinstance(raw["size"], int) or \
                not isinstance(raw["uncaptioned"], int):
            raise ValueError("label, size or uncaptioned of the wrong type")
        return {**raw, "positions": positions, "sizes": sizes, "skipped": skipped}

    def _for_settings(self, index: dict, label: str) -> dict | None:
        """The sidecar as _index_shard would have found it with this open's label, captions and max_pixels;
        None where it cannot say (the shard is read then, and its report is the reader's own)."""
        sizes = index["sizes"]
        if len(sizes) and int((sizes[:, 0] * sizes[:, 1]).max()) > self._max_pixels:
            return None  # which records go, and why, is the reader's to report
        skipped = index["skipped"]
        if not self._use_captions and skipped:
            return None  # built with captions read: a bad caption may be why a record was skipped
        written = index["label"]
        if written != label:  # a list naming the shard by another path: reports use the list's name
            skipped = [(label + where[len(written):] if where.startswith(written) else where, reason)
                       for where, reason in skipped]
        self.shards_from_sidecar += 1
        return {"version": INDEX_VERSION, "positions": index["positions"], "sizes": sizes.astype(np.int32),
                "skipped": skipped,
                "uncaptioned": index["uncaptioned"] if self._use_captions else len(index["positions"])}


def sidecar_path(shard: Shard) -> Shard | None:
    """Where the index of `shard` is kept beside it; None for a URL with a query (no name to add to)."""
    if isinstance(shard, str):
        return None if "?" in shard else shard + SIDECAR_SUFFIX
    return shard.with_name(shard.name + SIDECAR_SUFFIX)
