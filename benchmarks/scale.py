"""Data at LAION scale: how long a run over many shards takes to open them, and what the index costs in memory.

    .venv/bin/python benchmarks/scale.py [--only startup|memory|fsdp|sampler] [--shards 10000] [--per-shard 2]
        [--cold-shards N] [--sampler-records 20000000]

start-up: writes `--shards` tiny laion parts (`--per-shard` small PNGs each) through `data build`'s writer,
which puts each part's index beside it, then opens them as a run does, in one process:
  cold       no index at all, every part read (on the first `--cold-shards` only when given, scaled up);
             the parts were just written, so they come from the page cache: a cold read from disk or
             over the network, of parts of 1,000 real images, costs far more, and a sidecar no more
  cache      the run's cache dir warm (index_dir), as a second start of the same run
  sidecar    the index beside the parts (what `data build` / `data download` write), first start
Ratios are against cold, per shard. Each line gives wall and CPU seconds (the machine may be shared:
CPU time is the steadier figure).

memory: writes `--memory-records` records in parts of `--memory-per-shard`, then in a fresh
process per size opens 1/10 and all of them (2,000 and 20,000 records at the default) from
their sidecars and reads a few batches, decoding each image; prints how much the resident set
grew (after imports, to after the batches) and tracemalloc's peak, and from the difference the
bytes a record costs: flat apart from the index (two int32 sizes and an int64 position a record,
and each shard's name and arrays).

fsdp: the text2image run on SD 1.5's shape at a quarter width (sd_quarter, EMA on) with 2 CPU
processes over gloo, launched as a user would, under DDP (`--multi_gpu`), FSDP
(configs/accelerate/fsdp_full_shard.yaml) and DeepSpeed ZeRO-2 and ZeRO-3 with CPU offload
(configs/accelerate/deepspeed_*.yaml): trained weights + optimizer state each process holds
(the run summary's `memory` line; under ZeRO it counts the fp32 master partitions too), steps/s
of the loop, and the checkpoint bytes rank 0 writes. The EMA weights (another 4 bytes a
parameter, sharded under FSDP and ZeRO-3) are not in the memory figure.

sampler: one epoch's order of `--sampler-records` records (20M), as the sampler keeps it now (an array)
and as it did before (lists of Python ints): seconds and peak resident growth, in one process.

A section is one function taking the parsed arguments and a work folder; add one to SECTIONS.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")



def tiny_pngs(count: int = 16) -> list[bytes]:
    from PIL import Image

    images = []
    for k in range(count):
        buffer = io.BytesIO()
        Image.new("RGB", (8 + k % 4, 6 + k // 4), (k * 15, 255 - k * 15, 90)).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


def write_parts(out: Path, shards: int, per_shard: int) -> Path:
    """`shards` gzip laion parts of `per_shard` records, each with its sidecar, and filelist.txt; the list."""
    from difftrain.data.records import RawRecord
    from difftrain.data.shards import LaionWriter

    out.mkdir(parents=True)
    writer, images = LaionWriter(out, per_shard, compress=True), tiny_pngs()
    synced, os.fsync = os.fsync, lambda fd: None  # a throw-away set: 10,000 fsyncs would be most of the time
    try:
        for number in range(shards * per_shard):
            writer.add(RawRecord(f"{number}", images[number % len(images)], [f"tiny picture {number}"]))
        names = writer.finish()
    finally:
        os.fsync = synced
    (out / "filelist.txt").write_text("".join(f"{name}\n" for name in names))
    return out / "filelist.txt"


def sublist(listing: Path, shards: int) -> Path:
    """A list of the first `shards` parts, beside the full one (so names resolve the same)."""
    names = listing.read_text().splitlines()[:shards]
    smaller = listing.with_name(f"filelist-{shards}.txt")
    smaller.write_text("".join(f"{name}\n" for name in names))
    return smaller


def timed_open(listing: Path, index_dir: Path | None, sidecars: bool) -> tuple[tuple[float, float], object]:
    """((wall s, CPU s), the source) of opening `listing` as a laion source."""
    from difftrain.data.sources import LaionSource, open_source

    LaionSource.sidecars = sidecars
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        source = open_source("laion", listing, index_dir=index_dir, progress=False)
        return (time.perf_counter() - wall, time.process_time() - cpu), source
    finally:
        LaionSource.sidecars = True


def startup(args: argparse.Namespace, work: Path) -> None:
    started = time.perf_counter()
    listing = write_parts(work / "parts", args.shards, args.per_shard)
    print(f"wrote {args.shards:,} laion parts of {args.per_shard} PNGs, each with its sidecar, in "
          f"{time.perf_counter() - started:.1f} s (no fsync)")
    cold_n = min(args.cold_shards or args.shards, args.shards)
    cold_list = listing if cold_n == args.shards else sublist(listing, cold_n)
    cache = work / "cache"
    cold, expected = timed_open(cold_list, None, sidecars=False)
    timed_open(listing, cache, sidecars=False)  # fills the cache (a first start with index_dir)
    warm, from_cache = timed_open(listing, cache, sidecars=False)
    beside, from_sidecar = timed_open(listing, None, sidecars=True)
    assert from_cache.shards_from_cache == args.shards and from_sidecar.shards_from_sidecar == args.shards
    assert from_sidecar.shards_indexed == 0 and len(from_sidecar) == args.shards * args.per_shard
    assert from_sidecar.sizes[:len(expected)].tolist() == expected.sizes.tolist()
    rows = [(f"cold ({cold_n:,} shards read)", cold, cold_n), (f"cache dir warm ({args.shards:,})", warm, args.shards),
            (f"sidecar ({args.shards:,})", beside, args.shards)]
    per_cold = (cold[0] / cold_n, cold[1] / cold_n)
    print(f"{'':<32} {'wall s':>8} {'CPU s':>8} {'ms/shard':>9}  speed-up over cold, per shard (wall, CPU)")
    for label, (wall, cpu), n in rows:
        print(f"{label:<32} {wall:8.2f} {cpu:8.2f} {1000 * wall / n:9.3f}  "
              f"{per_cold[0] * n / wall:6.1f}x {per_cold[1] * n / max(cpu, 1e-9):6.1f}x")
    if cold_n < args.shards:
        print(f"cold on {args.shards:,} shards, scaled from {cold_n:,}: ~{per_cold[0] * args.shards:.0f} s wall")


def memory(args: argparse.Namespace, work: Path) -> None:
    shards = args.memory_records // args.memory_per_shard
    listing = write_parts(work / "parts", shards, args.memory_per_shard)
    small = sublist(listing, shards // 10)
    results = []
    for path in (small, listing):
        found = subprocess.run([sys.executable, __file__, "--child-memory", str(path)], check=True,
                               capture_output=True, text=True)
        results.append(json.loads(found.stdout.strip().splitlines()[-1]))
    print(f"{'records':>10} {'shards':>8} {'open s':>7} {'RSS growth MiB':>15} {'tracemalloc peak MiB':>21}")
    for found in results:
        print(f"{found['records']:>10,} {found['shards']:>8,} {found['open_s']:7.2f} "
              f"{found['rss_growth'] / 2**20:15.1f} {found['traced_peak'] / 2**20:21.2f}")
    (a, b), extra = results, results[1]["records"] - results[0]["records"]
    print(f"per record: {(b['traced_peak'] - a['traced_peak']) / extra:.0f} bytes traced, "
          f"{(b['rss_growth'] - a['rss_growth']) / extra:.0f} bytes RSS ({extra:,} more records)")


def child_memory(listing: Path, batches: int = 8, batch_size: int = 16) -> None:
    """Open `listing`, read and decode a few batches; print one JSON line of what it cost."""
    import tracemalloc

    from difftrain.data.images import load_image_bytes
    from difftrain.data.sources import open_source

    load_image_bytes(tiny_pngs(1)[0])  # PIL's decoder plugins load now, not inside what is measured

    start_rss = _rss()  # after the imports, which are the same for every size
    tracemalloc.start()
    started = time.perf_counter()
    source = open_source("laion", listing, progress=False)
    opened = time.perf_counter() - started
    step = max(1, len(source) // (batches * batch_size))  # spread over the data: one shard read a batch or so
    for index in range(0, batches * batch_size * step, step):
        load_image_bytes(source.read(index % len(source)).data)
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(json.dumps({"records": len(source), "shards": len(source.shard_sizes), "open_s": opened,
                      "rss_growth": _rss() - start_rss, "traced_peak": traced}))


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


ROOT = Path(__file__).resolve().parents[1]
LAUNCHES = {
    "DDP": ["--multi_gpu", "--num_processes", "2"],
    "FSDP full shard": ["--config_file", str(ROOT / "configs/accelerate/fsdp_full_shard.yaml")],
    "ZeRO-2": ["--config_file", str(ROOT / "configs/accelerate/deepspeed_zero2.yaml")],
    "ZeRO-3 offload": ["--config_file", str(ROOT / "configs/accelerate/deepspeed_zero3_offload.yaml")],
}


def sharded(args: argparse.Namespace, work: Path) -> None:
    """The SD-quarter text2image run (EMA on) with 2 CPU processes over gloo, under DDP, FSDP and ZeRO-2/3."""
    import re

    import yaml
    from _common import sd_quarter

    from difftrain.data.shapes import write_shapes_dataset

    model = sd_quarter(work, args.fsdp_size)
    data = write_shapes_dataset(work / "shapes", num_images=64, size=args.fsdp_size, seed=0)
    print(f"text2image on SD 1.5's shape at a quarter width, {args.fsdp_size} px, batch 2 a process, "
          f"{args.fsdp_steps} steps, AdamW + EMA, 2 processes x 1 thread")
    rows = {}
    for name, launch in LAUNCHES.items():
        config = work / f"{name.split()[0].replace('-', '')}.yaml"
        config.write_text(yaml.safe_dump({
            "output_dir": str(work / config.stem), "method": "text2image", "seed": 0,
            "data": {"path": str(data), "resolution": args.fsdp_size},
            "model": {"base": str(model)},
            "training": {"max_steps": args.fsdp_steps, "batch_size": 2, "learning_rate": 1e-4},
            "checkpoint": {"every_steps": args.fsdp_steps}, "sample": {"every_steps": 10**6, "num_images": 1, "steps": 1},
            "log": {"every_steps": 1, "tensorboard": False}}))
        command = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--main_process_port", "0",
                   "-m", "difftrain", "train", "--no-progress", str(config)]
        done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{name} run failed:\n{(done.stdout + done.stderr)[-3000:]}")
        speed = float(re.search(r"speed +([\d.]+) steps/s", done.stdout)[1])
        held = float(re.search(r"memory +([\d.]+) MiB", done.stdout)[1])
        checkpoint = work / config.stem / "checkpoints" / f"step-{args.fsdp_steps:08d}"
        rank0 = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors") if "rank1" not in f.name)
        rows[name] = (held, speed, rank0 / 2**20)
    base_held, base_speed, _ = rows["DDP"]
    print(f"{'':<18} {'weights+optimizer MiB/process':>30} {'steps/s':>8} {'checkpoint MiB by rank 0':>25}  "
          "ratio to DDP (memory, speed)")
    for name, (held, speed, written) in rows.items():
        print(f"{name:<18} {held:30.2f} {speed:8.2f} {written:25.1f}  x{held / base_held:.2f} x{speed / base_speed:.2f}")


def sampler(args: argparse.Namespace, work: Path) -> None:
    """The per-epoch order of `--sampler-records` records (no shards, no buckets): time and peak memory growth of
    drawing one epoch's order and its first batch, as an array (now) and as lists of Python ints (before)."""
    import math

    import torch
    from _common import PeakMemory

    from difftrain.data.sampler import EpochBatchSampler

    records, batch, world = args.sampler_records, 16, 2

    def as_lists() -> list[int]:  # the order as difftrain drew it before 2026-12-06
        order = torch.randperm(records, generator=torch.Generator().manual_seed(0 * 1_000_003 + 0)).tolist()
        total = math.ceil(records / (batch * world)) * batch * world
        indices = (order * math.ceil(total / len(order)))[:total][0::world]
        return indices[:batch]

    def as_array() -> list[int]:
        ranked = EpochBatchSampler(records, batch, seed=0, rank=0, world_size=world)
        return list(next(iter(ranked)))

    rows = {}
    for name, draw in (("array (now)", as_array), ("lists (before)", as_lists)):  # lists last: freed ints stay
        with PeakMemory(torch.device("cpu")) as peak:
            started = time.perf_counter()
            first = draw()
            seconds = time.perf_counter() - started
        rows[name] = (seconds, peak.peak / 2**20, first)
    assert [key[2] for key in rows["array (now)"][2]] == rows["lists (before)"][2]  # the same order
    print(f"one epoch's order of {records:,} records, batch {batch}, rank 0 of {world}")
    before_s, before_mib, _ = rows["lists (before)"]
    for name, (seconds, mib, _) in rows.items():
        print(f"{name:<16} {seconds:6.2f} s {mib:8.0f} MiB peak growth   x{before_s / seconds:.1f} faster, "
              f"x{before_mib / max(mib, 1):.1f} less memory")


SECTIONS: dict[str, Callable[[argparse.Namespace, Path], None]] = {
    "startup": startup, "memory": memory, "fsdp": sharded, "sampler": sampler}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(SECTIONS), help="run one section (default: all)")
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument("--per-shard", type=int, default=2, help="records a part")
    parser.add_argument("--cold-shards", type=int, default=0, help="shards the cold open reads (default: all)")
    parser.add_argument("--memory-records", type=int, default=20_000)
    parser.add_argument("--memory-per-shard", type=int, default=100)
    parser.add_argument("--fsdp-steps", type=int, default=10)
    parser.add_argument("--fsdp-size", type=int, default=64, help="image side of the DDP, FSDP and ZeRO runs")
    parser.add_argument("--sampler-records", type=int, default=20_000_000)
    parser.add_argument("--child-memory", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        return child_memory(args.child_memory)
    for name, section in SECTIONS.items():
        if args.only in (None, name):
            print(f"== {name} ==")
            with tempfile.TemporaryDirectory() as tmp:
                section(args, Path(tmp))


if __name__ == "__main__":
    main()
