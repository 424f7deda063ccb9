"""Where the test suite's CPU time goes, per test file: a pytest plugin.

    PYTHONPATH=benchmarks PYTEST_ADDOPTS="-p suite_cpu" make test

On 2 cores the suite is CPU-bound, and its wall times mislead: a test beside the multi-process fixture
waits for a core (the FID test took 215 s there and 19 s alone), and a test that launches processes spends
its CPU in them. This counts each test's CPU seconds (setup, call and teardown; a module's fixture falls to
the first test that uses it) in its own process and in the child processes it waited for (getrusage), on
each pytest-xdist worker, and prints the files by CPU seconds at the end of the run. Child processes a test
leaves running are not counted.
"""

from __future__ import annotations

import resource
import time
from collections import defaultdict

import pytest

TOP_FILES = 15


def cpu_seconds() -> tuple[float, float]:
    """(this process's, its waited-for children's) user + system seconds so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def table(rows: list[tuple[str, float, float, float]], top: int = TOP_FILES) -> list[str]:
    """Lines of the per-file table from (test id, own CPU s, children's CPU s, wall s) rows."""
    files: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0])
    for test_id, own, children, wall in rows:
        totals = files[test_id.split("::")[0]]
        totals[0] += own
        totals[1] += children
        totals[2] += wall
        totals[3] += 1
    everything = sum(own + children for own, children, _, _ in files.values())
    ranked = sorted(files.items(), key=lambda item: -(item[1][0] + item[1][1]))
    lines = [f"{'file':44s} {'CPU s':>7s} {'share':>6s} {'in children':>11s} {'wall s':>7s} {'tests':>5s}"]
    for name, (own, children, wall, count) in ranked[:top]:
        lines.append(f"{name:44s} {own + children:7.1f} {(own + children) / everything:6.1%} {children:11.1f} "
                     f"{wall:7.1f} {count:5d}")
    rest = ranked[top:]
    if rest:
        cpu = sum(own + children for _, (own, children, _, _) in rest)
        lines.append(f"{f'the other {len(rest)} files':44s} {cpu:7.1f} {cpu / everything:6.1%}")
    lines.append(f"{'all tests':44s} {everything:7.1f}   (wall s: summed over each worker's tests)")
    return lines


class SuiteCpu:
    def __init__(self, config: pytest.Config):
        self.config = config
        self.rows: list[tuple[str, float, float, float]] = []

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem):
        (own, children), started = cpu_seconds(), time.perf_counter()
        yield
        own_after, children_after = cpu_seconds()
        self.rows.append((item.nodeid, own_after - own, children_after - children, time.perf_counter() - started))

    def pytest_sessionfinish(self) -> None:
        if hasattr(self.config, "workeroutput"):  # a pytest-xdist worker: its rows go to the controller
            self.config.workeroutput["suite_cpu"] = self.rows

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error) -> None:  # the controller, as each worker ends
        self.rows += [tuple(row) for row in getattr(node, "workeroutput", {}).get("suite_cpu", [])]

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.rows and not hasattr(self.config, "workeroutput"):
            terminalreporter.section("CPU seconds by test file (benchmarks/suite_cpu.py)")
            for line in table(self.rows):
                terminalreporter.write_line(line)


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(SuiteCpu(config), "suite_cpu_counter")
