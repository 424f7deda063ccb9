"""What each DataLoader worker copies of a folder source's per-record strings over an epoch: Python lists
(what FileSource held before) against packed arrays (data/packed.py, what it holds), in one process.

    .venv/bin/python benchmarks/worker_memory.py [--records 1000000] [--workers 2]

A worker is a forked child, as DataLoader's on Linux. Each reads every record's key, path and
captions once, as `FileSource.read` does (without opening the files), then reports its private
memory (USS) grown since the fork: pages it shares with the parent cost nothing, pages it copied
(touching a Python object writes its reference count) cost each worker their size. Prints the
parent's size of the lists and of the packed arrays, the workers' growth, and the ratio.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time

import psutil

from difftrain.data.packed import PackedLists, PackedStrings


def records(count: int) -> tuple[list[str], list[str], list[list[str]]]:
    keys = [f"photos/{i // 1000:04d}/IMG_{i:08d}.jpg" for i in range(count)]
    paths = [f"/data/datasets/my-photos/{key}" for key in keys]
    captions = [[f"a photo of a {('red', 'green', 'blue')[i % 3]} thing number {i}, in the style of nobody"]
                for i in range(count)]
    return keys, paths, captions


def epoch(keys, paths, captions, out) -> None:
    before = psutil.Process().memory_full_info().uss
    total = 0
    for i in range(len(keys)):
        total += len(keys[i]) + len(paths[i]) + len(captions[i][0])
    out.send((psutil.Process().memory_full_info().uss - before, total))


def workers_growth(keys, paths, captions, count: int) -> list[int]:
    context = multiprocessing.get_context("fork")
    pipes, children = [], []
    for _ in range(count):
        parent_end, child_end = context.Pipe()
        child = context.Process(target=epoch, args=(keys, paths, captions, child_end))
        child.start()
        pipes.append(parent_end)
        children.append(child)
    results = [pipe.recv() for pipe in pipes]
    for child in children:
        child.join()
    return [grown for grown, _ in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    mib = 2**20
    process = psutil.Process()

    start = process.memory_info().rss
    keys, paths, captions = records(args.records)
    lists_size = process.memory_info().rss - start
    started = time.perf_counter()
    grown_lists = workers_growth(keys, paths, captions, args.workers)
    lists_time = time.perf_counter() - started

    start = process.memory_info().rss
    packed = PackedStrings(keys), PackedStrings(paths), PackedLists(captions)
    packed_size = process.memory_info().rss - start
    del keys, paths, captions
    started = time.perf_counter()
    grown_packed = workers_growth(*packed, args.workers)
    packed_time = time.perf_counter() - started

    print(f"{args.records:,} records, {args.workers} forked workers, each reading every record's key, path and "
          f"captions once ({os.cpu_count()} CPUs)")
    print(f"  Python lists : parent holds ~{lists_size / mib:,.0f} MiB; each worker grew "
          f"{', '.join(f'{g / mib:,.0f}' for g in grown_lists)} MiB; epoch {lists_time:.1f} s")
    print(f"  packed arrays: parent holds ~{packed_size / mib:,.0f} MiB; each worker grew "
          f"{', '.join(f'{g / mib:,.0f}' for g in grown_packed)} MiB; epoch {packed_time:.1f} s")
    print(f"  worker growth, packed / lists: x{sum(grown_packed) / max(sum(grown_lists), 1):.3f}")


if __name__ == "__main__":
    main()
