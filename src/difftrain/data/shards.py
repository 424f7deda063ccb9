"""Writing any source out as shards (`difftrain data build`), or back out as an image folder.

Image bytes are copied, never re-encoded, so folder -> shards -> folder gives the same
files. Each shard is written under a `.tmp` name and renamed once complete, then its index
is written beside it (`part-00000.gz.index.json`, see records.py), so opening the shards
reads no shard; the shard list (`filelist.txt`) is written last: a build that dies half
way leaves nothing that reads as finished.
"""

from __future__ import annotations

import base64
import gzip as gzip_module
import io
import json
import logging
import os
import tarfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator

from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from difftrain.atomic import fsync_dir, occupied, write_bytes
from difftrain.data.folder import UNFINISHED, DatasetError
from difftrain.data.images import IMAGE_EXTENSIONS
from difftrain.data.records import ShardSource, sidecar_path
from difftrain.data.sources import LIST_NAME, BadRecord, LaionSource, RawRecord, RecordSource, WebDatasetSource

log = logging.getLogger(__name__)

FORMATS = ("laion", "webdataset")
# PIL format -> the extension a folder or tar member gets when the key does not say.
# (MPO: a JPEG with more frames after the first, as many phone cameras save their photos)
_FORMAT_EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp",
                      "TIFF": ".tif", "AVIF": ".avif"}
_LINE_BREAKERS = str.maketrans({"\t": " ", "\n": " ", "\r": " "})


def image_extension(record: RawRecord) -> str:
    """The record's own extension when its key has one ("cats/001.jpeg"), else the one its bytes say."""
    suffix = PurePosixPath(record.key).suffix
    if suffix.lower() in IMAGE_EXTENSIONS:
        return suffix
    try:
        with Image.open(io.BytesIO(record.data)) as image:
            found = image.format
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise BadRecord(f"{record.key}: the stored bytes are not an image PIL can identify") from None
    if found not in _FORMAT_EXTENSIONS:
        raise BadRecord(f"{record.key}: {found} images cannot be written as files "
                        f"({', '.join(_FORMAT_EXTENSIONS)} can)")
    return _FORMAT_EXTENSIONS[found]


def build_shards(
    source: RecordSource,
    out_dir: str | Path,
    format: str = "laion",
    records_per_shard: int = 1000,
    gzip: bool = True,
    progress: bool = True,
    skipped: list[str] | None = None,
) -> Path:
    """Write every readable record of `source` into numbered shards; return the shard list file. The records
    that could not be read or written are logged and their reasons appended to `skipped`.

    laion: `part-00000.gz` ... (`part-00000.txt` with gzip=False), lines `caption\\t\\tbase64`;
    webdataset: `shard-000000.tar` ... with `<key>.<ext>`, `<key>.txt` (first caption) and
    `<key>.json` (`{"captions": [...], "source": original key}`). Either way `filelist.txt`
    lists the shards, and `open_source(format, <returned path>)` reads them back.
    """
    if format not in FORMATS:
        raise DatasetError(f"shard format {format!r} is not known; choose one of {', '.join(FORMATS)}")
    if records_per_shard < 1:
        raise DatasetError(f"records_per_shard = {records_per_shard}: a shard needs at least 1 record")
    out = _empty_folder(out_dir)
    writer: ShardWriter = LaionWriter(out, records_per_shard, gzip) if format == "laion" else TarWriter(
        out, records_per_shard
    )
    skipped = [] if skipped is None else skipped
    try:
        for record in _records(source, f"writing {format} shards", progress, skipped):
            try:
                writer.add(record)
            except BadRecord as reason:
                log.warning("skipping %s", reason)
                skipped.append(str(reason))
        names = writer.finish()
    finally:
        writer.abandon()  # after an error: no .tmp shard is left to look like data
    if not names:
        raise _nothing_written(out, source, skipped)
    for note in writer.notes():
        log.warning(note)
    listing = out / LIST_NAME
    write_bytes(listing, "".join(f"{name}\n" for name in names).encode())
    (out / UNFINISHED).unlink()
    return listing


def export_folder(source: RecordSource, out_dir: str | Path, progress: bool = True,
                  skipped: list[str] | None = None) -> Path:
    """Write every readable record as an image file plus `metadata.jsonl`; return the folder (`skipped` as
    build_shards').

    A record whose key is a relative image path keeps it; others are numbered in source
    order. metadata.jsonl has `file_name` and `text` (the first caption, empty for none), plus
    `captions` when there are several.
    """
    out = _empty_folder(out_dir)
    width = max(6, len(str(len(source) - 1)))
    used: set[str] = set()
    lines: list[str] = []
    skipped = [] if skipped is None else skipped
    for index, record in enumerate(_records(source, "writing images", progress, skipped)):
        try:
            extension = image_extension(record)
        except BadRecord as reason:
            log.warning("skipping %s", reason)
            skipped.append(str(reason))
            continue
        name = _folder_name(record.key, index, width, extension, used)
        used.add(name.lower())
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(target, record.data, sync=False)
        # A line for every image, an uncaptioned one's text empty: datasets' imagefolder leaves out the images
        # metadata.jsonl does not name (difftrain reads them all either way).
        entry = {"file_name": name, "text": record.captions[0] if record.captions else ""}
        if len(record.captions) > 1:
            entry["captions"] = record.captions
        lines.append(json.dumps(entry, ensure_ascii=False))
    if not used:
        raise _nothing_written(out, source, skipped)
    write_bytes(out / "metadata.jsonl", "".join(f"{line}\n" for line in lines).encode())
    (out / UNFINISHED).unlink()
    return out


def _nothing_written(out: Path, source: RecordSource, skipped: list[str]) -> DatasetError:
    example = f"; e.g. {skipped[0]}" if skipped else ""
    return DatasetError(f"nothing written to {out}: none of the {len(source):,} records could be read{example}")


def _records(source: RecordSource, description: str, progress: bool, skipped: list[str]) -> Iterator[RawRecord]:
    """Every readable record in source order (shard by shard, so each shard is read once)."""
    for index in tqdm(range(len(source)), desc=description, unit="rec", disable=not progress):
        try:
            yield source.read(index)
        except BadRecord as reason:
            log.warning("skipping %s", reason)
            skipped.append(str(reason))


def refuse_occupied(out: Path) -> None:
    """A build writes into a new or empty folder only; `data build` asks before it reads its source."""
    if occupied(out) and (out / UNFINISHED).exists():  # (a killed build: its shards and a .tmp of the next)
        raise DatasetError(f"{out} holds a build that did not finish ({UNFINISHED} is there): delete the folder and "
                           "build again, or write to a new folder")
    if occupied(out):
        raise DatasetError(
            f"{out} already exists and is not empty; write to a new folder (a build never mixes with older files)"
        )


def _empty_folder(out_dir: str | Path) -> Path:
    """`out_dir`, made, marked UNFINISHED until the writer takes the mark off as its last act."""
    out = Path(out_dir)
    refuse_occupied(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / UNFINISHED).write_text("written by difftrain while it writes this folder; gone when it has finished\n")
    return out


def _folder_name(key: str, index: int, width: int, extension: str, used: set[str]) -> str:
    path = PurePosixPath(key)
    # (a hidden file or folder, ".cache/a.png", is one a folder scan passes over as a tool's: it is renamed)
    usable = (":" not in key and not path.is_absolute() and ".." not in path.parts
              and not any(part.startswith(".") for part in path.parts))
    if usable and path.suffix.lower() in IMAGE_EXTENSIONS and str(path).lower() not in used:
        return str(path)
    name, copy = f"{index:0{width}d}{extension}", 1
    while name.lower() in used:  # a later record's own key took the numbered name
        name, copy = f"{index:0{width}d}-{copy}{extension}", copy + 1
    return name


class ShardWriter:
    """Numbered shards of at most `per_shard` records, each renamed into place when it is full, its index
    written beside it at once (so whatever sees the shard done sees its index too)."""

    reader: type[ShardSource]  # the source that reads these shards back, and so indexes them

    def __init__(self, out: Path, per_shard: int, first: int = 0):
        self.out = out
        self.per_shard = per_shard
        self.first = first  # the first shard's number: a downloader writes shard k on its own
        self.names: list[str] = []
        self._raw: BinaryIO | None = None
        self._count = 0

    def shard_name(self, number: int) -> str:
        raise NotImplementedError

    def _begin(self, raw: BinaryIO) -> None:
        raise NotImplementedError

    def _write(self, record: RawRecord, number: int) -> None:
        raise NotImplementedError

    def _end(self) -> None:
        """Finish the format's own stream (gzip trailer, tar end blocks); the raw file stays open."""
        raise NotImplementedError

    def notes(self) -> list[str]:
        return []

    @property
    def number(self) -> int:
        """The number of the shard being written, or of the next one."""
        return self.first + len(self.names)

    @property
    def _partial(self) -> Path:
        return self.out / f"{self.shard_name(self.number)}.tmp"

    def add(self, record: RawRecord) -> None:
        if self._raw is None:
            self._raw = open(self._partial, "wb")
            self._begin(self._raw)
            self._count = 0
        self._write(record, self.per_shard * self.number + self._count)
        self._count += 1
        if self._count == self.per_shard:
            self._seal()

    def _seal(self) -> None:
        assert self._raw is not None
        self._end()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        self._raw = None
        name = self.shard_name(self.number)
        os.replace(self.out / f"{name}.tmp", self.out / name)
        fsync_dir(self.out)  # the rename lands on disk before the report that says the shard is done
        self.reader.write_sidecar(self.out / name)
        self.names.append(name)

    def remove(self, number: int) -> None:
        """Delete shard `number` and its index, if they are there (a download redoing an unfinished shard)."""
        shard = self.out / self.shard_name(number)
        shard.unlink(missing_ok=True)
        sidecar = sidecar_path(shard)
        assert isinstance(sidecar, Path)
        sidecar.unlink(missing_ok=True)

    def finish(self) -> list[str]:
        if self._raw is not None and self._count:
            self._seal()
        self.abandon()  # a shard opened for a record that then proved bad holds nothing
        return self.names

    def abandon(self) -> None:
        if self._raw is not None:
            self._raw.close()
            self._raw = None
            self._partial.unlink(missing_ok=True)


class LaionWriter(ShardWriter):
    reader = LaionSource

    def __init__(self, out: Path, per_shard: int, compress: bool, first: int = 0):
        super().__init__(out, per_shard, first)
        self.compress = compress
        self._stream: BinaryIO | None = None
        self.dropped_captions = 0  # records whose extra captions the format has no room for
        self.flattened = 0  # captions whose tabs or line breaks became spaces

    def shard_name(self, number: int) -> str:
        return f"part-{number:05d}" + (".gz" if self.compress else ".txt")

    def _begin(self, raw: BinaryIO) -> None:
        # mtime=0 and no file name in the header: the same data always gives the same bytes.
        self._stream = gzip_module.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0, filename="") \
            if self.compress else raw  # type: ignore[assignment]

    def _write(self, record: RawRecord, number: int) -> None:
        caption = record.captions[0] if record.captions else ""
        clean = caption.translate(_LINE_BREAKERS)
        self.flattened += clean != caption
        self.dropped_captions += len(record.captions) > 1
        assert self._stream is not None
        self._stream.write(clean.encode("utf-8") + b"\t" + self.placeholder(record) + b"\t"
                           + base64.b64encode(record.data) + b"\n")

    def placeholder(self, record: RawRecord) -> bytes:
        """The middle column, which readers skip: empty here; a downloader keeps its metadata JSON there."""
        return b""

    def _end(self) -> None:
        if self.compress and self._stream is not None:
            self._stream.close()  # writes the gzip trailer; the raw file stays open
        self._stream = None

    def notes(self) -> list[str]:
        notes = []
        if self.dropped_captions:
            notes.append(f"{self.dropped_captions} records have several captions; a laion line holds one, so "
                         "only the first was written (webdataset keeps them all)")
        if self.flattened:
            notes.append(f"{self.flattened} captions held tabs or line breaks, written as spaces "
                         "(laion is one line per record)")
        return notes


class TarWriter(ShardWriter):
    reader = WebDatasetSource

    def __init__(self, out: Path, per_shard: int, first: int = 0):
        super().__init__(out, per_shard, first)
        self._tar: tarfile.TarFile | None = None

    def shard_name(self, number: int) -> str:
        return f"shard-{number:06d}.tar"

    def _begin(self, raw: BinaryIO) -> None:
        self._tar = tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT)

    def _write(self, record: RawRecord, number: int) -> None:
        key = self.sample_key(record, number)
        extension = image_extension(record)  # before anything is added: a bad record leaves no member behind
        meta = json.dumps(self.metadata(record), ensure_ascii=False).encode()
        self._add(f"{key}{extension}", record.data)
        if record.captions:
            self._add(f"{key}.txt", record.captions[0].encode("utf-8"))
        self._add(f"{key}.json", meta)

    def sample_key(self, record: RawRecord, number: int) -> str:
        return f"{number:09d}"  # img2dataset's naming: no dots, sorts in order

    def metadata(self, record: RawRecord) -> dict:
        """The sample's .json member."""
        return {"captions": record.captions, "source": record.key}

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed times: reproducible tars
        assert self._tar is not None
        self._tar.addfile(info, io.BytesIO(data))

    def _end(self) -> None:
        if self._tar is not None:
            self._tar.close()  # end-of-archive blocks; the raw file stays open
        self._tar = None
