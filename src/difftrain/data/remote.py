"""Shards read from a URL: http(s) through requests, any other scheme (s3://, gs://, ...) through fsspec.

A shard is downloaded whole into a spooled temporary file (memory up to SPOOL_BYTES, disk
beyond) and then parsed like a local file: the shard source holds a shard's records in
memory anyway, and a whole download is the unit a retry can repeat without seeking into
a half-read stream. http(s) uses requests rather than fsspec's HTTP file system, which
needs aiohttp.

A transient failure (a dropped connection, a timeout, HTTP 408/425/429/5xx) is retried
after each of RETRY_DELAYS; what stays unreadable raises ShardUnreachable, an OSError, so
the shard source reports that shard as skipped and goes on with the others.

A remote shard's cached index is keyed by what the remote says of it (`remote_identity`):
its size plus ETag or Last-Modified (a HEAD for http, fsspec's info() otherwise). Where it
says neither, the URL alone keys it, so a shard rewritten in place under the same URL keeps
its old index until the index folder is cleared.
"""

from __future__ import annotations

import posixpath
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Callable, Sequence, TypeVar
from urllib.parse import urlsplit, urlunsplit

import requests

from difftrain.data.folder import DatasetError

RETRY_DELAYS = (1.0, 3.0, 9.0)  # seconds to wait before each retry of a transient failure
SPOOL_BYTES = 256 << 20  # a shard up to this size stays in memory; a bigger one spills to a temp file
TIMEOUT = (10, 60)  # requests: seconds to connect, and at most between two reads of the body
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
_TRANSIENT_ERRORS = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)
# What fsspec back ends call a version in info(): s3fs, gcsfs, local and memory file systems.
_VERSION_FIELDS = ("ETag", "etag", "LastModified", "last_modified", "updated", "mtime", "created")
# Two letters at least, so a Windows drive ("C://x") is never taken for a scheme.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")

T = TypeVar("T")


class ShardUnreachable(OSError):
    """A URL that could not be read: a final answer (404), or a transient failure that outlasted the retries."""


class _Transient(Exception):
    """A failure worth trying again; str() is the reason."""


def is_url(path: str | Path) -> bool:
    return isinstance(path, str) and _URL.match(path) is not None


def url_name(url: str) -> str:
    """The last part of the URL's path, e.g. shard-000000.tar: what a shard read from it is called."""
    return posixpath.basename(urlsplit(url).path)


def join_url(base: str, name: str) -> str:
    """`name` (a URL, or a path relative to `base`'s folder) as a URL.

    Not urllib's urljoin: it leaves names alone under schemes it does not know, s3:// among them.
    """
    if is_url(name):
        return name
    scheme, netloc, path, _, _ = urlsplit(base)
    return urlunsplit((scheme, netloc, posixpath.normpath(posixpath.join(posixpath.dirname(path), name)), "", ""))


def require_support(url: str) -> None:
    """Raise a DatasetError naming the package to install when nothing here can read the URL's scheme."""
    if _is_http(url):
        return
    import fsspec
    from fsspec.registry import known_implementations

    protocol = urlsplit(url).scheme
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError:
        package = known_implementations[protocol]["class"].partition(".")[0]
        raise DatasetError(f"reading {url} needs the {package} package (fsspec's {protocol}:// file system): "
                           f"pip install {package}") from None
    except ValueError:
        raise DatasetError(f"{url}: fsspec knows no {protocol}:// file system; use http(s)://, s3://, gs:// "
                           "or a local path") from None


def open_url(url: str) -> IO[bytes]:
    """The whole object at `url`, rewound, in a file the caller closes; ShardUnreachable if it cannot be read."""
    require_support(url)
    fetch = _http_get if _is_http(url) else _fsspec_get
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
    try:
        _retrying(url, lambda: fetch(url, spool))
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return spool  # type: ignore[return-value]


def read_text(url: str) -> str:
    with open_url(url) as file:
        return file.read().decode("utf-8", errors="replace")


def remote_identity(url: str) -> list | None:
    """[url, size, version] as the remote reports them (None for what it does not say); None if it cannot be asked."""
    require_support(url)
    try:
        size, version = _retrying(url, lambda: _http_head(url) if _is_http(url) else _fsspec_info(url))
    except ShardUnreachable:
        return None  # the shard's indexing reads it, and reports it if it is gone
    return [url, size, version]


def _is_http(url: str) -> bool:
    return urlsplit(url).scheme.lower() in ("http", "https")


def retrying(attempt: Callable[[], T], delays: Sequence[float], transient: Callable[[Exception], bool],
             stop: threading.Event | None = None) -> T:
    """attempt(), made again after each of `delays` while what it raises is `transient`. The last failure
    propagates with `tries` (the attempts made) set on it; a `stop` set during a wait raises it at once.
    A failure carrying a `pause` (a server's Retry-After) waits that long instead, when it is longer."""
    for tries, delay in enumerate((*delays, None), 1):
        try:
            return attempt()
        except Exception as exc:
            exc.tries = tries  # type: ignore[attr-defined]
            if delay is None or not transient(exc):
                raise
            delay = max(delay, getattr(exc, "pause", None) or 0.0)
            if stop is None:
                time.sleep(delay)
            elif stop.wait(delay):
                raise
    raise AssertionError("unreachable: the last attempt returns or raises")


def _retrying(url: str, attempt: Callable[[], T]) -> T:
    try:
        return retrying(attempt, RETRY_DELAYS, lambda exc: isinstance(exc, _Transient))
    except _Transient as reason:
        tries = reason.tries  # type: ignore[attr-defined]
        raise ShardUnreachable(f"cannot read {url}: {reason} ({tries} tries)") from None


def _check(response: requests.Response, url: str) -> None:
    reason = f"HTTP {response.status_code} {response.reason}"
    if response.status_code in _TRANSIENT_STATUS:
        raise _Transient(reason)
    if not response.ok:
        raise ShardUnreachable(f"cannot read {url}: {reason}")


def _http_get(url: str, spool: IO[bytes]) -> None:
    spool.seek(0)
    spool.truncate()  # a retry starts the body again from its first byte
    try:
        with requests.get(url, stream=True, timeout=TIMEOUT) as response:
            _check(response, url)
            for chunk in response.iter_content(1 << 20):
                spool.write(chunk)
    except _TRANSIENT_ERRORS as exc:  # refused, reset, timed out, or a body cut short of its Content-Length
        raise _Transient(f"{type(exc).__name__}: {exc}") from None
    except requests.RequestException as exc:
        raise ShardUnreachable(f"cannot read {url}: {exc}") from None


def _http_head(url: str) -> tuple[int | None, str | None]:
    try:
        response = requests.head(url, allow_redirects=True, timeout=TIMEOUT)
    except _TRANSIENT_ERRORS as exc:
        raise _Transient(f"{type(exc).__name__}: {exc}") from None
    except requests.RequestException as exc:
        raise ShardUnreachable(f"cannot read {url}: {exc}") from None
    _check(response, url)
    length = response.headers.get("Content-Length", "")
    return (int(length) if length.isdigit() else None), (
        response.headers.get("ETag") or response.headers.get("Last-Modified"))


def _fsspec_get(url: str, spool: IO[bytes]) -> None:
    import fsspec

    spool.seek(0)
    spool.truncate()
    try:
        with fsspec.open(url, "rb") as remote:
            shutil.copyfileobj(remote, spool, 1 << 20)
    except (FileNotFoundError, PermissionError) as exc:
        raise ShardUnreachable(f"cannot read {url}: {exc}") from None
    except OSError as exc:  # fsspec's back ends report network trouble as OSError
        raise _Transient(f"{type(exc).__name__}: {exc}") from None


def _fsspec_info(url: str) -> tuple[int | None, str | None]:
    import fsspec

    try:
        filesystem, path = fsspec.core.url_to_fs(url)
        info = filesystem.info(path)
    except (FileNotFoundError, PermissionError) as exc:
        raise ShardUnreachable(f"cannot read {url}: {exc}") from None
    except OSError as exc:
        raise _Transient(f"{type(exc).__name__}: {exc}") from None
    version = next((str(info[field]) for field in _VERSION_FIELDS if info.get(field) is not None), None)
    return info.get("size"), version
