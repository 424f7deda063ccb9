"""Text-to-image training steps/s and peak memory: difftrain (with and without the cache, and with
gradient checkpointing) against the loop the seeds write (VAE encode and text encode inside every
step), in one benchmark run, on the same SD-shaped model, data, batch and precision. Each run of a
variant is a fresh process: difftrain's runs set process-wide state the baseline must not inherit
(training.keep_host_memory).

    .venv/bin/python benchmarks/text2image_step.py [--steps 60] [--batch 4] [--size 128] [--precision bf16]
        [--rounds 2] [--compile [blocks,model]]

`--compile` adds difftrain's two runs with `training.compile: true`, once per `training.compile_scope`
listed (bare: both; the first step, which compiles, is left out as in every run). Compiling the whole
UNet (`model`) takes ~4 min the first time on 2 CPU cores, ~40 s a run from the kernel cache after that;
only its transformer blocks (`blocks`), ~60 s and ~15 s.

Peak memory is the peak CUDA allocation on a GPU; on a CPU it is the peak resident set size
above what the process held before that variant started (sampled every 5 ms).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from _common import (add_compile_option, alternate, compile_settings, device_name, difftrain_run, print_rates,
                     step_arguments, workspace)


@dataclass
class PlainLoop:
    """The models and state of the loop as the seeds (and diffusers' train_text_to_image.py) write it.

    Mixed precision and LoRA as diffusers' scripts do them: the frozen VAE and text encoder (and
    under LoRA the frozen UNet) cast to the half type, autocast around the UNet, a gradient scaler
    for fp16, and peft adapters on to_q/to_k/to_v/to_out.0, upcast to fp32 under fp16 only (peft
    gives them the base layer's dtype; train_text_to_image_lora.py casts them for fp16 alone).
    TF32 on, as difftrain's runs set it for the process.
    """

    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    scheduler: Any
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    half: torch.dtype
    device: torch.device

    @classmethod
    def build(cls, model_dir: Path, device, precision: str = "no", lora_rank: int = 0,
              foreach: bool | None = None) -> PlainLoop:
        """`foreach`: AdamW's implementation (None: torch's default, foreach on CUDA, per tensor on a CPU)."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        half = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", dtype=half)
        vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", dtype=half)
        text_encoder.to(device).requires_grad_(False)
        vae.to(device).requires_grad_(False)
        unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", dtype=half if lora_rank else None)
        unet.train()
        if lora_rank:
            from peft import LoraConfig

            unet.requires_grad_(False).to(device)
            unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                        target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
            trained = [p for p in unet.parameters() if p.requires_grad]
            if precision == "fp16":
                for parameter in trained:
                    parameter.data = parameter.data.float()
        else:
            unet.to(device)
            trained = list(unet.parameters())
        return cls(tokenizer, text_encoder, vae, unet, DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler"),
                   torch.optim.AdamW(trained, lr=1e-4, foreach=foreach),
                   torch.amp.GradScaler(device.type, enabled=precision == "fp16"), half, device)

    def step(self, pixels: torch.Tensor, captions: list[str], phase=lambda name: contextlib.nullcontext()) -> None:
        """One training step on a batch; `phase(name)` wraps the "loss", "backward" and "optimizer" parts."""
        with phase("loss"):
            pixels = pixels.to(self.device, self.half)
            ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(self.device)
            with torch.no_grad():
                latents = self.vae.encode(pixels).latent_dist.sample() * self.vae.config.scaling_factor
                embeds = self.text_encoder(ids)[0]
            noise = torch.randn_like(latents)
            t = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],), device=self.device)
            with torch.autocast(self.device.type, dtype=self.half, enabled=self.half != torch.float32):
                prediction = self.unet(self.scheduler.add_noise(latents, noise, t), t, embeds).sample
            loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        with phase("backward"):
            self.scaler.scale(loss).backward()
        with phase("optimizer"):
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad()


def seeds_style_loop(model_dir: Path, data_dir: Path, steps: int, batch: int, size: int, device,
                     precision: str = "no", lora_rank: int = 0, after_first_step: bool = False) -> float:
    """PlainLoop's steps over the data set as the seeds load it; steps/s.

    `after_first_step`: the rate of the steps after the first (cuDNN autotuning, allocator growth).
    """
    import json

    import numpy as np
    from PIL import Image

    loop = PlainLoop.build(model_dir, device, precision, lora_rank)
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
    for step in range(steps):
        try:
            pixels, captions = next(batches)
        except StopIteration:
            batches = iter(loader)
            pixels, captions = next(batches)
        loop.step(pixels, list(captions))
        if step == 0 and after_first_step:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (steps - 1 if after_first_step else steps) / (time.perf_counter() - started)


def plain_loop(out: Path, **loop) -> float:
    """seeds_style_loop as a benchmark variant (it writes nothing to `out`)."""
    return seeds_style_loop(**loop)


def difftrain_text2image(out: Path, model_dir: Path, data_dir: Path, steps: int, batch: int, size: int, cache: bool,
                         checkpointing: bool = False, precision: str = "no",
                         keep_host_memory: bool | str = "auto", compile_scope: str | None = None) -> float:
    return difftrain_run(model_dir, data_dir, out, steps, batch, size, after_first_step=True,
                         data={"cache": {"latents": cache, "text": cache}},
                         training={"gradient_checkpointing": checkpointing, "mixed_precision": precision,
                                   "keep_host_memory": keep_host_memory, **compile_settings(compile_scope)})[0]


def main() -> None:
    parser = step_arguments(__doc__.splitlines()[0])
    # 60, not the shared 20: each run's first steps (kernel choice, allocator growth) weigh on 20
    # steps and moved the ratios by up to 0.25 between runs.
    parser.set_defaults(steps=60)
    parser.add_argument("--precision", choices=("no", "bf16", "fp16"), default="no",
                        help="both loops: frozen parts in this type and autocast around the UNet (bf16: what "
                             "`mixed_precision: auto` picks on a CPU with AVX512-BF16 or AMX)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each variant, in alternating order")
    add_compile_option(parser, "difftrain's runs with and without the cache")
    args = parser.parse_args()
    precision = args.precision
    space = workspace(args.size, args.batch)
    model_dir, data_dir, device = space.model_dir, space.data_dir, space.device
    print(f"device: {device_name(device)}; {args.steps} steps of batch {args.batch} at {args.size} px, "
          f"precision {precision}")

    baseline = "seeds-style loop (encode every step)"
    shared = dict(model_dir=model_dir, data_dir=data_dir, steps=args.steps, batch=args.batch, size=args.size,
                  precision=precision)
    variants = {
        baseline: partial(plain_loop, device=device, after_first_step=True, **shared),
        "difftrain, no cache": partial(difftrain_text2image, cache=False, **shared),
        "difftrain, no cache, host memory released": partial(difftrain_text2image, cache=False,
                                                             keep_host_memory=False, **shared),
        "difftrain, cached latents + text": partial(difftrain_text2image, cache=True, **shared),
        "difftrain, cached + grad. checkpointing": partial(difftrain_text2image, cache=True, checkpointing=True,
                                                           **shared),
    }
    for scope in args.compile:
        variants[f"difftrain, no cache, compiled {scope}"] = partial(difftrain_text2image, cache=False,
                                                                     compile_scope=scope, **shared)
        variants[f"difftrain, cached, compiled {scope}"] = partial(difftrain_text2image, cache=True,
                                                                   compile_scope=scope, **shared)
    # Every run in a fresh process: the baseline gets glibc's malloc as a user's script does
    # (difftrain keeps freed host memory, training.keep_host_memory), and no variant inherits
    # another's warm state. The rates leave out each run's first step, where a fresh process
    # builds its kernels.
    print_rates(alternate(variants, space, rounds=args.rounds, fresh_processes=True), baseline)
    print("(each run in a fresh process, its first step left out. difftrain's figure is the run summary's steps\n"
          " alone: data, step and logging, without previews or checkpoints; the cache's one-off fill and model\n"
          " loading are not in it. 'host memory released': training.keep_host_memory off, glibc's malloc defaults\n"
          " as in the baseline. peak: model loading included)")


if __name__ == "__main__":
    main()
