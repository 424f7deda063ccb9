"""`difftrain data download` against a real HTTP server on 127.0.0.1: every failure reason, the
shard formats read back through our own sources, resume after a kill, and N processes sharing OUT."""

from __future__ import annotations

import base64
import csv
import gzip
import hashlib
import io
import json
import random
import tarfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from http_server import LoopbackServer
from PIL import Image

from difftrain.cli import main
from difftrain.data.download import DownloadOptions, Failed, Fetcher, check_url, download, merge, resize
from difftrain.data.folder import DatasetError
from difftrain.data.sources import open_source


def png(width: int, height: int, noisy: bool = False) -> bytes:
    image = Image.new("RGB", (width, height), (width * 3 % 256, height * 5 % 256, 90))
    if noisy:  # incompressible, so cutting the file cuts pixel data, not just the end marker
        image = Image.frombytes("RGB", (width, height), random.Random(0).randbytes(width * height * 3))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(buffer, "JPEG")
    return buffer.getvalue()


def served_image(path: str) -> bytes:
    """/img/64x48.png -> a 64x48 PNG; the same bytes on every request."""
    size, _, kind = path.rpartition("/")[2].partition(".")
    width, height = map(int, size.split("x"))
    return png(width, height) if kind == "png" else jpeg(width, height)


HTML = b"<!doctype html><html><body>not found, but with status 200</body></html>"
BIG = b"\xff" * 200_000


class Handler(BaseHTTPRequestHandler):
    server: Server

    def do_GET(self) -> None:
        hits = self.server.count(self.path)  # the query string keeps each test's URLs apart
        path = self.path.partition("?")[0]
        if path.startswith("/img/"):
            self.reply(200, served_image(path), "image/png" if path.endswith(".png") else "image/jpeg")
        elif path == "/truncated.png":
            data = png(64, 64, noisy=True)
            self.reply(200, data[: len(data) // 2], "image/png")
        elif path == "/page.html":
            self.reply(200, HTML, "text/html; charset=utf-8")
        elif path == "/disguised.jpg":
            self.reply(200, HTML, "image/jpeg")
        elif path == "/slow":
            time.sleep(1.0)
            self.reply(200, png(8, 8), "image/png")
        elif path.startswith("/redirect/"):
            left = int(path.rpartition("/")[2])
            self.redirect(f"/redirect/{left - 1}" if left > 1 else "/img/40x30.png")
        elif path == "/loop":
            self.redirect("/loop")
        elif path == "/to-file":
            self.redirect("file:///etc/passwd")
        elif path == "/flaky":
            self.reply(500, b"try again", "text/plain") if hits == 1 else self.reply(200, png(24, 24), "image/png")
        elif path == "/down":
            self.reply(503, b"down", "text/plain")
        elif path == "/huge":
            self.reply(200, BIG, "image/jpeg", length=False)  # no Content-Length: the reader must stop itself
        elif path == "/huge-declared":
            self.reply(200, BIG, "image/jpeg")
        elif path == "/bomb.png":
            self.reply(200, png(300, 300), "image/png")
        elif path == "/trickle.png":  # a byte every 0.2 s of a 1,000-byte body: only a total deadline stops it
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.2)
        elif path == "/odd-length.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "\u00b2".encode().decode("latin-1"))  # b"\xc2\xb2": "²"
            self.end_headers()
            self.wfile.write(png(8, 8))
        elif path == "/bad-redirect":
            self.send_response(302)
            self.send_header("Location", "http://[::1")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/busy":  # 429 with Retry-After the first time
            if hits == 1:
                self.reply(429, b"later", "text/plain", headers={"Retry-After": "1"})
            else:
                self.reply(200, png(12, 12), "image/png")
        elif path == "/optout.png":
            self.reply(200, png(20, 20), "image/png", headers={"X-Robots-Tag": "noimageai, nofollow"})
        else:
            self.reply(404, b"no such thing", "text/plain")

    def reply(self, status: int, body: bytes, content_type: str, length: bool = True,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length:
            self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


class Server(LoopbackServer):
    def __init__(self):
        super().__init__(Handler)
        self.hits: Counter[str] = Counter()
        self._lock = threading.Lock()

    def count(self, path: str) -> int:
        with self._lock:
            self.hits[path] += 1
            return self.hits[path]

    def handle_error(self, request, client_address) -> None:
        pass  # a client that gave up on /slow closed the socket: expected


@pytest.fixture(scope="module")
def server():
    with Server().running() as httpd:
        yield httpd


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)


def fast(**overrides) -> DownloadOptions:
    """Small timeouts and pauses, so the failures cost milliseconds."""
    settings = dict(workers=8, timeout=0.5, retries=2, backoff=0.01, max_bytes=100_000, max_pixels=50_000,
                    progress=False, allow_private=True)  # the test server is on loopback
    settings.update(overrides)
    return DownloadOptions(**settings)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def good_rows(base: str, tag: str, count: int) -> list[dict]:
    return [{"url": f"{base}/img/{20 + i}x{16 + i}.png?t={tag}", "caption": f"picture {i}", "id": i}
            for i in range(count)]


def tar_samples(folder: Path) -> list[dict]:
    """Every sample's .json member, over the shards filelist.txt lists, in order."""
    samples = []
    for name in (folder / "filelist.txt").read_text().split():
        with tarfile.open(folder / name) as tar:
            samples += [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    return samples


# Each row: url path (or a whole URL), and what it must end as: "ok" or the failure reason.
MIXED = [
    ("/img/64x48.png", "ok"), ("/img/30x40.jpg", "ok"), ("/img/8x8.png", "ok"), ("/redirect/3", "ok"),
    ("/flaky", "ok"), ("/truncated.png", "broken image"), ("/page.html", "not an image"),
    ("/disguised.jpg", "not an image"), ("/slow", "timeout"), ("/missing", "http 404"), ("/down", "http 503"),
    ("/huge", "too large"), ("/huge-declared", "too large"), ("/bomb.png", "too many pixels"),
    ("/optout.png", "opted out"), ("/loop", "too many redirects"), ("/to-file", "unsupported scheme"),
    ("file:///etc/passwd", "unsupported scheme"), ("ftp://127.0.0.1/a.jpg", "unsupported scheme"),
    ("data:image/png;base64," + base64.b64encode(png(4, 4)).decode(), "unsupported scheme"), ("", "bad row"),
]


def test_every_failure_has_its_reason_and_the_rest_reads_back_as_webdataset(tmp_path, server):
    rows = [{"url": server.url + path + "?t=mixed" if path.startswith("/") else path, "caption": f"row {i}",
             "license": f"cc-{i}", "score": i / 10} for i, (path, _) in enumerate(MIXED)]
    urls = write_jsonl(tmp_path / "urls.jsonl", rows)
    result = download(urls, tmp_path / "out", fast(resize=16, per_shard=8))

    expected = Counter(outcome for _, outcome in MIXED if outcome != "ok")
    report = result.report
    assert report is not None and result.shards == [0, 1, 2]
    assert (report["rows"], report["ok"], report["failed"]) == (21, 5, 16)
    assert report["failures_by_reason"] == dict(expected)
    # Retried: the 500 once, the 503 and the timeout up to --retries; a 404 never.
    hits = {path: server.hits[path + "?t=mixed"] for path in ("/flaky", "/down", "/missing", "/huge-declared")}
    assert hits == {"/flaky": 2, "/down": 3, "/missing": 1, "/huge-declared": 1}
    failures = [f for k in range(3) for f in json.loads((tmp_path / "out/reports" / f"{k:06d}.json").read_text())[
        "failures"]]
    # (The server may not have seen the last timed-out request yet: the client's count is the one to check.)
    assert failures[3]["detail"] == "no answer within --timeout 0.5 s (after 3 attempts)"
    # Without a Content-Length the reader stops itself past --max-bytes; with one, nothing is read.
    assert [f["detail"] for f in failures[6:8]] == ["over --max-bytes 100,000 bytes; stopped reading",
                                                    "Content-Length 200,000 bytes is over --max-bytes 100,000"]
    assert {f["url"]: f["reason"] for f in failures}["file:///etc/passwd"] == "unsupported scheme"
    bomb = next(f for f in failures if f["url"].endswith("/bomb.png?t=mixed"))
    assert bomb["detail"] == "300x300 pixels exceeds --max-pixels=50000 (possible decompression bomb)"  # its flag
    assert [f["row"] for f in failures] == list(range(5, 21))
    # Rows 8-20 all failed: their shards hold no file and the list names shard 0 alone.
    assert (tmp_path / "out/filelist.txt").read_text() == "shard-000000.tar\n"
    assert report["files"] == ["shard-000000.tar"]

    source = open_source("webdataset", tmp_path / "out", progress=False)
    assert len(source) == 5
    # keep_ratio 16 on the shorter side, never enlarged: 64x48 -> 21x16, 8x8 stays.
    assert source.sizes.tolist() == [[21, 16], [16, 21], [8, 8], [21, 16], [16, 16]]
    assert [source.read(i).captions for i in range(5)] == [[f"row {i}"] for i in range(5)]
    assert all(b"root:" not in source.read(i).data for i in range(5))

    meta = tar_samples(tmp_path / "out")
    assert [m["key"] for m in meta] == [f"{i:09d}" for i in range(5)]
    assert [(m["license"], m["score"]) for m in meta] == [(f"cc-{i}", i / 10) for i in range(5)]
    assert [(m["original_width"], m["original_height"]) for m in meta] == [(64, 48), (30, 40), (8, 8), (40, 30),
                                                                           (24, 24)]
    assert meta[0]["sha256"] == hashlib.sha256(served_image("/img/64x48.png")).hexdigest()
    assert meta[3]["url"].endswith("/redirect/3?t=mixed")  # the URL asked for, not where it led


def test_laion_parts_from_parquet_keep_every_column(tmp_path, server):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = good_rows(server.url, "parquet", 5)
    table = pa.table({"URL": [r["url"] for r in rows], "TEXT": [r["caption"] for r in rows],
                      "similarity": [0.31, 0.32, None, 0.34, 0.35],
                      "taken": pa.array([0, 1, 2, 3, 4], pa.timestamp("s"))})
    pq.write_table(table, tmp_path / "urls.parquet", row_group_size=2)
    options = fast(url_col="URL", caption_col="TEXT", format="laion", per_shard=2, resize=12,
                   resize_mode="center_crop", encode_format="png")
    result = download(tmp_path / "urls.parquet", tmp_path / "out", options)

    assert result.report["ok"] == 5 and result.report["files"] == ["part-00000.gz", "part-00001.gz", "part-00002.gz"]
    source = open_source("laion", tmp_path / "out", progress=False)
    assert len(source) == 5 and source.shard_sizes == [2, 2, 1]
    assert source.sizes.tolist() == [[12, 12]] * 5
    assert (source.shards_from_sidecar, source.shards_indexed) == (3, 0)  # each part's index is beside it
    assert [source.read(i).captions for i in range(5)] == [[f"picture {i}"] for i in range(5)]
    assert Image.open(io.BytesIO(source.read(0).data)).format == "PNG"
    lines = gzip.decompress((tmp_path / "out/part-00001.gz").read_bytes()).splitlines()
    meta = [json.loads(line.split(b"\t")[1]) for line in lines]
    assert [m["similarity"] for m in meta] == [None, 0.34]
    assert [m["taken"] for m in meta] == ["1970-01-01 00:00:02", "1970-01-01 00:00:03"]
    assert [(m["key"], m["original_width"], m["width"]) for m in meta] == [("000000002", 22, 12),
                                                                           ("000000003", 23, 12)]


@pytest.mark.parametrize("mode, upscale, size, expected", [
    ("keep_ratio", False, 16, (21, 16)), ("keep_ratio", False, 100, (64, 48)), ("keep_ratio", True, 96, (128, 96)),
    ("center_crop", False, 16, (16, 16)), ("center_crop", False, 100, (48, 48)), ("border", False, 32, (32, 32)),
    ("no", False, 16, (64, 48)),
])
def test_resize_modes(mode, upscale, size, expected):
    image = Image.new("RGB", (64, 48), (10, 200, 10))
    result = resize(image, size, mode, upscale)
    assert result.size == expected
    if mode == "border":  # 64x48 -> 32x24, centred on white
        assert result.getpixel((0, 0)) == (255, 255, 255) and result.getpixel((16, 16))[1] > 150


@pytest.mark.parametrize("url, reason", [
    ("file:///etc/passwd", "unsupported scheme"), ("ftp://host/a.jpg", "unsupported scheme"),
    ("data:,x", "unsupported scheme"), ("/relative.jpg", "unsupported scheme"), ("http:///no-host", "bad url"),
    ("http://[::1/", "bad url"),
])
def test_only_http_urls_with_a_host_are_fetched(url, reason):
    with pytest.raises(Failed) as caught:
        check_url(url)
    assert caught.value.reason == reason
    check_url("HTTPS://example.com/a.jpg")


def test_cli_csv_and_its_errors(tmp_path, server, capsys):
    rows = good_rows(server.url, "cli", 3) + [{"url": f"{server.url}/missing?t=cli", "caption": "gone", "id": 9}]
    with open(tmp_path / "urls.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, ["id", "url", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    argv = ["data", "download", str(tmp_path / "urls.csv"), str(tmp_path / "out"), "--quiet", "--allow-private",
            "--workers", "4", "--timeout", "2", "--format", "laion", "--no-gzip", "--resize", "10",
            "--resize-mode", "border"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "4 rows: 3 ok, 1 failed (http 404: 1)" in printed and "images/s" in printed and "MB/s" in printed
    assert (tmp_path / "out/filelist.txt").read_text() == "part-00000.txt\n"
    source = open_source("laion", tmp_path / "out/filelist.txt", progress=False)
    assert len(source) == 3 and source.sizes.tolist() == [[10, 10]] * 3
    # ... and `difftrain data build` reads the result unchanged.
    assert main(["data", "build", str(tmp_path / "out"), str(tmp_path / "folder"), "--source", "laion",
                 "--format", "folder"]) == 0
    assert len(list((tmp_path / "folder").glob("*.jpg"))) == 3

    assert main(argv[:2] + [str(tmp_path / "urls.csv"), str(tmp_path / "other"), "--url-col", "link"]) == 2
    assert "no 'link' column (its columns: 'id', 'url', 'caption'); name the URL column with --url-col" in \
        capsys.readouterr().err
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    assert main(argv[:2] + [str(tmp_path / "broken.parquet"), str(tmp_path / "other")]) == 2
    assert f"cannot read {tmp_path / 'broken.parquet'} as parquet" in capsys.readouterr().err
    assert main(argv[:2] + [str(tmp_path / "absent.csv"), str(tmp_path / "other")]) == 2
    assert f"{tmp_path / 'absent.csv'} does not exist" in capsys.readouterr().err


def test_bad_input_names_the_file_and_columns(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"link": "http://x/1.jpg", "text": "t"}])
    with pytest.raises(DatasetError, match=r"a.jsonl has no 'url' column \(its columns: 'link', 'text'\)"):
        download(tmp_path / "a.jsonl", tmp_path / "out")
    with pytest.raises(DatasetError, match=r"no 'caption' column .* --caption-col ''"):
        download(tmp_path / "a.jsonl", tmp_path / "out", DownloadOptions(url_col="link"))
    (tmp_path / "urls.xlsx").write_bytes(b"")
    with pytest.raises(DatasetError, match="cannot tell the input's format from .xlsx"):
        download(tmp_path / "urls.xlsx", tmp_path / "out")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DatasetError, match="empty.txt holds no rows"):
        download(tmp_path / "empty.txt", tmp_path / "out")
    (tmp_path / "data").mkdir()
    (tmp_path / "data/keep.jpg").write_bytes(b"mine")
    with pytest.raises(DatasetError, match="is not empty and holds no download to continue"):
        download(tmp_path / "a.jsonl", tmp_path / "data", DownloadOptions(url_col="link", caption_col="text"))
    with pytest.raises(DatasetError, match=r"--resize 0: must be at least 1; --shard 2/2: give i/N with 0 <= i < N"):
        download(tmp_path / "a.jsonl", tmp_path / "out", DownloadOptions(shard=(2, 2), resize=0))


def test_txt_input_and_bad_jsonl_lines(tmp_path, server):
    # Saved by Notepad: a BOM before the first URL, which is fetched as the others are
    lines = f"\ufeff{server.url}/img/20x20.png?t=txt\n\n  {server.url}/img/9x9.png?t=txt  \n"
    (tmp_path / "urls.txt").write_text(lines, encoding="utf-8")
    result = download(tmp_path / "urls.txt", tmp_path / "txt", fast())
    assert result.report["ok"] == 2
    assert open_source("webdataset", tmp_path / "txt", progress=False).sizes.tolist() == [[20, 20], [9, 9]]

    lines = [json.dumps({"url": f"{server.url}/img/20x20.png?t=jsonl", "caption": "a"}), "{broken", "[1, 2]",
             json.dumps({"caption": "no url"})]
    (tmp_path / "urls.jsonl").write_text("\n".join(lines) + "\n")
    report = download(tmp_path / "urls.jsonl", tmp_path / "jsonl", fast()).report
    assert (report["ok"], report["failures_by_reason"]) == (1, {"bad row": 3})
    details = [f["detail"] for f in json.loads((tmp_path / "jsonl/reports/000000.json").read_text())["failures"]]
    assert details == ["urls.jsonl line 2: not valid JSON: Expecting property name enclosed in double quotes",
                       "urls.jsonl line 3: not a JSON object", "no URL in 'url'"]


def test_a_jsonl_read_by_all_its_keys_with_a_bom_line_and_a_captions_column(tmp_path, server):
    """A jsonl's columns are its objects' keys together: its first row may have no caption. A BOM on a
    line of its own is no row (the plan counted one, and its last shard never finished). An input column
    named `captions` does not replace the caption column's text in the samples' metadata."""
    rows = [{"url": f"{server.url}/img/20x20.png?t=keys"},
            {"url": f"{server.url}/img/9x9.png?t=keys", "caption": "a square", "captions": 7, "id": 1}]
    (tmp_path / "urls.jsonl").write_bytes(b"\xef\xbb\xbf\n" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    result = download(tmp_path / "urls.jsonl", tmp_path / "out", fast(per_shard=1))
    assert (result.report["rows"], result.report["ok"], result.shards) == (2, 2, [0, 1])
    assert [(m["captions"], m.get("id")) for m in tar_samples(tmp_path / "out")] == [([], None), (["a square"], 1)]
    source = open_source("webdataset", tmp_path / "out", progress=False)
    assert [source.read(i).captions for i in range(2)] == [[], ["a square"]]
    # A list in the caption column is several captions, as every reader takes it (its Python repr was written as
    # one caption); a caption of another kind fails its row, naming the column.
    rows = [{"url": f"{server.url}/img/12x12.png?t=list", "caption": ["a cat", "a kitten"]},
            {"url": f"{server.url}/img/13x13.png?t=list", "caption": {"en": "a dog"}}]
    result = download(write_jsonl(tmp_path / "list.jsonl", rows), tmp_path / "listed", fast())
    source = open_source("webdataset", tmp_path / "listed", progress=False)
    assert (result.report["ok"], [source.read(i).captions for i in range(len(source))]) == (1, [["a cat", "a kitten"]])
    assert "caption column 'caption': a caption must be a string or a list of strings, found dict" in json.dumps(
        result.report)


def test_resume_redoes_only_unfinished_shards(tmp_path, server, monkeypatch):
    urls = write_jsonl(tmp_path / "urls.jsonl", good_rows(server.url, "resume", 10))
    out = tmp_path / "out"
    stop_after = 5  # a kill mid-run: shard 1 (rows 3-5) is being written when it comes
    real_get = Fetcher.get

    def dying_get(self, url):
        if url.endswith(f"{20 + stop_after}x{16 + stop_after}.png?t=resume"):
            raise KeyboardInterrupt
        return real_get(self, url)

    monkeypatch.setattr(Fetcher, "get", dying_get)
    with pytest.raises(KeyboardInterrupt):
        download(urls, out, fast(per_shard=3, workers=1))
    monkeypatch.setattr(Fetcher, "get", real_get)
    assert sorted(p.name for p in (out / "reports").iterdir()) == ["000000.json"]
    assert not list(out.glob("*.tmp")) and not (out / "filelist.txt").exists()  # the half shard was dropped

    (out / "shard-000001.tar.tmp").write_bytes(b"half a tar")  # as a SIGKILL inside the write leaves it
    result = download(urls, out, fast(per_shard=3))
    assert result.shards == [1, 2, 3] and result.report["ok"] == 10
    # Killed between shard 2's rename and its report, and inside shard 3's write.
    (out / "reports/000002.json").unlink()
    (out / "shard-000003.tar").unlink()
    (out / "reports/000003.json").unlink()
    (out / "shard-000003.tar.tmp").write_bytes(b"stale")
    before = Counter(server.hits)
    result = download(urls, out, fast(per_shard=3))
    assert result.shards == [2, 3] and result.run["rows"] == 4

    fetched = {url.split("/img/")[1] for url in server.hits - before if url.endswith("?t=resume")}
    assert fetched == {f"{20 + i}x{16 + i}.png?t=resume" for i in (6, 7, 8, 9)}  # shards 0 and 1 untouched
    samples = tar_samples(out)
    assert sorted(s["url"] for s in samples) == sorted(r["url"] for r in good_rows(server.url, "resume", 10))
    assert [s["key"] for s in samples] == [f"{i:09d}" for i in range(10)]  # each row once, in order
    assert not list(out.glob("*.tmp"))
    assert (out / "filelist.txt").read_text().split() == [f"shard-{k:06d}.tar" for k in range(4)]
    opened = open_source("webdataset", out, progress=False)
    assert len(opened) == 10
    # Each shard's index was written with it, redone shards' too: the open reads no shard.
    assert (opened.shards_from_sidecar, opened.shards_indexed) == (4, 0)

    with pytest.raises(DatasetError, match=r"other settings: per_shard 3 \(now 4\)"):
        download(urls, out, fast(per_shard=4))


def test_two_processes_share_out_and_match_one_run(tmp_path, server, monkeypatch):
    urls = write_jsonl(tmp_path / "urls.jsonl", good_rows(server.url, "split", 9))
    whole = download(urls, tmp_path / "one", fast(per_shard=2))
    assert whole.report["ok"] == 9

    first = download(urls, tmp_path / "split", fast(per_shard=2, shard=(0, 2)))
    assert (first.shards, first.done, first.report) == ([0, 2, 4], 3, None)
    assert not (tmp_path / "split/filelist.txt").exists()
    with pytest.raises(DatasetError, match=r"2 of 5 shards are not finished \(shards 1, 3\)"):
        merge(tmp_path / "split")
    # The second process takes its place from torchrun's / accelerate's variables, and merges: all is done.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    second = download(urls, tmp_path / "split", fast(per_shard=2))
    assert second.shards == [1, 3] and second.report is not None

    def records(folder):
        source = open_source("webdataset", folder, progress=False)
        assert source.shards_indexed == 0  # each process wrote the indexes of its own shards
        return [(r.key.partition(":")[2], r.captions, r.data) for r in map(source.read, range(len(source)))]

    assert records(tmp_path / "split") == records(tmp_path / "one")
    assert (tmp_path / "split/filelist.txt").read_text() == (tmp_path / "one/filelist.txt").read_text()
    monkeypatch.delenv("WORLD_SIZE")
    assert main(["data", "download", str(urls), str(tmp_path / "split"), "--merge-only"]) == 0


def test_one_odd_server_fails_its_row_and_never_stops_the_run(tmp_path, server):
    fetcher = Fetcher(fast(timeout=1.0, retries=0))
    try:
        started = time.monotonic()
        with pytest.raises(Failed) as trickle:
            fetcher.get(f"{server.url}/trickle.png?t=odd")
        assert trickle.value.reason == "timeout" and time.monotonic() - started < 3  # not 200 s of bytes
        assert fetcher.get(f"{server.url}/odd-length.png?t=odd").startswith(b"\x89PNG")  # "²" is no length
        with pytest.raises(Failed) as redirect:
            fetcher.get(f"{server.url}/bad-redirect?t=odd")
        assert redirect.value.reason == "bad response"
    finally:
        fetcher.close()
    # A 429's Retry-After is waited for, not the 0.01 s backoff.
    patient = Fetcher(fast(retries=1))
    try:
        started = time.monotonic()
        assert patient.get(f"{server.url}/busy?t=odd").startswith(b"\x89PNG")
        assert time.monotonic() - started >= 0.9
    finally:
        patient.close()


def test_private_addresses_are_refused_unless_allowed(tmp_path, server):
    import requests

    from difftrain.data.download import _check_redirect

    guarded = Fetcher(fast(allow_private=False, retries=0))
    try:
        with pytest.raises(Failed) as refused:
            guarded.get(f"{server.url}/img/20x16.png?t=private")
        assert refused.value.reason == "private address" and "127.0.0.1" in refused.value.detail
        # A URL whose host reads one way to the check and another to the connection is refused unfetched;
        # an internationalised host name is the same host to both.
        with pytest.raises(Failed) as confusing:
            guarded.get("http://127.0.0.1\\@example.com/latest/meta-data/")
        assert confusing.value.reason == "bad url" and "reads differently" in confusing.value.detail
        from urllib3.util import parse_url

        from difftrain.data.download import _ascii_host

        prepared = requests.Request("GET", "http://Bücher.example/katze.jpg").prepare().url
        assert parse_url(prepared).host == _ascii_host("bücher.example") == "xn--bcher-kva.example"
        # IDNA 2008, as requests encodes: a sharp s is its own letter (IDNA 2003, Python's codec, made it "ss")
        prepared = requests.Request("GET", "http://straße.example/katze.jpg").prepare().url
        assert parse_url(prepared).host == _ascii_host("straße.example") == "xn--strae-oqa.example"
    finally:
        guarded.close()
    # A public URL that redirects inward (a cloud's metadata service) is refused at the redirect.
    response = requests.Response()
    response.status_code, response.url = 302, "http://example.com/cat.jpg"
    response.headers["Location"] = "http://169.254.169.254/latest/meta-data/"
    with pytest.raises(Failed, match="169.254.169.254 is 169.254.169.254, not a public address"):
        _check_redirect(response)
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"url": f"{server.url}/img/20x16.png?t=p", "caption": "x"}])
    with pytest.raises(DatasetError, match=r"none of the 1 rows .* could be downloaded \(private address: 1\)"):
        download(rows, tmp_path / "out", fast(allow_private=False))


def test_a_csv_with_a_long_caption_and_a_bad_byte_reports_the_row(tmp_path, server):
    long_caption = "a " * 100_000  # past csv's own 131,072-character cell limit
    lines = ["url,caption", f"{server.url}/img/20x16.png?t=csv,{long_caption}",
             f"{server.url}/img/21x17.png?t=csv,caf\xe9"]
    (tmp_path / "rows.csv").write_bytes("\n".join(lines[:2]).encode() + b"\n" + lines[2].encode("latin-1") + b"\n")
    result = download(tmp_path / "rows.csv", tmp_path / "out", fast())
    assert result.report["ok"] == 1 and result.report["failures_by_reason"] == {"bad row": 1}
    assert "data row 2 is not valid UTF-8" in json.dumps(result.report["examples"])


def test_a_name_that_resolves_public_for_the_check_and_private_for_the_connection_is_refused(server, monkeypatch):
    import socket

    # DNS rebinding: the name server answers a public address to the check and loopback to the connection.
    real_getaddrinfo, answers = socket.getaddrinfo, []

    def rebinding(host, port, *args, **kwargs):
        if host != "rebind.example":
            return real_getaddrinfo(host, port, *args, **kwargs)
        answers.append(port)
        address = "93.184.216.34" if len(answers) == 1 else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port or 0))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    port = server.url.rsplit(":", 1)[1]
    hits_before = sum(server.hits.values())
    guarded = Fetcher(fast(allow_private=False, retries=0))
    try:
        with pytest.raises(Failed) as refused:
            guarded.get(f"http://rebind.example:{port}/img/20x16.png?t=rebind")
    finally:
        guarded.close()
    assert refused.value.reason == "private address", refused.value
    assert "rebind.example connected to 127.0.0.1" in refused.value.detail
    assert len(answers) == 2 and sum(server.hits.values()) == hits_before  # resolved twice, nothing sent
    # The same name, allowed, reaches the server: the refusal was the peer check's, not a failed connection.
    allowed = Fetcher(fast(allow_private=True, retries=0))
    try:
        assert allowed.get(f"http://rebind.example:{port}/img/20x16.png?t=rebind")[:4] == b"\x89PNG"
    finally:
        allowed.close()
