"""Opening an image folder with the folder index: the first start decodes every image, the second only what changed.

    .venv/bin/python benchmarks/folder_index.py [--images 20000] [--size 32] [--changed 200]

Writes `--images` shapes PNGs, waits out the index's settle time (a file written in the
last 2 s is not trusted, so a real data set's old files are what is measured), then opens
the folder as training does, in one process: without an index (how every start went
before), the first start with an index (builds it), the second (reads it), and a third
after `--changed` images were rewritten. Ratios are against the first start. Each line gives
wall and CPU seconds: the scan is one thread, so CPU time is the steadier figure on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def timed_open(root: Path, index_dir: Path | None) -> tuple[tuple[float, float], object]:
    """((wall s, CPU s), the source)."""
    from difftrain.data.sources import open_source

    wall, cpu = time.perf_counter(), time.process_time()
    source = open_source("folder", root, index_dir=index_dir, progress=False)
    return (time.perf_counter() - wall, time.process_time() - cpu), source


def rewrite(root: Path, count: int) -> None:
    """Give `count` images new bytes (a colour flipped) and a new mtime, as an edit would."""
    from PIL import Image

    for path in sorted(root.glob("*.png"))[:count]:
        with Image.open(path) as image:
            Image.eval(image.convert("RGB"), lambda v: 255 - v).save(path)
        later = time.time_ns() - 5 * 10**9  # settled, and newer than the indexed mtime
        os.utime(path, ns=(later, later))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--changed", type=int, default=200)
    args = parser.parse_args()

    from difftrain.data.folder_index import SETTLE_NS
    from difftrain.data.shapes import write_shapes_dataset

    with tempfile.TemporaryDirectory() as tmp:
        root, index = Path(tmp) / "data", Path(tmp) / "index"
        started = time.perf_counter()
        write_shapes_dataset(root, num_images=args.images, size=args.size)
        print(f"wrote {args.images:,} {args.size} px PNGs in {time.perf_counter() - started:.1f} s")
        time.sleep(SETTLE_NS / 1e9)

        plain, expected = timed_open(root, None)
        first, _ = timed_open(root, index)
        second, source = timed_open(root, index)
        assert source.sizes.tolist() == expected.sizes.tolist() and source.skipped == expected.skipped
        rewrite(root, args.changed)
        third, _ = timed_open(root, index)
        rows = [("no index", plain), ("first start (builds index)", first), ("second start (from index)", second),
                (f"after {args.changed:,} images changed", third)]
        print(f"{'':<30} {'wall s':>8} {'CPU s':>8}  speed-up over the first start (wall, CPU)")
        for label, (wall, cpu) in rows:
            print(f"{label:<30} {wall:8.2f} {cpu:8.2f}  {first[0] / wall:5.1f}x {first[1] / cpu:5.1f}x")
        print(f"first start: {args.images / first[0]:,.0f} images/s wall")


if __name__ == "__main__":
    main()
