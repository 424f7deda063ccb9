"""What the benchmarks share: peak-memory measurement, the SD-shaped test model, a difftrain run."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import io
import multiprocessing
import os
import shutil
import tempfile
import threading
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from difftrain.cli import quiet_libraries

os.environ.setdefault("HF_HUB_OFFLINE", "1")
quiet_libraries()  # the tables, not transformers' weight-loading bars and torchvision notices (as the CLI)


def scratch(prefix: str) -> Path:
    """A temporary folder removed when the benchmark exits: the SD-shaped models in them are GBs."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    return work


class PeakMemory:
    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self._rss()
            self.thread = threading.Thread(target=self._watch, daemon=True)
            self.thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss() - self.start)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self._stop.set()
            self.thread.join()


def sd_quarter(work: Path, size: int) -> Path:
    """Stable Diffusion 1.5's shape at a quarter of its width, random weights, saved as a diffusers folder.

    VAE (128, 256, 512, 512) -> (32, 64, 128, 128), UNet (320, 640, 1280, 1280) -> (80, 160, 320, 320),
    two layers per block, 8x VAE downsampling, CLIP at 77 tokens. Channel counts scale the UNet's and
    the VAE's cost alike, so the share of a step each part takes is close to SD's at the same
    pixels-to-latents ratio.
    """
    from difftrain.models.tiny_sd import write_tiny_sd

    return write_tiny_sd(work / "sd", unet_channels=(80, 160, 320, 320), vae_channels=(32, 64, 128, 128),
                         text_hidden=192, text_layers=6, sample_size=size, layers_per_block=2)


def sd15_unet():
    """SD 1.5's UNet shape, random weights: diffusers' defaults are SD 1.5's UNet."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768)


def sd15_shaped(seed: int = 0):
    """SD 1.5's UNet, VAE and CLIP-L text encoder shapes, random weights, with the tiny tokenizer."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from difftrain.models.tiny_sd import SD_SCHEDULER, build_clip_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072,
                                                num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77))
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512)
    unet = sd15_unet()
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


def difftrain_run(model_dir: Path, data_dir: Path, out: Path, steps: int, batch: int, size: int,
                  method: str = "text2image", after_first_step: bool = False, **sections):
    """A run (text2image unless `method` says) through the real Trainer; returns (steps/s of the loop, the trainer).

    `after_first_step`: the rate of the steps after the first, which holds compiling and first-use warm-up.
    """
    from difftrain.config import parse_config
    from difftrain.training.trainer import Trainer

    raw = {
        "output_dir": str(out),
        "method": method,
        "data": {"path": str(data_dir), "resolution": size, "random_flip": False},
        "model": {"base": str(model_dir)},
        "training": {"max_steps": steps, "batch_size": batch, "learning_rate": 1e-4, "ema": {"enabled": False},
                     "max_grad_norm": None},
        "checkpoint": {"every_steps": 10 * steps},
        "sample": {"every_steps": 10 * steps},
        "log": {"every_steps": steps, "tensorboard": False},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = Trainer(parse_config(raw), progress=False)
        # The loop always checkpoints its last step and writes the final model: I/O, not steps, and
        # at SD 1.5's size 4 GB a run.
        trainer.save_checkpoint = lambda: None
        trainer.save_final_model = lambda: None
        result = trainer.run()
    if after_first_step:
        return (steps - 1) / (result.loop_seconds - result.first_step_seconds), trainer
    return steps / result.loop_seconds, trainer


COMPILE_SCOPES = ("blocks", "model")


def add_compile_option(parser: argparse.ArgumentParser, runs: str) -> None:
    """`--compile [blocks,model]`: `runs` again with training.compile: true, once per compile scope given."""
    def scopes(text: str) -> list[str]:
        chosen = [scope for scope in text.split(",") if scope]
        unknown = sorted(set(chosen) - set(COMPILE_SCOPES))
        if unknown:
            raise argparse.ArgumentTypeError(f"{', '.join(unknown)}: a scope is one of {', '.join(COMPILE_SCOPES)}")
        return chosen

    parser.add_argument("--compile", nargs="?", const=",".join(COMPILE_SCOPES), default="", type=scopes,
                        metavar="SCOPES", help=f"add {runs} with training.compile: true, once per "
                                              "training.compile_scope listed (blocks, model; bare: both)")


def compile_settings(scope: str | None) -> dict:
    """The training section's compile settings for a run compiled at `scope`, or eager for None."""
    return {"compile": True, "compile_scope": scope} if scope else {"compile": False}


def step_arguments(description: str) -> argparse.ArgumentParser:
    """The options every training-step benchmark takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    return parser


@dataclass
class Workspace:
    device: torch.device
    work: Path
    model_dir: Path
    data_dir: Path


def workspace(size: int, batch: int, masks: bool = False, sd15: bool = False) -> Workspace:
    """A temporary folder with a shapes data set of 8 batches (with masks: ControlNet data) and the
    SD-quarter model, or with `sd15` one of SD 1.5's full shape."""
    from difftrain.data.shapes import write_shapes_dataset

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = scratch("difftrain-bench-")
    data_dir = write_shapes_dataset(work / "data", num_images=8 * batch, size=size, masks=masks)
    if sd15:
        model_dir = work / "sd15"
        sd15_shaped().save_pretrained(model_dir, safe_serialization=True)
    else:
        model_dir = sd_quarter(work, size)
    return Workspace(device, work, model_dir, data_dir)


class Rates(NamedTuple):
    """A variant's rate in each round of alternate(), in round order, and the largest peak memory of its runs."""

    runs: list[float]
    peak: int

    @property
    def rate(self) -> float:
        return sum(self.runs) / len(self.runs)


def alternate(variants: dict[str, Callable[[Path], float]], space: Workspace, rounds: int = 2,
              fresh_processes: bool = False) -> dict[str, Rates]:
    """Run every variant `rounds` times, in alternating order so neither profits from going second.

    Each variant is called with a fresh output folder and returns its rate (steps/s, images/s). Returns, per
    variant, its rate in each round and the larger peak memory. `fresh_processes` runs each call in a
    new (spawned) Python process, for comparisons with a plain loop: a difftrain run tunes
    process-wide state that cannot be undone (training.keep_host_memory raises glibc's malloc
    thresholds), which a baseline in the same process would otherwise inherit. Variants must
    then be picklable: functools.partial of module-level functions, not lambdas.
    """
    rates: dict[str, list[float]] = {name: [] for name in variants}
    peaks: dict[str, list[int]] = {name: [] for name in variants}
    order = list(variants)
    for round_ in range(rounds):
        for number, name in enumerate(order if round_ % 2 == 0 else order[::-1]):
            call = (variants[name], space.device, space.work / f"run-{round_}-{number}")
            if fresh_processes:
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                    rate, peak = pool.submit(measured, *call).result()
            else:
                rate, peak = measured(*call)
            rates[name].append(rate)
            peaks[name].append(peak)
    return {name: Rates(rates[name], max(peaks[name])) for name in variants}


def print_rates(results: dict[str, Rates], baseline: str, unit: str = "steps/s", memory: bool = True,
                columns: dict[str, dict[str, str]] | None = None) -> None:
    """alternate()'s table: each variant's mean rate and its ratio to the baseline's mean, the lowest and
    highest ratio of one round (a run against the baseline's run of the same round), and with `memory` the
    peak and its ratio. `columns`: more columns before the rates, {header: {variant: text}}.

    The per-round range is the machine's noise made visible: on a shared CPU whose speed swings for
    minutes at a time, two rounds of one benchmark have put a lever on both sides of x1.00.
    """
    base = results[baseline]
    columns = columns or {}
    header = ["variant", *columns, unit, "x base", "rounds", *(["peak MiB", "x base"] if memory else [])]
    rows = [header]
    for name, result in results.items():
        ratios = [run / base_run for run, base_run in zip(result.runs, base.runs)]
        spread = "-" if name == baseline else f"{min(ratios):.2f}-{max(ratios):.2f}"
        rows.append([name, *(cells[name] for cells in columns.values()), f"{result.rate:.2f}",
                     f"{result.rate / base.rate:.2f}", spread,
                     *([f"{result.peak / 2**20:.0f}", f"{result.peak / max(base.peak, 1):.2f}"] if memory else [])])
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    print()
    for row in rows:
        print(row[0].ljust(widths[0]) + "".join(f"  {cell:>{width}}" for cell, width in zip(row[1:], widths[1:])))
    peak_note = "; peak: the largest of the runs" if memory else ""
    print(f"({unit}: mean of {len(base.runs)} runs each, alternating order. rounds: the lowest and highest x base\n"
          f" of one round, a run against the baseline's run of that round{peak_note})")


def measured(variant: Callable[[Path], float], device: torch.device, out: Path) -> tuple[float, int]:
    """A variant's steps/s and the peak memory it added."""
    with PeakMemory(device) as memory:
        rate = variant(out)
    return rate, memory.peak
