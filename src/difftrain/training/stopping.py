"""Stopping on a signal: the first Ctrl-C or SIGTERM finishes the step, saves a checkpoint and exits.

SIGTERM is how a scheduler preempts a job (SLURM, Kubernetes, `docker stop`); SLURM sends it to
every process of the job, torchrun's agent passes its own on to each worker, and a user may
`kill` one process. So with several processes each may be told at another step, or not at all,
while a checkpoint must be written by all of them at one step. Every step each process adds
whether it was told to an all-reduce (max) that it starts without waiting and reads one step
later: no step waits for the network or for the GPU to catch up (on a GPU the answer is copied
to pinned memory behind the step's own work), and every process reads the same answer at the
same step.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

import torch


class StopRequest:
    """Whether this process was told to stop, and (with several processes) whether all of them stop now."""

    def __init__(self):
        self.signalled = False  # set by the signal handler
        self._device: torch.device | None = None  # where the all-reduce runs; None: one process
        self._pending: tuple | None = None  # (what to wait on, the answer), started at the last step
        self._pinned: torch.Tensor | None = None  # on a GPU, where the answer lands (read before it is reused)

    def agree(self, device: torch.device) -> None:
        """From now on every process calls `due` at every step: processes stop together."""
        if torch.distributed.is_available() and torch.distributed.is_initialized() and (
                torch.distributed.get_world_size() > 1):
            self._device = device

    def due(self) -> bool:
        """Once per step on every process: True at the step all of them stop (with several processes, the
        step after the first was told)."""
        if self._device is None:
            return self.signalled
        stop = self._read() if self._pending is not None else False
        told = torch.full((1,), int(self.signalled), dtype=torch.int32, device=self._device)  # (a kernel, no copy)
        if told.is_cuda:
            torch.distributed.all_reduce(told, op=torch.distributed.ReduceOp.MAX)  # queued on the stream
            if self._pinned is None:
                self._pinned = torch.empty(1, dtype=torch.int32, pin_memory=True)
            self._pinned.copy_(told, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._pending = (done, self._pinned)
        else:
            work = torch.distributed.all_reduce(told, op=torch.distributed.ReduceOp.MAX, async_op=True)
            self._pending = (work, told)
        return stop

    def _read(self) -> bool:
        waitable, answer = self._pending
        self._pending = None
        waitable.synchronize() if isinstance(waitable, torch.cuda.Event) else waitable.wait()
        return bool(answer.item())

    def close(self) -> None:
        """Wait for the last step's all-reduce, so no process leaves one unfinished."""
        if self._pending is not None:
            self._read()


@contextmanager
def stop_on_first_signal() -> Iterator[StopRequest]:
    """The first Ctrl-C (or SIGTERM) sets `signalled`; a second Ctrl-C stops at once, more SIGTERMs change nothing."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {}

    def request_stop(signum, frame):
        if request.signalled:  # a second SIGTERM: a scheduler's and torchrun's agent's, a moment apart
            return
        request.signalled = True
        # Only Ctrl-C gets its old meaning back (a second one stops at once). SIGTERM comes twice under SLURM with
        # torchrun (SLURM signals every process, the agent passes its own on), and must not kill the save.
        signal.signal(signal.SIGINT, previous[signal.SIGINT])
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: finishing this step and saving a checkpoint (Ctrl-C to stop now)", flush=True)

    for number in (signal.SIGINT, signal.SIGTERM):
        previous[number] = signal.signal(number, request_stop)
    try:
        yield request
    finally:
        request.close()
        for number, handler in previous.items():
            signal.signal(number, handler)
