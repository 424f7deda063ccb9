"""Record sources: every way a data set is stored, behind one small interface.

A source knows how many usable records it holds, each record's upright (width, height)
read from its image header (aspect buckets need sizes before any pixel is decoded), and
how to fetch record i as the encoded bytes plus its captions. Decoding stays with the
caller (images.py), so a source never holds pixels.

Two families:
- files on disk ("folder", "jsonl"): one image file per record, cheap random access;
- shards ("laion" gz parts, "webdataset" tars): cheap front to back, costly to seek.
  `shard_sizes` tells the sampler where the shard boundaries are, and `read` keeps one
  shard in memory, so a sampler that visits shard by shard reads each file once per
  epoch whatever the data set's size.

Indexing a shard source streams each shard once with flat memory. With `index_dir`, each
shard's index is cached under a hash of its path, size and mtime, so opening the same
data again reads no shard, and a changed shard is indexed again on its own.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import gzip
import hashlib
import json
import tarfile
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
from tqdm.auto import tqdm

from difftrain.atomic import write_text
from difftrain.data.folder import ConditioningFiles, DatasetError, conditioning_file, jsonl_entries, scan_folder
from difftrain.data.images import BadImage, check_size, image_size_from_bytes, image_size_from_file

KINDS = ("folder", "jsonl", "laion", "webdataset")
# Image members of a webdataset sample, in order of preference when a sample has several.
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
LIST_NAME = "filelist.txt"  # what build_shards writes; a folder holding one is read through it
INDEX_VERSION = 1  # bump when the cached index layout or meaning changes
# Anything that means "this shard file is broken from here on"; the records before it still count.
SHARD_ERRORS = (OSError, EOFError, tarfile.TarError, zlib.error)


class BadRecord(Exception):
    """A record that cannot be read as stored; str() is the one-line reason, naming the record."""


@dataclass
class RawRecord:
    key: str  # stable id for reports and caches: "cats/001.png", "part-00003.gz:17", "shard-000001.tar:000000017"
    data: bytes  # the encoded image exactly as stored
    captions: list[str]  # zero or more; the trainer picks one per sample
    conditioning: bytes | None = None  # its conditioning image file, encoded, for sources that hold one


class RecordSource(ABC):
    description: str  # one line for the run summary
    skipped: list[tuple[str, str]]  # (where, reason) for everything left out while indexing
    shard_sizes: list[int] | None  # None: cheap random access; else usable records per shard, in order
    sizes: np.ndarray  # (N, 2) int32 upright (width, height) per record
    uncaptioned: int  # records with no caption at all
    has_conditioning: bool = False  # every record carries a conditioning image file

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def read(self, index: int) -> RawRecord:
        """Record `index` (0 <= index < len); raises BadRecord if it cannot be read as stored."""

    def stored_files(self) -> list[tuple[str, str, list[str]]]:
        """(key, path, captions held outside the file) for each file the records come from
        (resume compares them); a source with no files of its own lists none."""
        return []

    def report_lines(self) -> list[str]:
        lines = [self.description]
        if self.skipped:
            lines.append(f"{len(self.skipped)} skipped:")
            lines += [f"  {where}: {reason}" for where, reason in self.skipped]
        return lines


def open_source(
    kind: str,
    path: str | Path,
    *,
    image_key: str = "image",
    caption_key: str = "caption",
    captions: str = "auto",
    caption_extension: str = ".txt",
    max_pixels: int = 64_000_000,
    index_dir: str | Path | None = None,
    progress: bool = True,
    conditioning: ConditioningFiles | None = None,
) -> RecordSource:
    """Index the data at `path` stored as `kind` (one of KINDS); see the module docstring.

    With `conditioning`, each record also carries its conditioning image file (folder and
    jsonl sources; see folder.ConditioningFiles); a record whose file is missing or has an
    unreadable header is skipped and reported. If no record names one in the column, the
    source carries none (`has_conditioning` False).
    """
    if kind not in KINDS:
        raise DatasetError(f"data.source = {kind!r} is not a source kind; choose one of {', '.join(KINDS)}")
    if conditioning and conditioning.folder is not None and not conditioning.folder.is_dir():
        raise DatasetError(f"the conditioning folder {conditioning.folder} does not exist")
    if kind == "folder":
        return _open_folder(Path(path), captions, caption_extension, max_pixels, progress, conditioning)
    if captions not in ("auto", "none"):
        raise DatasetError(
            f"data.captions = {captions!r} applies to folder sources only; with data.source = {kind} use "
            "auto (the captions stored in the data) or none"
        )
    if kind == "jsonl":
        return _open_jsonl(Path(path), image_key, caption_key, captions != "none", max_pixels, progress, conditioning)
    if conditioning and conditioning.folder is not None:
        raise DatasetError(f"conditioning images from a folder with data.source = {kind}: they are read beside "
                           "folder and jsonl sources; export the data with `difftrain data build --format folder`, "
                           "or compute them from the images with a preprocessor (canny)")
    cls = LaionSource if kind == "laion" else WebDatasetSource
    return cls(Path(path), captions != "none", max_pixels, Path(index_dir) if index_dir else None, progress)


def caption_list(value: object) -> list[str]:
    """A stored caption value (a string or a list of strings) as a list without blank entries."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise BadRecord(f"a caption must be a string or a list of strings, found {type(value).__name__}")
    return [item for item in value if item.strip()]


def _describe(
    head: str, count: int, noun: str, skipped: int, uncaptioned: int, shards: str = "", where: str = ""
) -> str:
    """e.g. "laion parts: 3 parts, 2,400 records, 2 skipped (see the data report) (data/laion/filelist.txt)"."""
    text = f"{head}: " + (f"{shards}, " if shards else "") + f"{count:,} {noun}"
    if uncaptioned:
        text += f", {uncaptioned:,} without caption"
    if skipped:
        text += f", {skipped:,} skipped (see the data report)"
    return text + (f" ({where})" if where else "")


# --- files on disk ------------------------------------------------------------------------


class FileSource(RecordSource):
    """One image file per record: random access is one file read."""

    def __init__(self, description: str, keys: list[str], paths: list[str], captions: list[list[str]],
                 sizes: list[tuple[int, int]], skipped: list[tuple[str, str]], conditioning: list[str] | None = None):
        self.description = description
        self._conditioning = conditioning
        self.has_conditioning = conditioning is not None
        self.skipped = skipped
        self.shard_sizes = None
        self.sizes = np.asarray(sizes, dtype=np.int32).reshape(-1, 2)
        self.uncaptioned = sum(not c for c in captions)
        self._keys, self._paths, self._captions = keys, paths, captions

    def __len__(self) -> int:
        return len(self._paths)

    def read(self, index: int) -> RawRecord:
        try:
            data = Path(self._paths[index]).read_bytes()
        except OSError as exc:
            # A file can vanish or break between indexing and reading (disk, sync tools).
            raise BadRecord(f"{self._keys[index]}: cannot read file: {exc.strerror}") from None
        condition = None
        if self._conditioning is not None:
            try:
                condition = Path(self._conditioning[index]).read_bytes()
            except OSError as exc:
                raise BadRecord(f"{self._keys[index]}: cannot read its conditioning image "
                                f"{self._conditioning[index]}: {exc.strerror}") from None
        return RawRecord(self._keys[index], data, list(self._captions[index]), condition)

    def stored_files(self) -> list[tuple[str, str, list[str]]]:
        files = list(zip(self._keys, self._paths, self._captions))
        if self._conditioning is not None:  # a changed condition changes the data as much as a changed image
            files += [(f"{key} (conditioning)", path, []) for key, path in zip(self._keys, self._conditioning)]
        return files


def _open_folder(root: Path, captions: str, caption_extension: str, max_pixels: int, progress: bool,
                 conditioning: ConditioningFiles | None) -> FileSource:
    scan = scan_folder(root, captions, caption_extension, max_pixels, progress=progress, conditioning=conditioning)
    keys, paths, texts, sizes = [], [], [], []
    for record in scan.records:
        keys.append(record.path.relative_to(scan.root).as_posix())
        paths.append(str(record.path))
        texts.append(caption_list(list(record.captions)) if record.captions is not None
                     else caption_list(record.caption or ""))
        sizes.append((record.width, record.height))
    uncaptioned = sum(not t for t in texts)
    head = f"folder (captions: {scan.caption_source}" + (
        f", conditioning images: {scan.conditioning_source})" if scan.conditioning_source else ")")
    description = _describe(head, len(keys), "images", len(scan.skipped), uncaptioned, where=str(root))
    conditions = [str(r.conditioning) for r in scan.records] if scan.conditioning_source else None
    return FileSource(description, keys, paths, texts, sizes, scan.skipped, conditions)


def _open_jsonl(path: Path, image_key: str, caption_key: str, use_captions: bool, max_pixels: int,
                progress: bool, conditioning: ConditioningFiles | None) -> FileSource:
    if not path.is_file():
        raise DatasetError(
            f"data.path: {path} is not a file; a jsonl source is one file with a JSON object per line, "
            f'e.g. {{"{image_key}": "images/001.jpg", "{caption_key}": "a cat"}}'
        )
    root = path.parent
    keys, paths, texts, sizes, wheres = [], [], [], [], []
    conditions: list[object] = []  # per record: the conditioning column's value as stored
    skipped: list[tuple[str, str]] = []
    with open(path, "rb") as file:
        lines = tqdm(file, desc=f"indexing {path.name}", unit="line", disable=not progress, leave=False)
        for where, entry in jsonl_entries(lines, path.name, skipped):
            name = entry.get(image_key) if isinstance(entry, dict) else None
            if not isinstance(name, str) or not name:
                reason = f"needs an {image_key!r} string (the image path); set image_key if yours differs"
                skipped.append((where, reason))
                continue
            captions: list[str] = []
            if use_captions:
                if caption_key not in entry:
                    reason = f"no {caption_key!r} key; set caption_key, or captions: none to train without"
                    skipped.append((where, reason))
                    continue
                try:
                    captions = caption_list(entry[caption_key])
                except BadRecord as reason:
                    skipped.append((where, f"{caption_key!r}: {reason}"))
                    continue
            image = Path(name) if Path(name).is_absolute() else root / name
            if not image.is_file():
                skipped.append((where, f"image {name} does not exist (relative paths are read from {root})"))
                continue
            try:
                width, height = image_size_from_file(image)
                check_size(width, height, max_pixels)
            except BadImage as reason:
                skipped.append((where, f"{name}: {reason}"))
                continue
            keys.append(name)
            paths.append(str(image))
            texts.append(captions)
            sizes.append((width, height))
            wheres.append(where)
            conditions.append(entry.get(conditioning.column) if conditioning else None)
    files = None
    if conditioning and (conditioning.folder is not None or any(c is not None for c in conditions)):
        files, kept = [], []
        for i, (name, value) in enumerate(zip(keys, conditions)):
            found, problem = conditioning_file(name, value, root, conditioning, max_pixels)
            if problem:
                skipped.append((wheres[i], problem))
            else:
                files.append(str(found))
                kept.append(i)
        keys, paths, texts, sizes = ([column[i] for i in kept] for column in (keys, paths, texts, sizes))
    if not keys:
        detail = f"; e.g. {skipped[0][0]}: {skipped[0][1]}" if skipped else " (the file is empty)"
        raise DatasetError(f"no usable records in {path}{detail}")
    uncaptioned = sum(not t for t in texts)
    head = f"jsonl (conditioning images: {conditioning.describe()})" if files is not None else "jsonl"
    description = _describe(head, len(keys), "records", len(skipped), uncaptioned, where=str(path))
    return FileSource(description, keys, paths, texts, sizes, skipped, files)


# --- shards -------------------------------------------------------------------------------


def _read_list(list_file: Path, what: str) -> tuple[list[tuple[str, Path]], list[tuple[str, str]]]:
    """(label, path) per non-empty line of a shard list; a missing shard is skipped and reported."""
    shards: list[tuple[str, Path]] = []
    skipped: list[tuple[str, str]] = []
    text = list_file.read_text(encoding="utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), 1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        shard = Path(name)
        if not shard.is_absolute():
            beside = list_file.parent / shard
            # PaddleMIX filelists are often relative to where training starts, not to the list.
            shard = beside if beside.exists() or not shard.exists() else shard
        if not shard.is_file():
            skipped.append((f"{list_file.name} line {number}",
                            f"{what} {name} does not exist (relative paths are read from {list_file.parent})"))
            continue
        shards.append((name, shard))
    if not shards:
        detail = f"; e.g. {skipped[0][0]}: {skipped[0][1]}" if skipped else " (it lists nothing)"
        raise DatasetError(f"no {what} to read in {list_file}{detail}")
    return shards, skipped


def _open_binary(path: Path) -> BinaryIO:
    """`path` as a byte stream, gunzipped if its first bytes say gzip, whatever its name says."""
    with open(path, "rb") as file:
        magic = file.read(2)
    # gzip.open owns the file it opens, so closing the stream closes the file too.
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")  # type: ignore[return-value]


@dataclass
class _Entry:
    position: int  # where in the shard: a line number (laion) or a sample ordinal (webdataset)
    key: str
    where: str  # how a report names it
    record: RawRecord | None
    problem: str | None = None


class ShardSource(RecordSource):
    """Records stored in shard files read front to back; one shard is held in memory at a time."""

    kind = ""
    shard_noun = "shard"
    noun = "records"
    position_noun = "record"

    def __init__(self, path: Path, use_captions: bool, max_pixels: int, index_dir: Path | None, progress: bool):
        self._use_captions = use_captions
        self._max_pixels = max_pixels
        shards, self.skipped = self._shard_list(path)
        self.shards_indexed = 0  # shards streamed by this open
        self.shards_from_cache = 0  # shards whose index came from index_dir
        self.shard_loads = 0  # shards read by read() in this process
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
            if index["positions"]:  # a shard with no usable record is left out of the order altogether
                self._labels.append(label)
                self._paths.append(str(shard))
                self._positions.append(np.asarray(index["positions"], dtype=np.int64))
                sizes.append(np.asarray(index["sizes"], dtype=np.int32).reshape(-1, 2))
        if not self._positions:
            detail = f"; e.g. {self.skipped[0][0]}: {self.skipped[0][1]}" if self.skipped else ""
            raise DatasetError(f"no usable records in {path}{detail}")
        self.shard_sizes = [len(p) for p in self._positions]
        self._ends = np.cumsum(self.shard_sizes).tolist()
        self.sizes = np.concatenate(sizes)
        counted = f"{len(self._labels)} {self.shard_noun}" + ("s" if len(self._labels) != 1 else "")
        if len(shards) > len(self._labels):
            counted += f" (and {len(shards) - len(self._labels)} with no usable record)"
        self.description = _describe(
            f"{self.kind} {self.shard_noun}s", len(self), self.noun, len(self.skipped), self.uncaptioned,
            shards=counted, where=str(path),
        )
        self._loaded: tuple[int, list[RawRecord | str]] | None = None

    # What a kind provides: its list of shards, and the entries of one shard in order.
    def _shard_list(self, path: Path) -> tuple[list[tuple[str, Path]], list[tuple[str, str]]]:
        raise NotImplementedError

    def _entries(self, label: str, path: Path) -> Iterator[_Entry]:
        raise NotImplementedError

    def __len__(self) -> int:
        return self._ends[-1]

    def stored_files(self) -> list[tuple[str, str, list[str]]]:
        return [(label, path, []) for label, path in zip(self._labels, self._paths)]  # captions are inside

    def __getstate__(self) -> dict:
        # A worker process gets the index, not the parent's loaded shard (nor any open file: none is kept).
        state = self.__dict__.copy()
        state["_loaded"] = None
        return state

    def read(self, index: int) -> RawRecord:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} is out of range for a source of {len(self)} records")
        shard = bisect.bisect_right(self._ends, index)
        if self._loaded is None or self._loaded[0] != shard:
            self._loaded = None  # let the old shard go before the new one is read
            self._loaded = (shard, self._load(shard))
        item = self._loaded[1][index - (self._ends[shard - 1] if shard else 0)]
        if isinstance(item, str):
            raise BadRecord(item)
        return item

    def _load(self, shard: int) -> list[RawRecord | str]:
        """Every usable record of one shard, in index order; a str stands for one that broke since."""
        label, path, wanted = self._labels[shard], Path(self._paths[shard]), self._positions[shard]
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

    def _index(self, label: str, path: Path, index_dir: Path | None) -> dict:
        cache = None
        if index_dir is not None and path.is_file():  # a shard gone since listing is reported by the indexing
            stat = path.stat()
            identity = [INDEX_VERSION, self.kind, label, str(path.resolve()), stat.st_size, stat.st_mtime_ns,
                        self._max_pixels, self._use_captions]
            digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()
            cache = index_dir / f"{self.kind}-{digest[:40]}.json"
            try:
                index = json.loads(cache.read_text())
                if index.get("version") == INDEX_VERSION:
                    self.shards_from_cache += 1
                    return index
            except (OSError, ValueError, AttributeError):
                pass  # not cached yet, or a damaged entry: index the shard again
        index = self._index_shard(label, path)
        self.shards_indexed += 1
        if cache is not None:
            write_text(cache, json.dumps(index), sync=False)  # an index is cheap to rebuild
        return index

    def _index_shard(self, label: str, path: Path) -> dict:
        positions: list[int] = []
        sizes: list[tuple[int, int]] = []
        skipped: list[tuple[str, str]] = []
        uncaptioned = 0
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
        return {"version": INDEX_VERSION, "positions": positions, "sizes": sizes, "skipped": skipped,
                "uncaptioned": uncaptioned}


class LaionSource(ShardSource):
    """PaddleMIX laion400m parts: a filelist of parts, each line `caption \\t placeholder \\t base64 image`."""

    kind = "laion"
    shard_noun = "part"
    position_noun = "line"

    def _shard_list(self, path: Path) -> tuple[list[tuple[str, Path]], list[tuple[str, str]]]:
        if path.is_dir():
            if not (path / LIST_NAME).is_file():
                raise DatasetError(
                    f"data.path: {path} is a folder without a {LIST_NAME}; point data.path at the laion filelist "
                    "(a text file with one part path per line)"
                )
            path = path / LIST_NAME
        if not path.is_file():
            raise DatasetError(
                f"data.path: laion filelist {path} does not exist; it is a text file with one part path "
                "(gzip or plain text) per line, relative to the filelist's folder or absolute"
            )
        return _read_list(path, "part")

    def _entries(self, label: str, path: Path) -> Iterator[_Entry]:
        with _open_binary(path) as file:
            for number, line in enumerate(file, 1):
                line = line.rstrip(b"\r\n")
                if not line.strip():
                    continue
                key, where = f"{label}:{number}", f"{label} line {number}"
                columns = line.split(b"\t")
                if len(columns) < 3:
                    problem = f"expected caption<TAB>placeholder<TAB>base64 image, found {len(columns)} column(s)"
                    yield _Entry(number, key, where, None, problem)
                    continue
                try:
                    data = base64.b64decode(columns[2].strip(), validate=True)
                except (binascii.Error, ValueError):
                    yield _Entry(number, key, where, None, "the image column is not valid base64")
                    continue
                caption = columns[0].decode("utf-8", errors="replace") if self._use_captions else ""
                yield _Entry(number, key, where, RawRecord(key, data, caption_list(caption)))


class WebDatasetSource(ShardSource):
    """webdataset tars: members grouped by key (path up to the first dot of the name) into samples."""

    kind = "webdataset"
    shard_noun = "tar"
    noun = "samples"
    position_noun = "sample number"

    def _shard_list(self, path: Path) -> tuple[list[tuple[str, Path]], list[tuple[str, str]]]:
        if path.is_dir():
            if (path / LIST_NAME).is_file():
                return _read_list(path / LIST_NAME, "tar")
            tars = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(TAR_SUFFIXES))
            if not tars:
                raise DatasetError(
                    f"data.path: no .tar files in {path}; a webdataset source is a folder of .tar shards, "
                    "one .tar, or a text file listing .tar paths"
                )
            return [(p.name, p) for p in tars], []
        if not path.is_file():
            raise DatasetError(
                f"data.path: {path} does not exist; a webdataset source is a folder of .tar shards, "
                "one .tar, or a text file listing .tar paths"
            )
        if path.name.endswith(TAR_SUFFIXES) or tarfile.is_tarfile(path):
            return [(path.name, path)], []
        return _read_list(path, "tar")

    def _entries(self, label: str, path: Path) -> Iterator[_Entry]:
        with tarfile.open(path, mode="r|*") as tar:
            for ordinal, (name, members) in enumerate(_tar_samples(tar)):
                key, where = f"{label}:{name}", f"{label}:{name}"
                image = next((ext for ext in WDS_IMAGE_EXTENSIONS if ext in members), None)
                if image is None:
                    found = ", ".join(f".{ext}" for ext in members)
                    problem = f"no image member (.{', .'.join(WDS_IMAGE_EXTENSIONS)}); it has {found}"
                    yield _Entry(ordinal, key, where, None, problem)
                    continue
                try:
                    captions = self._captions(members)
                except BadRecord as reason:
                    yield _Entry(ordinal, key, where, None, str(reason))
                    continue
                yield _Entry(ordinal, key, where, RawRecord(key, members[image] or b"", captions))

    def _captions(self, members: dict[str, bytes | None]) -> list[str]:
        """`captions` in .json (what build_shards writes), else .txt, else .json `caption`/`text`."""
        if not self._use_captions:
            return []
        meta = None
        if members.get("json") is not None:
            try:
                meta = json.loads(members["json"])
            except (ValueError, UnicodeDecodeError) as exc:
                raise BadRecord(f"the .json member is not valid JSON: {exc}") from None
            if isinstance(meta, dict) and "captions" in meta:
                return caption_list(meta["captions"])
        if members.get("txt") is not None:
            return caption_list(members["txt"].decode("utf-8", errors="replace").strip())
        if isinstance(meta, dict):
            for field in ("caption", "text"):
                if field in meta:
                    return caption_list(meta[field])
        return []


_WANTED_MEMBERS = set(WDS_IMAGE_EXTENSIONS) | {"txt", "json"}


def _tar_samples(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """(key, {extension: bytes}) per sample; members of other kinds are named but not read."""
    key, members = None, {}
    while (info := tar.next()) is not None:
        # A streamed TarFile remembers every member it passed; forget them to keep memory flat.
        tar.members = []
        if not info.isfile():
            continue
        folder, _, base = info.name.removeprefix("./").rpartition("/")
        if not base or base.startswith("."):  # macOS "._name" companions and other hidden files
            continue
        stem, _, extension = base.partition(".")
        name = f"{folder}/{stem}" if folder else stem
        if name != key:
            if key is not None:
                yield key, members
            key, members = name, {}
        extension = extension.lower()
        stream = tar.extractfile(info) if extension in _WANTED_MEMBERS else None
        members[extension] = stream.read() if stream is not None else None
    if key is not None:
        yield key, members
