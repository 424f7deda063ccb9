"""Hugging Face `datasets` as a record source (`data.source: hf`).

`data.path` names one of:
- a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk` (a DatasetDict gives `data.split`);
- parquet: one file, a folder of them (searched recursively; its files split by their names as `load_dataset`
  splits a folder: `train-00000-of-00002.parquet`, `data/test/...`; a folder naming no split is all `train`), or
  a glob;
- a Hub id such as `owner/name`, loaded with `data.hf_config`, `data.split` and `data.revision`.

A row becomes a record: its image column may hold `datasets.Image` values (read undecoded,
so difftrain's own checks see the stored bytes, or the file a value names), raw bytes, or
a path (relative paths are read from the data set's folder); its caption column a string
or a list of strings, or null for no caption. A row whose image cannot be read, or whose
caption is of another type, is skipped and reported like a bad file of a folder.

Without streaming (the default) the data is an Arrow table on disk: `load_from_disk` maps
a saved folder in place; parquet files and Hub data sets are converted once into the
datasets cache (`HF_DATASETS_CACHE`) by `load_dataset`. The table is memory-mapped, so
`HFSource` reads any row at once, like a folder reads a file. Opening it reads every
image header once for the sizes aspect buckets need; that index is cached under
`index_dir`, keyed by the table's fingerprint.

Streaming (`data.streaming: true`) is for data larger than the disk: nothing is copied,
rows are read from the files as they stream by. Design choice: `HFStreamSource` is a
`ShardSource` whose shards are the stream's own shards (`IterableDataset.shard`, one data
file each: a parquet file, a tar). So it trains exactly as laion and webdataset parts do:
opening streams each shard once to count its usable rows and read their image headers
(cached per shard under `index_dir`: a local file by path, size and mtime, a Hub file by
the data set's resolved version, so a later open streams nothing); an epoch then visits
the shards in a seeded order, each shard's rows shuffled among themselves, one shard in
memory per process. The checkpoint keeps the sampler's (epoch, batch) as for every other
source, which makes resume exact. `IterableDataset.state_dict()` was not used: datasets
refills the shuffle buffer on resume (its documentation says so), so batches after a
resume would differ from an uninterrupted run's, and it would need a second kind of
checkpoint state and loader beside the sampler's. The cost of this choice is one extra
pass over the data the first time it is opened. Since the sizes are then known, aspect
buckets work too, with `data.cache.latents` on, as for the other shard sources.

`datasets` is imported only when a data set is opened: it is slow to import and an
optional extra (`pip install 'difftrain[data]'`).
"""

from __future__ import annotations

import glob
import json
import os
import re
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from difftrain.atomic import atomic_path
from difftrain.data.folder import DatasetError
from difftrain.data.folder_index import keyed_path
from difftrain.data.images import HEADER_SIZE_VERSION, BadImage, check_size, image_size_from_bytes
from difftrain.data.records import (
    INDEX_VERSION,
    BadRecord,
    RawRecord,
    RecordSource,
    ShardSource,
    describe_records,
    ShardEntry,
    caption_list,
)
from difftrain.data.setting_names import DATA_KEYS, SettingNames

ROWS_PER_BATCH = 256  # rows read at a time while indexing or streaming
# Value dtypes an image column may have besides the Image feature: encoded bytes, or paths.
_BYTES_OR_PATHS = ("binary", "large_binary", "string", "large_string")
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
_FORMS = {"disk": "save_to_disk folder", "parquet": "parquet", "hub": "Hub data set"}


@dataclass(frozen=True)
class HFOptions:
    """The `data:` keys that say what to read from a Hugging Face data set."""

    image_column: str = "image"
    caption_column: str | None = "caption"  # None: no captions
    split: str = "train"
    hf_config: str | None = None  # the Hub data set's configuration (subset) name
    revision: str | None = None
    streaming: bool = False
    # A ControlNet's conditioning images, where the data set has this column (diffusers' train_controlnet.py
    # layout: image, text, conditioning_image); without it they are computed from the images, as for a folder.
    conditioning_column: str | None = None
    # What messages call these settings (setting_names.py); not a setting itself, so not in a cache's key.
    names: SettingNames = field(default=DATA_KEYS, repr=False, compare=False)


@dataclass(frozen=True)
class _Columns:
    """How a row becomes a record: which columns, and where relative image paths are read from."""

    image: str
    caption: str | None  # None: records carry no captions
    base: Path | None
    conditioning: str | None = None  # None: records carry no conditioning image

    def record(self, row: dict, key: str) -> RawRecord:
        """The record of `row`; BadRecord names what is wrong with it."""
        data = _image_bytes(row.get(self.image), self.base)
        condition = None
        if self.conditioning is not None:
            try:
                condition = _image_bytes(row.get(self.conditioning), self.base)
            except BadRecord as reason:
                raise BadRecord(f"its conditioning image ({self.conditioning!r}): {reason}") from None
        if self.caption is None or row.get(self.caption) is None:  # a null caption is a missing one
            return RawRecord(key, data, [], condition)
        try:
            return RawRecord(key, data, caption_list(row[self.caption]), condition)
        except BadRecord as reason:
            raise BadRecord(f"{self.caption!r}: {reason}") from None

    @property
    def names(self) -> list:
        """What an index of these columns is known by."""
        return [self.image, self.caption, str(self.base), self.conditioning]


def open_hf(path: str, options: HFOptions, use_captions: bool, max_pixels: int, index_dir: Path | None,
            progress: bool) -> RecordSource:
    """The data set at `path` (see the module docstring) as a source; streamed if `options.streaming`."""
    names = options.names
    datasets = _import_datasets(names)
    form, files = _locate(path, options.split, names)
    for setting in ("hf_config", "revision"):
        if getattr(options, setting) is not None and form != "hub":
            raise DatasetError(f"{names.given(setting, getattr(options, setting))} applies to a Hub data set; "
                               f"{path} is local ({_FORMS[form]})")
    columns = _Columns(options.image_column, options.caption_column if use_captions else None,
                       _base_folder(path, form, files), options.conditioning_column)
    if options.streaming:
        return _open_stream(datasets, path, form, files, options, columns, max_pixels, index_dir, progress)
    return _open_table(datasets, path, form, files, options, columns, max_pixels, index_dir, progress)


def _import_datasets(names: SettingNames) -> Any:
    try:
        import datasets
    except ImportError:
        raise DatasetError(f"{names.given('source', 'hf')} needs the Hugging Face datasets package: "
                           "pip install 'difftrain[data]'") from None
    return datasets


def _locate(path: str, split: str, names: SettingNames) -> tuple[str, list[str]]:
    """What data.path names: ("disk", []) a save_to_disk folder, ("parquet", files of `split`), or ("hub", []) a Hub
    id."""
    if any(char in path for char in "*?["):
        files = sorted(str(Path(name).resolve()) for name in glob.glob(os.path.expanduser(path), recursive=True)
                       if Path(name).is_file())
        if not files:
            raise DatasetError(f"{names.given('path', path)} matches no file")
        return "parquet", files
    local = Path(path).expanduser()
    if local.is_dir():
        if (local / "state.json").is_file() or (local / "dataset_dict.json").is_file():
            return "disk", []
        files = sorted(str(p.resolve()) for p in local.rglob("*.parquet"))
        if not files:
            raise DatasetError(f"{names.path}: {local} holds neither a data set written by save_to_disk (state.json "
                               "or dataset_dict.json) nor .parquet files")
        return "parquet", _files_of_split(local, files, split, names)
    if local.is_file():
        return "parquet", [str(local.resolve())]
    if _HUB_ID.fullmatch(path) and not path.endswith(".parquet"):
        return "hub", []
    raise DatasetError(f"{names.path}: {path} does not exist; with {names.given('source', 'hf')} it is a folder "
                       "written by "
                       "save_to_disk, parquet (a file, a folder of them, or a glob), or a Hub id such as owner/name")


def _files_of_split(folder: Path, files: list[str], split: str, names: SettingNames) -> list[str]:
    """The parquet `files` of `folder` that are `split`'s by datasets' own naming rules (a Hub repository's layout:
    a folder cloned from the Hub holds its test split beside its train split). Files no split claims (a folder of
    images named train/ beside the parquet) are all `split`'s, as before splits were read."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        found = DataFilesDict.from_patterns(get_data_patterns(str(folder)), base_path=str(folder))
    except (OSError, ValueError):  # (datasets' EmptyDatasetError is a FileNotFoundError)
        return files
    splits = {str(name): sorted(str(Path(file).resolve()) for file in named if str(file).endswith(".parquet"))
              for name, named in found.items()}  # (datasets' keys are NamedSplits)
    splits = {name: named for name, named in splits.items() if named}
    if not splits:
        return files
    if split not in splits:
        raise DatasetError(f"{names.given('split', split)}: the parquet files of {folder} are named as the splits "
                           f"{', '.join(splits)} (as load_dataset reads a folder); choose one of them "
                           f"with {names.split}")
    return splits[split]


def _base_folder(path: str, form: str, files: list[str]) -> Path | None:
    """Where relative image paths are read from: the saved folder, or the one the parquet files share."""
    if form == "hub":
        return None  # a Hub data set has no folder here: such paths are read as they are
    if form == "disk":
        return Path(path).expanduser()  # as _locate found it (a relative image path under "~/..." was not)
    return Path(os.path.commonpath([str(Path(file).parent) for file in files]))


def _load_error(datasets: Any, path: str, form: str, exc: Exception, names: SettingNames) -> DatasetError:
    if form == "hub":
        offline = " (HF_HUB_OFFLINE is set: only data sets already in the datasets cache load)" \
            if datasets.config.HF_HUB_OFFLINE else ""
        return DatasetError(f"{names.given('path', path)} is no local folder or file, and loading it as a Hugging "
                            f"Face Hub data set failed{offline}: {exc}. Check the path, or the id with "
                            f"{names.hf_config}, {names.split} and {names.revision}")
    return DatasetError(f"{names.path}: cannot read {path} as a Hugging Face data set: {exc}")


def _load_errors(datasets: Any) -> tuple[type[Exception], ...]:
    # What datasets raises for data it cannot find or read: network and file errors, unknown configs and
    # splits (ValueError), and its own errors; anything else is a bug and keeps its traceback.
    return OSError, ValueError, datasets.exceptions.DatasetsError


def _select_columns(datasets: Any, table: Any, columns: _Columns, where: str,
                    names: SettingNames) -> tuple[Any, _Columns]:
    """`table` cut to the columns records are made of, images left encoded; a missing column is refused, but
    for the conditioning column (without it, conditioning images are computed from the images)."""
    held = table.column_names  # None for a stream whose features are unknown until read
    if columns.conditioning is not None and (held is None or columns.conditioning not in held):
        columns = replace(columns, conditioning=None)
    for setting, column in (("image_column", columns.image), ("caption_column", columns.caption)):
        if column is not None and held is not None and column not in held:
            advice = (f" ({names.without_captions} reads it without captions)" if setting == "caption_column"
                      else "")
            raise DatasetError(f"{names.given(setting, column)}: the data set {where} has no such column; its "
                               f"columns: {', '.join(held)}{advice}")
    table = table.select_columns([c for c in (columns.image, columns.caption, columns.conditioning) if c is not None])
    if columns.conditioning is not None and isinstance((table.features or {}).get(columns.conditioning),
                                                       datasets.Image):
        table = table.cast_column(columns.conditioning, datasets.Image(decode=False))
    feature = (table.features or {}).get(columns.image)
    if isinstance(feature, datasets.Image):
        # The stored bytes rather than a PIL image: difftrain's checks (bombs, EXIF, modes) decode them.
        return table.cast_column(columns.image, datasets.Image(decode=False)), columns
    # pandas, pyarrow and polars write an image column as a plain {bytes, path} struct, without the
    # Hugging Face metadata that would make it an Image feature; _image_bytes reads it the same.
    stored = getattr(feature.get("bytes"), "dtype", None) if isinstance(feature, dict) else None
    image_struct = stored in ("binary", "large_binary")
    if feature is not None and not image_struct and not (
            isinstance(feature, datasets.Value) and feature.dtype in _BYTES_OR_PATHS):
        raise DatasetError(f"{names.given('image_column', columns.image)}: in {where} it holds {feature}, not images; "
                           "name a column of images (the Image feature), image bytes or image paths")
    return table, columns


def _image_bytes(value: object, base: Path | None) -> bytes:
    """The encoded image a cell holds: an Image feature value ({"bytes", "path"}), raw bytes, or a file path."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str) and value:
        path = base / value if base is not None else Path(value)  # an absolute value stays itself
        try:
            return path.read_bytes()
        except OSError as exc:
            raise BadRecord(f"cannot read the image file {path}: {exc.strerror}") from None
    if value is None:
        raise BadRecord("no image (the cell is empty)")
    raise BadRecord(f"the image cell holds {type(value).__name__}, not image bytes or a path")


def _rows(batches: Iterable[dict[str, list]]) -> Iterator[dict]:
    """Rows out of column batches ({column: [values]})."""
    for batch in batches:
        for values in zip(*batch.values()):
            yield dict(zip(batch, values))


# --- an Arrow table on disk -----------------------------------------------------------------


class HFSource(RecordSource):
    """A memory-mapped Arrow table: any row is read at once."""

    def __init__(self, table: Any, columns: _Columns, split: str | None, index: dict, description: str,
                 files: list[str]):
        self._table, self._columns, self._split, self._files = table, columns, split, files
        self._rows = np.asarray(index["rows"], dtype=np.int64)
        self.sizes = np.asarray(index["sizes"], dtype=np.int32).reshape(-1, 2)
        self.skipped = [tuple(item) for item in index["skipped"]]
        self.uncaptioned = index["uncaptioned"]
        self.shard_sizes = None
        self.description = description
        self.has_conditioning = columns.conditioning is not None
        # An Image column from an image folder holds paths, not bytes (as a column of paths does).
        first = table[int(self._rows[0])].get(columns.image) if len(self._rows) else None
        self.reads_unlisted_files = isinstance(first, str) or (isinstance(first, dict) and not first.get("bytes"))

    def __len__(self) -> int:
        return len(self._rows)

    def read(self, index: int) -> RawRecord:
        row = int(self._rows[index])
        key, where = _row_names(self._split, row)
        try:
            return self._columns.record(self._table[row], key)
        except BadRecord as reason:
            raise BadRecord(f"{where}: {reason}") from None

    def stored_files(self) -> list[tuple[str, str, list[str]]]:
        return [(file, file, []) for file in self._files]  # captions are inside


def _open_table(datasets: Any, path: str, form: str, files: list[str], options: HFOptions, columns: _Columns,
                max_pixels: int, index_dir: Path | None, progress: bool) -> HFSource:
    table, split = _load_table(datasets, path, form, files, options)
    where = f"{path}, split {split}" if split else path
    table, columns = _select_columns(datasets, table, columns, where, options.names)
    index = _cached_index(table, columns, split, max_pixels, index_dir, progress)
    if not len(index["rows"]):
        skipped = index["skipped"]
        detail = f"; e.g. {skipped[0][0]}: {skipped[0][1]}" if skipped else " (it has no rows)"
        raise DatasetError(f"no usable records in {where}{detail}")
    head = f"hf {_FORMS[form]}" + (f", split {split}" if split else "")
    description = describe_records(head, len(index["rows"]), "records", len(index["skipped"]), index["uncaptioned"],
                            where=path)
    # What resume compares: the user's parquet files, else the Arrow files the table maps.
    stored = files if form == "parquet" else [entry["filename"] for entry in table.cache_files]
    return HFSource(table, columns, split, index, description, stored)


def _row_names(split: str | None, row: int) -> tuple[str, str]:
    """(key, where) of a table's row: ("train:17", "train row 17"), or ("row:17", "row 17") with no split."""
    return (f"{split}:{row}", f"{split} row {row}") if split else (f"row:{row}", f"row {row}")


def _load_table(datasets: Any, path: str, form: str, files: list[str], options: HFOptions) -> tuple[Any, str | None]:
    """The Arrow table data.path names, and its split (None: a saved Dataset, which has no splits)."""
    try:
        if form == "disk":
            loaded = datasets.load_from_disk(path)
        elif form == "parquet":
            loaded = datasets.load_dataset("parquet", data_files={options.split: files}, split=options.split)
        else:
            loaded = datasets.load_dataset(path, options.hf_config, split=options.split, revision=options.revision)
    except _load_errors(datasets) as exc:
        raise _load_error(datasets, path, form, exc, options.names) from None
    if not isinstance(loaded, datasets.DatasetDict):
        return loaded, None if form == "disk" else options.split
    if options.split not in loaded:
        raise DatasetError(f"{options.names.given('split', options.split)}: {path} holds the splits "
                           f"{', '.join(loaded)}; choose one of them with {options.names.split}")
    return loaded[options.split], options.split


def _cached_index(table: Any, columns: _Columns, split: str | None, max_pixels: int, index_dir: Path | None,
                  progress: bool) -> dict:
    """`_index_table`'s result, from `index_dir` when this table (by its fingerprint) was indexed before."""
    if index_dir is None:
        return _index_table(table, columns, split, max_pixels, progress)
    # The fingerprint changes with the data and with every operation on it (the column selection included).
    identity = [INDEX_VERSION, HEADER_SIZE_VERSION, "hf", table._fingerprint, split, *columns.names, max_pixels]
    cache = keyed_path(index_dir, "hf", identity, ".npz")
    try:
        with np.load(cache) as saved:
            return {"rows": saved["rows"], "sizes": saved["sizes"], **json.loads(str(saved["meta"]))}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        pass  # not cached yet, or a damaged entry: index again
    index = _index_table(table, columns, split, max_pixels, progress)
    meta = json.dumps({"skipped": index["skipped"], "uncaptioned": index["uncaptioned"]})
    with atomic_path(cache, sync=False) as tmp, open(tmp, "wb") as file:  # an index is cheap to rebuild
        np.savez(file, rows=np.asarray(index["rows"], dtype=np.int64),
                 sizes=np.asarray(index["sizes"], dtype=np.int32).reshape(-1, 2), meta=meta)
    return index


def _index_table(table: Any, columns: _Columns, split: str | None, max_pixels: int, progress: bool) -> dict:
    """The usable rows with their image sizes (from the headers), and every row left out with its reason."""
    rows: list[int] = []
    sizes: list[tuple[int, int]] = []
    skipped: list[tuple[str, str]] = []
    uncaptioned = 0
    everything = _rows(table.iter(batch_size=ROWS_PER_BATCH))
    bar = tqdm(everything, total=len(table), desc="indexing hf rows", unit="row", disable=not progress, leave=False)
    for number, row in enumerate(bar):
        key, where = _row_names(split, number)
        try:
            record = columns.record(row, key)
            width, height = image_size_from_bytes(record.data)
            check_size(width, height, max_pixels)
            if record.conditioning is not None:  # one that cannot be read skips its record now, as a folder's does
                try:
                    check_size(*image_size_from_bytes(record.conditioning), max_pixels)
                except BadImage as reason:
                    raise BadRecord(f"its conditioning image ({columns.conditioning!r}): {reason}") from None
        except (BadRecord, BadImage) as reason:
            skipped.append((where, str(reason)))
            continue
        rows.append(number)
        sizes.append((width, height))
        uncaptioned += not record.captions
    return {"rows": rows, "sizes": sizes, "skipped": skipped, "uncaptioned": uncaptioned}


# --- a stream ---------------------------------------------------------------------------------


class HFStreamSource(ShardSource):
    """A streamed data set read as shards: the stream's own, one data file each (see the module docstring)."""

    kind = "hf"
    position_noun = "row"

    def __init__(self, stream: Any, labels: list[str], files: list[str], version: str, columns: _Columns,
                 where: str, max_pixels: int, index_dir: Path | None, progress: bool):
        self._stream, self._columns, self._version = stream, columns, version
        self._shards = list(zip(labels, files))
        self._numbers = {label: number for number, label in enumerate(labels)}
        # `where` only names the data in messages: the shards come from _shard_list.
        super().__init__(where, columns.caption is not None, max_pixels, index_dir, progress)  # type: ignore[arg-type]
        self.has_conditioning = columns.conditioning is not None

    def _shard_list(self, path: Path, names: SettingNames) -> tuple[list[tuple[str, Path]], list[tuple[str, str]]]:
        return [(label, Path(file)) for label, file in self._shards], []

    def _identity(self, label: str, path: Path) -> list | None:
        # A local file is known by its path, size and mtime; a Hub file by the data set's resolved version
        # (datasets pins it to the commit it resolved), which changes with any file of the data set.
        found = super()._identity(label, path) or [INDEX_VERSION, HEADER_SIZE_VERSION, self.kind, self._version, label,
                                                   self._max_pixels, self._use_captions]
        return [*found, *self._columns.names]

    def stored_files(self) -> list[tuple[str, str, list[str]]]:
        # A Hub file has no size or mtime here: its key carries the resolved version, so a new commit reads as changed.
        return [(label if Path(path).is_file() else f"{label}@{self._version}", path, [])
                for label, path in zip(self._labels, self._paths)]

    def _entries(self, label: str, path: Path) -> Iterator[ShardEntry]:
        import pyarrow

        shard = self._stream.shard(num_shards=self._stream.num_shards, index=self._numbers[label])
        try:
            # .iter, not iter(): inside a DataLoader worker, iter() would split the shard among the workers.
            for number, row in enumerate(_rows(shard.iter(batch_size=ROWS_PER_BATCH))):
                key, where = f"{label}:{number}", f"{label} row {number}"
                try:
                    yield ShardEntry(number, key, where, self._columns.record(row, key))
                except BadRecord as reason:
                    yield ShardEntry(number, key, where, None, str(reason))
        except pyarrow.ArrowException as exc:  # a damaged file: the shard source keeps the rows before it
            raise OSError(f"{label}: {exc}") from exc


def _open_stream(datasets: Any, path: str, form: str, files: list[str], options: HFOptions, columns: _Columns,
                 max_pixels: int, index_dir: Path | None, progress: bool) -> HFStreamSource:
    if form == "disk":
        raise DatasetError(f"{options.names.streaming}: {path} is a folder written by save_to_disk, which is read "
                           f"in place (memory-mapped) without copying; {options.names.without_streaming}")
    try:
        if form == "parquet":
            builder = datasets.load_dataset_builder("parquet", data_files={options.split: files})
        else:
            builder = datasets.load_dataset_builder(path, options.hf_config, revision=options.revision)
        stream = builder.as_streaming_dataset(split=options.split)
    except _load_errors(datasets) as exc:
        raise _load_error(datasets, path, form, exc, options.names) from None
    where = f"{path}, split {options.split}, streamed"
    stream, columns = _select_columns(datasets, stream, columns, where, options.names)
    shard_files = [str(file) for file in (builder.config.data_files or {}).get(options.split, [])]
    if len(shard_files) == stream.num_shards:
        labels = _labels(shard_files)
    else:  # shards that are not one file each are named by number, and known by the data set's version
        labels = shard_files = [f"shard-{number:05d}" for number in range(stream.num_shards)]
    version = f"{builder.dataset_name}/{builder.config_id}"
    return HFStreamSource(stream, labels, shard_files, version, columns, where, max_pixels, index_dir, progress)


def _labels(files: list[str]) -> list[str]:
    """Each file by its path below the folder (or Hub repository) they all share, e.g. data/train-00000.parquet."""
    shared = os.path.commonprefix(files) if len(files) > 1 else files[0]
    cut = shared.rfind("/") + 1
    return [file[cut:] for file in files]
