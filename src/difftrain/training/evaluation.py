"""Evaluation during training: every `eval.every_steps`, measure the model as it is, and remember the best.

The method draws (`Method.evaluation_images`), `evaluate.scores` measures, and the results
go to metrics.jsonl, TensorBoard and `eval.png`. Evaluation must never change training: it
runs inside a fork of every global random state (torch, CUDA, numpy, Python) and draws from
generators of its own, so a run with evaluation on ends with bitwise the weights of one
without (tested). The reference images are opened and the prompts chosen when the run starts
(a bad setting stops it then, not hours later); the networks and the reference features load
once, at the first evaluation; the reference comes from the content-keyed cache when the data
was seen before.
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from difftrain.config import RunConfig
from difftrain.evaluate.names import RESULTS
from difftrain.evaluate.weights import EvalError


@contextmanager
def untouched_random_state():
    """Whatever runs inside leaves torch's, CUDA's, numpy's and Python's global generators as they were."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class TrainingEvaluation:
    def __init__(self, config: RunConfig, run_dir: Path):
        self.config, self.run_dir = config, run_dir
        self.settings = config.eval
        self.scorer = self.reference = self.prompts = self.records = None
        keep = config.checkpoint.keep_best
        if keep:
            name, _, direction = keep.partition(":")
            self.best_metric, self.direction = name, direction or RESULTS[name][1]
        else:
            self.best_metric = self.direction = None
        self.best: dict | None = None  # {"step", "value"}: saved in checkpoints, so resume keeps it

    @property
    def enabled(self) -> bool:
        return self.settings.every_steps is not None

    def due(self, step: int, last_step: bool) -> bool:
        return self.enabled and (step % self.settings.every_steps == 0 or last_step)

    def _networks(self):
        from difftrain.evaluate.scores import Networks

        s = self.settings
        return Networks(s.weights_dir, s.inception_weights, s.alexnet_weights, s.lpips_weights, s.clip_model,
                        "cuda" if torch.cuda.is_available() else "cpu")

    def check(self, takes_prompts: bool) -> None:
        """Refuse the run now, not at its first evaluation (after hours of training, and before the checkpoint of
        that step), when a metric's network, the reference images or the prompts cannot be had."""
        if self.enabled:
            from difftrain.evaluate.scores import check_networks

            check_networks(list(self.settings.metrics), self._networks())
            self._plan(takes_prompts)

    def _plan(self, takes_prompts: bool) -> None:
        """The reference records, and the prompt of each image drawn (None for a method without prompts)."""
        from difftrain.evaluate.reference import keyed_options, open_records
        from difftrain.evaluate.run import prompt_list

        s, data = self.settings, self.config.data
        if s.reference:  # real images of the user's choosing
            kind = s.reference_source or "folder"
            self.records = open_records(s.reference, kind, s.reference_max, setting="eval.reference",
                                        **keyed_options(kind, s.reference_image_key, s.reference_caption_key))
        else:  # the training data, read as training reads it
            from difftrain.training.run_data import hf_options

            self.records = open_records(data.path, data.source, s.reference_max, image_key=data.image_key,
                                        caption_key=data.caption_key, captions=data.captions,
                                        caption_extension=data.caption_extension, hf=hf_options(data))
        if takes_prompts:
            try:
                self.prompts = prompt_list(s.num_images, s.images_per_prompt, s.seed, self.records,
                                           prompts=list(s.prompts))
            except EvalError:
                raise EvalError("evaluation of a text-to-image run needs prompts: set eval.prompts, or point "
                                "eval.reference at captioned images to sample captions from") from None
        else:
            self.prompts = [None] * s.num_images

    def _setup(self, method) -> None:
        from difftrain.evaluate.reference import reference_features
        from difftrain.evaluate.scores import Scorer

        s = self.settings
        self.scorer = Scorer(list(s.metrics), self._networks())
        if self.records is None:
            self._plan(method.takes_prompts)
        if self.scorer.inception is not None and any(m in s.metrics for m in ("fid", "kid", "prc")):
            self.reference = reference_features(self.records, self.scorer.inception, self.config.data.resolution,
                                                s.cache_dir)

    def run(self, method, modules: dict, step: int) -> dict:
        """Measure now; returns the metrics with `seconds` and whether this step is the best so far."""
        from difftrain.evaluate.scores import Group

        started = time.time()
        s = self.settings
        with untouched_random_state():
            if self.scorer is None:
                self._setup(method)
            images = method.evaluation_images(modules, self.prompts, s.seed, s.scheduler, s.steps, s.guidance_scale,
                                              s.batch_size)
            groups: dict[str | None, Group] = {}
            for prompt, image in zip(self.prompts, images):
                groups.setdefault(prompt, Group(prompt)).images.append(image)
            values = self.scorer.score(list(groups.values()), self.config.data.resolution, self.reference)
        values = {"step": step, **values, "seconds": round(time.time() - started, 2)}
        values["best"] = self._is_best(values, step)
        return values

    def _is_best(self, values: dict, step: int) -> bool:
        value = values.get(self.best_metric) if self.best_metric else None
        if value is None or not math.isfinite(value):
            return False
        previous = None if self.best is None else self.best["value"]
        better = previous is None or (value < previous if self.direction == "min" else value > previous)
        if better:
            self.best = {"step": step, "value": value, "metric": self.best_metric}
        return better

    def record(self, values: dict, accelerator) -> None:
        """metrics.jsonl, TensorBoard and the eval.png curves."""
        from difftrain.evaluate.report import plot_metric_curves

        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        accelerator.log({f"eval/{k}": v for k, v in numbers.items() if k not in ("step",)}, step=values["step"])
        with open(self.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps({"eval": True, **values}) + "\n")
        plot_metric_curves(read_eval_history(self.run_dir / "metrics.jsonl"), self.run_dir / "eval.png")


def read_eval_history(path: Path) -> list[dict]:
    """The evaluation lines of metrics.jsonl, one per step (a resumed run's repeat keeps the last)."""
    by_step: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("eval"):
                by_step[int(entry["step"])] = entry
    return [by_step[s] for s in sorted(by_step)]
