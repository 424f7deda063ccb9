"""The benchmarks' shared parts. The step profiler (issue 17's "where the time goes") runs on the trainer's
current internals: it drives the loop's own calls, so a renamed private step broke it unseen (2026-12-06)."""

from __future__ import annotations

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
