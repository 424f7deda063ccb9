"""The training loop: one loop on accelerate for every method.

Read `Trainer.run` top to bottom: that is the whole of training. Everything a particular
method needs is behind `Method`; everything that must survive a crash is in
`save_checkpoint` / `load_checkpoint`.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs, set_seed
from tqdm.auto import tqdm

from difftrain.atomic import atomic_dir, recover_dirs, write_text
from difftrain.config import ConfigError, RunConfig, flatten, resume_conflicts, says
from difftrain.errors import DifftrainError
from difftrain.data.dataset import make_loader
from difftrain.data.fingerprint import describe_change, fingerprint_and_layout
from difftrain.data.sampler import Position
from difftrain.methods import build_method, method_class
from difftrain.models.manifest import MANIFEST_FILE
from difftrain.run_folder import ABANDONED, join_modules, split_modules
from difftrain.sampling.images import make_grid
from difftrain.training import host_memory, rng, sharding, zero
from difftrain.training.checkpoint import (
    CheckpointError,
    CheckpointStore,
    load_tensors,
    load_trainable_state,
    optimizer_from_parts,
    optimizer_to_parts,
    read_config,
    read_json,
    save_tensors,
    trainable_state,
    write_json,
)
from difftrain.training.ema import Ema, trained_parameters
from difftrain.training.evaluation import TrainingEvaluation
from difftrain.training.optim import (
    apply_speed_options,
    build_lr_schedule,
    build_optimizer,
    clip_gradients,
    compile_modules,
    resolve_compile,
    resolve_precision,
)
from difftrain.training.report import drop_metrics_after, plot_loss_curve, read_metrics
from difftrain.training.run_data import build_sampler
from difftrain.training.stopping import stop_on_first_signal

log = logging.getLogger(__name__)
REPORTED = 1000  # records replaced at read time that data_report.txt names (a shard that broke whole is more)


class TrainingDiverged(DifftrainError):
    pass


class _LeftOff(Exception):
    """Previews or evaluation given up: a stop signal came while they drew."""


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path | None
    step: int
    loss: float | None
    seconds: float
    loop_seconds: float = 0.0  # the steps alone: no samples, evaluation or checkpoints
    startup_seconds: float = 0.0  # from the Trainer's creation (or `started`) to the first step
    state_bytes: int = 0  # trained weights + optimizer state this process held (under FSDP, its shards)
    first_step_seconds: float = 0.0  # the loop's first step: compiling and first-use warm-up land here


class Trainer:
    def __init__(
        self, config: RunConfig, progress: bool = True, resume: str | None = None, allow_data_change: bool = False,
        started: float | None = None,
    ):
        # time.perf_counter() when the user asked for this run (the CLI passes its own start).
        self.started = started if started is not None else time.perf_counter()
        if config.training.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError(
                "training.mixed_precision = 'fp16': fp16 needs a CUDA GPU; on this machine use 'bf16' or 'no'"
            )
        self.config = config
        self.run_dir = Path(config.output_dir)
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            # accelerate keeps one global state per process; a second train() call from
            # Python (a notebook, the tests) with other precision settings must start clean.
            AcceleratorState._reset_state(reset_partial_state=True)
        zero.check_installed()
        sharding.check_launch()
        self.store = CheckpointStore(self.run_dir / "checkpoints", config.checkpoint.keep_last)
        recorded = self._recorded_choices(resume)
        self.accelerator = Accelerator(
            mixed_precision=resolve_precision(config.training, recorded.get("mixed_precision")),
            # Under FSDP each micro-batch's gradients are reduce-scattered at once: skipping the sync between
            # optimizer steps (as for DDP) would leave every process holding whole, unsharded gradients.
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=config.training.gradient_accumulation_steps, sync_each_batch=sharding.launch_asks_for_fsdp()),
            log_with="tensorboard" if config.log.tensorboard else None,
            project_dir=str(self.run_dir),
            # Without this, accelerate ignores a torchrun/`accelerate launch --multi_gpu` world
            # on a machine with no GPU and runs N independent single-process trainings.
            cpu=not _has_accelerator_device(),
            # Rank 0 alone evaluates and writes the final model while the others wait at a barrier: under
            # NCCL's default 10 minutes, an evaluation of a few thousand images would abort the launch.
            kwargs_handlers=[InitProcessGroupKwargs(
                timeout=timedelta(minutes=config.training.process_timeout_minutes))],
        )
        # Before any model loads, so loading's and the first step's blocks are reused too.
        self.host_memory = host_memory.configure(config.training.keep_host_memory, self.accelerator.device)
        sharding.honour_fsdp_on_cpu(self.accelerator)
        zero.honour_on_cpu(self.accelerator)
        self.sharded = sharding.is_sharded(self.accelerator)
        sharding.reduce_in_fp32(self.accelerator)
        # Before any model loads: DeepSpeed's batch, accumulation and clipping follow the run config.
        self.zero_stage = zero.configure(self.accelerator, config) if zero.is_zero(self.accelerator) else 0
        # The weights themselves are split: every process takes part in gathering them for samples and saves.
        self.partitioned = self.sharded or self.zero_stage == 3
        if config.training.optimizer == "muon" and (self.sharded or self.zero_stage):
            raise ConfigError(
                "training.optimizer = muon orthogonalises each weight matrix whole, and this launch splits them "
                f"({'FSDP' if self.sharded else f'DeepSpeed ZeRO-{self.zero_stage}'}): use training.optimizer: "
                "adamw, or launch with configs/accelerate/ddp.yaml (DDP keeps every matrix whole)")
        self.main = self.accelerator.is_main_process
        self.compiled = (resolve_compile(config, self.accelerator.mixed_precision, recorded.get("compiled"))
                         and not self.zero_stage)  # DeepSpeed: see zero.configure
        self.progress = progress and self.main
        # Refuse a run that cannot start before any model loads or any cache fills.
        self.resume = resume
        self._stop = None  # the run's stop signal while it trains (previews and evaluation leave off on it)
        self.allow_data_change = allow_data_change
        self._check_startable(resume)
        self.evaluation = TrainingEvaluation(config, self.run_dir)
        problem = None
        if self.main:  # (rank 0 alone evaluates; raising alone, it left the others a gloo traceback)
            try:
                self.evaluation.check(method_class(config).takes_prompts)
            except DifftrainError as exc:
                problem = exc
        self._decide_together(problem, "stopped: the main process cannot evaluate as the config asks (its error "
                                       "says why)")

        # Same initial weights on every process and for every process count.
        set_seed(config.seed)
        self.method = build_method(config)
        self.method.prepare_data(self.accelerator, _weight_dtype(self.accelerator), self.progress)
        self.dataset = self.method.build_dataset(progress=self.progress)
        fingerprints = {name: fingerprint_and_layout(s) for name, s in self.dataset.sources().items()}
        self.data_fingerprints = {name: fp for name, (fp, _) in fingerprints.items()}
        data_layout = repr(sorted((name, layout) for name, (_, layout) in fingerprints.items()))
        # Written into every checkpoint; it cannot change during the run, so it is serialised once.
        self.data_json = json.dumps(self.data_fingerprints, separators=(",", ":"), sort_keys=True)
        self.model_configs = self.method.model_configs()  # before any wrapper (DDP, compile) hides a model's config
        problem = None
        try:
            if resume:  # another data set is refused now, before any model is set up or any cache fills
                checkpoint = self.store.resolve(resume)
                state = read_json(checkpoint / "state.json")
                self._check_same_data(checkpoint, state)
                self.method.check_resume(checkpoint)  # first: its own reasons say more (another list of classes)
                self._check_same_models(checkpoint, state)
        except DifftrainError as exc:  # raised on every process together, or the others would wait forever
            problem = exc
        self._decide_together(problem, "cannot resume this run (their error says why)")
        # A machine whose copy of the data differs would read other records under the same indices.
        self._same_everywhere(data_layout, "see other data (other records, files, sizes or "
                                                              "captions): give every machine the same copy of it")
        # From here on each process draws its own noise, timesteps and dropout masks.
        set_seed(config.seed, device_specific=True)

        apply_speed_options(self.method.speed_modules(), config.training)
        self.method.setup(self.accelerator, _weight_dtype(self.accelerator), self.dataset, self.progress)
        self.modules = self.method.trainable_modules()
        for module in self.modules.values():
            # Loaded models come in eval mode, and transformers' gradient checkpointing (and any dropout) acts
            # only in training mode: from the first step, not from the first preview on.
            module.train()
        if self.sharded:
            sharding.check_trainable(config, self.modules)
        if self.zero_stage:
            zero.check_trainable(self.modules, self.zero_stage)
        groups = self.method.parameter_groups(config.training.learning_rate)
        self.optimizer = build_optimizer(groups, config.training, self.modules)
        self.lr_schedule = build_lr_schedule(self.optimizer, config.training)
        prepared = self.accelerator.prepare(*self.modules.values(), self.optimizer)
        self.wrapped = dict(zip(self.modules, prepared[:-1]))
        self.optimizer = prepared[-1]
        # Taken after prepare: FSDP replaces each parameter with its sharded version, ZeRO steps fp32 partitions.
        self.parameters = (zero.masters(self.optimizer) if self.zero_stage else
                           [p for group in self.optimizer.param_groups for p in group["params"]])
        held = zero.partition_views if self.zero_stage == 3 else trained_parameters
        self.emas = ({n: Ema(m, config.training.ema, held) for n, m in self.modules.items()}
                     if config.training.ema.enabled else {})
        self.compiled_parts = compile_modules(self.wrapped, config.training.compile_scope) if self.compiled else []

        device = self.accelerator.device
        # Its own stream: seeded as set_seed seeds the global one (seed + rank, which seed 0 made equal to the
        # old seed * 7919 + rank), noise and timesteps would repeat the draws of dropout masks.
        self.noise_generator = torch.Generator(device=device).manual_seed(
            noise_seed(config.seed, self.accelerator.process_index))
        self.sampler = build_sampler(config, self.dataset, self.accelerator.process_index, self.accelerator.num_processes)
        self.replaced_reasons: list[str] = []  # why records were replaced at read time (the first REPORTED)
        self.replaced_at_read = 0
        self.step = 0
        self.position = Position()

    # ----------------------------------------------------------------- the loop
    def run(self) -> TrainResult:
        """Train to max_steps, from the checkpoint named at construction if any."""
        config, accelerator, resume = self.config, self.accelerator, self.resume
        self._recover_run_dir()
        if resume:
            path = self.store.resolve(resume)
            # Each process reads parts of its own (rng, sharded state): one missing on one process stops all of
            # them here, before any loads, rather than that one alone while the others wait at a collective.
            missing = [file.name for file in self._own_parts(path) if not file.is_file()]
            problem = CheckpointError(f"checkpoint is missing {', '.join(missing)} ({path})") if missing else None
            self._decide_together(problem, f"cannot read their part of {path.name} (their error names it)")
            self.load_checkpoint(path)
        # Written once the checkpoint has loaded: a refused resume must not leave its settings in config.yaml, the
        # file users resume with.
        self._write_run_files()
        if resume:
            if self.main:
                drop_metrics_after(self.run_dir / "metrics.jsonl", self.step)
                moved = self.store.adopt(path) + self._adopt_best()
                if moved:
                    # (from a checkpoint outside checkpoints/, every one of the run's is of the branch left behind)
                    outside = path.resolve().parent != self.store.root.resolve()
                    what = "the run's checkpoints" if outside else f"the {len(moved)} later checkpoint(s)"
                    print(f"resuming from {path}: {what} of the branch left behind moved to {moved[0].parent} "
                          f"(as {', '.join(p.name for p in moved)})")
        self.sampler.start = self.position
        batches = iter(make_loader(self.dataset, self.sampler, config.data.num_workers, self.method.collate,
                                   pin_memory=accelerator.device.type == "cuda"))
        if config.log.tensorboard:
            # `ran.*`: what the `auto` settings resolved to, beside the configured values
            ran = {"ran.mixed_precision": accelerator.mixed_precision, "ran.compile": self.compiled}
            accelerator.init_trackers("tensorboard", config={**_scalar_config(config), **ran})

        bar = tqdm(
            total=config.training.max_steps,
            initial=self.step,
            desc="training",
            unit="step",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        timer = _LoopTimer(self.started)
        start_step = self.step
        loss_sum, loss_count, last_loss = torch.zeros((), device=accelerator.device), 0, None
        with stop_on_first_signal() as stop:
            self._stop = stop
            stop.agree(accelerator.device)
            while self.step < config.training.max_steps:
                for _ in range(config.training.gradient_accumulation_steps):
                    batch = next(batches)
                    batch = {
                        k: v.to(accelerator.device, non_blocking=True) if torch.is_tensor(v) else v
                        for k, v in batch.items()
                    }
                    with accelerator.accumulate(*self.wrapped.values()):
                        loss = self.method.loss(self.wrapped, batch, self.noise_generator)
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and config.training.max_grad_norm and not self.zero_stage:
                            clip_gradients(accelerator, self.parameters, config.training.max_grad_norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    loss_sum += loss.detach()
                    loss_count += 1
                    if batch["skipped"]:
                        self.replaced_at_read += len(batch["skipped"])
                        self.replaced_reasons += batch["skipped"][:max(0, REPORTED - len(self.replaced_reasons))]
                timer.step_done()
                if not accelerator.optimizer_step_was_skipped:  # (fp16's scaler skips a step that overflowed)
                    self.lr_schedule.step()
                    for name, ema in self.emas.items():
                        ema.step(self.modules[name])
                self.step += 1
                self.position = self.sampler.position_after(batch["epoch"], batch["batch"])
                bar.update(1)

                last_step = self.step == config.training.max_steps
                stopping = stop.due()
                checkpoint_due = self.step % config.checkpoint.every_steps == 0 or last_step or stopping
                if checkpoint_due:  # never write a diverged checkpoint
                    self._check_finite(loss_sum, bar)
                if self.step % config.log.every_steps == 0 or last_step:
                    last_loss = accelerator.reduce(loss_sum / loss_count, reduction="mean").item()
                    if not np.isfinite(last_loss):
                        self._diverged(f"the loss became {last_loss}", bar)
                    loss_sum, loss_count = torch.zeros((), device=accelerator.device), 0
                    self._log_scalars(last_loss)
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{self.lr_schedule.get_last_lr()[0]:.2e}")
                # Stopped by a signal (at the last step too): the checkpoint first and alone. A scheduler's grace
                # (SLURM's KillWait, 30 s) would not outlast minutes of drawing, and the checkpoint would be lost.
                interrupted = stopping and not last_step
                with timer.aside():  # samples, evaluation and checkpoints are not the loop's speed
                    # Evaluation before the checkpoint (keep_best must know this step's result), previews after it:
                    # what goes wrong in either is reported and training goes on (_survivable), never the checkpoint.
                    if (not stopping and self.evaluation.due(self.step, last_step) and self.evaluate(bar)
                            and not checkpoint_due):
                        # A new best between checkpoint steps: its checkpoint is written now, so keep_best has
                        # one to keep (else the last best's would be pruned and the new one never written).
                        self._check_finite(loss_sum, bar)
                        checkpoint_due = True
                    if checkpoint_due:
                        self.save_checkpoint()
                    sample_due = self.step % config.sample.every_steps == 0 or last_step
                    if sample_due and not stopping and self.method.draws_samples():  # (an EMA swap costs a copy)
                        self.save_samples(bar)
                if interrupted:
                    bar.close()
                    self._finish_trackers()
                    print(f"interrupted: checkpoint saved at step {self.step}; --resume latest continues from here")
                    raise KeyboardInterrupt
        bar.close()
        timer.stop()  # the final model's save and the summary are not the loop's time
        seconds = timer.seconds()
        model_dir = self.save_final_model()
        held = (zero.state_bytes(self.modules, self.optimizer, self.zero_stage) if self.zero_stage
                else sharding.state_bytes(self.parameters, self.optimizer))
        self._end_processes()
        if self.main:
            logged = read_metrics(self.run_dir / "metrics.jsonl")
            plot_loss_curve(logged, self.run_dir / "loss.png")
            if last_loss is None and logged:  # a finished run resumed: no step ran here, the log has its last loss
                last_loss = logged[-1][1]
            self._print_summary(timer, self.step - start_step, last_loss, model_dir, held)
        return TrainResult(self.run_dir, model_dir, self.step, last_loss, seconds, timer.loop_seconds(),
                           timer.startup, held, timer.first_step or 0.0)

    def _end_processes(self) -> None:
        """Drop the DDP/FSDP/DeepSpeed wrappers, then the process group.

        A DDP wrapper's reducer holds the process group. Left to die last, with the trainer, it ran
        the group's destructor while holding the GIL; that destructor joins gloo's worker threads, and
        a worker still releasing a finished collective's tensors needs the GIL: a 2-process CPU run
        hung at exit once in the test suite (pytorch/pytorch#56297). Dropped first, the wrappers leave
        the group to torch.distributed, which destroys it with the GIL released. A single process has
        no wrapper and no group: nothing to drop.
        """
        if self.accelerator.num_processes > 1:
            self.wrapped = dict(self.modules)
            self.accelerator.free_memory()  # accelerate's own references to the wrappers (and DeepSpeed's engine)
            gc.collect()  # a DDP wrapper sits in reference cycles (its hooks); free_memory collects before it lets go
        self.accelerator.end_training()

    def _check_finite(self, loss_sum: torch.Tensor, bar) -> None:
        """Stop before a checkpoint if any process's recent losses or the weights are no longer finite.

        Every process decides on the same reduced value (one stopping alone would leave the
        others waiting in the checkpoint's collectives). The weights are checked too: a
        non-finite gradient can reach them under a finite loss.
        """
        weights = torch.stack([sharding.local(p).detach().isfinite().all() for p in self.parameters]).all()
        # .to: ZeRO's offloaded fp32 masters live in CPU memory while the loss is on the GPU.
        bad = torch.stack([~loss_sum.isfinite(), ~weights.to(loss_sum.device)]).float().to(self.accelerator.device)
        loss_bad, weights_bad = self.accelerator.reduce(bad, reduction="sum").tolist()
        if loss_bad or weights_bad:
            local = float(loss_sum)
            what = (f"the loss became {local}" if not np.isfinite(local) else "another process's loss became "
                    "non-finite") if loss_bad else "the weights became non-finite"
            self._diverged(what, bar)

    def _adopt_best(self) -> list[Path]:
        """model-best/ written on the branch a resume leaves behind (not the best the checkpoint restored) moves to
        the abandoned checkpoints beside it, so that model-best/ and the run summary's best name the same step."""
        from difftrain.models.manifest import read_manifest

        folder = self.run_dir / "model-best"
        manifest = read_manifest(folder) if folder.is_dir() else None
        written_at = manifest.trained.get("at_step") if manifest is not None else None
        restored = self.evaluation.best["step"] if self.evaluation.best else None
        if written_at is None or written_at == restored:  # (an older run's model-best says no step: kept)
            return []
        target = self.store.root / ABANDONED / f"model-best-step-{written_at:08d}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(folder, target)
        return [target]

    def _best_weights(self) -> str:
        """Where the best step's weights are: model-best/, or, when that was written on a branch a resume left
        behind, the best step's checkpoint (keep_best keeps it)."""
        if (self.run_dir / "model-best").is_dir():
            return str(self.run_dir / "model-best")
        checkpoint = self.store.root / f"step-{self.evaluation.best['step']:08d}"
        return f"{checkpoint} (its checkpoint; model-best/ was written on the branch the resume left behind)"

    def _finish_trackers(self) -> None:
        """Flush TensorBoard and the others on a run that stops early (their writers buffer up to minutes)."""
        for tracker in self.accelerator.trackers:
            tracker.finish()

    def _diverged(self, what: str, bar) -> None:
        bar.close()
        self._finish_trackers()
        latest = self.store.latest()
        where = f"the latest checkpoint, {latest.name}, is from before it" if latest else "no checkpoint was written"
        precision = self.accelerator.mixed_precision
        hint = ("fp16 overflows where bf16 does not: set training.mixed_precision: bf16 (or no), "
                if precision == "fp16" else "")
        raise TrainingDiverged(
            f"{what} by step {self.step}: training diverged; {where}. {hint}Lower "
            "training.learning_rate or set training.max_grad_norm (both may change on resume), and resume with "
            "--resume latest")

    # ----------------------------------------------------------------- outputs
    def _rescale_learning_rate(self, saved: float) -> None:
        """training.learning_rate changed on resume (after a divergence, say): every group's rate, and the base
        the schedule scales from, by the same factor, so warmup and decay go on where they were."""
        new = self.config.training.learning_rate
        # A group with a rate of its own (text2image.text_encoder_lr) keeps it: each parameter's factor is what
        # the method's groups give it under the new rate against the old.
        factor_of = {id(param): after["lr"] / before["lr"]
                     for before, after in zip(self.method.parameter_groups(saved), self.method.parameter_groups(new))
                     for param in before["params"]}
        groups = self.optimizer.param_groups
        factors = [factor_of.get(id(group["params"][0]), new / saved) if group["params"] else new / saved
                   for group in groups]
        self.lr_schedule.base_lrs = [rate * factor for rate, factor in zip(self.lr_schedule.base_lrs, factors)]
        for group, factor in zip(groups, factors):
            group["lr"] *= factor
            if "initial_lr" in group:
                group["initial_lr"] *= factor
        if self.main:
            print(f"training.learning_rate {saved:g} -> {new:g}: rates x{new / saved:g} (a group's own rate kept)")

    def _check_startable(self, resume: str | None) -> None:
        problem = None
        try:
            existing = self.store.latest()
            if existing is not None and not resume:
                raise CheckpointError(
                    f"{self.run_dir} already holds a run (checkpoint {existing.name}); "
                    "add --resume latest to continue it, or set output_dir to a new folder"
                )
            for name in ("model", "model-no-ema", "model-best"):  # replaced whole at the end of a run
                folder = self.run_dir / name
                if not resume and folder.is_dir() and any(folder.iterdir()) and not (folder / MANIFEST_FILE).is_file():
                    raise CheckpointError(f"{folder} holds files that are no difftrain model (no {MANIFEST_FILE}), and "
                                          "a run writes its model there, replacing the folder; set output_dir to a "
                                          "new folder")
            if existing is None and not resume and (self.run_dir / "metrics.jsonl").is_file():
                # (its curves and previews would mix with this run's)
                raise CheckpointError(f"{self.run_dir} holds a run that trained and wrote no checkpoint (its "
                                      "metrics.jsonl): nothing to resume; set output_dir to a new folder, or delete "
                                      "that one")
            if resume:
                self._check_resumable(self.store.resolve(resume))
        except CheckpointError as exc:
            problem = exc
        self._decide_together(problem, f"cannot start this run from {self.run_dir} (their error says why). If this "
                                       "process sees a checkpoint they do not (or the other way round), the run folder "
                                       "is not shared by every machine: put output_dir on a file system they all mount")
        if resume:  # a node's stale view of the folder (an NFS cache) could name an older checkpoint for "latest"
            self._same_everywhere(self.store.resolve(resume).name, f"resolve --resume {resume} to another checkpoint: "
                                                                   "put output_dir on a file system every machine "
                                                                   "sees the same")

    def _decide_together(self, problem: Exception | None, others: str) -> None:
        """Raise `problem` here, and an error on every other process, if any process has one."""
        failing = self._processes_where(problem is not None)
        if problem is not None:
            raise problem
        if failing:  # this process could start; another could not, and says why
            raise CheckpointError(f"{failing} other process(es) {others}")

    def _same_everywhere(self, value: str, otherwise: str) -> None:
        """Refuse, on every process, a `value` that is not the same on all of them."""
        if self.accelerator.num_processes == 1:
            return
        digest = int.from_bytes(hashlib.sha256(value.encode()).digest()[:7], "big")
        digests = self.accelerator.gather(torch.tensor([digest], dtype=torch.int64, device=self.accelerator.device))
        if len(set(digests.tolist())) > 1:
            raise CheckpointError(f"the processes of this run {otherwise}")

    def _processes_where(self, flag: bool) -> int:
        """How many processes have `flag`. Every process must call it: they decide together whether to stop,
        since one raising alone would leave the others waiting at the next collective."""
        flags = torch.tensor([float(flag)], device=self.accelerator.device)
        return int(self.accelerator.reduce(flags, reduction="sum").item())

    def _recorded_choices(self, resume: str | None) -> dict[str, Any]:
        """What the `auto` settings resolved to in the checkpoint to resume, which a resumed run keeps:
        `mixed_precision` and `compiled` (kernels of either kind round differently).

        Read before accelerate starts, since accelerate fixes the precision, and before any module
        compiles. Empty for a new run or a checkpoint not found (the start-up check reports that).
        """
        if not resume:
            return {}
        try:
            path = self.store.resolve(resume)
            state = read_json(path / "state.json")
            # Checkpoints from before `auto` record only their config's explicit precision.
            return {"mixed_precision": state.get("mixed_precision") or read_config(path).training.mixed_precision,
                    "compiled": state.get("compiled", False)}
        except (DifftrainError, OSError, ValueError):
            return {}

    def _check_same_models(self, path: Path, state: dict) -> None:
        """Refuse a checkpoint whose trained models were built with other settings: its weights would go on under
        another activation, dropout or norm (an edited model .json keeps its path, so the config looks the same)."""
        changed = [f"{name}.{key}: checkpoint has {value!r}, this run builds {self.model_configs[name][key]!r}"
                   for name, saved in state.get("model_configs", {}).items() if name in self.model_configs
                   for key, value in saved.items() if self.model_configs[name].get(key, value) != value]
        if changed:
            raise CheckpointError(f"cannot resume from {path}: its model was built with other settings (an edited "
                                  "model config .json?):\n  " + "\n  ".join(changed) + "\nRestore the file, or "
                                  "start a new output_dir.")

    def _check_resumable(self, path: Path) -> None:
        state = read_json(path / "state.json")
        if state.get("step", 0) > self.config.training.max_steps:
            raise CheckpointError(f"cannot resume from {path}: it is at step {state['step']}, past training.max_steps "
                                  f"= {self.config.training.max_steps}; raise max_steps, or use the run's model as it is")
        conflicts = resume_conflicts(read_config(path), self.config, state.get("compiled", False) or self.compiled)
        if conflicts:
            raise CheckpointError(
                f"cannot resume from {path}: the config differs in settings that change training:\n  "
                + "\n  ".join(conflicts)
                + "\nUse the checkpoint's config (it is saved in that folder) or start a new output_dir."
            )
        # An explicit training.compile that differs is a config conflict above; `auto` followed the checkpoint
        # when the modules compiled (_recorded_choices).
        written = _parallelism(state.get("sharded", False), state.get("zero_stage", 0))
        now = _parallelism(self.sharded, self.zero_stage)
        if written != now:
            raise CheckpointError(
                f"cannot resume from {path}: it was written by a {written} run and this one is {now}; launch with "
                "the accelerate config the run started with")
        written_on, device = state.get("device", self.accelerator.device.type), self.accelerator.device.type
        if written_on != device:  # a CPU generator's state is not a CUDA one's: restoring it would fail late
            raise CheckpointError(
                f"cannot resume from {path}: it was written on a {written_on} device and this run is on {device}; "
                "an exact resume continues the noise generator of the device kind it was written on. Resume on "
                f"a {written_on} device, or start a new run whose model.base is a model this run saved")
        written_in = state.get("mixed_precision")
        if written_in and written_in != self.accelerator.mixed_precision and self.main:  # allowed: the user's call
            print(f"note: {path.name} was trained in {written_in}, this run goes on in "
                  f"{self.accelerator.mixed_precision}")
        if state["world_size"] != self.accelerator.num_processes and now != "data parallel":
            raise CheckpointError(
                f"cannot resume from {path}: it was written by {state['world_size']} process(es) under {written}, "
                f"which splits the weights and optimizer state per process, and this run has "
                f"{self.accelerator.num_processes}; launch {state['world_size']} processes")

    def _recover_run_dir(self) -> None:
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            recover_dirs(self.run_dir)  # a final model a killed run was swapping in
            self.store.clean_staging()
        self.accelerator.wait_for_everyone()

    def _write_run_files(self) -> None:
        if self.main:
            # Atomic: users often resume with this very file, which a full disk must not leave truncated. One that
            # says this run's settings already stays as it is: it may be the user's own, comments and all.
            if not says(self.run_dir / "config.yaml", self.config):
                write_text(self.run_dir / "config.yaml", self.config.to_yaml())
            write_text(self.run_dir / "data_report.txt", "\n".join(self.dataset.source.report_lines()) + "\n")
            for count, what in ((len(self.dataset.source.skipped), "unusable records skipped"),
                                (len(self.dataset.source.notes), "caption problems (no record left out)")):
                if count:
                    log.warning("%d %s; the list is in %s", count, what, self.run_dir / "data_report.txt")
        self.accelerator.wait_for_everyone()

    def _log_scalars(self, loss: float) -> None:
        lr = self.lr_schedule.get_last_lr()[0]
        values = {"train/loss": loss, "train/lr": lr}
        if self.emas:
            values["train/ema_decay"] = next(iter(self.emas.values())).decay
        self.accelerator.log(values, step=self.step)
        if self.main:
            with open(self.run_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps({"step": self.step, "loss": loss, "lr": lr}) + "\n")

    @contextmanager
    def _modules_for_main(self, ema: bool = True) -> Iterator[dict[str, torch.nn.Module] | None]:
        """The trained modules as rank 0 samples, evaluates and saves them: unwrapped, in eval mode,
        holding the EMA weights when EMA is on (and `ema`). The other processes get None.

        Every process must enter it: under FSDP and ZeRO-3 they all take part in gathering the weights
        into rank 0's plain copies.
        """
        if not (self.main or self.partitioned):
            yield None
            return
        modules = self.modules
        with ExitStack() as stack:
            if self.compiled:  # sampling's shapes and no-grad mode would each cost a compile of their own
                stack.enter_context(torch.compiler.set_stance("force_eager"))
            for name, averaged in self.emas.items() if ema else ():
                stack.enter_context(averaged.swapped_into(modules[name]))
            if self.partitioned:
                device, copy = self.accelerator.device, sharding.plain_copy if self.sharded else zero.plain_copy
                modules = {name: copy(m, self.main, device) for name, m in modules.items()}
                if not self.main:
                    yield None
                    return
            for m in modules.values():
                m.eval()
            try:
                yield modules
            finally:
                for m in modules.values():
                    m.train()

    @contextmanager
    def _survivable(self, what: str, bar=None) -> Iterator[None]:
        """Previews and evaluation are not worth the run: an error in them (a GPU out of memory while drawing) is
        reported, and training goes on. Around one process's own work only, so every process still meets the
        collectives after it."""
        try:
            yield
        except _LeftOff:
            (bar.write if bar is not None else print)(f"{what} at step {self.step} left off: a stop signal came, "
                                                      "and the checkpoint comes at the end of the next step")
        except Exception as error:  # noqa: BLE001
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            message = f"{what} at step {self.step} failed ({type(error).__name__}: {reason}); training goes on"
            log.error("%s", message, exc_info=log.isEnabledFor(logging.DEBUG))
            (bar.write if bar is not None else print)(message)

    @contextmanager
    def _left_off_on_signal(self, modules: dict[str, torch.nn.Module] | None) -> Iterator[None]:
        """Previews and evaluation (rank 0's own work) end at the next forward of a model after a stop signal: the
        stop was read before them, and minutes of drawing would outlast a scheduler's grace (SLURM's 30 s) before
        the checkpoint."""
        stop = self._stop

        def check(*_) -> None:
            if stop is not None and stop.signalled:
                raise _LeftOff

        handles = [module.register_forward_pre_hook(check) for module in (modules or {}).values()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def save_samples(self, bar=None) -> None:
        sample = self.config.sample
        with self._survivable("previews", bar):
            self._draw_samples(sample, bar)
        self.accelerator.wait_for_everyone()

    def _draw_samples(self, sample, bar) -> None:
        with self._modules_for_main() as modules, self._left_off_on_signal(modules):
            if modules is not None:
                images = self.method.sample(modules, sample.num_images, sample.scheduler, sample.steps, sample.seed)
        if self.main:
            scores = self.method.sample_scores(images) if images else {}
            if scores:
                self.accelerator.log({f"samples/{name}": value for name, value in scores.items()}, step=self.step)
                (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
                with open(self.run_dir / "samples" / "scores.jsonl", "a") as handle:
                    handle.write(json.dumps({"step": self.step, **scores}) + "\n")
                (bar.write if bar is not None else print)(
                    f"samples at step {self.step}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
            if images:  # a method with nothing to show (no validation prompts) returns none
                grid = make_grid(images, self.method.preview_columns(len(images)))
                out = self.run_dir / "samples" / f"step-{self.step:08d}.png"
                out.parent.mkdir(parents=True, exist_ok=True)
                grid.save(out)
                for tracker in self.accelerator.trackers:
                    if tracker.name == "tensorboard":
                        tracker.writer.add_image("samples", np.asarray(grid), self.step, dataformats="HWC")

    def evaluate(self, bar) -> bool:
        """Measure the model as it is now (EMA weights when EMA is on); keep the best as model-best/. Returns
        whether this is a new best, on every process."""
        best, values = [False], None
        with (self._survivable("evaluation", bar), self._modules_for_main() as modules,
              self._left_off_on_signal(modules)):
            if modules is not None:
                values = self.evaluation.run(self.method, modules, self.step)
                best = [bool(values["best"])]
                if values["best"]:
                    self._write_model(modules, self.run_dir / "model-best", "ema" if self.emas else "raw")
                    self.store.keep_step = self.step
        if self.main and values is not None:
            self.evaluation.record(values, self.accelerator)
            # (an LPIPS diversity of prompts drawn once each is None: no pair to compare)
            shown = {k: values[k] for k in ("fid", "kid", "is", "clip_score", "lpips_diversity")
                     if values.get(k) is not None}
            bar.write(f"eval at step {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items())
                      + f" ({values['seconds']:.0f} s)" + (" - best so far, saved to model-best/" if values["best"] else ""))
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(best)
        self.accelerator.wait_for_everyone()
        return best[0]

    def _write_model(self, modules: dict, folder: Path, weights: str) -> None:
        # Built beside and swapped in: a crash mid-write never leaves a mix of two models.
        with atomic_dir(folder) as staging:
            self.method.save_model(modules, staging)
            self._manifest_now(weights).write(staging)

    def _manifest_now(self, weights: str):
        """The method's manifest of the weights written now: which ones (ema or raw), and the step they are of
        (what a resume checks model-best by; a checkpoint's is its own step, not the run's max_steps)."""
        manifest = self.method.manifest()
        manifest.trained = {**manifest.trained, "at_step": self.step}
        return replace(manifest, weights=weights)

    def save_final_model(self) -> Path | None:
        model_dir = self.run_dir / "model"
        with self._modules_for_main() as modules:
            if modules is not None:
                self._write_model(modules, model_dir, "ema" if self.emas else "raw")
        if self.emas:
            with self._modules_for_main(ema=False) as modules:
                if modules is not None:
                    self._write_model(modules, self.run_dir / "model-no-ema", "raw")
        self.accelerator.wait_for_everyone()
        return model_dir

    def _print_summary(self, timer: "_LoopTimer", steps_run: int, loss: float | None, model_dir: Path | None,
                       held: int) -> None:
        config = self.config
        images = steps_run * config.training.batch_size * config.training.gradient_accumulation_steps
        images *= self.accelerator.num_processes
        loop = max(timer.loop_seconds(), 1e-9)
        parallelism, split = _parallelism(self.sharded, self.zero_stage), ""
        if parallelism != "data parallel":
            what = "optimizer" if self.zero_stage in (1, 2) else "weights and optimizer"
            split = f" ({parallelism}: {what} split over {self.accelerator.num_processes})"
        lines = [
            "",
            f"difftrain: {config.method} run finished at step {self.step}/{config.training.max_steps}",
            f"  time        {timer.seconds() / 60:.1f} min for {steps_run} steps, start-up {timer.startup:.1f} s "
            f"before the first step",
            f"  speed       {steps_run / loop:.2f} steps/s, {images / loop:.1f} images/s over "
            f"{self.accelerator.num_processes} process(es), the steps alone (samples, evaluation and checkpoints "
            f"took {timer.aside_seconds:.0f} s more)",
            f"  precision   {_precision_line(self.accelerator.mixed_precision, config.training.mixed_precision)}",
            f"  memory      {held / 2**20:.2f} MiB of trained weights and optimizer state per process{split}",
            f"  host memory freed memory {self.host_memory}",
            *([f"  compile     torch.compile ({', '.join(self.compiled_parts)}): first step {timer.first_step:.1f} s, "
               f"about {timer.compile_seconds(steps_run):.0f} s of it compiling"] if self.compiled and steps_run else []),
            f"  final loss  {loss:.4f}" if loss is not None else "  final loss  -",
            f"  data        {len(self.dataset)} records, {len(self.dataset.source.skipped)} skipped at start, "
            f"{self.replaced_at_read} replaced at read time (this process)"
            + (f", {len(self.dataset.source.notes)} caption problems" if self.dataset.source.notes else "")
            + (f" (see {self.run_dir / 'data_report.txt'})"
               if self.dataset.source.skipped or self.dataset.source.notes or self.replaced_at_read else ""),
            *([f"  buckets     {self.sampler.describe()}"] if self.dataset.buckets is not None else []),
            *[f"  model       {line}" for line in self.method.describe()],
            # (only what is there: no previews without prompts, no curve from fewer than two logged losses)
            *[f"  samples     {self.run_dir / 'samples'} (latest: {latest.name})"
              for latest in sorted((self.run_dir / "samples").glob("step-*.png"))[-1:]],
            *([f"  loss curve  {self.run_dir / 'loss.png'}"] if (self.run_dir / "loss.png").is_file() else []),
            *([f"  evaluation  {self.run_dir / 'eval.png'} (numbers in metrics.jsonl)"] if self.evaluation.enabled else []),
            *([f"  best        {self.evaluation.best['metric']} {self.evaluation.best['value']:.4g} at step "
               f"{self.evaluation.best['step']}: {self._best_weights()}"] if self.evaluation.best else []),
            f"  checkpoint  {self.store.latest()}",
            f"  final model {model_dir}" + (" (EMA weights; raw weights in model-no-ema)" if self.emas else ""),
        ]
        print("\n".join(lines))
        if self.replaced_at_read:  # data_report.txt lists them too, beside what was skipped at the start
            listed = f", the first {REPORTED}" if self.replaced_at_read > REPORTED else ""
            with open(self.run_dir / "data_report.txt", "a", encoding="utf-8") as report:
                report.write(f"{self.replaced_at_read} record(s) unreadable at read time in steps up to {self.step}, "
                             f"each replaced by another record (this process{listed}):\n"
                             + "".join(f"  {reason}\n" for reason in self.replaced_reasons))

    # ----------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> None:
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        staging = self.store.staging_dir(self.step)
        if self.main:
            self.store.begin(self.step)
        accelerator.wait_for_everyone()
        unseen = self._processes_where(not staging.is_dir())
        if unseen:
            raise CheckpointError(
                f"{staging}, which rank 0 created, does not exist for {unseen} process(es): the run folder is not "
                "shared by every machine. Put output_dir on a file system they all mount (NFS, Lustre, a cloud "
                "file store); difftrain does not support node-local run folders")
        rank = accelerator.process_index
        save_tensors(staging / sharding.part_file("rng", rank), rng.capture(self.noise_generator))
        if self.zero_stage:  # every process writes its partition of the optimizer
            zero.save_optimizer(self.optimizer, staging, rank)
        optimizer_rest = None
        if self.main or self.partitioned:  # under FSDP every process writes the part it holds
            parts, optimizer_rest = self._checkpoint_parts()
            if self.main or self.sharded:  # at ZeRO-3 the other processes only helped gather
                for part, tensors in parts.items():
                    save_tensors(staging / (sharding.part_file(part, rank) if self.sharded else f"{part}.safetensors"),
                                 tensors)
            if self.sharded and self.main:
                sharding.write_layout(staging, parts, accelerator.num_processes)
        accelerator.wait_for_everyone()
        if self.main:
            state = {
                "step": self.step,
                "position": {"epoch": self.position.epoch, "batch": self.position.batch},
                "world_size": accelerator.num_processes,
                "device": accelerator.device.type,  # whose noise generator the rng parts hold
                "compiled": self.compiled,
                "mixed_precision": self.accelerator.mixed_precision,
                "sharded": self.sharded,
                "zero_stage": self.zero_stage,
                "num_records": len(self.dataset),
                "order_rule": self.sampler.order_rule,
                "lr_schedule": self.lr_schedule.state_dict(),
                "optimizer": optimizer_rest,
                "ema": {name: ema.counters() for name, ema in self.emas.items()},
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "best": self.evaluation.best,
                "model_configs": self.model_configs,
            }
            (staging / "config.yaml").write_text(self.config.to_yaml())
            manifest = self._manifest_now("ema" if self.emas else "raw")
            if manifest.architecture:  # this checkpoint's weights alone make the model: `sample` can draw from it
                manifest.write(staging)
            write_text(staging / "data.json", self.data_json, sync=False)
            write_json(staging / "state.json", state)  # last: a folder with state.json is complete
            self.store.commit(self.step)
        accelerator.wait_for_everyone()

    def _checkpoint_parts(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict | None]:
        """The training state's tensors by file (under FSDP, sharded), and the optimizer's other state
        (under ZeRO, None: each process writes its partition of the optimizer apart)."""
        parts = {}
        if self.zero_stage == 3:  # whole, gathered by every process for rank 0
            device = self.accelerator.device
            if self.emas:  # first: right after a step, as when samples are drawn with the EMA swapped in
                ema = {}
                for name, averaged in self.emas.items():
                    with averaged.swapped_into(self.modules[name]):
                        ema[name] = zero.gathered_state(self.modules[name], self.main, device)
                parts["ema"] = join_modules(ema)
            parts["model"] = join_modules({n: zero.gathered_state(m, self.main, device) for n, m in self.modules.items()})
        else:
            parts["model"] = join_modules({n: trainable_state(m) for n, m in self.modules.items()})
            if self.emas:
                parts["ema"] = join_modules({n: e.tensors() for n, e in self.emas.items()})
        if self.zero_stage:
            return parts, None
        parts["optimizer"], optimizer_rest = optimizer_to_parts(self.optimizer.state_dict())
        return parts, optimizer_rest

    def _read_part(self, path: Path, part: str, sharded: bool) -> dict[str, torch.Tensor]:
        return load_tensors(path / (sharding.part_file(part, self.accelerator.process_index) if sharded
                                    else f"{part}.safetensors"))

    def _own_parts(self, path: Path) -> list[Path]:
        """The files of checkpoint `path` that this process reads (its shards' too)."""
        state = read_json(path / "state.json")
        rank, sharded = self.accelerator.process_index, state.get("sharded", False)
        names = [part for part, read in (("model", self.zero_stage != 3), ("ema", bool(self.emas)),
                                         ("optimizer", not self.zero_stage)) if read]
        files = [sharding.part_file(part, rank) if sharded else f"{part}.safetensors" for part in names]
        if self.zero_stage:  # ZeRO's partition of the optimizer, and what it was besides its tensors
            files += [sharding.part_file("optimizer", rank), Path(sharding.part_file("optimizer", rank)).with_suffix(
                ".json").name]
        if rank < state["world_size"]:
            files.append(sharding.part_file("rng", rank))
        return [path / name for name in files]

    def load_checkpoint(self, path: Path) -> None:
        accelerator = self.accelerator
        state = read_json(path / "state.json")
        saved = read_config(path)
        self._check_resumable(path)
        if saved.training.max_steps != self.config.training.max_steps and self.config.training.lr_scheduler not in (
            "constant",
            "constant_with_warmup",
        ):
            log.warning(
                "training.max_steps changed from %d to %d: the %s LR schedule is stretched from here on",
                saved.training.max_steps,
                self.config.training.max_steps,
                self.config.training.lr_scheduler,
            )
        sharded = state.get("sharded", False)
        rank, world = accelerator.process_index, accelerator.num_processes
        if self.zero_stage != 3:  # at ZeRO-3 the optimizer's fp32 masters restore the weight partitions
            weights = split_modules(self._read_part(path, "model", sharded))
            for name, module in self.modules.items():
                load_trainable_state(module, weights.get(name, {}), f"{path}/model.safetensors [{name}]")
        if self.emas:
            ema_weights = split_modules(self._read_part(path, "ema", sharded))
            for name, ema in self.emas.items():
                held = ema_weights[name]
                if self.zero_stage == 3:
                    held = zero.partitions(self.modules[name], held)
                ema.load(held, state["ema"][name])
        if self.zero_stage:
            zero.load_optimizer(self.optimizer, path, rank, world)
        else:
            optimizer_state = optimizer_from_parts(self._read_part(path, "optimizer", sharded), state["optimizer"])
            if sharded:
                optimizer_state = sharding.shard_optimizer_state(optimizer_state, self.parameters, path)
            # Loading takes each group's settings from the checkpoint, `fused` too: a bf16 run's fused AdamW
            # resumed under fp16 would hide the scaler's skipped steps (build_optimizer), so this run's stays.
            fused = [group.get("fused") for group in self.optimizer.param_groups]
            self.optimizer.load_state_dict(optimizer_state)
            for group, built in zip(self.optimizer.param_groups, fused):
                if "fused" in group:
                    group["fused"] = built
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        if saved.training.learning_rate != self.config.training.learning_rate:
            self._rescale_learning_rate(saved.training.learning_rate)
        if state.get("scaler") and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        if rank < state["world_size"]:
            rng.restore(load_tensors(path / sharding.part_file("rng", rank)), self.noise_generator)
        else:  # a process the checkpoint's run did not have: streams of its own, apart from every other one's
            fresh = noise_seed(self.config.seed + self.step, rank) % 2**32  # (numpy takes 32-bit seeds)
            set_seed(fresh)
            self.noise_generator.manual_seed(noise_seed(fresh, rank))
        self.position = Position(**state["position"])
        if state["world_size"] != world:
            self.position = self._position_for_world(path, state["world_size"])
        best = state.get("best")
        # A best of another metric (eval.keep_best changed on resume) would be compared with the new metric's values.
        same_metric = best is None or best.get("metric", self.evaluation.best_metric) == self.evaluation.best_metric
        self.evaluation.best = best if same_metric else None
        self.store.keep_step = (self.evaluation.best or {}).get("step")
        if state.get("num_records", len(self.dataset)) != len(self.dataset):  # only with --allow-data-change
            self.position = Position(self.position.epoch + 1, 0)  # the old order means nothing for new data
        elif state.get("order_rule", 1) != self.sampler.order_rule and self.position.batch:
            self.position = Position(self.position.epoch + 1, 0)
            if self.main:
                print(f"note: this difftrain draws the batch order by another rule than the one {path.name} was "
                      f"trained with; training goes on from the start of epoch {self.position.epoch}")
        if self.main:
            print(f"resumed from {path} at step {self.step} (epoch {self.position.epoch}, batch {self.position.batch})")

    def _position_for_world(self, path: Path, written_by: int) -> Position:
        """The checkpoint's position in this run's number of processes, with a note of what changes."""
        moved = self.sampler.position_for_world(self.position, written_by)
        if self.main:
            per_step = self.config.training.batch_size * self.config.training.gradient_accumulation_steps
            now = self.accelerator.num_processes
            print(f"note: {path.name} was written by {written_by} process(es) and this run has {now}: each step "
                  f"now trains on {per_step * now} images (was {per_step * written_by}) at the same learning rate, "
                  f"the data order goes on where "
                  f"it stopped (epoch {moved.epoch}, batch {moved.batch} of {self.sampler.batches_per_epoch} a "
                  f"process), and processes the run did not have start random streams of their own; the run "
                  f"continues, but not bit for bit as {written_by} process(es) would have")
        return moved

    def _check_same_data(self, path: Path, state: dict) -> None:
        """Refuse to continue on data other than the checkpoint's, naming what changed."""
        saved = read_json(path / "data.json") if (path / "data.json").is_file() else {}
        changes = []
        for name, now in self.data_fingerprints.items():
            section, _, key = name.partition(".")  # "data" -> data.path, "dreambooth.class_data" as named
            where = getattr(getattr(self.config, section), key or "path")
            difference = describe_change(saved[name], now) if name in saved else None
            if difference:
                changes.append(f"{name} ({where}): {difference}")
        if not saved and state.get("num_records", len(self.dataset)) != len(self.dataset):  # checkpoints before data.json
            changes.append(f"data ({self.config.data.path}): {state['num_records']:,} usable records then, "
                           f"{len(self.dataset):,} now")
        if not changes:
            return
        if not self.allow_data_change:
            raise CheckpointError(
                f"cannot resume from {path}: the data set is not the one it was trained on:\n  "
                + "\n  ".join(changes)
                + "\nRestore the data, start a new output_dir, or pass --allow-data-change to continue on purpose."
            )
        log.warning("resuming on changed data (--allow-data-change): %s", "; ".join(changes))


def noise_seed(seed: int, rank: int) -> int:
    """The seed of a process's noise and timestep generator, apart from every process's global seed."""
    return int(np.random.SeedSequence([seed, rank, 0x6E6F697365]).generate_state(1, np.uint64)[0] >> 1)


class _LoopTimer:
    """Wall time of the loop, split into the steps themselves and the work beside them."""

    def __init__(self, started: float):
        self.loop_start = time.perf_counter()
        self.startup = self.loop_start - started
        self.first_step: float | None = None
        self.aside_seconds = 0.0
        self.ended: float | None = None

    def step_done(self) -> None:
        if self.first_step is None:
            if torch.cuda.is_available():  # once: the first step's kernels are its time, not the second's
                torch.cuda.synchronize()
            self.first_step = time.perf_counter() - self.loop_start

    @contextmanager
    def aside(self) -> Iterator[None]:
        begun = time.perf_counter()
        try:
            yield
        finally:
            self.aside_seconds += time.perf_counter() - begun

    def stop(self) -> None:
        self.ended = time.perf_counter()

    def seconds(self) -> float:
        return (self.ended or time.perf_counter()) - self.loop_start

    def loop_seconds(self) -> float:
        return self.seconds() - self.aside_seconds

    def compile_seconds(self, steps: int) -> float:
        """The first step's time beyond a typical step's: what compiling (and first-use warm-up) cost."""
        typical = (self.loop_seconds() - self.first_step) / (steps - 1) if steps > 1 else 0.0
        return max(self.first_step - typical, 0.0)


def _has_accelerator_device() -> bool:
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return (
        torch.cuda.is_available()
        or bool(mps and mps.is_available())
        or bool(xpu and xpu.is_available())
    )


def _parallelism(sharded: bool, zero_stage: int) -> str:
    """How a run held its training state across processes, as its checkpoints record it."""
    return "FSDP" if sharded else f"DeepSpeed ZeRO-{zero_stage}" if zero_stage else "data parallel"


def _precision_line(used: str, asked: str) -> str:
    name = {"no": "fp32", "bf16": "bf16 autocast, trained weights fp32",
            "fp16": "fp16 autocast, trained weights fp32"}[used]
    return f"{name} (mixed_precision: auto)" if asked == "auto" else name


def _weight_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype frozen modules are held in: the compute dtype, since they never take a step."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def _scalar_config(config: RunConfig) -> dict:
    return {k: v for k, v in flatten(config.model_dump(mode="json")).items() if isinstance(v, (int, float, str, bool))}


def train(
    config: RunConfig, resume: str | None = None, progress: bool = True, allow_data_change: bool = False,
    started: float | None = None,
) -> TrainResult:
    """Train `config` to `training.max_steps`; `resume` is 'latest' or a checkpoint folder.

    `allow_data_change` resumes although the data set differs from the checkpoint's; `started`
    (a time.perf_counter() value) is when the run was asked for, the start of its start-up time."""
    check_output_dir(config)
    with run_lock(Path(config.output_dir)):
        return Trainer(config, progress=progress, resume=resume, allow_data_change=allow_data_change,
                       started=started).run()


RUN_LOCK = ".train-lock"


def check_output_dir(config: RunConfig) -> None:
    """Refuse a run folder that is a file, or one inside the image folder it trains on (its previews would be
    read as training images at the next start)."""
    run_dir = Path(config.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output_dir {run_dir} is a file; give a folder for the run (or a path that does not exist)")
    data = Path(config.data.path)
    if config.data.source == "folder" and data.is_dir() and data.resolve() in [run_dir.resolve(),
                                                                               *run_dir.resolve().parents]:
        raise ConfigError(f"output_dir {run_dir} is inside data.path {data}: its samples and checkpoints would be "
                          "read as training images; put the run elsewhere")


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """One `difftrain train` per run folder at a time (the launch's first process holds it): two at once (a
    requeued job overlapping its first, a second terminal's --resume) wrote the same checkpoints over each other,
    pruned each other's, and cleared each other's half-written saves."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / RUN_LOCK, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another difftrain train is writing to {run_dir} (it holds {run_dir / RUN_LOCK}): "
                              "wait for it to end, or give this run another output_dir") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
