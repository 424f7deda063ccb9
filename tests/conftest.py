"""Shared fixtures: a tiny shapes data set and a tiny run config, made fresh per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import json

import pytest
import torch
import yaml
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # set in each of pytest-xdist's worker processes (make test)
if WORKER:
    # Each worker with every core would put twice as many threads as cores on the machine: the cores
    # are shared out instead (measured with one thread a worker: 7.6 min, README). The processes a test
    # starts get the same count, since a sum split over another number of threads rounds differently
    # (the resume tests compare a killed subprocess's weights with this process's bit for bit).
    THREADS = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    torch.set_num_threads(THREADS)


# The slowest files, slowest first, by their CPU seconds in a 2-worker run on 2026-12-07 (PYTEST_ADDOPTS="-p
# suite_cpu", benchmarks/suite_cpu.py), with what a clean machine (CI) adds compiling kernels cold: they are
# handed out first, and the many small files after them even out the two workers' ends. In pytest-xdist's
# default order (most tests first) a 95 s file started last on one worker while the other sat idle for 80 s.
# The Makefile passes --no-loadscope-reorder, which keeps this order.
SLOWEST_FIRST = (
    "test_sharded_training.py",  # ~100 s, on both cores for ~70 s (its launches fork from one import: launches.py)
    "test_train_e2e.py",  # ~75 s, ~170 s when its compile test compiles cold
    "test_evaluate.py",  # ~135 s
    "test_controlnet_demo.py",  # ~120 s
    "test_onnx_export.py",  # ~95 s
    "test_serve.py",  # ~65 s
    "test_text2image.py",  # ~30 s, ~55 s cold
    "test_personalise.py",  # ~55 s
    "test_generate.py",  # ~50 s
    "test_generate_speed.py",  # ~15 s, ~45 s cold
    "test_schedulers.py",  # ~40 s
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: number for number, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests stay together


@pytest.fixture(scope="session", autouse=True)
def difftrain_cache(tmp_path_factory) -> Path:
    """difftrain's cache (compiled kernels, default feature caches) beside pytest's temporary folders, never
    in the home folder. It outlives a session, as the real cache does, so compiled kernels are reused; the
    workers of one session share it (inductor writes its cache entries atomically)."""
    session_folder = tmp_path_factory.getbasetemp().parent if WORKER else tmp_path_factory.getbasetemp()
    folder = session_folder.parent / "difftrain-cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIFFTRAIN_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    from difftrain.data.shapes import write_shapes_dataset

    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_images=24, size=16, seed=0)


def tiny_config(data_dir: Path, output_dir: Path, **sections) -> dict:
    """A run config that trains the tiny preset on 16 px images in well under a second a step."""
    config = {
        "output_dir": str(output_dir),
        "seed": 0,
        "data": {"path": str(data_dir), "resolution": 16},
        "model": {"preset": "tiny"},
        "training": {"max_steps": 4, "batch_size": 4, "learning_rate": 1e-3, "lr_warmup_steps": 2},
        "checkpoint": {"every_steps": 2, "keep_last": 10},
        "sample": {"every_steps": 1000, "num_images": 4, "steps": 3, "scheduler": "ddim"},
        "log": {"every_steps": 1, "tensorboard": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            config.setdefault(section, {}).update(values)
        else:
            config[section] = values
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def make_config(shapes_dir, tmp_path):
    def make(name: str = "run", **sections) -> Path:
        return write_config(tmp_path / f"{name}.yaml", tiny_config(shapes_dir, tmp_path / name, **sections))

    return make


@pytest.fixture(scope="session")
def shapes32(tmp_path_factory) -> Path:
    from difftrain.data.shapes import write_shapes_dataset

    return write_shapes_dataset(tmp_path_factory.mktemp("shapes32"), num_images=48, size=32, seed=0)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory, shapes32) -> Path:
    """A CLIP of a few thousand parameters, trained contrastively on the shapes captions for 120 steps."""
    from difftrain.curate.tiny import tiny_clip as build

    torch.manual_seed(0)
    model, processor = build(32)
    rows = [json.loads(line) for line in (shapes32 / "metadata.jsonl").read_text().splitlines()]
    images = [Image.open(shapes32 / row["file_name"]).convert("RGB") for row in rows]
    captions = [row["text"] for row in rows]
    batch = processor(text=captions, images=images, return_tensors="pt", padding=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(0)
    for _ in range(120):
        pick = torch.randperm(len(rows), generator=order)[:24]
        loss = model(input_ids=batch["input_ids"][pick], attention_mask=batch["attention_mask"][pick],
                     pixel_values=batch["pixel_values"][pick], return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("tiny-clip")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
