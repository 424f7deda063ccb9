"""Convolutions on this CPU: oneDNN (what torch picks) against im2col + GEMM (torch's own
slow_conv2d, what it runs with oneDNN off), for every convolution of a UNet's training step.

    .venv/bin/python benchmarks/conv_kernels.py [--model sd-quarter|sd15|demo] [--size 128] [--batch 4]

The convolutions are recorded from one forward pass of the real model (text2image_step.py's
SD-quarter UNet, SD 1.5's shape, or the demo's `mini` pixel UNet), grouped by shape; each shape's
forward, gradient of the input and gradient of the weight are then timed under both kernels, in
one process, alternating. Prints milliseconds per call, im2col's time over oneDNN's (below 1:
im2col is faster), and over the whole step what oneDNN costs against the faster kernel per shape
and pass, i.e. what choosing the kernel per shape could save. A measurement, not a lever difftrain
pulls (README, "Benchmarks").
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections import Counter

import torch
import torch.nn.functional as F
from _common import scratch, sd15_unet, sd_quarter

convolution_backward = torch.ops.aten.convolution_backward


def recorded_convolutions(model: str, size: int, batch: int) -> Counter:
    """(input shape, weight shape, stride, padding) -> calls in one forward pass of the model."""
    torch.manual_seed(0)
    if model == "demo":
        from difftrain.models.unet import build_unet

        unet = build_unet("mini", None, 3, size, 12)
        inputs = dict(sample=torch.randn(batch, 3, size, size), timestep=torch.tensor(500),
                      class_labels=torch.zeros(batch, dtype=torch.long))
    else:
        from diffusers import UNet2DConditionModel

        if model == "sd15":
            unet = sd15_unet()  # the UNet alone: its convolutions are all this measures
        else:
            unet = UNet2DConditionModel.from_pretrained(sd_quarter(scratch("difftrain-bench-"), size), subfolder="unet")
        inputs = dict(sample=torch.randn(batch, 4, size // 8, size // 8), timestep=torch.tensor(500),
                      encoder_hidden_states=torch.randn(batch, 77, unet.config.cross_attention_dim))
    seen: Counter = Counter()

    def record(module, args, _output):
        seen[(tuple(args[0].shape), tuple(module.weight.shape), module.stride, module.padding)] += 1

    for module in unet.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(record)
    with torch.no_grad():
        unet(**inputs)
    return seen


def pass_ms(shape: tuple, onednn: bool) -> tuple[float, float, float]:
    """Milliseconds of one forward, one input gradient and one weight (and bias) gradient, each
    timed over ~0.2 s of calls."""
    input_shape, weight_shape, stride, padding = shape
    x, weight = torch.randn(input_shape), torch.randn(weight_shape)
    bias = torch.randn(weight_shape[0])
    grad = torch.randn_like(F.conv2d(x, weight, bias, stride, padding))
    common = ([weight_shape[0]], list(stride), list(padding), [1, 1], False, [0, 0], 1)
    passes = (lambda: F.conv2d(x, weight, bias, stride, padding),
              lambda: convolution_backward(grad, x, weight, *common, [True, False, False]),
              lambda: convolution_backward(grad, x, weight, *common, [False, True, True]))
    times = []
    with torch.backends.mkldnn.flags(enabled=onednn):
        for run in passes:
            started = time.perf_counter()
            run()  # warm-up: kernel choice, allocation
            rounds = max(2, min(20, int(0.2 / (time.perf_counter() - started))))
            started = time.perf_counter()
            for _ in range(rounds):
                run()
            times.append((time.perf_counter() - started) / rounds * 1000)
    return tuple(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("sd-quarter", "sd15", "demo"), default="sd-quarter")
    parser.add_argument("--size", type=int, default=None, help="pixels (default 128, sd15 512, demo 32)")
    parser.add_argument("--batch", type=int, default=None, help="default 4, sd15 1, demo 16")
    args = parser.parse_args()
    size = args.size or {"sd-quarter": 128, "sd15": 512, "demo": 32}[args.model]
    batch = args.batch or {"sd-quarter": 4, "sd15": 1, "demo": 16}[args.model]
    warnings.filterwarnings("ignore", message=".*TF32.*")  # torch.backends.mkldnn.flags sets oneDNN's TF32 too
    shapes = recorded_convolutions(args.model, size, batch)
    print(f"{args.model} at {size} px, batch {batch}, fp32, {torch.get_num_threads()} threads: "
          f"{sum(shapes.values())} convolutions of {len(shapes)} shapes\n")
    print(f"{'input':>18s} {'weight':>18s} {'calls':>5s}   {'oneDNN ms fwd/dx/dw':>22s}   {'im2col / oneDNN':>18s}")
    rows = []
    for shape, calls in shapes.items():
        onednn, im2col = [0.0] * 3, [0.0] * 3
        for _ in range(2):  # alternating, so neither kernel profits from going second
            onednn = [a + b / 2 for a, b in zip(onednn, pass_ms(shape, True))]
            im2col = [a + b / 2 for a, b in zip(im2col, pass_ms(shape, False))]
        rows.append((shape, calls, onednn, im2col))
    rows.sort(key=lambda row: -row[1] * sum(row[2]))  # the step's costliest shapes first
    for (input_shape, weight_shape, *_), calls, onednn, im2col in rows:
        print(f"{str(input_shape):>18s} {str(weight_shape):>18s} {calls:5d}   "
              f"{'/'.join(f'{t:.2f}' for t in onednn):>22s}   "
              f"{'/'.join(f'{b / a:.2f}' for a, b in zip(onednn, im2col)):>18s}")
    onednn_total = sum(calls * sum(onednn) for _, calls, onednn, _ in rows)
    best_total = sum(calls * sum(map(min, onednn, im2col)) for _, calls, onednn, im2col in rows)
    print(f"\nthe step's convolutions (forward and backward): oneDNN {onednn_total:.1f} ms, the faster kernel "
          f"per shape and pass {best_total:.1f} ms (x{onednn_total / best_total:.2f})")


if __name__ == "__main__":
    main()
