"""Downloading a table of image URLs into shards (`difftrain data download`), img2dataset-style.

The input (parquet, csv/tsv, jsonl, or a .txt of one URL per line) is streamed row by row.
Rows go to output shards by position: shard k holds input rows [k*K, (k+1)*K), so which
rows a shard holds never depends on what downloaded. A pool of threads fetches the rows
(http and https only, bounded size, time and redirects, retries with backoff for what may
pass), decodes and checks each image through images.py, resizes and re-encodes it; the
results are written in input order through shards.py's writers, so `open_source("laion" |
"webdataset", OUT)` and `difftrain data build` read the output as they read their own.

Each shard is renamed into place when complete, its index written beside it at once
(`shard-000000.tar.index.json`, see records.py: opening the output then reads no shard),
then its report (`reports/NNNNNN.json`: successes, failures with url and reason, bytes,
times) is written. A shard with a report is done: a re-run skips it and redoes only the
others (shard file and index both written anew), so a killed download continues
without duplicates. `--shard i/N` (or RANK/WORLD_SIZE from accelerate or torchrun) gives a
process the shards k with k % N == i, so N processes share one OUT. Whichever process
finishes and finds every shard done merges: it writes `download_report.json` and, last,
`filelist.txt` (the shard list the sources read); `--merge-only` does the same on demand.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import logging
import math
import os
import sys
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from http.client import HTTPException, IncompleteRead
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

import requests
import urllib3
from PIL import Image
from tqdm.auto import tqdm
from urllib3.exceptions import ReadTimeoutError
from urllib3.util import parse_url

from difftrain.atomic import write_text
from difftrain.data.folder import UNFINISHED, DatasetError, csv_rows, jsonl_entries
from difftrain.data.images import BadImage, allow_pixels, check_size, image_size_from_bytes, load_image_bytes
from difftrain.data.records import BadRecord, caption_list, is_utf8
from difftrain.data.remote import retrying
from difftrain.data.shards import FORMATS, LaionWriter, ShardWriter, TarWriter
from difftrain.data.sources import LIST_NAME, RawRecord

log = logging.getLogger(__name__)

INPUT_KINDS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
               ".txt": "txt"}
RESIZE_MODES = ("keep_ratio", "center_crop", "border", "no")
ENCODE_FORMATS = {"jpg": ("JPEG", ".jpg"), "png": ("PNG", ".png"), "webp": ("WEBP", ".webp")}
SCHEMES = ("http", "https")
REPORTS_DIR = "reports"
REPORT_NAME = "download_report.json"
REPORT_VERSION = 1
USER_AGENT = f"difftrain/{version('difftrain')} (image downloader for training data, img2dataset-style)"
# X-Robots-Tag directives by which a site asks not to be used for AI training (img2dataset skips the same).
OPT_OUT_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")
# Fields every record's metadata gets; an input column of the same name is dropped for ours.
RESERVED = ("captions", "url", "key", "sha256", "width", "height", "original_width", "original_height")
_CHUNK = 64 * 1024
_PARQUET_BATCH = 4096


@dataclass
class DownloadOptions:
    url_col: str = "url"
    caption_col: str | None = "caption"  # None or "": no captions
    format: str = "webdataset"
    per_shard: int = 1000  # input rows per output shard
    gzip: bool = True  # laion parts
    workers: int = 16
    timeout: float = 10.0  # seconds for one request, connect to last byte
    retries: int = 2  # extra attempts after a timeout, a connection error, a 5xx or a 429
    backoff: float = 1.0  # seconds before the first retry, doubled for each next one
    max_redirects: int = 10
    max_bytes: int = 20_000_000  # per response; reading stops past it
    respect_opt_out: bool = True  # skip responses whose X-Robots-Tag holds an OPT_OUT_DIRECTIVES entry
    resize: int | None = None  # target side in pixels; None keeps the size
    resize_mode: str = "keep_ratio"
    upscale: bool = False  # let a resize enlarge images smaller than the target
    encode_format: str = "jpg"
    encode_quality: int = 95  # jpg and webp; png is lossless
    max_pixels: int = 64_000_000  # decompression-bomb guard, as data.max_image_pixels
    allow_private: bool = False  # fetch from loopback, private and link-local addresses too (a list you trust)
    shard: tuple[int, int] | None = None  # (i, N): only the shards k with k % N == i
    progress: bool = True

    def check(self) -> None:
        problems = []
        if self.format not in FORMATS:
            problems.append(f"--format {self.format}: choose one of {', '.join(FORMATS)}")
        if self.resize_mode not in RESIZE_MODES:
            problems.append(f"--resize-mode {self.resize_mode}: choose one of {', '.join(RESIZE_MODES)}")
        if self.encode_format not in ENCODE_FORMATS:
            problems.append(f"--encode-format {self.encode_format}: choose one of {', '.join(ENCODE_FORMATS)}")
        for name, value, low in (("--per-shard", self.per_shard, 1), ("--workers", self.workers, 1),
                                 ("--retries", self.retries, 0), ("--max-bytes", self.max_bytes, 1),
                                 ("--resize", 1 if self.resize is None else self.resize, 1)):
            if value < low:
                problems.append(f"{name} {value}: must be at least {low}")
        if not 1 <= self.encode_quality <= 100:
            problems.append(f"--encode-quality {self.encode_quality}: give 1 to 100")
        if self.timeout <= 0:
            problems.append(f"--timeout {self.timeout}: must be above 0 seconds")
        if self.shard is not None and not 0 <= self.shard[0] < self.shard[1]:
            problems.append(f"--shard {self.shard[0]}/{self.shard[1]}: give i/N with 0 <= i < N")
        if problems:
            raise DatasetError("; ".join(problems))


# --- the input table ----------------------------------------------------------------------


@dataclass
class Row:
    index: int  # position in the input: decides the shard and the sample key
    url: str
    captions: list[str]
    extra: dict[str, Any]  # every other column, JSON-safe
    problem: str | None = None  # why the row has nothing to fetch


class UrlTable:
    """The input's rows, streamed: opening it reads the columns and counts the rows, nothing more."""

    def __init__(self, path: str | Path, url_col: str = "url", caption_col: str | None = "caption"):
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in INPUT_KINDS:
            raise DatasetError(f"{self.path}: cannot tell the input's format from {suffix or 'no suffix'}; "
                               f"give a {', '.join(INPUT_KINDS)} file")
        if not self.path.is_file():
            raise DatasetError(f"{self.path} does not exist (or is not a file); give the table of image URLs")
        self.kind = INPUT_KINDS[suffix]
        # A .txt holds bare URLs: there is no column to choose.
        self.url_col, self.caption_col = ("url", None) if self.kind == "txt" else (url_col, caption_col or None)
        columns, self.rows = self._guarded(lambda: _SURVEYS[self.kind](self.path))
        self._check_columns(columns)
        if not self.rows:
            raise DatasetError(f"{self.path} holds no rows: nothing to download")

    def __iter__(self) -> Iterator[Row]:
        items = _ITEMS[self.kind](self.path)
        while True:
            item = self._guarded(lambda: next(items, None))
            if item is None:
                return
            yield self._row(item)

    def _guarded(self, read: Callable[[], Any]) -> Any:
        """read(), with a failure of the file itself (not of one row) said as one message naming it."""
        try:
            return read()
        except DatasetError:
            raise
        except (OSError, ValueError, csv.Error) as exc:
            raise DatasetError(f"cannot read {self.path} as {self.kind}: {exc}") from None

    def _check_columns(self, columns: list[str]) -> None:
        listed = ", ".join(map(repr, columns)) or "none"
        if self.url_col not in columns:
            raise DatasetError(f"{self.path} has no {self.url_col!r} column (its columns: {listed}); "
                               "name the URL column with --url-col")
        if self.caption_col and self.caption_col not in columns:
            raise DatasetError(f"{self.path} has no {self.caption_col!r} column (its columns: {listed}); name the "
                               "caption column with --caption-col, or --caption-col '' to download without captions")
        clashes = sorted(set(RESERVED) & set(columns) - {self.url_col, self.caption_col})
        if clashes:
            log.warning("%s: the columns %s are not kept: each record's metadata has the downloader's own fields "
                        "of those names", self.path, ", ".join(clashes))

    def _row(self, item: tuple[int, dict | str]) -> Row:
        index, values = item
        if isinstance(values, str):
            return Row(index, "", [], {}, problem=values)
        url, caption = values.get(self.url_col), values.get(self.caption_col) if self.caption_col else None
        extra = {k: v for k, v in values.items() if k not in (self.url_col, self.caption_col, *RESERVED)}
        # Parquet cells can be dates, decimals or bytes; metadata must survive json.dumps.
        extra = json.loads(json.dumps(extra, default=str))
        shown = "" if url is None else str(url)
        try:  # a list is several captions, as every reader of captions takes it (its repr was written)
            captions = [] if caption is None else caption_list(str(caption) if isinstance(caption, (int, float))
                                                                else caption)
        except BadRecord as reason:
            return Row(index, shown, [], extra, problem=f"caption column {self.caption_col!r}: {reason}")
        if not isinstance(url, str) or not url.strip():
            return Row(index, shown, captions, extra, problem=f"no URL in {self.url_col!r}")
        return Row(index, url.strip(), captions, extra)


# Per kind: (columns, row count) read cheaply up front, and the rows as (index, dict or why-unreadable).
def _survey_parquet(path: Path) -> tuple[list[str], int]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError(f"reading {path} needs pyarrow: pip install pyarrow, or use a csv or jsonl") from None
    with pq.ParquetFile(path) as file:
        return list(file.schema_arrow.names), file.metadata.num_rows


def _parquet_items(path: Path) -> Iterator[tuple[int, dict | str]]:
    import pyarrow.parquet as pq

    index = 0
    with pq.ParquetFile(path) as file:
        for batch in file.iter_batches(batch_size=_PARQUET_BATCH):  # one batch in memory, whatever the file
            for values in batch.to_pylist():
                yield index, values
                index += 1


def _csv_rows(path: Path, delimiter: str) -> Iterator[list[str]]:
    # A byte that is not UTF-8 is kept (as a surrogate) for its row to be reported, not the file refused.
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as file:
        yield from (fields for fields in csv_rows(file, delimiter) if fields)


def _survey_csv(path: Path, delimiter: str = ",") -> tuple[list[str], int]:
    rows = _csv_rows(path, delimiter)
    header = next(rows, [])
    return header, sum(1 for _ in rows)


def _csv_items(path: Path, delimiter: str = ",") -> Iterator[tuple[int, dict | str]]:
    rows = _csv_rows(path, delimiter)
    header = next(rows, [])
    for index, fields in enumerate(rows):
        if len(fields) != len(header):
            yield index, f"{path.name} data row {index + 1} has {len(fields)} fields, the header {len(header)}"
        elif not all(map(is_utf8, fields)):  # a surrogate: a byte the file held that is not UTF-8
            yield index, f"{path.name} data row {index + 1} is not valid UTF-8; save the file as UTF-8"
        else:
            yield index, dict(zip(header, fields))




def _decoded_lines(path: Path) -> Iterator[str]:
    """Each line as jsonl_entries decodes it (a BOM before the first one dropped), so counts and rows agree."""
    with open(path, "rb") as file:
        for number, raw in enumerate(file, 1):
            yield raw.decode("utf-8-sig" if number == 1 else "utf-8", errors="replace")


def _nonblank_lines(path: Path) -> int:
    return sum(1 for line in _decoded_lines(path) if line.strip())


# A jsonl's columns are the keys of its first objects together: one line may lack a key (an uncaptioned
# row) that the others have.
_SURVEYED_OBJECTS = 1000


def _survey_jsonl(path: Path) -> tuple[list[str], int]:
    columns: dict[str, None] = {}
    with open(path, "rb") as file:
        objects = (value for _, value in jsonl_entries(file, path.name, []) if isinstance(value, dict))
        for value in itertools.islice(objects, _SURVEYED_OBJECTS):
            columns.update(dict.fromkeys(value))
    if not columns:
        raise DatasetError(f"{path} holds no JSON object line; a jsonl input has one object per line, "
                           'e.g. {"url": "https://...", "caption": "a cat"}')
    return list(columns), _nonblank_lines(path)


def _jsonl_items(path: Path) -> Iterator[tuple[int, dict | str]]:
    skipped: list[tuple[str, str]] = []
    index = 0
    with open(path, "rb") as file:
        # jsonl_entries reports a bad line in `skipped` before it yields the next good one: in order.
        for where, value in jsonl_entries(file, path.name, skipped):
            for bad_where, reason in skipped:
                yield index, f"{bad_where}: {reason}"
                index += 1
            skipped.clear()
            yield index, value if isinstance(value, dict) else f"{where}: not a JSON object"
            index += 1
    for bad_where, reason in skipped:
        yield index, f"{bad_where}: {reason}"
        index += 1


def _survey_txt(path: Path) -> tuple[list[str], int]:
    return ["url"], _nonblank_lines(path)


def _txt_items(path: Path) -> Iterator[tuple[int, dict | str]]:
    lines = (line.strip() for line in _decoded_lines(path))
    yield from enumerate({"url": line} for line in lines if line)


_SURVEYS: dict[str, Callable[[Path], tuple[list[str], int]]] = {
    "parquet": _survey_parquet, "csv": _survey_csv, "tsv": lambda p: _survey_csv(p, "\t"),
    "jsonl": _survey_jsonl, "txt": _survey_txt,
}
_ITEMS: dict[str, Callable[[Path], Iterator[tuple[int, dict | str]]]] = {
    "parquet": _parquet_items, "csv": _csv_items, "tsv": lambda p: _csv_items(p, "\t"),
    "jsonl": _jsonl_items, "txt": _txt_items,
}


# --- fetching -----------------------------------------------------------------------------


class Failed(Exception):
    """One row that gave no record: `reason` is a short category (counted), `detail` the specifics."""

    def __init__(self, reason: str, detail: str, retry: bool = False, pause: float | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.retry = reason, detail, retry
        self.pause = pause  # how long the server asked to wait before a retry (Retry-After), if it did


def check_url(url: str) -> None:
    """Refuse, before any connection, whatever is not an http(s) URL with a host (file:, ftp:, data: ...)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as exc:
        raise Failed("bad url", str(exc)) from None
    if parts.scheme.lower() not in SCHEMES:
        raise Failed("unsupported scheme", f"{parts.scheme or 'no'} scheme: only http and https URLs are fetched")
    if not host:
        raise Failed("bad url", "no host name")


def check_host(host: str) -> None:
    """Refuse a host that resolves to no public address (loopback, private, link-local such as a cloud's
    169.254.169.254 metadata service): a URL list from elsewhere must not reach into this machine's network."""
    import socket

    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (socket.gaierror, UnicodeError) as exc:
        # Final, a name that does not resolve stays so; but a resolver overwhelmed by 64 threads says "try again".
        raise Failed("unknown host", f"{host}: {exc}", retry=getattr(exc, "errno", None) == socket.EAI_AGAIN) from None
    private = sorted(a for a in addresses if not _is_public(a))
    if private:
        raise Failed("private address", f"{host} is {', '.join(private)}, not a public address "
                                        "(--allow-private fetches from a list you trust)")


def _is_public(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address.split("%")[0])
    return (getattr(ip, "ipv4_mapped", None) or ip).is_global  # "::ffff:10.0.0.1" is 10.0.0.1


class _PublicPeer:
    """A connection that closes at once if the address it reached is not public.

    check_host resolves a name before the request; the connection resolves it again, and a name server that
    answers a public address the first time and 10.0.0.1 the second (DNS rebinding) would get past the check
    alone. The socket's own peer is what was really reached, so it is checked too, before a byte is sent.
    """

    def _new_conn(self):
        sock = super()._new_conn()
        peer = sock.getpeername()[0]
        if not _is_public(peer):
            sock.close()
            raise Failed("private address", f"{self.host} connected to {peer}, not a public address "
                                            "(--allow-private fetches from a list you trust)")
        return sock


class _PublicHTTPConnection(_PublicPeer, urllib3.connection.HTTPConnection):
    pass


class _PublicHTTPSConnection(_PublicPeer, urllib3.connection.HTTPSConnection):
    pass


class _PublicHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _PublicHTTPConnection


class _PublicHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _PublicHTTPSConnection


class _PublicOnlyAdapter(requests.adapters.HTTPAdapter):
    """Direct connections reach public addresses only. Through a proxy the proxy resolves and connects, and the
    socket's peer is the proxy, so those connections keep the name check alone."""

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _PublicHTTPPool, "https": _PublicHTTPSPool}


class Fetcher:
    """HTTP GETs with one requests.Session per worker thread (a Session is not thread-safe)."""

    def __init__(self, options: DownloadOptions):
        self.options = options
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()

    def get(self, url: str) -> bytes:
        """The response body, or Failed; passing failures are tried again with a doubling pause."""
        pauses = [self.options.backoff * 2**n for n in range(self.options.retries)]
        try:
            # _closing: an interrupted run must not wait out every pending retry before it can stop.
            return retrying(lambda: self._get_once(url), pauses, lambda exc: isinstance(exc, Failed) and exc.retry,
                            stop=self._closing)
        except Failed as failure:
            tries = failure.tries  # type: ignore[attr-defined]
            if tries > 1:
                failure.detail += f" (after {tries} attempts)"
            raise

    def stop_retrying(self) -> None:
        self._closing.set()

    def close(self) -> None:
        with self._lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["User-Agent"] = USER_AGENT
            session.max_redirects = self.options.max_redirects
            # No .netrc credentials of this machine go to the hosts a URL list names (an auth of its own stops
            # requests looking them up); its proxy and CA settings still apply.
            session.auth = _no_credentials
            if not self.options.allow_private:
                session.hooks["response"].append(_check_redirect)
                for scheme in SCHEMES:
                    session.mount(f"{scheme}://", _PublicOnlyAdapter())
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def _get_once(self, url: str) -> bytes:
        # requests' timeout bounds each wait; the deadline bounds a server that trickles bytes.
        deadline = time.monotonic() + self.options.timeout
        if not self.options.allow_private:
            host = urlsplit(url).hostname or ""
            # The host checked must be the host connected to: "http://10.0.0.5\\@example.com/" is example.com to
            # urlsplit and 10.0.0.5 to urllib3, which requests connects with.
            connected = (parse_url(requests.Request("GET", url).prepare().url).host or "").strip("[]").lower()
            if connected != _ascii_host(host):
                raise Failed("bad url", f"{url}: its host reads differently to different URL parsers")
            check_host(connected)  # the name requests resolves, not the one Python's IDNA 2003 codec would
        try:
            with self._session().get(url, timeout=self.options.timeout, stream=True) as response:
                self._check_response(response)
                return self._read_body(response, deadline)
        except requests.RequestException as exc:
            raise _request_failure(exc, self.options) from None
        except ReadTimeoutError:  # read1 is urllib3's own reader: its errors come unwrapped by requests
            raise Failed("timeout", f"no answer within --timeout {self.options.timeout:g} s", retry=True) from None
        except (urllib3.exceptions.HTTPError, IncompleteRead) as exc:  # reset or cut off mid-body
            raise Failed("connection error", f"{type(exc).__name__}: {exc}", retry=True) from None
        except (ValueError, UnicodeError, HTTPException) as exc:  # a malformed redirect or header, say
            raise Failed("bad response", f"{type(exc).__name__}: {exc}") from None

    def _check_response(self, response: requests.Response) -> None:
        status = response.status_code
        if not 200 <= status < 300:
            raise Failed(f"http {status}", f"{response.url} answered {status} {response.reason}",
                         retry=status >= 500 or status == 429, pause=_retry_after(response.headers.get("Retry-After")))
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type.startswith("text/"):
            raise Failed("not an image", f"the server sent {content_type} (a web page or text), not an image")
        if self.options.respect_opt_out:
            # A directive aimed at one named crawler ("googlebot: noindex") counts too: better to skip an
            # image than to train on one its owner refused to some.
            tags = response.headers.get("X-Robots-Tag", "").lower().replace(",", " ").split()
            refused = [tag for tag in tags if tag in OPT_OUT_DIRECTIVES]
            if refused:
                raise Failed("opted out", f"X-Robots-Tag: {', '.join(refused)} (--ignore-opt-out fetches it)")
        length = response.headers.get("Content-Length", "")
        if length.isascii() and length.isdigit() and int(length) > self.options.max_bytes:
            raise Failed("too large", f"Content-Length {int(length):,} bytes is over --max-bytes "
                                      f"{self.options.max_bytes:,}")

    def _read_body(self, response: requests.Response, deadline: float) -> bytes:
        body = bytearray()
        # read1 returns what has arrived (at least a byte) instead of waiting for a whole chunk, so a server
        # that trickles a byte at a time meets the deadline within one read timeout, not after 64 KiB of them.
        raw = response.raw
        chunks = (iter(lambda: raw.read1(_CHUNK, decode_content=True), b"") if hasattr(raw, "read1")
                  else response.iter_content(_CHUNK))
        for chunk in chunks:
            body += chunk
            if len(body) > self.options.max_bytes:
                raise Failed("too large", f"over --max-bytes {self.options.max_bytes:,} bytes; stopped reading")
            if time.monotonic() > deadline:
                raise Failed("timeout", f"the body took over --timeout {self.options.timeout:g} s", retry=True)
        return bytes(body)


def _ascii_host(host: str) -> str:
    """A host name as it goes on the wire: an internationalised one in punycode by IDNA 2008 with UTS 46, as
    requests encodes it (Python's own codec is IDNA 2003, which spells some names otherwise: "straße")."""
    if host.isascii():
        return host.lower()
    import idna

    try:
        return idna.encode(host, uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError):
        return host.lower()


def _no_credentials(request):
    return request


def _check_redirect(response: requests.Response, *args, **kwargs) -> None:
    """A response hook: a redirect is followed only to a public address (a public URL may point inward)."""
    if response.is_redirect:
        target = urlsplit(requests.compat.urljoin(response.url, response.headers.get("Location", "")))
        if target.scheme.lower() in SCHEMES and target.hostname:
            check_host(target.hostname)


def _retry_after(value: str | None) -> float | None:
    """Seconds a 429/503's Retry-After asks for (a number of seconds; an HTTP date counts as a minute), at most
    a minute: a server may ask for hours, and one row is not worth holding a worker that long."""
    if not value:
        return None
    return min(float(value), 60.0) if value.strip().isdigit() else 60.0


def _request_failure(exc: requests.RequestException, options: DownloadOptions) -> Failed:
    if isinstance(exc, requests.TooManyRedirects):
        return Failed("too many redirects", f"more than {options.max_redirects} redirects")
    if isinstance(exc, requests.exceptions.InvalidSchema):  # a redirect to file:, ftp: ...: never followed
        return Failed("unsupported scheme", f"redirected to a URL requests will not fetch: {exc}")
    if isinstance(exc, (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema)):
        return Failed("bad url", str(exc))
    # A read timeout inside the body arrives as a ConnectionError wrapping urllib3's ReadTimeoutError.
    if isinstance(exc, requests.Timeout) or any(isinstance(arg, ReadTimeoutError) for arg in exc.args):
        return Failed("timeout", f"no answer within --timeout {options.timeout:g} s", retry=True)
    if isinstance(exc, requests.exceptions.SSLError):  # a certificate that is wrong now is wrong in a second
        return Failed("tls error", str(exc))
    return Failed("connection error", str(exc), retry=True)


# --- images -------------------------------------------------------------------------------


def resize(image: Image.Image, size: int | None, mode: str = "keep_ratio", upscale: bool = False) -> Image.Image:
    """img2dataset's resize modes: keep_ratio (shorter side = size), center_crop (that, then the centre
    size x size), border (longer side = size, padded white to size x size), no. Without `upscale` a
    smaller image keeps its pixels: center_crop then gives a smaller square, border a wider border."""
    if size is None or mode == "no":
        return image
    width, height = image.size
    scale = size / (max(width, height) if mode == "border" else min(width, height))
    if scale > 1 and not upscale:
        scale = 1.0
    if scale != 1:
        target = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(target, Image.Resampling.LANCZOS)
    if mode == "center_crop":
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    elif mode == "border":
        canvas = Image.new("RGB", (size, size), (255, 255, 255))
        canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
        image = canvas
    return image


def _decoded(data: bytes, max_pixels: int) -> Image.Image:
    """The upright RGB image, or Failed saying whether it is no image, a bomb or a broken one."""
    try:
        width, height = image_size_from_bytes(data)
    except BadImage as exc:
        # PIL's own bomb guard fires when the header is read; images.py raises BadImage from within its handler.
        bomb = isinstance(exc.__context__, Image.DecompressionBombError)
        raise Failed("too many pixels" if bomb else "not an image", str(exc)) from None
    try:
        check_size(width, height, max_pixels, limit="--max-pixels")
    except BadImage as exc:
        raise Failed("too many pixels" if width * height > max_pixels else "broken image", str(exc)) from None
    try:
        return load_image_bytes(data, max_pixels)
    except BadImage as exc:
        raise Failed("broken image", str(exc)) from None


def _encoded(image: Image.Image, options: DownloadOptions) -> bytes:
    pil_format, _ = ENCODE_FORMATS[options.encode_format]
    buffer = io.BytesIO()
    quality = {"quality": options.encode_quality} if options.encode_format in ("jpg", "webp") else {}
    try:
        image.save(buffer, pil_format, **quality)
    except (OSError, ValueError) as exc:  # e.g. webp's 16383 px side limit
        raise Failed("encode error", f"{image.width}x{image.height} as {options.encode_format}: {exc}") from None
    return buffer.getvalue()


# --- one row ------------------------------------------------------------------------------


@dataclass
class Downloaded(RawRecord):
    """A record as the shard writers take it, plus its metadata."""

    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    row: Row
    downloaded: int  # bytes received, whether or not they became a record
    record: Downloaded | None = None
    failure: Failed | None = None


def download_row(row: Row, fetcher: Fetcher, options: DownloadOptions) -> Outcome:
    data = b""
    try:
        if row.problem:
            raise Failed("bad row", row.problem)
        check_url(row.url)
        data = fetcher.get(row.url)
        original = _decoded(data, options.max_pixels)
        image = resize(original, options.resize, options.resize_mode, options.upscale)
        encoded = _encoded(image, options)
    except Failed as failure:
        return Outcome(row, len(data), failure=failure)
    except Exception as exc:  # noqa: BLE001 - one row, whatever broke it, must not stop days of downloading
        log.debug("row %d (%s) failed unexpectedly", row.index, row.url, exc_info=True)
        return Outcome(row, len(data), failure=Failed("error", f"{type(exc).__name__}: {exc}"))
    key = f"{row.index:09d}"
    meta = {**row.extra, "url": row.url, "key": key, "sha256": hashlib.sha256(data).hexdigest(),
            "original_width": original.width, "original_height": original.height,
            "width": image.width, "height": image.height}
    # The extension in the key tells the tar writer the member's type without opening the image again.
    record = Downloaded(key + ENCODE_FORMATS[options.encode_format][1], encoded, row.captions,
                        meta=meta)
    return Outcome(row, len(data), record=record)


# --- shards -------------------------------------------------------------------------------


class _TarShard(TarWriter):
    def sample_key(self, record: RawRecord, number: int) -> str:
        assert isinstance(record, Downloaded)
        return record.meta["key"]  # the input row, not the count of successes before it

    def metadata(self, record: RawRecord) -> dict:
        assert isinstance(record, Downloaded)
        return {"captions": record.captions, **record.meta}


class _LaionShard(LaionWriter):
    def placeholder(self, record: RawRecord) -> bytes:
        assert isinstance(record, Downloaded)
        # json.dumps escapes tabs and line breaks, so the line keeps its three columns.
        return json.dumps(record.meta, ensure_ascii=False).encode("utf-8")


def report_path(out: Path, number: int) -> Path:
    return out / REPORTS_DIR / f"{number:06d}.json"


class ShardRun:
    """One output shard being written: its records, its failures, and at the end its report."""

    def __init__(self, out: Path, number: int, plan: dict, options: DownloadOptions, started: float):
        self.out, self.number, self.plan = out, number, plan
        per_shard = plan["per_shard"]
        self.writer: ShardWriter = (_TarShard(out, per_shard, number) if options.format == "webdataset"
                                     else _LaionShard(out, per_shard, options.gzip, number))
        # A shard without a report is not done, even if a killed run renamed its file into place.
        self.writer.remove(number)  # the shard and its index
        self.started = started
        self.ok = 0
        self.bytes = 0
        self.failures: list[dict[str, Any]] = []

    def add(self, outcome: Outcome) -> None:
        self.bytes += outcome.downloaded
        if outcome.record is not None:
            self.writer.add(outcome.record)
            self.ok += 1
        else:
            assert outcome.failure is not None
            self.failures.append({"row": outcome.row.index, "url": outcome.row.url,
                                  "reason": outcome.failure.reason, "detail": outcome.failure.detail})

    def finish(self) -> dict:
        """Seal the shard (when it holds a record), then write its report: the report marks it done."""
        names = self.writer.finish()
        finished = time.time()
        reasons = Counter(f["reason"] for f in self.failures)
        first = self.number * self.plan["per_shard"]
        report = {
            "version": REPORT_VERSION, "shard": self.number, "file": names[0] if names else None,
            "rows": [first, min(first + self.plan["per_shard"], self.plan["rows"])],
            "ok": self.ok, "failed": len(self.failures), "failures_by_reason": dict(reasons.most_common()),
            "failures": self.failures, "bytes": self.bytes, "started": self.started, "finished": finished,
            "elapsed": finished - self.started, "plan": self.plan,
        }
        write_text(report_path(self.out, self.number), json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        return report

    def abandon(self) -> None:
        self.writer.abandon()


# --- the whole download -------------------------------------------------------------------


@dataclass
class DownloadResult:
    out: Path
    shards: list[int]  # the shards this call downloaded
    run: dict  # totals of this call (see totals())
    done: int  # shards with a report, this call's and earlier ones'
    total_shards: int
    report: dict | None  # the merged report, when every shard is done


def download(urls: str | Path, out: str | Path, options: DownloadOptions | None = None) -> DownloadResult:
    """Download the rows of `urls` into shards in `out`, resuming what an earlier run left; see the
    module docstring. Merges (filelist.txt, download_report.json) when every shard is then done."""
    options = options or DownloadOptions()
    options.check()
    allow_pixels(options.max_pixels)
    table = UrlTable(urls, options.url_col, options.caption_col)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out} is a file; give a folder to download into")
    if out.is_dir() and any(out.iterdir()) and not (out / REPORTS_DIR).is_dir():
        raise DatasetError(f"{out} is not empty and holds no download to continue; download into a new folder")
    (out / REPORTS_DIR).mkdir(parents=True, exist_ok=True)
    if not (out / LIST_NAME).is_file():  # (taken off by the merge that writes the list)
        (out / UNFINISHED).write_text("written by difftrain while it downloads into this folder\n")
    plan = _plan(table, options)
    _check_plan(out, plan)
    index, count = options.shard or env_shard() or (0, 1)
    todo = [k for k in range(plan["shards"]) if k % count == index and not report_path(out, k).exists()]
    started = time.time()
    reports = _download_shards(table, out, plan, todo, options)
    run = totals(reports, time.time() - started)
    done = sum(report_path(out, k).exists() for k in range(plan["shards"]))
    merged = merge(out) if done == plan["shards"] else None
    return DownloadResult(out, todo, run, done, plan["shards"], merged)


def env_shard() -> tuple[int, int] | None:
    """(RANK, WORLD_SIZE) when started by accelerate launch or torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else None


def _plan(table: UrlTable, options: DownloadOptions) -> dict:
    """What decides the output's contents: a re-run into the same folder must agree on all of it."""
    return {
        "input": table.path.name, "rows": table.rows, "per_shard": options.per_shard,
        "shards": math.ceil(table.rows / options.per_shard), "format": options.format,
        "gzip": options.gzip if options.format == "laion" else None, "url_col": table.url_col,
        "caption_col": table.caption_col, "resize": options.resize, "resize_mode": options.resize_mode,
        "upscale": options.upscale, "encode_format": options.encode_format,
        "encode_quality": options.encode_quality, "max_pixels": options.max_pixels,
    }


def _check_plan(out: Path, plan: dict) -> None:
    earlier = next(iter(sorted((out / REPORTS_DIR).glob("*.json"))), None)
    if earlier is None:
        return
    before = json.loads(earlier.read_text(encoding="utf-8"))["plan"]
    differs = [f"{key} {before.get(key)!r} (now {plan[key]!r})" for key in plan if before.get(key) != plan[key]]
    if differs:
        raise DatasetError(f"{out} holds a download made with other settings: {'; '.join(differs)}. Re-run with "
                           "the same input and settings to continue it, or download into a new folder")


def _download_shards(table: UrlTable, out: Path, plan: dict, todo: list[int], options: DownloadOptions) -> list[dict]:
    """Fetch the rows of the shards in `todo` on a thread pool; write and report each shard as it completes."""
    if not todo:
        return []
    per_shard, wanted = plan["per_shard"], set(todo)
    rows = (row for row in table if row.index // per_shard in wanted)
    total = sum(min(per_shard, plan["rows"] - k * per_shard) for k in todo)
    fetcher = Fetcher(options)
    pool = ThreadPoolExecutor(options.workers, thread_name_prefix="download")
    # tqdm's disable=None: no bar when the output is not a terminal.
    bar = tqdm(total=total, desc="downloading", unit="url", disable=None if options.progress else True,
               dynamic_ncols=True)
    reports: list[dict] = []
    current: ShardRun | None = None
    ok_before = rows_done = 0  # successes in the shards already finished by this call; rows seen (a disabled bar
    # counts none)
    # Each shard's span starts where the one before ended: the spans of one process never overlap.
    shard_started = time.time()
    try:
        outcomes = _in_order(pool, rows, lambda row: download_row(row, fetcher, options), 4 * options.workers)
        for outcome in outcomes:
            number = outcome.row.index // per_shard
            if current is None or current.number != number:
                if current is not None:
                    reports.append(current.finish())
                    ok_before += current.ok
                    shard_started = reports[-1]["finished"]
                    if options.progress and bar.disable:  # no terminal (a batch job's log): a line a shard instead
                        print(f"download: shard {reports[-1]['shard']} done; {rows_done:,} of {total:,} rows so "
                              f"far, {ok_before:,} ok", file=sys.stderr, flush=True)
                current = ShardRun(out, number, plan, options, shard_started)
            current.add(outcome)
            rows_done += 1
            bar.update()
            bar.set_postfix(ok=ok_before + current.ok, failed=bar.n - ok_before - current.ok, refresh=False)
        if current is not None:
            reports.append(current.finish())
            current = None
    finally:
        if current is not None:  # interrupted mid-shard: no .tmp left to look like data
            current.abandon()
        fetcher.stop_retrying()
        pool.shutdown(wait=True, cancel_futures=True)
        fetcher.close()
        bar.close()
    return reports


def _in_order(pool: ThreadPoolExecutor, rows: Iterator[Row], work: Callable[[Row], Outcome],
              window: int) -> Iterator[Outcome]:
    """work(row) for every row on the pool, yielded in input order with at most `window` rows in flight:
    memory stays flat however long the input, and shards come out the same on every run."""
    pending: deque[Future[Outcome]] = deque()
    for row in rows:
        pending.append(pool.submit(work, row))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# --- merging ------------------------------------------------------------------------------


def merge(out: str | Path) -> dict:
    """Write `download_report.json` and then `filelist.txt` from the per-shard reports; every shard must
    be done. Safe to run by several processes at once: they write the same files, each atomically."""
    out = Path(out)
    reports = _read_reports(out)
    if not reports:
        raise DatasetError(f"{out} holds no finished shard ({REPORTS_DIR}/*.json); run the download first")
    plan = next(iter(reports.values()))["plan"]
    missing = [k for k in range(plan["shards"]) if k not in reports]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise DatasetError(f"{out}: {len(missing)} of {plan['shards']} shards are not finished (shards {shown}); "
                           "run the download again (each --shard i/N that has not finished), then --merge-only")
    # A killed run's shards (not the hidden staging files other processes' atomic writes may hold open now).
    for leftover in out.glob("*.tmp"):
        if not leftover.name.startswith("."):
            leftover.unlink(missing_ok=True)
    ordered = [reports[k] for k in range(plan["shards"])]
    spans = [(r["started"], r["finished"]) for r in ordered]
    report = {"version": REPORT_VERSION, "input": plan["input"], **totals(ordered, _busy_seconds(spans)),
              "shards": plan["shards"], "files": [r["file"] for r in ordered if r["file"]],
              "examples": _examples(ordered), "plan": plan}
    write_text(out / REPORT_NAME, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    if not report["files"]:
        raise DatasetError(f"none of the {report['rows']:,} rows of {plan['input']} could be downloaded "
                           f"({_reasons(report) or 'no rows'}); see {out / REPORT_NAME}")
    write_text(out / LIST_NAME, "".join(f"{name}\n" for name in report["files"]))
    (out / UNFINISHED).unlink(missing_ok=True)
    return report


def _read_reports(out: Path, per_reason: int = 3) -> dict[int, dict]:
    """Every shard's report, each with only its first `per_reason` failures of each reason kept: a LAION-sized
    run fails hundreds of millions of rows, and merging must not hold them all."""
    reports = {}
    for path in sorted((out / REPORTS_DIR).glob("*.json")):
        report = json.loads(path.read_text(encoding="utf-8"))
        seen: Counter[str] = Counter()
        kept = []
        for failure in report.get("failures", []):
            seen[failure["reason"]] += 1
            if seen[failure["reason"]] <= per_reason:
                kept.append(failure)
        report["failures"] = kept
        reports[report["shard"]] = report
    return reports


def totals(reports: list[dict], seconds: float) -> dict:
    """Rows, successes, failures by reason and bytes over `reports`, with the rates over `seconds`."""
    reasons: Counter[str] = Counter()
    for report in reports:
        reasons.update(report["failures_by_reason"])
    ok, failed = sum(r["ok"] for r in reports), sum(r["failed"] for r in reports)
    size = sum(r["bytes"] for r in reports)
    return {"rows": ok + failed, "ok": ok, "failed": failed, "failures_by_reason": dict(reasons.most_common()),
            "bytes": size, "seconds": round(seconds, 3),
            "images_per_s": round(ok / seconds, 2) if seconds > 0 else None,
            "mb_per_s": round(size / 1e6 / seconds, 3) if seconds > 0 else None}


def _busy_seconds(spans: list[tuple[float, float]]) -> float:
    """Length of the union of the shards' time spans: parallel processes are not counted twice, and the
    pause between a killed run and its resume is not counted at all."""
    busy, reached = 0.0, -math.inf
    for start, stop in sorted(spans):
        if stop > reached:
            busy += stop - max(start, reached)
            reached = stop
    return busy


def _examples(reports: list[dict], per_reason: int = 3) -> dict[str, list[dict]]:
    examples: dict[str, list[dict]] = {}
    for report in reports:
        for failure in report["failures"]:
            found = examples.setdefault(failure["reason"], [])
            if len(found) < per_reason:
                found.append({"url": failure["url"], "detail": failure["detail"]})
    return examples


def _reasons(summary: dict) -> str:
    return ", ".join(f"{reason}: {n:,}" for reason, n in summary["failures_by_reason"].items())


def summary_lines(summary: dict) -> list[str]:
    """A report's totals (or a run's) for people: counts, failures by reason, speed."""
    failed = f" ({_reasons(summary)})" if summary["failed"] else ""
    lines = [f"{summary['rows']:,} rows: {summary['ok']:,} ok, {summary['failed']:,} failed{failed}"]
    if summary["images_per_s"] is not None:
        lines.append(f"{summary['images_per_s']:.1f} images/s, {summary['mb_per_s']:.2f} MB/s "
                     f"({summary['bytes'] / 1e6:.1f} MB in {summary['seconds']:.1f} s)")
    return lines
