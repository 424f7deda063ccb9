"""One queue, one worker per device: jobs run first in, first out, each with its own progress.

A job is a validated request and what became of it. The worker thread takes the oldest
queued job and draws it; between sampling steps it counts progress and honours the job's
flags: interrupt (stop now, keep what is drawn, as A1111's Interrupt), skip (end the
current image, go on with the next batch) and cancel (a client gone or a DELETE: stop and
return nothing). A full queue refuses new jobs (HTTP 429) instead of growing without bound.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from difftrain.errors import DifftrainError
from difftrain.serve.requests import RequestError

log = logging.getLogger(__name__)

FINISHED_KEPT = 64  # finished /v1/jobs answerable by id (with their images); older ones are forgotten
FINISHED_BYTES = 256 * 2**20  # and at most this much of their images (one job may hold 128 PNGs of 1024 px)


class QueueFull(DifftrainError):
    pass


@dataclass(eq=False)  # a job is itself: never compared field by field (its request may hold megabytes)
class Job:
    kind: str  # "txt2img" or "img2img"
    request: object  # a Txt2ImgRequest / Img2ImgRequest, checked; dropped when the job ends
    prepared: object = None  # engine.Prepared: its model, LoRA files, ControlNet units, decoded at submit
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    number: int = 0  # order of arrival
    state: str = "queued"  # queued, running, done, interrupted, cancelled, failed
    steps_done: int = 0  # sampler steps over the whole job
    images: int = 1  # n_iter: batches drawn one after the other
    # A1111's progress is per sampling run (a batch's pass: n_iter x 2 runs with the hires fix): the run drawing
    # now, its steps taken and how many it takes (what the sampler runs, once it has said: 2 x steps - 1 for Heun).
    run_no: int = 0
    run_step: int = 0
    run_steps: int | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    result: dict | None = None  # the A1111 response body
    failure: Exception | None = None  # why it failed: a RequestError (the client's) or anything else (ours)
    interrupt: bool = False
    skip: bool = False
    cancel: bool = False
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def error(self) -> str | None:
        return None if self.failure is None else str(self.failure)

    def __post_init__(self):
        request = self.request
        self.images = request.n_iter
        steps = request.steps
        if self.kind == "img2img":  # img2img runs the last `strength` share of the schedule (a step more: A1111's
            # k-diffusion samplers; the sampler tells its own count once it starts)
            steps = min(steps, int(request.steps * min(request.denoising_strength, 0.999)) + 1)
        self.passes = 1 + (self.kind == "txt2img" and request.enable_hr)
        # each pass's steps as planned, until its sampler says (the hires pass's taken exactly: generate/hires.py)
        self._planned = [steps, request.hr_second_pass_steps or request.steps][:self.passes]
        self._run_over = False  # the run's last step was taken (or it was skipped): the next step starts the next
        self._skipped = False

    @property
    def runs(self) -> int:
        """A1111's job_count: sampling runs, a batch's each pass."""
        return self.images * self.passes

    @property
    def total_steps(self) -> int:
        """The job's sampler steps as planned (each run's count once its sampler has said)."""
        return sum(self._planned) * self.images

    @property
    def sampling_steps(self) -> int:
        return self.run_steps or self._planned[self.run_no % self.passes]

    @property
    def progress(self) -> float:
        """A1111's: runs done plus the share of the one drawing now, of all runs."""
        if self.state in ("done", "interrupted"):
            return 1.0
        return min(1.0, (self.run_no + min(self.run_step / max(self.sampling_steps, 1), 1.0)) / max(self.runs, 1))

    @property
    def eta_relative(self) -> float:
        """Seconds left, from the rate so far (A1111's estimate)."""
        progress = self.progress
        if self.state != "running" or not progress or self.started is None:
            return 0.0
        elapsed = time.time() - self.started
        return max(0.0, elapsed / progress - elapsed)

    def count_step(self, run_steps: int | None) -> None:
        """One sampler step; `run_steps`: the steps the run drawing it takes (diffusers' _num_timesteps)."""
        if self._run_over:  # this step starts the next run: the next pass, or after a skip the next batch
            self.run_no = (self.run_no // self.passes + 1) * self.passes if self._skipped else self.run_no + 1
            self.run_no, self.run_step, self._run_over, self._skipped = min(self.run_no, self.runs - 1), 0, False, False
        self.run_steps = run_steps
        self.steps_done += 1
        self.run_step += 1
        self._run_over = self.run_step >= self.sampling_steps

    def skip_run(self) -> None:
        """A skip ends the batch drawing now (its first pass's image kept): the next step is the next batch's."""
        self._run_over = self._skipped = True


class JobQueue:
    def __init__(self, run, max_queue: int):
        """`run(job, on_step)` draws a job and returns its A1111 response body."""
        self._run, self.max_queue = run, max_queue
        self._queue: deque[Job] = deque()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Condition()
        self._numbers = itertools.count()
        self.current: Job | None = None
        self._closing = False
        self._worker = threading.Thread(target=self._work, name="difftrain-serve-worker", daemon=True)
        self._worker.start()

    def submit(self, job: Job) -> Job:
        with self._lock:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue holds {len(self._queue)} jobs, this server's limit; retry later")
            job.number = next(self._numbers)
            self._queue.append(job)
            self._jobs[job.id] = job
            self._lock.notify()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def position(self, job: Job) -> int:
        """How many jobs run before this one: those ahead in the queue and the one running (0: running, or next
        with none running)."""
        with self._lock:
            if job not in self._queue:
                return 0
            ahead = next(i for i, queued in enumerate(self._queue) if queued is job)
            return ahead + (self.current is not None)

    def waiting(self) -> int:
        with self._lock:
            return len(self._queue)

    def cancel(self, job: Job) -> None:
        """Stop a job: a queued one never runs, a running one stops at its next step and returns nothing."""
        with self._lock:
            job.cancel = True
            if job in self._queue:
                self._queue.remove(job)
                self._finish(job, "cancelled")

    def close(self) -> None:
        """Stop: queued jobs are cancelled and the running one stops at its next step."""
        with self._lock:
            self._closing = True
            if self.current is not None:
                self.current.cancel = True
            for job in list(self._queue):
                job.cancel = True
                self._finish(job, "cancelled")
            self._queue.clear()
            self._lock.notify_all()
        self._worker.join(timeout=30)

    # ----------------------------------------------------------------- the worker
    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._lock.wait()
                if self._closing:
                    return
                job = self._queue.popleft()
                job.state, job.started, self.current = "running", time.time(), job
            try:
                job.result = self._run(job, lambda pipe: self._on_step(job, pipe))
                state = "cancelled" if job.cancel else "interrupted" if job.interrupt else "done"
            except RequestError as reason:
                job.failure, state = reason, "failed"
            except DifftrainError as reason:  # ours to explain: a prompt, a LoRA that does not fit, ...
                job.failure, state = RequestError("request", str(reason)), "failed"
            except Exception as reason:  # a worker that died would stall every later client
                log.exception("job %s failed", job.id)
                # Kept without its traceback: the frames would hold the failed step's tensors (after an
                # out-of-memory error, the very memory the next job needs) for as long as the job is kept.
                reason.__context__ = reason.__cause__ = None  # (their tracebacks would hold the frames too)
                job.failure, state = reason.with_traceback(None), "failed"
                release_device_memory()
            with self._lock:
                self.current = None
                self._finish(job, state)

    def forget(self, job: Job) -> None:
        """A finished job nobody will ask for again (an A1111 call answered): its images leave memory."""
        with self._lock:
            self._jobs.pop(job.id, None)

    def _on_step(self, job: Job, pipe) -> None:
        job.count_step(getattr(pipe, "_num_timesteps", None))
        if job.cancel or job.interrupt:
            pipe._interrupt = True  # diffusers' pipelines skip the remaining steps
            pipe._difftrain_stop = True  # and the engine draws no further batch
        elif job.skip:
            job.skip = False
            pipe._interrupt = True
            job.skip_run()

    def _finish(self, job: Job, state: str) -> None:
        job.state, job.finished = state, time.time()
        job.request = job.prepared = None  # (init images can be megabytes; the result says what was drawn)
        if state == "cancelled":
            job.result = None
        job.done.set()
        finished = [key for key, old in self._jobs.items() if old.done.is_set()]
        for key in finished[:-FINISHED_KEPT]:
            del self._jobs[key]
        finished, held = finished[-FINISHED_KEPT:], sum(map(self._result_bytes, finished[-FINISHED_KEPT:]))
        for key in finished:  # oldest first; the job just finished is always kept: its client has yet to ask for it
            if held <= FINISHED_BYTES:
                break
            if key != job.id:
                held -= self._result_bytes(key)
                del self._jobs[key]

    def _result_bytes(self, key: str) -> int:
        result = self._jobs[key].result or {}
        return sum(len(image) for image in result.get("images", []))


def release_device_memory() -> None:
    """Give the CUDA caching allocator's free blocks back, after a failure or a model let go."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
