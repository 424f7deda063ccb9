"""Text-to-image training steps/s and peak memory: difftrain (with and without the cache) against
the loop the seeds write (VAE encode and text encode inside every step), in one process, on the
same SD-shaped model, data and batch.

    .venv/bin/python benchmarks/text2image_step.py [--steps 20] [--batch 4] [--size 128]

Peak memory is the peak CUDA allocation on a GPU; on a CPU it is the peak resident set size
above what the process held before that variant started (sampled every 5 ms).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")


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


def seeds_style_loop(model_dir: Path, data_dir: Path, steps: int, batch: int, size: int, device) -> float:
    """The loop as the seeds (and diffusers' train_text_to_image.py) write it."""
    import json

    import numpy as np
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").to(device).requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").to(device).requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").to(device).train()
    scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    records = [json.loads(line) for line in (data_dir / "metadata.jsonl").read_text().splitlines()]

    class Folder(torch.utils.data.Dataset):
        def __len__(self):
            return len(records)

        def __getitem__(self, i):
            image = Image.open(data_dir / records[i]["file_name"]).convert("RGB").resize((size, size))
            pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1
            return pixels, records[i]["text"]

    loader = torch.utils.data.DataLoader(Folder(), batch_size=batch, shuffle=True, drop_last=True)
    batches = iter(())
    started = time.perf_counter()
    for _ in range(steps):
        try:
            pixels, captions = next(batches)
        except StopIteration:
            batches = iter(loader)
            pixels, captions = next(batches)
        pixels = pixels.to(device)
        ids = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            embeds = text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        prediction = unet(scheduler.add_noise(latents, noise, t), t, embeds).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - started)


def difftrain_run(model_dir: Path, data_dir: Path, out: Path, steps: int, batch: int, size: int, cache: bool) -> float:
    from difftrain.config import parse_config
    from difftrain.training.trainer import Trainer

    config = parse_config({
        "output_dir": str(out),
        "method": "text2image",
        "data": {"path": str(data_dir), "resolution": size, "random_flip": False,
                 "cache": {"latents": cache, "text": cache}},
        "model": {"base": str(model_dir)},
        "training": {"max_steps": steps, "batch_size": batch, "learning_rate": 1e-4, "ema": {"enabled": False},
                     "max_grad_norm": None},
        "checkpoint": {"every_steps": 10 * steps},
        "sample": {"every_steps": 10 * steps},
        "log": {"every_steps": steps, "tensorboard": False},
    })
    trainer = Trainer(config, progress=False)
    trainer.save_checkpoint = lambda: None  # the loop always checkpoints its last step; that is I/O, not a step
    result = trainer.run()
    return steps / result.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    from difftrain.data.shapes import write_shapes_dataset
    from difftrain.models.tiny_sd import write_tiny_sd

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(tempfile.mkdtemp(prefix="difftrain-bench-"))
    # Stable Diffusion 1.5's shape at a quarter of its width: VAE (128, 256, 512, 512) -> (32, 64, 128, 128),
    # UNet (320, 640, 1280, 1280) -> (80, 160, 320, 320), two layers per block, 8x VAE downsampling, CLIP
    # at 77 tokens. Channel counts scale the UNet's and the VAE's cost alike, so the share of a step the
    # encoders take is close to SD's at the same pixels-to-latents ratio.
    model_dir = write_tiny_sd(work / "sd", unet_channels=(80, 160, 320, 320), vae_channels=(32, 64, 128, 128),
                              text_hidden=192, text_layers=6, sample_size=args.size, layers_per_block=2)
    data_dir = write_shapes_dataset(work / "data", num_images=8 * args.batch, size=args.size)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'} "
          f"({torch.get_num_threads()} threads); {args.steps} steps of batch {args.batch} at {args.size} px")

    baseline = "seeds-style loop (encode every step)"
    variants = [
        (baseline, lambda out: seeds_style_loop(model_dir, data_dir, args.steps, args.batch, args.size, device)),
        ("difftrain, no cache", lambda out: difftrain_run(model_dir, data_dir, out, args.steps, args.batch, args.size, False)),
        ("difftrain, cached latents + text", lambda out: difftrain_run(model_dir, data_dir, out, args.steps, args.batch, args.size, True)),
    ]
    # A short untimed baseline first, so no variant pays the process's first-use costs
    # (imports, allocator growth); then every variant twice, in alternating order.
    with contextlib.redirect_stdout(io.StringIO()):
        seeds_style_loop(model_dir, data_dir, 3, args.batch, args.size, device)
    rates: dict[str, list[float]] = {name: [] for name, _ in variants}
    peaks: dict[str, list[int]] = {name: [] for name, _ in variants}
    for round_ in range(2):
        for number, (name, run) in enumerate(variants if round_ == 0 else variants[::-1]):
            with PeakMemory(device) as memory, contextlib.redirect_stdout(io.StringIO()):
                rates[name].append(run(work / f"run-{round_}-{number}"))
            peaks[name].append(memory.peak)
    results = {name: (sum(rates[name]) / len(rates[name]), max(peaks[name])) for name in rates}

    baseline_rate, baseline_memory = results[baseline]
    print(f"\n{'variant':40s} {'steps/s':>8s} {'x base':>7s} {'peak MiB':>9s} {'x base':>7s}")
    for name, (rate, peak) in results.items():
        print(f"{name:40s} {rate:8.2f} {rate / baseline_rate:7.2f} {peak / 2**20:9.0f} "
              f"{peak / max(baseline_memory, 1):7.2f}")
    print("(steps/s: mean of two runs each, alternating order. difftrain's figure is its loop time: data, step\n"
          " and logging (the final checkpoint is switched off); the cache's one-off fill and model loading are not in it.\n"
          " peak: the larger of the two runs, model loading included)")


if __name__ == "__main__":
    main()
