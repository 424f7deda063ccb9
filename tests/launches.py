"""Processes the tests launch through `accelerate launch`, ended whole when they overrun.

torchrun, which accelerate's launcher runs, starts each worker in its own session, and a
SIGKILL of the launcher is not passed on: a test that killed (or merely abandoned) a launch
that hung would leave two processes waiting at a collective for the rest of the suite. A
timeout, or an interrupted test, kills the launcher and every process under it."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil


def accelerate_launch(*arguments: str, stderr: int = subprocess.STDOUT) -> subprocess.Popen:
    """`accelerate launch *arguments` with one thread per process (its output piped; stderr into it by default)."""
    return subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", *arguments],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=stderr,
                            text=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[str, str | None]:
    """(stdout, stderr) once the launch ends; past `timeout` seconds it is killed with its workers, and the
    test fails. 300 s: on a slow hour of a 2-core machine, with the sharded fixture's 12 processes side by
    side, a launch whose processes stop with an error as they start took over 120 s to end (2026-12-06)."""
    try:
        return process.communicate(timeout=timeout)
    except BaseException as stopped:
        _kill_tree(process.pid)
        output = process.communicate()[0] or ""
        if isinstance(stopped, subprocess.TimeoutExpired):
            raise AssertionError(f"killed after {timeout} s: {process.args}\n{output[-3000:]}") from None
        raise


def _kill_tree(pid: int) -> None:
    try:
        launcher = psutil.Process(pid)
        tree = [launcher, *launcher.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for member in tree:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=10)
