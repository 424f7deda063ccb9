"""training.keep_host_memory: freed host memory stays in the process, and nothing computed changes."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from difftrain.config import TrainingConfig, parse_config, resume_conflicts
from difftrain.training.host_memory import configure, wanted

# Frees and re-allocates a 64 MiB tensor ten times and prints the page faults that cost, first
# with glibc's defaults, then after a CPU run's configure(). In a fresh process: the setting is
# process-wide and one-way, and the test process may already hold it from a training test.
FAULTS = """
import resource, sys, torch
from difftrain.training.host_memory import configure

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.empty(16 * 2**20).fill_(1.0)  # touch every page, then free
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults()  # the first use of torch's allocation paths
default = faults()
print(configure("auto", torch.device("cpu")))
faults()  # the block is faulted in once more, then kept
print(default, faults())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc")
def test_kept_memory_is_not_faulted_in_again():
    done = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, check=True)
    said, counts = done.stdout.splitlines()
    default, kept = map(int, counts.split())
    assert said.startswith("kept for the next step")
    # 64 MiB is above glibc's largest dynamic mmap threshold (32 MiB): unmapped at every free and
    # faulted in again, 4 KiB page by page, 16,384 pages a time.
    assert default >= 10 * 16_384 * 0.9, default
    assert kept < 1_000, kept


def test_auto_keeps_host_memory_on_a_cpu_only():
    assert wanted("auto", torch.device("cpu"))
    assert not wanted("auto", torch.device("cuda", 0))
    assert wanted(True, torch.device("cuda", 0)) and not wanted(False, torch.device("cpu"))
    assert TrainingConfig().keep_host_memory == "auto"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc")
def test_a_run_that_asks_for_the_defaults_after_one_that_kept_memory_is_told_it_cannot_have_them():
    assert configure("auto", torch.device("cpu")).startswith("kept for the next step (glibc")
    said = configure(False, torch.device("cpu"))
    assert said.startswith("kept for the next step") and "one-way" in said


def test_keep_host_memory_is_resume_safe(shapes_dir, tmp_path):
    raw = tiny_config(shapes_dir, tmp_path / "run")
    saved = parse_config(raw)
    raw["training"]["keep_host_memory"] = False
    assert resume_conflicts(saved, parse_config(raw)) == []


def test_the_same_run_with_and_without_kept_memory_trains_the_same_weights(make_config, tmp_path):
    # Each run in its own process, so the one without starts from glibc's defaults.
    for keep in ("false", "true"):
        config = make_config(f"keep-{keep}", training={"max_steps": 3, "keep_host_memory": keep == "true"})
        done = subprocess.run([sys.executable, "-m", "difftrain", "train", str(config), "--no-progress"],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        line = next(line for line in done.stdout.splitlines() if line.startswith("  host memory"))
        assert ("kept for the next step" in line) == (keep == "true" and platform.libc_ver()[0] == "glibc"), line
    weights = [load_file(str(tmp_path / name / "checkpoints" / "step-00000003" / "model.safetensors"))
               for name in ("keep-false", "keep-true")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
