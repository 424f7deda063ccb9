"""The step profiler (issue 17's "where the time goes") runs on the trainer's current internals: it drives the
loop's own calls, so a renamed private step broke it unseen (2026-12-06)."""

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
