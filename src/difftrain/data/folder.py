"""Reading an image folder into records: which files are images and what their captions are.

Captions come from Hugging Face style metadata files, `metadata.jsonl` or `metadata.csv`
(`file_name` relative to the file's own folder, caption under `text`), from a `.txt` file
beside each image, or not at all. A record may have a second image, its conditioning image (ControlNet): a file
named by a metadata column (diffusers' `conditioning_image`) or a file of the same name in
a conditioning folder; those files are never training images themselves. Every image is
decoded once here, so a bad file is found and reported before training starts rather
than at step 40,000; with an `index_dir`, only images new or changed since the last scan
are (folder_index.py).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from tqdm.auto import tqdm

from difftrain.data.folder_index import ImageChecks
from difftrain.data.images import IMAGE_EXTENSIONS, BadImage, check_size, image_size_from_file
from difftrain.data.setting_names import DATA_KEYS, SettingNames
from difftrain.errors import DifftrainError

CAPTION_KEYS = ("text", "caption")
csv.field_size_limit(2**31 - 1)  # for csv_rows: csv's own 131,072 characters stopped a file at one long caption


class DatasetError(DifftrainError):
    """A dataset that cannot be trained on at all; the message says why and what to do."""


# In a folder `data build`, `data curate` or `data download` is writing, until it has finished: a folder that
# holds it is refused as data (its shards or images are some of the records, read as if all).
UNFINISHED = ".difftrain-unfinished"


def require_folder(root: Path, names: SettingNames = DATA_KEYS) -> None:
    if not root.is_dir():
        raise DatasetError(f"{names.path}: {root} is not a folder; create it or point {names.path} at your images")
    refuse_unfinished(root, names)


def refuse_unfinished(root: Path, names: SettingNames = DATA_KEYS) -> None:
    if (root / UNFINISHED).exists():
        raise DatasetError(f"{names.path}: {root} is the output of a data build, curate or download that did not "
                           f"finish ({UNFINISHED} is there): only part of its records are written. Run the download "
                           "again (it resumes), or build again into a new folder")


@dataclass(frozen=True)
class Record:
    path: Path
    caption: str | None
    # Upright size after EXIF rotation, from the decode the scan already does (aspect buckets need it).
    width: int = 0
    height: int = 0
    captions: tuple[str, ...] | None = None  # all of them, when a metadata.jsonl lists several
    conditioning: Path | None = None  # its conditioning image file, when the scan looked for one
    digest: bytes | None = None  # SHA-256 of the image file's bytes as the scan decoded them
    condition_digest: bytes | None = None  # the same of its conditioning image file


@dataclass(frozen=True)
class ConditioningFiles:
    """Where each image's conditioning image is: a file named by `column` of its metadata entry,
    or, when `folder` is set, the file with the image's relative name (any image extension) there."""

    column: str = "conditioning_image"
    folder: Path | None = None

    def describe(self) -> str:
        return f"folder {self.folder}" if self.folder else f"column {self.column!r}"


@dataclass
class FolderScan:
    root: Path
    records: list[Record]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason): images left out
    caption_source: str = "none"
    missing_captions: list[str] = field(default_factory=list)
    conditioning_source: str | None = None  # how conditioning files were found; None: none were
    # (file or metadata line, reason): caption files and metadata lines that could not be used. No image is left
    # out for one (it is used uncaptioned, or with another caption), so they are not counted as skipped records.
    notes: list[tuple[str, str]] = field(default_factory=list)

    def report_lines(self) -> list[str]:
        lines = [f"{len(self.records)} usable images in {self.root} (captions: {self.caption_source})"]
        if self.skipped:
            lines.append(f"{len(self.skipped)} files skipped:")
            lines += [f"  {name}: {reason}" for name, reason in self.skipped]
        lines += caption_problem_lines(self.notes)
        if self.missing_captions:
            lines.append(f"{len(self.missing_captions)} images have no caption")
        return lines


# Folders that hold other programs' copies of the images, never training data: Synology's thumbnails,
# macOS's resource forks in zip files.
TOOL_FOLDERS = ("@eaDir", "__MACOSX", "$RECYCLE.BIN")


def _hidden(relative: Path) -> bool:
    """A dot-file, or anything under a dot-folder or a tool's folder (relative to the data folder)."""
    return any(part.startswith(".") or part in TOOL_FOLDERS for part in relative.parts)


def visible_files(root: Path) -> list[Path]:
    """Everything under `root` a folder source looks at: hidden and tool folders left out."""
    return [p for p in Path(root).rglob("*") if not _hidden(p.relative_to(root))]


def image_paths(paths: Iterable[Path]) -> list[Path]:
    """The image files among `paths`, sorted: what a folder source trains on."""
    return sorted(p for p in paths if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def caption_problem_lines(notes: list[tuple[str, str]]) -> list[str]:
    """A report's lines for a source's `notes` (none: no lines)."""
    if not notes:
        return []
    return [f"{len(notes)} caption problems (no image left out for them):",
            *(f"  {where}: {reason}" for where, reason in notes)]


def not_utf8(raw: bytes, exc: UnicodeDecodeError, consequence: str = "") -> str:
    """Why a file's bytes are refused (never guessed at: a replaced character would silently change a caption)."""
    then = f"{consequence}; " if consequence else ""
    return f"not valid UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}); {then}save the file as UTF-8"


def csv_rows(lines: Iterable[str], delimiter: str = ",", reader=csv.reader):
    """`reader` (csv.reader, csv.DictReader) with no cell-size limit: csv's own 131,072 characters stopped a whole
    file at one long caption."""
    return reader(lines, delimiter=delimiter)


def jsonl_entries(lines: Iterable[bytes], label: str, problems: list[tuple[str, str]]) -> Iterator[tuple[str, Any]]:
    """(where, parsed value) for each non-blank line of a file opened in binary mode; lines
    that are not UTF-8 or not JSON go to `problems` (a replaced character would silently
    become part of a caption)."""
    for number, raw in enumerate(lines, 1):
        where = f"{label} line {number}"
        try:
            # utf-8-sig on the first line: Windows Notepad and PowerShell 5 start files with a BOM, which
            # json.loads refuses, and the first record then lost its caption.
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            problems.append((where, not_utf8(raw, exc)))
            continue
        if not line.strip():
            continue
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append((where, f"not valid JSON: {exc.msg}"))


def csv_entries(raw: bytes, label: str, problems: list[tuple[str, str]]) -> Iterator[tuple[str, Any]]:
    """(where, row as a dict) for each row of a metadata.csv, as `jsonl_entries` for a jsonl; a file
    that is not UTF-8 or has no `file_name` column is reported whole."""
    try:
        text = raw.decode("utf-8-sig")  # Excel's "CSV UTF-8" starts with a BOM
    except UnicodeDecodeError as exc:
        problems.append((label, not_utf8(raw, exc)))
        return
    rows = csv_rows(io.StringIO(text, newline=""), reader=csv.DictReader)
    if "file_name" not in (rows.fieldnames or ()):
        problems.append((label, f"has no 'file_name' column (its header: {', '.join(rows.fieldnames or ())}); "
                               "the first row must name the columns, e.g. file_name,text"))
        return
    try:
        for row in rows:
            # line_num counts the file's lines, so a caption spanning lines still gives where its row ends.
            yield f"{label} line {rows.line_num}", row
    except csv.Error as exc:
        problems.append((f"{label} line {rows.line_num}", f"not valid CSV: {exc}; the rest of the file is not read"))


METADATA_FILES = ("metadata.jsonl", "metadata.csv")


def metadata_files(paths: Iterable[Path]) -> list[Path]:
    """The metadata files among a folder's `paths` (visible ones), sorted; a folder with both kinds is refused, as
    datasets' imagefolder does."""
    found = sorted(path for path in paths if path.name in METADATA_FILES)
    both = sorted(folder for folder, count in Counter(path.parent for path in found).items() if count > 1)
    if both:
        raise DatasetError(f"{both[0]} holds both metadata.jsonl and metadata.csv; keep one of them")
    return found


@dataclass(frozen=True)
class MetadataEntry:
    caption: str  # the one caption `text`/`caption` gives
    captions: list[str] | None  # a `captions` list (export_folder writes one for several captions), if any
    where: str  # "metadata.jsonl line N" (or .csv), for reports
    conditioning: object = None  # the value of the conditioning column, as stored
    folder: Path | None = None  # the folder of its metadata file: relative paths are read from there


def path_resolver() -> Callable[[Path], Path]:
    """Path.resolve, with each folder resolved once: a resolve walks every component (an lstat
    each), which costs a scan more than anything else once decodes come from the index. For one
    scan only: a folder or link may change before the next."""
    folder = cache(Path.resolve)

    def resolve(path: Path) -> Path:
        if path.name in ("", "..") or path.is_symlink():
            return path.resolve()
        return folder(path.parent) / path.name

    return resolve


def read_metadata(root: Path, files: list[Path], notes: list[tuple[str, str]], conditioning_column: str | None = None,
                  resolve: Callable[[Path], Path] = Path.resolve) -> dict[Path, MetadataEntry]:
    """Every metadata.jsonl and metadata.csv (`files`, under `root`): image path -> its entry. The one reader of
    these files.

    A conditioning column's value is kept as stored, with the folder it is relative to.

    A second line for the same `file_name` is reported and ignored: the first one is kept. Lines that cannot be
    used go to `notes`: they lose no image of their own (an image no usable line names is used without them).
    """
    entries: dict[Path, MetadataEntry] = {}
    for meta in files:
        label = str(meta.relative_to(root))
        with open(meta, "rb") as file:
            rows = (csv_entries(file.read(), label, notes) if meta.suffix == ".csv"
                    else jsonl_entries(file, label, notes))
            for where, entry in rows:
                name = entry.get("file_name") if isinstance(entry, dict) else None
                # the first caption key with a value: a table exported with both columns has nulls in one
                caption = next((entry[k] for k in CAPTION_KEYS if isinstance(entry, dict) and entry.get(k) is not None),
                               None)
                if not isinstance(name, str) or not isinstance(caption, str):
                    notes.append((where, "needs a 'file_name' string and a 'text' (or 'caption') string"))
                    continue
                path = resolve(meta.parent / name)
                if path in entries:
                    notes.append((where, f"{name} is listed again; the caption of {entries[path].where} is kept"))
                    continue
                listed = entry.get("captions")
                if not (isinstance(listed, list) and all(isinstance(c, str) for c in listed)):
                    listed = None
                value = entry.get(conditioning_column) if conditioning_column else None
                entries[path] = MetadataEntry(caption, listed, where, value, meta.parent)
    return entries


def _read_caption_file(path: Path, root: Path, notes: list[tuple[str, str]]) -> str | None:
    """A .txt caption (a UTF-8 byte-order mark is dropped); one that is not UTF-8 is reported, not
    guessed at: a replaced character would silently change what the model learns."""
    if not path.is_file():
        return None
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        notes.append((str(path.relative_to(root)), not_utf8(raw, exc, "its image is used uncaptioned")))
        return None


def _choose_caption_source(mode: str, metadata: list[Path], images: list[Path], extension: str) -> str:
    if mode != "auto":
        return mode
    if metadata:
        return "metadata"
    if any(image.with_suffix(extension).is_file() for image in images):
        return "txt"
    return "none"


def conditioning_path(base: Path, value: object) -> Path | None:
    """A conditioning column's value as a file path (relative values are read from `base`); None if not a path."""
    return (base / value).resolve() if isinstance(value, str) and value else None


def conditioning_file(name: str, value: object, base: Path, files: ConditioningFiles,
                      max_pixels: int) -> tuple[Path | None, str | None]:
    """(the conditioning file of the image `name`, None) or (None, why it has none).

    `name` is the image's path relative to the data (the conditioning folder pairs by it);
    `value` its entry's conditioning column as stored, a path relative to `base`.
    """
    if files.folder is not None:
        relative = Path(name)
        if relative.is_absolute() or ".." in relative.parts:
            return None, (f"the conditioning folder pairs images by their path inside the data, and {name} is not "
                          f"one; name its conditioning image in the {files.column!r} column instead")
        stem = files.folder / relative.parent / relative.stem
        candidates = [stem.parent / (stem.name + ext) for ext in (relative.suffix, *IMAGE_EXTENSIONS)]
        path = next((candidate for candidate in candidates if candidate.is_file()), None)
        if path is None:
            return None, f"no conditioning image {stem}.* in the conditioning folder"
    elif value is None or value == "":
        return None, f"its entry has no {files.column!r} (the conditioning image); add one, or drop the image"
    elif not isinstance(value, str):
        return None, f"{files.column!r} must be a path string, found {type(value).__name__}"
    else:
        path = conditioning_path(base, value)
    if not path.is_file():
        return None, f"conditioning image {path} does not exist"
    try:
        check_size(*image_size_from_file(path), max_pixels)
    except BadImage as reason:
        return None, f"conditioning image {path}: {reason}"
    return path, None


def scan_folder(
    root: str | Path,
    captions: str = "auto",
    caption_extension: str = ".txt",
    max_pixels: int = 64_000_000,
    progress: bool = True,
    conditioning: ConditioningFiles | None = None,
    index_dir: str | Path | None = None,
    names: SettingNames = DATA_KEYS,
) -> FolderScan:
    """List every decodable image under `root` with its caption (and conditioning file); report everything else.

    With `index_dir`, images unchanged since the last scan (same size and mtime) are not
    decoded again: their outcome comes from the folder's index there (folder_index.py).

    With `conditioning` by column and no metadata entry holding that column, the records get
    no conditioning file (`conditioning_source` None): the caller derives it from the image.

    `names`: what its messages call the settings (setting_names.py).
    """
    root = Path(root)
    require_folder(root, names)
    visible = visible_files(root)  # one walk: images and metadata
    named = [path for path in visible if path.suffix.lower() in IMAGE_EXTENSIONS]
    images = image_paths(named)
    files = metadata_files(visible)
    source = _choose_caption_source(captions, files, images, caption_extension)
    # image_paths() keeps files only: an image name whose link leads nowhere would be left out unsaid. (Only the
    # names that are not files are looked at again: no second system call per image.)
    dangling = [path for path in sorted(set(named) - set(images)) if path.is_symlink() and not path.exists()]
    skipped = [(str(path.relative_to(root)), f"a link to {os.readlink(path)}, which does not exist")
               for path in dangling]
    column = conditioning.column if conditioning and conditioning.folder is None else None
    wants_metadata = source == "metadata" or (column and files)
    resolve = path_resolver()
    notes: list[tuple[str, str]] = []
    metadata = read_metadata(root, files, notes, column, resolve) if wants_metadata else {}
    if source == "metadata" and not metadata:
        why = f": {notes[0][0]}: {notes[0][1]}" if notes else ""
        raise DatasetError(f"no usable metadata.jsonl or metadata.csv entries under {root}{why}")
    if conditioning and column and not any(entry.conditioning not in (None, "") for entry in metadata.values()):
        conditioning = None  # no file names one: conditioning images are computed from the images
    if conditioning:
        # Conditioning files are the records' second images, not records of their own, unless an
        # entry lists one as its file_name too (a condition that is an image of the set).
        held = {conditioning_path(entry.folder, entry.conditioning) for entry in metadata.values()} - set(metadata)
        folder = conditioning.folder.resolve() if conditioning.folder else None
        if folder and root.resolve().is_relative_to(folder):
            raise DatasetError(f"the conditioning folder {conditioning.folder} holds {names.path} {root}: its files "
                               "are never training images, so none would be left; give the conditioning images a "
                               f"folder of their own (one inside {names.path} works)")
        images = [p for p in images
                  if (path := resolve(p)) not in held and not (folder and path.is_relative_to(folder))]

    checks = ImageChecks(root, max_pixels, Path(index_dir) if index_dir is not None else None)
    records: list[Record] = []
    missing: list[str] = []
    for image_path in tqdm(images, desc="checking images", unit="img", disable=not progress, leave=False):
        name = str(image_path.relative_to(root))
        outcome, digest = checks.outcome(image_path, name)
        if isinstance(outcome, str):
            skipped.append((name, outcome))
            continue
        width, height = outcome
        caption, listed, condition = None, None, None
        entry = metadata.get(resolve(image_path)) if metadata else None  # one resolve per image: an lstat each
        if conditioning:
            value, base = (entry.conditioning, entry.folder) if entry else (None, root)
            condition, problem = conditioning_file(name, value, base, conditioning, max_pixels)
            if problem:
                skipped.append((name, problem))
                continue
            # Decoded once and remembered like the image, so a cached start need not read it to know its hash.
            condition_outcome, condition_digest = checks.outcome(condition, f"conditioning:{condition}")
            if isinstance(condition_outcome, str):
                skipped.append((name, f"conditioning image {condition}: {condition_outcome}"))
                continue
        if source == "metadata" and entry is not None:
            caption, listed = entry.caption, entry.captions
        elif source == "txt" or (source == "metadata" and captions == "auto"):
            # With captions: auto, a metadata file (a subfolder's, say) does not speak for the images it
            # does not list: their caption files still caption them, as with no metadata file at all.
            caption = _read_caption_file(image_path.with_suffix(caption_extension), root, notes)
        if source != "none" and caption is None:
            missing.append(name)
        records.append(Record(image_path, caption, width, height, tuple(listed) if listed is not None else None,
                              condition, digest, condition_digest if conditioning else None))

    listed_absent = set(metadata) - {resolve(r.path) for r in records} if metadata else set()
    for absent in sorted(listed_absent - {resolve(root / n) for n, _ in skipped}):
        if not absent.exists():
            skipped.append((str(absent), f"listed in {metadata[absent].where} but the file does not exist"))

    checks.save()
    if progress and checks.path is not None:
        tqdm.write(checks.summary(), file=sys.stderr)
    if not records:
        detail = f"; {len(skipped)} files were unusable, e.g. {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise DatasetError(
            f"no usable images under {root} (looked for {', '.join(IMAGE_EXTENSIONS)}){detail}"
        )
    return FolderScan(root, records, skipped, source, missing, conditioning.describe() if conditioning else None,
                      notes)
