"""Would encoding the next batch beside the UNet step pay on a CPU? The uncached text2image step
with the VAE encode in sequence (what difftrain does) against the encode in a second, one-thread
process while the two-thread UNet step runs, alternating in one process.

    .venv/bin/python benchmarks/encode_overlap.py [--steps 10] [--rounds 2]
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/encode_overlap.py   # OpenMP threads that sleep when idle

The idea comes from thread scaling, printed first: the UNet step (forward, backward, fused AdamW)
gains less from a second thread than the VAE encode does, so the second core looks partly idle.
Model: text2image_step.py's SD-quarter model, batch 4, 128 px, random weights.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time

import torch
from _common import scratch, sd_quarter
from vae_encode import encode_ms

from difftrain.methods.text2image import encoder_channels_last


def load_vae(model_dir):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").eval().requires_grad_(False)
    encoder_channels_last(vae)
    return vae


def pixels() -> torch.Tensor:
    return torch.rand(4, 3, 128, 128).contiguous(memory_format=torch.channels_last) * 2 - 1


def encoder_process(model_dir, jobs, done) -> None:
    """One thread, one encode per job: what a data-loader worker encoding the next batch would do."""
    torch.set_num_threads(1)
    vae, batch = load_vae(model_dir), pixels()
    done.put("ready")
    while jobs.get():
        with torch.no_grad():
            vae.encode(batch).latent_dist.sample()
        done.put("encoded")


def main() -> None:
    from diffusers import UNet2DConditionModel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="steps per timing")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    model_dir = sd_quarter(scratch("encode-overlap-"), 128)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    optimizer = torch.optim.AdamW(unet.parameters(), fused=True)
    latents, timesteps = torch.randn(4, 4, 16, 16), torch.randint(0, 1000, (4,))
    text = torch.randn(4, 77, unet.config.cross_attention_dim)
    vae, batch = load_vae(model_dir), pixels()

    def unet_step() -> None:
        unet(latents, timesteps, text).sample.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def step_ms(step) -> float:
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        return (time.perf_counter() - started) / args.steps * 1000

    unet_step()  # warm-up: oneDNN picks its kernels
    print(f"{'threads':>7s} {'UNet step ms':>13s} {'VAE encode ms':>14s}")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        print(f"{threads:7d} {step_ms(unet_step):13.0f} {encode_ms(vae, batch, args.steps):14.0f}")

    context = multiprocessing.get_context("spawn")
    jobs, done = context.Queue(), context.Queue()
    worker = context.Process(target=encoder_process, args=(model_dir, jobs, done))
    worker.start()
    done.get()

    def in_sequence() -> None:
        with torch.no_grad():
            vae.encode(batch).latent_dist.sample()
        unet_step()

    def overlapped() -> None:
        jobs.put(True)
        unet_step()
        done.get()

    print(f"\n{'round':>5s} {'in sequence ms':>15s} {'overlapped ms':>14s} {'x':>6s}")
    for round_ in range(args.rounds):
        # alternating which goes first, so neither profits from going second
        if round_ % 2:
            overlapped_ms, sequential_ms = step_ms(overlapped), step_ms(in_sequence)
        else:
            sequential_ms, overlapped_ms = step_ms(in_sequence), step_ms(overlapped)
        print(f"{round_:5d} {sequential_ms:15.0f} {overlapped_ms:14.0f} {sequential_ms / overlapped_ms:6.2f}")
    jobs.put(False)
    worker.join()


if __name__ == "__main__":
    main()
