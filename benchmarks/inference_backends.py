"""Inference backends side by side: torch fp32 (difftrain's default), ONNX Runtime fp32 and ONNX Runtime int8,
for the tiny SD and a model of Stable Diffusion 1.5's shape (random weights: timing, and the int8 gate's PSNR).

    .venv/bin/python benchmarks/inference_backends.py [--steps 8] [--sizes 256,512] [--skip-sd15] [--work DIR]

Every figure is measured through `difftrain generate`'s own drawing code (the Drawer), each
backend in a fresh process so that its peak memory is its own: images/s of a whole
generation (CFG 7, DPM++ 2M Karras), the UNet's latency per step (batch 2, as CFG runs it)
and the process's peak resident memory. Ratios are against torch fp32 in the same run.
The int8 export's quality gate (PSNR to the fp32 graphs, 8 images) is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def measure(model: str, size: int, steps: int) -> dict:
    """In this process: load, warm up, time one generation and the UNet alone."""
    import torch

    from difftrain.generate.text2image import Drawer, GenerateOptions

    started = time.perf_counter()
    drawer = Drawer(model, GenerateOptions(prompt="", steps=steps, width=size, height=size), progress=False)
    load = time.perf_counter() - started
    drawer.draw("a red circle", "", [0])  # warm-up: first-call allocations, kernel and graph choices
    started = time.perf_counter()
    drawer.draw("a red circle", "", [1])
    seconds = time.perf_counter() - started
    unet, pipe = drawer.pipe.unet, drawer.pipe
    latent = size // pipe.vae_scale_factor
    x = torch.randn(2, unet.config.in_channels, latent, latent)
    context = torch.randn(2, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim)
    timings = []
    with torch.no_grad():
        for _ in range(3):
            begin = time.perf_counter()
            unet(x, torch.tensor(500), context)
            timings.append(time.perf_counter() - begin)
    return {"images_per_s": 1 / seconds, "unet_step_s": statistics.median(timings), "load_s": load,
            "peak_rss_gb": peak_rss() / 2**30}


def peak_rss() -> int:
    """This process's peak resident memory: VmHWM, not ru_maxrss, which Linux carries over from the
    parent across exec (the parent that exported a 3 GB UNet would show in every child)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def in_fresh_process(model: Path, size: int, steps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", str(model), "--size", str(size), "--steps", str(steps)],
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"measuring {model} at {size} px failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def build(work: Path, name: str, make, gate_size: int, gate_steps: int) -> dict[str, Path]:
    """The torch model and its fp32 and int8 exports (kept in `work` for the next run)."""
    from difftrain.export.onnx import ExportOptions, export_onnx

    models = {"torch fp32": work / name, "onnxruntime fp32": work / f"{name}-onnx",
              "onnxruntime int8": work / f"{name}-int8"}
    if not (models["torch fp32"] / "model_index.json").is_file():
        make(models["torch fp32"])
    for label, options in (("onnxruntime fp32", ExportOptions()),
                           ("onnxruntime int8", ExportOptions(quantize="int8", force=True, gate_size=gate_size,
                                                              gate_steps=gate_steps))):
        if not (models[label] / "difftrain.json").is_file():
            started = time.perf_counter()
            export_onnx(models["torch fp32"], models[label], options, progress=False)
            print(f"  exported {models[label].name} in {time.perf_counter() - started:.0f} s", flush=True)
    for label in ("onnxruntime fp32", "onnxruntime int8"):  # the UNet file: the part int8 shrinks
        unet = sum(p.stat().st_size for p in (models[label] / "unet").glob("model.onnx*"))
        print(f"  {label} UNet: {unet / 2**20:,.0f} MiB on disk", flush=True)
    return models


def tiny(out: Path) -> None:
    from difftrain.models.tiny_sd import write_tiny_sd

    write_tiny_sd(out)


def sd15(out: Path) -> None:
    from _common import sd15_shaped

    sd15_shaped().save_pretrained(out, safe_serialization=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--sizes", default="256,512", help="SD 1.5 shape: image sides to time")
    parser.add_argument("--skip-sd15", action="store_true")
    parser.add_argument("--gate-size", type=int, default=256, help="SD 1.5 shape: the int8 gate's image side")
    parser.add_argument("--gate-steps", type=int, default=6)
    parser.add_argument("--work", help="keep models and exports here between runs (default: a temporary folder)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.size, args.steps)))
        return
    import onnxruntime
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    print(f"CPU, {torch.get_num_threads()} threads; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; "
          f"{args.steps} steps, DPM++ 2M Karras, CFG 7, batch 1; each backend in its own process")
    from _common import scratch

    work = Path(args.work) if args.work else scratch("difftrain-backends-")
    plans = [("tiny SD", "tiny", tiny, [32], 32, 12)]
    if not args.skip_sd15:
        plans.append(("SD 1.5 shape", "sd15", sd15, [int(s) for s in args.sizes.split(",")], args.gate_size,
                      args.gate_steps))
    rows = []
    for label, name, make, sizes, gate_size, gate_steps in plans:
        print(f"{label}: building and exporting in {work}", flush=True)
        models = build(work, name, make, gate_size, gate_steps)
        gate = json.loads((models["onnxruntime int8"] / "difftrain.json").read_text())["export"]["quality_gate"]
        for size in sizes:
            results = {backend: in_fresh_process(path, size, args.steps) for backend, path in models.items()}
            base = results["torch fp32"]
            for backend, result in results.items():
                rows.append((label, size, backend, result, result["images_per_s"] / base["images_per_s"],
                             base["unet_step_s"] / result["unet_step_s"]))
                print(f"  {size} px {backend}: {result['images_per_s']:.3f} images/s", flush=True)
        print(f"  int8 quality gate ({gate['images']} images at {gate['size'] or 'native'} px, {gate['steps']} steps): "
              f"PSNR to fp32 {gate['psnr_min']:.1f} dB worst, {gate['psnr_mean']:.1f} mean -> "
              f"{'passed' if gate['passed'] else 'FAILED'} (floor {gate['min_psnr']})")
    print(f"\n{'model':14s} {'px':>4s} {'backend':18s} {'images/s':>9s} {'x torch':>8s} {'UNet s/step':>12s} "
          f"{'x torch':>8s} {'peak GB':>8s} {'load s':>7s}")
    for label, size, backend, result, ratio, unet_ratio in rows:
        print(f"{label:14s} {size:4d} {backend:18s} {result['images_per_s']:9.3f} {ratio:8.2f} "
              f"{result['unet_step_s']:12.4f} {unet_ratio:8.2f} {result['peak_rss_gb']:8.2f} {result['load_s']:7.1f}")


if __name__ == "__main__":
    main()
