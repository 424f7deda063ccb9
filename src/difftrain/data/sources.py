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
  epoch whatever the data set's size. Shards, and the list naming them, may also be
  URLs (http(s)://, s3://, gs://; see remote.py); a list read from a URL names its
  shards relative to that URL.

Hugging Face data sets ("hf", data/hf.py) are either: an Arrow table with random access,
or, streamed, a shard source whose shards are the stream's data files.

What a record is, the RecordSource interface and the shard machinery (indexing each shard
once, its cache under `index_dir`, one shard in memory) are in records.py, below every source.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import json
import sys
import tarfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Iterator

import numpy as np
from tqdm.auto import tqdm

from difftrain.atomic import CONTENTS_OLD, CONTENTS_STAGING, contents_lock, interrupted_contents, recover_contents
from difftrain.data.folder import (ConditioningFiles, DatasetError, conditioning_file, jsonl_entries,
                                   refuse_unfinished, require_folder, scan_folder)
from difftrain.data.images import BadImage, allow_pixels, check_size, image_size_from_file
from difftrain.data.packed import PackedLists, PackedStrings
# The rest of difftrain imports the record types from here; they live in records.py so hf.py can build on them.
from difftrain.data.records import (BadRecord, KnownRecords, RawRecord, RecordSource, Shard, ShardEntry, ShardSource,
                                    caption_list, describe_records)
from difftrain.data.remote import ShardUnreachable, is_url, join_url, open_url, read_text, url_name
from difftrain.data.setting_names import DATA_KEYS, SettingNames

if TYPE_CHECKING:
    from difftrain.data.hf import HFOptions

KINDS = ("folder", "jsonl", "laion", "webdataset", "hf")
# Image members of a webdataset sample, in order of preference when a sample has several.
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "jfif", "png", "webp", "bmp", "gif", "tif", "tiff", "avif")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
LIST_NAME = "filelist.txt"  # what build_shards writes; a folder holding one is read through it


def finish_interrupted_curate(path: str | Path) -> None:
    """A folder `difftrain data curate` was killed while filling is put right before it is read: reading it
    as it is would train on part of the old data and part of the new."""
    if is_url(str(path)):
        return
    path = Path(path) if Path(path).is_dir() else Path(path).parent  # a shard output's filelist.txt: its folder
    if not interrupted_contents(path):
        return
    try:
        # The lock tells a curate still writing (wait for it) from a killed one (put right), and lets the
        # processes of one training run repair the folder one at a time.
        with contents_lock(path, f"waiting for a `difftrain data curate` writing into {path}"):
            if recover_contents(path):
                print(f"note: {path} held an interrupted curate output; it was finished or undone", file=sys.stderr)
    except OSError as error:
        raise DatasetError(f"{path} holds an interrupted curate output ({CONTENTS_STAGING} or {CONTENTS_OLD}) that "
                           f"could not be put right ({error}); run `difftrain data curate` into it again with "
                           "write access") from None


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
    hf: HFOptions | None = None,
    names: SettingNames = DATA_KEYS,
) -> RecordSource:
    """Index the data at `path` stored as `kind` (one of KINDS); see the module docstring.

    `hf` says what to read from a Hugging Face data set (kind "hf", see data/hf.py). `names`: what messages call
    these settings (a run's config keys, or a command's arguments: setting_names.py).

    With `conditioning`, each record also carries its conditioning image file (folder and
    jsonl sources; see folder.ConditioningFiles); a record whose file is missing or has an
    unreadable header is skipped and reported. If no record names one in the column, the
    source carries none (`has_conditioning` False).
    """
    if kind not in KINDS:
        raise DatasetError(f"{names.given('source', kind)} is not a source kind; choose one of {', '.join(KINDS)}")
    allow_pixels(max_pixels)
    if conditioning and conditioning.folder is not None and not conditioning.folder.is_dir():
        raise DatasetError(f"the conditioning folder {conditioning.folder} does not exist")
    finish_interrupted_curate(path)
    source = _open_kind(kind, path, image_key, caption_key, captions, caption_extension, max_pixels,
                        Path(index_dir) if index_dir else None, progress, conditioning, hf, names)
    source.settings = repr((kind, image_key, caption_key, captions, caption_extension, max_pixels, hf))
    source.location = str(Path(path).resolve()) if Path(path).exists() else str(path)
    return source


def check_local_path(kind: str, path: str | Path, image_key: str = "image", caption_key: str = "caption",
                     names: SettingNames = DATA_KEYS) -> None:
    """A folder or jsonl source's refusal of a path that is not there, without reading anything: `difftrain train`
    says it before the trainer's imports (seconds), which this module does not need. The other kinds' paths may
    be URLs, globs or Hub ids: their readers say what is wrong."""
    if kind == "folder":
        require_folder(Path(path), names)
    elif kind == "jsonl" and not Path(path).is_file():
        raise DatasetError(
            f"{names.path}: {path} is not a file; a jsonl source is one file with a JSON object per line, "
            f'e.g. {{"{image_key}": "images/001.jpg", "{caption_key}": "a cat"}}'
        )


def _open_kind(kind: str, path: str | Path, image_key: str, caption_key: str, captions: str, caption_extension: str,
               max_pixels: int, index_dir: Path | None, progress: bool, conditioning: ConditioningFiles | None,
               hf: HFOptions | None, names: SettingNames) -> RecordSource:
    if kind == "folder":
        return _open_folder(Path(path), captions, caption_extension, max_pixels, progress, conditioning, index_dir,
                            names)
    if captions not in ("auto", "none"):
        raise DatasetError(
            f"{names.given('captions', captions)} applies to folder sources only; with {names.given('source', kind)} "
            "use auto (the captions stored in the data) or none"
        )
    if kind == "jsonl":
        return _open_jsonl(Path(path), image_key, caption_key, captions != "none", max_pixels, progress, conditioning,
                           names)
    if conditioning and conditioning.folder is not None:
        raise DatasetError(f"conditioning images from a folder with {names.given('source', kind)}: they are read "
                           "beside folder and jsonl sources; export the data with `difftrain data build --format "
                           "folder`, or compute them from the images with a preprocessor (canny)")
    if kind == "hf":
        from dataclasses import replace

        from difftrain.data.hf import HFOptions, open_hf

        hf = replace(hf or HFOptions(), conditioning_column=conditioning.column if conditioning else None,
                     names=names)
        return open_hf(str(path), hf, captions != "none", max_pixels, index_dir, progress)
    cls = LaionSource if kind == "laion" else WebDatasetSource
    location = str(path) if is_url(path) else Path(path)
    return cls(location, captions != "none", max_pixels, index_dir, progress, names)


# --- files on disk ------------------------------------------------------------------------


class FileSource(RecordSource):
    """One image file per record: random access is one file read."""

    def __init__(self, description: str, keys: list[str], paths: list[str], captions: list[list[str]],
                 sizes: list[tuple[int, int]], skipped: list[tuple[str, str]], conditioning: list[str] | None = None,
                 digests: list[bytes | None] | None = None, condition_digests: list[bytes | None] | None = None,
                 notes: list[tuple[str, str]] | None = None):
        self.description = description
        self.has_conditioning = conditioning is not None
        self.skipped, self.notes = skipped, notes or []
        self.shard_sizes = None
        self.sizes = np.asarray(sizes, dtype=np.int32).reshape(-1, 2)
        self.uncaptioned = sum(not c for c in captions)
        # Packed: each DataLoader worker shares them instead of copying them as it reads (packed.py).
        self._keys, self._paths, self._captions = PackedStrings(keys), PackedStrings(paths), PackedLists(captions)
        self._conditioning = None if conditioning is None else PackedStrings(conditioning)
        # Each file's SHA-256 where the folder scan hashed it (all zeros: not known), 32 bytes a record.
        self._known = None if digests is None else KnownRecords(np.frombuffer(
            b"".join(d or bytes(32) for d in digests), dtype=np.uint8).reshape(-1, 32), self._captions)
        # Its conditioning file's, where the scan hashed every one (else the cache reads the records to hash them).
        self.knows_conditions = bool(condition_digests) and all(condition_digests)
        self._condition_digests = b"".join(condition_digests) if self.knows_conditions else None

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
        return RawRecord(self._keys[index], data, self._captions[index], condition)

    def known_record(self, index: int) -> tuple[bytes, list[str]] | None:
        return None if self._known is None else self._known.known_record(index)

    def known_condition(self, index: int) -> bytes | None:
        return None if self._condition_digests is None else self._condition_digests[32 * index:32 * (index + 1)]

    def stored_files(self) -> list[tuple[str, str, list[str]]]:
        files = list(zip(self._keys, self._paths, self._captions))
        if self._conditioning is not None:  # a changed condition changes the data as much as a changed image
            files += [(f"{key} (conditioning)", path, []) for key, path in zip(self._keys, self._conditioning)]
        return files


def _open_folder(root: Path, captions: str, caption_extension: str, max_pixels: int, progress: bool,
                 conditioning: ConditioningFiles | None, index_dir: Path | None, names: SettingNames) -> FileSource:
    scan = scan_folder(root, captions, caption_extension, max_pixels, progress=progress, conditioning=conditioning,
                       index_dir=index_dir, names=names)
    keys, paths, texts, sizes, digests, condition_digests = [], [], [], [], [], []
    for record in scan.records:
        keys.append(record.path.relative_to(scan.root).as_posix())
        paths.append(str(record.path))
        texts.append(caption_list(list(record.captions)) if record.captions is not None
                     else caption_list(record.caption or ""))
        sizes.append((record.width, record.height))
        digests.append(record.digest)
        condition_digests.append(record.condition_digest)
    uncaptioned = sum(not t for t in texts)
    head = f"folder (captions: {scan.caption_source}" + (
        f", conditioning images: {scan.conditioning_source})" if scan.conditioning_source else ")")
    description = describe_records(head, len(keys), "images", len(scan.skipped), uncaptioned, where=str(root),
                                   caption_problems=len(scan.notes))
    conditions = [str(r.conditioning) for r in scan.records] if scan.conditioning_source else None
    return FileSource(description, keys, paths, texts, sizes, scan.skipped, conditions, digests,
                      condition_digests if conditions is not None else None, scan.notes)


def _open_jsonl(path: Path, image_key: str, caption_key: str, use_captions: bool, max_pixels: int,
                progress: bool, conditioning: ConditioningFiles | None, names: SettingNames) -> FileSource:
    check_local_path("jsonl", path, image_key, caption_key, names)
    root = path.parent
    keys, paths, texts, sizes, wheres = [], [], [], [], []
    conditions: list[object] = []  # per record: the conditioning column's value as stored
    skipped: list[tuple[str, str]] = []
    with open(path, "rb") as file:
        lines = tqdm(file, desc=f"indexing {path.name}", unit="line", disable=not progress, leave=False)
        for where, entry in jsonl_entries(lines, path.name, skipped):
            name = entry.get(image_key) if isinstance(entry, dict) else None
            if not isinstance(name, str) or not name:
                reason = (f"needs an {image_key!r} string (the image path); name the key that holds it with "
                          f"{names.image_key}")
                skipped.append((where, reason))
                continue
            captions: list[str] = []
            if use_captions:
                if caption_key not in entry:
                    reason = (f"no {caption_key!r} key; name the caption's key with {names.caption_key}, or "
                              f"{names.without_captions} reads the data without captions")
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
    description = describe_records(head, len(keys), "records", len(skipped), uncaptioned, where=str(path))
    return FileSource(description, keys, paths, texts, sizes, skipped, files)


# --- shards -------------------------------------------------------------------------------


def _read_list(list_file: Shard, what: str, names: SettingNames) -> tuple[list[tuple[str, Shard]],
                                                                          list[tuple[str, str]]]:
    """(label, path or URL) per non-empty line of a shard list; a missing local shard is skipped and reported."""
    if isinstance(list_file, str):
        shards, skipped = _remote_list(list_file, what, names), []
    else:
        shards, skipped = _local_list(list_file, what)
    if not shards:
        detail = f"; e.g. {skipped[0][0]}: {skipped[0][1]}" if skipped else " (it lists nothing)"
        raise DatasetError(f"no {what} to read in {list_file}{detail}")
    return shards, skipped


def _list_lines(text: str) -> Iterator[tuple[int, str]]:
    for number, line in enumerate(text.splitlines(), 1):
        name = line.strip()
        if name and not name.startswith("#"):
            yield number, name


def _remote_list(url: str, what: str, names: SettingNames) -> list[tuple[str, Shard]]:
    """(label, URL) per line, a relative name read from the list's own URL. Unlike a local list's files, the
    shards are not checked here (a request each): a missing one is reported by its indexing."""
    try:
        text = read_text(url)
    except ShardUnreachable as exc:
        raise DatasetError(f"{names.path}: {exc}; it should be a text file listing one {what} per line, "
                           "relative to its URL or as full URLs") from None
    return [(name, join_url(url, name)) for _, name in _list_lines(text)]


def _local_list(list_file: Path, what: str) -> tuple[list[tuple[str, Shard]], list[tuple[str, str]]]:
    shards: list[tuple[str, Shard]] = []
    skipped: list[tuple[str, str]] = []
    for number, name in _list_lines(list_file.read_text(encoding="utf-8", errors="replace")):
        if is_url(name):
            shards.append((name, name))
            continue
        shard = Path(name)
        if not shard.is_absolute():
            beside = list_file.parent / shard
            if beside.is_file():  # the usual case, in one stat (a list may name 10,000 shards)
                shards.append((name, beside))
                continue
            # PaddleMIX filelists are often relative to where training starts, not to the list.
            shard = beside if beside.exists() or not shard.exists() else shard
        if not shard.is_file():
            skipped.append((f"{list_file.name} line {number}",
                            f"{what} {name} does not exist (relative paths are read from {list_file.parent})"))
            continue
        shards.append((name, shard))
    return shards, skipped


def _open_raw(path: Shard) -> IO[bytes]:
    return open_url(path) if isinstance(path, str) else open(path, "rb")


@contextmanager
def _open_binary(path: Shard) -> Iterator[IO[bytes]]:
    """`path` as a byte stream, gunzipped if its first bytes say gzip, whatever its name says."""
    with _open_raw(path) as raw:
        magic = raw.read(2)
        raw.seek(0)
        if magic != b"\x1f\x8b":
            yield raw
            return
        with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
            yield unzipped  # type: ignore[misc]


def _refuse_a_part(path: Path, names: SettingNames) -> None:
    """A part given where its filelist belongs: read as a list, its gzip bytes or its image lines would each
    be reported as a part that does not exist (binary bytes and base64 on the terminal)."""
    with open(path, "rb") as file:
        start = file.read(4096)
    if start[:2] == b"\x1f\x8b" or b"\t" in start.split(b"\n", 1)[0]:
        beside = path.parent / LIST_NAME
        hint = f" ({beside} is one)" if beside.is_file() and beside != path else ""
        raise DatasetError(f"{names.path}: {path} is a laion part (gzip or caption<TAB>placeholder<TAB>base64 "
                           f"image lines), not a filelist; point {names.path} at the filelist that lists it{hint}, "
                           "or at its folder")


class LaionSource(ShardSource):
    """PaddleMIX laion400m parts: a filelist of parts, each line `caption \\t placeholder \\t base64 image`."""

    kind = "laion"
    sidecars = True  # data build and data download write each shard's index beside it
    shard_noun = "part"
    position_noun = "line"

    def _shard_list(self, path: Shard, names: SettingNames) -> tuple[list[tuple[str, Shard]], list[tuple[str, str]]]:
        if isinstance(path, str):  # no folder to look into: a URL ending in / names the folder of a filelist
            return _read_list(path + LIST_NAME if path.endswith("/") else path, "part", names)
        if path.is_dir():
            if not (path / LIST_NAME).is_file():
                raise DatasetError(
                    f"{names.path}: {path} is a folder without a {LIST_NAME}; point {names.path} at the laion "
                    "filelist (a text file with one part path per line)"
                )
            path = path / LIST_NAME
        if not path.is_file():
            raise DatasetError(
                f"{names.path}: laion filelist {path} does not exist; it is a text file with one part path "
                "(gzip or plain text) per line, relative to the filelist's folder or absolute"
            )
        _refuse_a_part(path, names)
        return _read_list(path, "part", names)

    def _entries(self, label: str, path: Shard) -> Iterator[ShardEntry]:
        with _open_binary(path) as file:
            for number, line in enumerate(file, 1):
                line = line.rstrip(b"\r\n")
                if not line.strip():
                    continue
                key, where = f"{label}:{number}", f"{label} line {number}"
                columns = line.split(b"\t")
                if len(columns) < 3:
                    problem = f"expected caption<TAB>placeholder<TAB>base64 image, found {len(columns)} column(s)"
                    yield ShardEntry(number, key, where, None, problem)
                    continue
                try:
                    data = base64.b64decode(columns[2].strip(), validate=True)
                except (binascii.Error, ValueError):
                    yield ShardEntry(number, key, where, None, "the image column is not valid base64")
                    continue
                caption = columns[0].decode("utf-8", errors="replace") if self._use_captions else ""
                yield ShardEntry(number, key, where, RawRecord(key, data, caption_list(caption)))


class WebDatasetSource(ShardSource):
    """webdataset tars: members grouped by key (path up to the first dot of the name) into samples."""

    kind = "webdataset"
    sidecars = True  # data build and data download write each shard's index beside it
    shard_noun = "tar"
    noun = "samples"
    position_noun = "sample number"

    def _shard_list(self, path: Shard, names: SettingNames) -> tuple[list[tuple[str, Shard]], list[tuple[str, str]]]:
        if isinstance(path, str):  # a URL: one tar, else a list (a URL ending in / names the folder of one)
            if url_name(path).endswith(TAR_SUFFIXES):
                return [(url_name(path), path)], []
            return _read_list(path + LIST_NAME if path.endswith("/") else path, "tar", names)
        if path.is_dir():
            if (path / LIST_NAME).is_file():
                return _read_list(path / LIST_NAME, "tar", names)
            refuse_unfinished(path, names)  # (a finished build or download lists its tars)
            tars = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(TAR_SUFFIXES))
            if not tars:
                raise DatasetError(
                    f"{names.path}: no .tar files in {path}; a webdataset source is a folder of .tar shards, "
                    "one .tar, or a text file listing .tar paths"
                )
            return [(p.name, p) for p in tars], []
        if not path.is_file():
            raise DatasetError(
                f"{names.path}: {path} does not exist; a webdataset source is a folder of .tar shards, "
                "one .tar, or a text file listing .tar paths"
            )
        if path.name.endswith(TAR_SUFFIXES) or tarfile.is_tarfile(path):
            return [(path.name, path)], []
        return _read_list(path, "tar", names)

    def _entries(self, label: str, path: Shard) -> Iterator[ShardEntry]:
        # ignore_zeros: past a damaged member header to the next good one, as GNU tar goes on (without it tarfile
        # ends the shard there without a word); _tar_samples names the stretch it passed over.
        with _open_raw(path) as raw, tarfile.open(fileobj=raw, mode="r|*", ignore_zeros=True,
                                                  tarinfo=_NotedDamage) as tar:
            for ordinal, (name, members) in enumerate(_tar_samples(tar)):
                if isinstance(members, str):  # a damaged stretch, named by its bytes
                    yield ShardEntry(ordinal, f"{label}:{name}", f"{label} {name}", None, members)
                    continue
                key, where = f"{label}:{name}", f"{label}:{name}"
                image = next((ext for ext in WDS_IMAGE_EXTENSIONS if ext in members), None)
                if image is None:
                    found = ", ".join(f".{ext}" for ext in members)
                    problem = f"no image member (.{', .'.join(WDS_IMAGE_EXTENSIONS)}); it has {found}"
                    yield ShardEntry(ordinal, key, where, None, problem)
                    continue
                try:
                    captions = self._captions(members)
                except BadRecord as reason:
                    yield ShardEntry(ordinal, key, where, None, str(reason))
                    continue
                yield ShardEntry(ordinal, key, where, RawRecord(key, members[image] or b"", captions))

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
            if isinstance(meta, dict) and meta.get("captions") is not None:  # (null: no caption, as in hf rows)
                return caption_list(meta["captions"])
        if members.get("txt") is not None:
            return caption_list(members["txt"].decode("utf-8", errors="replace").strip())
        if isinstance(meta, dict):
            for field in ("caption", "text"):
                if meta.get(field) is not None:
                    return caption_list(meta[field])
        return []


_WANTED_MEMBERS = set(WDS_IMAGE_EXTENSIONS) | {"txt", "json"}


class _NotedDamage(tarfile.TarInfo):
    """A TarInfo that notes where a header block failed its checksum in the TarFile's `damaged` list: read with
    ignore_zeros, tarfile passes over such blocks one by one without a word."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.InvalidHeaderError:  # (not EOFHeaderError: zero blocks end an archive)
            tar.damaged = [*getattr(tar, "damaged", []), tar.offset]
            raise


def _damage_before(tar: tarfile.TarFile, offset: int | str) -> Iterator[tuple[str, str]]:
    """("bytes A-B", why) for the damaged header blocks _NotedDamage noted before `offset` (a number, or "end")."""
    if getattr(tar, "damaged", None):
        yield (f"bytes {tar.damaged[0]}-{offset}", "no tar member header there (damaged); read on from the next one, "
               "as GNU tar does: the members it held are lost")
        tar.damaged = []


def _tar_samples(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes | None] | str]]:
    """(key, {extension: bytes}) per sample; members of other kinds are named but not read. A tar opened with
    ignore_zeros and _NotedDamage passes over damaged headers: each such stretch comes as ("bytes A-B", why)."""
    key, members = None, {}
    while (info := tar.next()) is not None:
        # A streamed TarFile remembers every member it passed; forget them to keep memory flat.
        tar.members = []
        for stretch in _damage_before(tar, info.offset):
            if key is not None:
                yield key, members
                key, members = None, {}
            yield stretch
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
    yield from _damage_before(tar, "end")
