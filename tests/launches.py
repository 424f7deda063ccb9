"""Processes the tests launch through `accelerate launch`, ended whole when they overrun.

torchrun, which accelerate's launcher runs, starts each worker in its own session, and a
SIGKILL of the launcher is not passed on: a test that killed (or merely abandoned) a launch
that hung would leave two processes waiting at a collective for the rest of the suite. A
timeout, or an interrupted test, kills the launcher and every process under it.

`forked_accelerate_launch` runs the same launch with its processes forked from one that has already imported
the trainer, for the sharded fixture's thirteen launches: see its docstring. `forked_difftrain` runs one
`difftrain` command so, for test_train_e2e.py's killed, signalled and crashing runs."""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil


def accelerate_launch(*arguments: str, stderr: int = subprocess.STDOUT) -> subprocess.Popen:
    """`accelerate launch *arguments` with one thread per process (its output piped; stderr into it by default)."""
    return subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", *arguments],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=stderr,
                            text=True)


# What every forked launch would import first, imported once in the fork server: the trainer, the CLIP text
# encoder and VAE it loads, and the launcher's own modules.
PRELOAD = ["difftrain.cli", "difftrain.training.trainer", "transformers.models.clip.modeling_clip",
           "diffusers.models.autoencoders.autoencoder_kl", "accelerate.commands.launch", "torch.distributed.run",
           "deepspeed"]


class ForkedProcess:
    """`target(output, env, *args)` in a process forked from the fork server (PRELOAD imported), its output in a
    file: answers what `finish` and the tests ask of a subprocess.Popen (pid, returncode, communicate, wait)."""

    def __init__(self, command: list[str], target, *args, env: dict[str, str] | None = None):
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        self.args, self.returncode = command, None
        self._output = Path(tempfile.mkstemp(prefix="difftrain-launch-", suffix=".log")[1])
        self._process = context.Process(target=target, args=(str(self._output), env or dict(os.environ), *args))
        self._process.start()
        self.pid = self._process.pid

    def wait(self, timeout: float | None = None) -> int | None:
        self._process.join(timeout)
        self.returncode = self._process.exitcode
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, None]:
        if self.wait(timeout) is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        output = self._output.read_text(errors="replace")
        self._output.unlink(missing_ok=True)
        return output, None


class ForkedLaunch(ForkedProcess):
    """`accelerate launch *arguments` run by accelerate's own `main()` in a process forked from a server that
    has imported PRELOAD, its workers started by torchrun's elastic agent as forks of it (torchrun's `fork`
    start method) instead of new interpreters. Everything from the command line to the workers' environment
    is accelerate's and torchrun's code, as under `accelerate launch`; what differs is that the ~16 CPU
    seconds of imports a launch spends (the launcher's, then each worker's) are spent once. Its workers are
    not fresh interpreters, so whatever a module reads at import comes from the server's environment: the
    suite's other launches (test_data_parallel.py, test_personalise.py, test_curate.py) stay real ones.
    Answers what `finish` asks of a subprocess.Popen."""

    def __init__(self, arguments: tuple[str, ...]):
        super().__init__(["accelerate", "launch", *arguments], _launch_here, arguments,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})


def forked_accelerate_launch(*arguments: str) -> ForkedLaunch:
    return ForkedLaunch(arguments)


def forked_difftrain(*argv: str, new_session: bool = False, prelude: str = "", **names) -> ForkedProcess:
    """`python -m difftrain *argv` forked from the fork server (the trainer's ~8 CPU s of imports spent once):
    `new_session` gives it a process group of its own, as Popen's start_new_session; `prelude`, code run before
    the command with `names` as its globals (a patch). torch keeps this process's thread count, as a launched
    process is given it (conftest.py), so its sums round as this process's do."""
    import torch

    return ForkedProcess(["difftrain", *argv], _difftrain_here, argv, new_session, prelude, names,
                         torch.get_num_threads())


def stop_fork_server() -> None:
    """Ends the fork server (and with it the memory of its imports); the next forked launch starts another.
    Waited for, its CPU time and its launches' count in this process's children's, as a subprocess's do."""
    multiprocessing.forkserver._forkserver._stop()


def _as_a_subprocess(output: str, env: dict[str, str]) -> None:
    """Output to `output`, line by line, and `env` as a subprocess would have them."""
    descriptor = os.open(output, os.O_WRONLY | os.O_APPEND)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True, write_through=True)  # as `python -u`, which torchrun runs
    os.environ.clear()
    os.environ.update(env)


def _difftrain_here(output: str, env: dict[str, str], argv: tuple[str, ...], new_session: bool, prelude: str,
                    names: dict, threads: int) -> None:
    if new_session:
        os.setsid()
    _as_a_subprocess(output, env)
    import torch

    torch.set_num_threads(threads)
    exec(prelude, dict(names))
    from difftrain.cli import main

    raise SystemExit(main(list(argv)))


def _launch_here(output: str, env: dict[str, str], arguments: tuple[str, ...]) -> None:
    """The forked launcher: output to `output`, `env` as a subprocess would have it, accelerate's `main()`."""
    import torch.distributed.run as torchrun
    from accelerate.commands.launch import main

    _as_a_subprocess(output, env)
    config_from_args = torchrun.config_from_args

    def forking(args):
        config, command, command_args = config_from_args(args)
        config.start_method = "fork"
        return config, _python, command_args

    torchrun.config_from_args = forking
    sys.argv = ["accelerate-launch", *arguments]
    main()


def _python(*command_line: str) -> None:
    """A worker: `python -u [-m] TARGET ARGS...`, torchrun's command line, run in this forked process."""
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # a new interpreter reads it as torch starts
    if command_line[0] == "-u":  # what the line buffering above already does
        command_line = command_line[1:]
    module = command_line[0] == "-m"
    target, *arguments = command_line[module:]
    sys.argv = [target, *arguments]
    try:
        if module:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(target, run_name="__main__")
    except SystemExit as exited:
        if exited.code not in (0, None):  # a worker that ends without returning is a failure to torchrun
            raise


def finish(process: subprocess.Popen | ForkedLaunch, timeout: float = 300) -> tuple[str, str | None]:
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
