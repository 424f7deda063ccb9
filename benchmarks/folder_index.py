"""Opening an image folder with the folder index: the first start decodes every image, the second only what changed.

    .venv/bin/python benchmarks/folder_index.py [--images 20000] [--size 32] [--changed 200] [--noise]

Writes `--images` shapes PNGs (with `--noise`, JPEGs of noise instead: a photo's bytes, ~0.4 MB at
512 px), waits out the index's settle time (a file written in the
last 2 s is not trusted, so a real data set's old files are what is measured), then opens
the folder as training does, in one process: without an index (how every start went
before), the first start with an index (builds it), the second (reads it), and a third
after `--changed` images were rewritten. Ratios are against the first start. Each line gives
wall and CPU seconds: the scan is one thread, so CPU time is the steadier figure on a shared machine.

Then a cached run's start after the scan: the latent cache's walk over every record with the
cache full (a stand-in encoder fills it first), as it went before the scan kept each file's
hash (every image read and hashed again) and as it goes now (no image read). Last, the same
images as webdataset shards: the walk of the first cached start (every shard read and hashed),
and of the next one, which takes the hashes and captions that walk left in the cache
(record_summary.py) and reads no shard.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path
from unittest import mock

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

    for path in sorted(root.glob("*.*"))[:count]:
        with Image.open(path) as image:
            Image.eval(image.convert("RGB"), lambda v: 255 - v).save(path)
        later = time.time_ns() - 5 * 10**9  # settled, and newer than the indexed mtime
        os.utime(path, ns=(later, later))


def write_noise(root: Path, count: int, size: int) -> None:
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for number in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{number:06d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--changed", type=int, default=200)
    parser.add_argument("--noise", action="store_true", help="noise JPEGs, as many bytes as a photo, not shapes PNGs")
    args = parser.parse_args()

    from difftrain.data.folder_index import SETTLE_NS
    from difftrain.data.shapes import write_shapes_dataset

    with tempfile.TemporaryDirectory() as tmp:
        root, index = Path(tmp) / "data", Path(tmp) / "index"
        started = time.perf_counter()
        if args.noise:
            write_noise(root, args.images, args.size)
        else:
            write_shapes_dataset(root, num_images=args.images, size=args.size)
        megabytes = sum(p.stat().st_size for p in root.iterdir()) / 2**20
        print(f"wrote {args.images:,} {args.size} px images ({megabytes:,.0f} MB) in "
              f"{time.perf_counter() - started:.1f} s")
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
        cached_start(source, Path(tmp) / "cache")
        shard_start(source, Path(tmp))


def cached_start(source, cache: Path) -> None:
    """The latent cache walk with the cache full: reading and hashing every record against the scan's hashes."""
    def walk(**known) -> tuple[tuple[float, float], dict]:
        with mock.patch.multiple(source, **known) if known else contextlib.nullcontext():
            return timed_walk(source, cache)

    filled, counts = walk()
    assert counts["latents computed"] == len(source)
    (read_all, counts_read), (now, counts_now) = walk(known_record=lambda index: None), walk()
    assert counts_read["latents found"] == counts_now["latents found"] == len(source)
    print(f"\ncached start (cache walk, {len(source):,} records, cache full) {'wall s':>8} {'CPU s':>8}")
    print(f"{'every record read and hashed (before)':<52} {read_all[0]:8.2f} {read_all[1]:8.2f}")
    print(f"{'hashes from the folder scan (now)':<52} {now[0]:8.2f} {now[1]:8.2f}  "
          f"{read_all[0] / now[0]:5.1f}x {read_all[1] / now[1]:5.1f}x")


def timed_walk(source, cache: Path) -> tuple[tuple[float, float], dict]:
    """((wall s, CPU s), counts) of one latent cache walk over `source` at 16 px, with a stand-in encoder."""
    from difftrain.data.cache import CacheEncoders
    from difftrain.data.dataset import ImageDataset

    small = lambda pixels: pixels[:, :, ::8, ::8].contiguous()  # noqa: E731  (the cache walk is measured, not the VAE)
    encoders = CacheEncoders(latents=lambda pixels: (small(pixels), small(pixels)), latent_tag="bench")
    data = ImageDataset(source, 16, "center", False, 0, 64_000_000)
    wall, cpu = time.perf_counter(), time.process_time()
    counts = data.fill_cache(encoders, cache, progress=False)
    return (time.perf_counter() - wall, time.process_time() - cpu), counts


def shard_start(folder_source, work: Path) -> None:
    """The cache walk with the cache full over the same images as webdataset shards: every shard read and hashed
    (each start before the record summary), and hashes from the summary the walk before left (no shard read)."""
    import shutil

    from difftrain.data.shards import build_shards
    from difftrain.data.sources import open_source

    def opened():
        return open_source("webdataset", work / "shards" / "filelist.txt", progress=False)

    build_shards(folder_source, work / "shards", "webdataset", records_per_shard=1000, progress=False)
    cache = work / "shard-cache"
    _, filled = timed_walk(opened(), cache)
    assert filled["latents computed"] == len(folder_source)
    shutil.rmtree(cache / "records")  # as if this difftrain kept none
    (read_all, counts_read), now_source = timed_walk(opened(), cache), opened()
    now, counts_now = timed_walk(now_source, cache)
    assert counts_read["latents found"] == counts_now["latents found"] == len(folder_source)
    assert now_source.shard_loads == 0
    print(f"\ncached start over {len(now_source.shard_sizes)} webdataset shards of the same records "
          f"{'wall s':>8} {'CPU s':>8}")
    print(f"{'every shard read and hashed (before)':<52} {read_all[0]:8.2f} {read_all[1]:8.2f}")
    print(f"{'hashes from the record summary (now)':<52} {now[0]:8.2f} {now[1]:8.2f}  "
          f"{read_all[0] / now[0]:5.1f}x {read_all[1] / now[1]:5.1f}x")


if __name__ == "__main__":
    main()
