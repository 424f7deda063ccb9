"""Attention kernels on this machine: torch's SDPA against diffusers' classic kernel, then the demo's loop under each.

    .venv/bin/python benchmarks/attention_kernels.py [--loop-steps 150]

First one diffusers attention layer, forward and backward, at the shapes the demo (64-256
tokens of 96 channels, batch 16) and Stable Diffusion's UNets (self-attention over 64-4,096
latent tokens, cross-attention to 77 text tokens) train at, in bf16 autocast and in fp32:
milliseconds each, and SDPA's time over the classic kernel's (above 1: the classic kernel is
faster). `training.attention: auto` takes the classic kernel where this says it wins on a CPU
under bf16 (up to 256 query tokens). Then the demo's training loop (the real Trainer on
configs/demo.yaml) with `training.attention: sdpa` against `auto`, two runs each, alternating.
"""

from __future__ import annotations

import argparse
import time

import torch
from demo_levers import compare_loops
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

# (batch, query tokens, channels, heads, text tokens or None for self-attention)
SHAPES = [
    (16, 64, 96, 4, None),    # the demo's UNet at 8x8
    (16, 256, 96, 4, None),   # the demo's attention if it sat at 16x16
    (4, 64, 80, 8, None),
    (4, 256, 80, 8, None),    # SD 1.5 at a quarter width, 128 px: the 16x16 latent level
    (4, 256, 80, 8, 77),
    (4, 64, 320, 8, 77),
    (4, 1024, 80, 8, None),
    (1, 4096, 320, 8, None),  # SD 1.5 at 512 px: its 64x64 latent level
]


def kernel_ms(processor, batch: int, tokens: int, channels: int, heads: int, text_tokens: int | None,
              bf16: bool) -> float:
    """Milliseconds of one forward and backward through an attention layer with this processor."""
    torch.manual_seed(0)
    layer = Attention(channels, heads=heads, dim_head=channels // heads,
                      cross_attention_dim=64 if text_tokens else None)
    layer.set_processor(processor)
    x = torch.randn(batch, tokens, channels, requires_grad=True)
    context = torch.randn(batch, text_tokens, 64) if text_tokens else None

    def once():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = layer(x, context)
        out.float().sum().backward()

    repeats = 3 if tokens >= 4096 else 20
    once(), once()
    started = time.perf_counter()
    for _ in range(repeats):
        once()
    return (time.perf_counter() - started) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop-steps", type=int, default=150, help="steps per run of the demo's loop (0: skip it)")
    args = parser.parse_args()
    print(f"CPU, {torch.get_num_threads()} threads; forward + backward of one attention layer, ms")
    print(f"{'batch x tokens, channels/heads, text':40s} {'precision':>9s} {'sdpa':>8s} {'classic':>8s} {'sdpa/classic':>12s}")
    for batch, tokens, channels, heads, text in SHAPES:
        for bf16 in (True, False):
            sdpa = kernel_ms(AttnProcessor2_0(), batch, tokens, channels, heads, text, bf16)
            classic = kernel_ms(AttnProcessor(), batch, tokens, channels, heads, text, bf16)
            shape = f"{batch} x {tokens}, {channels}/{heads}, {text or 'self'}"
            print(f"{shape:40s} {'bf16' if bf16 else 'fp32':>9s} {sdpa:8.2f} {classic:8.2f} {sdpa / classic:12.2f}")
    if not args.loop_steps:
        return
    compare_loops("training.attention", ("sdpa", "auto"), args.loop_steps, "mixed_precision auto")


if __name__ == "__main__":
    main()
