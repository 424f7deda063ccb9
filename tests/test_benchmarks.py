"""The benchmarks' shared parts. The step profiler (issue 17's "where the time goes") runs on the trainer's
current internals: it drives the loop's own calls, so a renamed private step broke it unseen (2026-12-06)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_profile_step_prints_every_phase_of_the_demo_step():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--only", "demo",
                           "--steps", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torchvision" not in done.stderr  # _common.py quiets transformers as the CLI does
    shares = dict(re.findall(r"^  ([a-zA-Z() ]+?)\s+[\d.]+ s\s+([\d.]+)%$", done.stdout, re.MULTILINE))
    assert {"data loading", "UNet forward", "backward", "optimizer", "EMA", "checkpoint"} <= set(shares)
    assert 99 <= sum(map(float, shares.values())) <= 101, shares


def test_a_benchmark_table_shows_each_rounds_ratio_to_the_baselines_run_of_that_round(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from _common import Rates, print_rates

    # One lever measured twice on a machine whose speed swung between the rounds: the means say x1.11, the rounds
    # x0.95 and x1.31 (the base's runs, not its mean, are each round's yardstick).
    print_rates({"plain": Rates([1.0, 0.8], 100 * 2**20), "lever": Rates([0.95, 1.05], 150 * 2**20)}, "plain",
                columns={"kind": {"plain": "eager", "lever": "compiled"}})
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["variant", "kind", "steps/s", "x", "base", "rounds", "peak", "MiB", "x", "base"]
    assert lines[1].split() == ["plain", "eager", "0.90", "1.00", "-", "100", "1.00"]
    assert lines[2].split() == ["lever", "compiled", "1.00", "1.11", "0.95-1.31", "150", "1.50"]
    assert "mean of 2 runs each" in lines[3]


def test_the_suite_cpu_plugin_counts_each_files_cpu_in_its_process_and_its_children(tmp_path):
    """A real pytest-xdist run of two files: one spends its CPU in a child process, the other in its own."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    burn = "sum(i * i for i in range(4_000_000))"
    (tmp_path / "test_child.py").write_text(
        f"import subprocess, sys\n\ndef test_child():\n    subprocess.run([sys.executable, '-c', '{burn}'], check=True)\n")
    (tmp_path / "test_own.py").write_text(f"def test_own():\n    {burn}\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "suite_cpu", "-n", "2", "-q", "-p", "no:cacheprovider",
                           "-c", str(tmp_path / "pytest.ini"), str(tmp_path)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT / "benchmarks")})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.startswith("test_")}
    child, own = rows["test_child.py"], rows["test_own.py"]
    # CPU s (printed to 0.1 s; the burn is ~0.15-0.3 s by the machine), all of it in children or none of it.
    assert float(child[3]) >= 0.1 and float(child[3]) >= float(child[1]) - 0.1, done.stdout
    assert float(own[1]) >= 0.1 and float(own[3]) == 0.0, done.stdout
    assert "all tests" in done.stdout and "CPU seconds by test file" in done.stdout


def test_the_suite_cpu_table_ranks_files_by_cpu_and_sums_the_rest(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from suite_cpu import table

    rows = [("tests/a.py::one", 1.0, 3.0, 5.0), ("tests/b.py::one", 2.0, 0.0, 2.0), ("tests/a.py::two", 1.0, 0.0, 1.0),
            ("tests/c.py::one", 1.0, 0.0, 9.0)]
    lines = table(rows, top=2)
    assert lines[1].split() == ["tests/a.py", "5.0", "62.5%", "3.0", "6.0", "2"]
    assert lines[2].split() == ["tests/b.py", "2.0", "25.0%", "0.0", "2.0", "1"]
    assert lines[3].split()[:6] == ["the", "other", "1", "files", "1.0", "12.5%"]
    assert lines[4].split()[:3] == ["all", "tests", "8.0"]
