"""What a header-only image size costs for PNGs: PIL's header alone, ours (which also looks for an eXIf chunk
after the pixels in the file's last 64 KB), and walking every chunk to find it (what it did first).

    python benchmarks/header_size.py                 # 40 noise PNGs of 1024 px, 8 KB IDAT chunks as libpng writes

Header-only sizes are what a jsonl or shard index reads per record at a run's start; the chunk walk read the
whole file of a PNG written in small IDAT chunks. Prints ms per file and ratios against the header alone.
"""

from __future__ import annotations

import argparse
import io
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _common  # noqa: E402,F401  (offline, like every benchmark)


def rechunked(data: bytes, size: int) -> bytes:
    """The PNG `data` with its image data in IDAT chunks of `size` bytes."""
    chunks, position, pixels = [data[:8]], 8, b""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    while position < len(data):
        length, kind = int.from_bytes(data[position:position + 4], "big"), data[position + 4:position + 8]
        body, position = data[position + 8:position + 8 + length], position + 12 + length
        if kind == b"IDAT":
            pixels += body
            continue
        if pixels:
            chunks += [chunk(b"IDAT", pixels[i:i + size]) for i in range(0, len(pixels), size)]
            pixels = b""
        chunks.append(chunk(kind, body))
    return b"".join(chunks)


def walk_chunks(path: Path) -> None:
    """The replaced way: every chunk header read in turn, up to the eXIf or IEND."""
    with open(path, "rb") as file:
        file.seek(8)
        while header := file.read(8):
            length, kind = int.from_bytes(header[:4], "big"), header[4:]
            if kind in (b"eXIf", b"IEND"):
                return
            file.seek(length + 4, io.SEEK_CUR)


def header_alone(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as image:
        image.size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=40)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=8192, help="IDAT chunk bytes (libpng's default)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import numpy as np
    from PIL import Image

    from difftrain.data.images import image_size_from_file

    with tempfile.TemporaryDirectory() as folder:
        rng, paths = np.random.default_rng(0), []
        for index in range(args.files):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)).save(buffer, "PNG")
            paths.append(Path(folder) / f"{index}.png")
            paths[-1].write_bytes(rechunked(buffer.getvalue(), args.chunk))
        megabytes = sum(path.stat().st_size for path in paths) / len(paths) / 2**20
        timings = {}
        for name, read in (("header alone", header_alone), ("ours", image_size_from_file),
                           ("chunk walk", lambda path: (header_alone(path), walk_chunks(path)))):
            started = time.perf_counter()
            for _ in range(args.rounds):
                for path in paths:
                    read(path)
            timings[name] = (time.perf_counter() - started) / (args.rounds * len(paths)) * 1000
    print(f"{args.files} PNGs of {args.size} px, {megabytes:.1f} MB each, IDAT chunks of {args.chunk} bytes "
          "(warm page cache):")
    for name, ms in timings.items():
        print(f"  {name:13s} {ms:7.3f} ms a file   x{ms / timings['header alone']:.1f} the header alone")


if __name__ == "__main__":
    main()
