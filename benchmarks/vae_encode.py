"""Encoding images to latents, as training and the latent cache do: the VAE encoder in
channels_last (what difftrain's text2image runs use) against the contiguous layout diffusers
loads, in one process, alternating.

    .venv/bin/python benchmarks/vae_encode.py [--batch 4] [--size 128] [--rounds 6] [--dtype fp32]

Two VAEs: text2image_step.py's SD-quarter VAE (32/64/128/128 channels) and SD's own width
(128/256/512/512), random weights. Prints ms per batch, the speed-up and the largest latent
difference between the layouts.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from _common import device_name

from difftrain.methods.text2image import encoder_channels_last


def encode_ms(vae, pixels: torch.Tensor, rounds: int) -> float:
    with torch.no_grad():
        vae.encode(pixels)  # warm-up: oneDNN picks its kernels
        if pixels.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(rounds):
            vae.encode(pixels).latent_dist.mean
        if pixels.device.type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - started) / rounds * 1000


def main() -> None:
    from diffusers import AutoencoderKL

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="the VAE's weights and input, as training holds the frozen VAE (fp16 there keeps fp32)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    print(f"device: {device_name(device)}; batch {args.batch} at {args.size} px, {args.dtype}, "
          f"{args.rounds} encodes per timing\n")
    print(f"{'VAE':24s} {'contiguous ms':>14s} {'channels_last ms':>17s} {'x':>6s} {'max latent diff':>16s}")
    for name, channels in (("SD-quarter (32..128)", (32, 64, 128, 128)), ("SD width (128..512)", (128, 256, 512, 512))):
        torch.manual_seed(0)
        vae = AutoencoderKL(block_out_channels=channels, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                            norm_num_groups=32).to(device, dtype).eval()
        fast = copy.deepcopy(vae)  # the same weights
        encoder_channels_last(fast)
        pixels = (torch.rand(args.batch, 3, args.size, args.size, device=device) * 2 - 1).to(dtype)
        plain, quick = [], []
        for round_ in range(2):  # alternating, so neither profits from going second
            for model, times in ((vae, plain), (fast, quick))[:: 1 if round_ == 0 else -1]:
                given = pixels.contiguous(memory_format=torch.channels_last) if model is fast else pixels
                times.append(encode_ms(model, given, args.rounds))
        with torch.no_grad():
            diff = (vae.encode(pixels).latent_dist.mean
                    - fast.encode(pixels.contiguous(memory_format=torch.channels_last)).latent_dist.mean).abs().max()
        a, b = sum(plain) / 2, sum(quick) / 2
        print(f"{name:24s} {a:14.1f} {b:17.1f} {a / b:6.2f} {diff.float().item():16.1e}")


if __name__ == "__main__":
    main()
