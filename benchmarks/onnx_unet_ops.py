"""Where an exported UNet's time goes, by ONNX operator type, from ONNX Runtime's own profiler.

    .venv/bin/python benchmarks/onnx_unet_ops.py EXPORT [EXPORT ...] [--size 512] [--runs 2]

EXPORT is a `difftrain export` folder (fp32 or int8). Each UNet runs `--runs` times on random
inputs shaped as classifier-free guidance feeds it (batch 2, 77 tokens of context) on the CPU
provider with 2 threads; the table is each operator type's share of the kernel time, with its
seconds per run and node count. This is how the int8 export's attention was found to dominate
at 512 px (QLinearMatMul + QLinearSoftmax) before `_attention_core` kept it in fp32.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def operator_times(unet: Path, size: int, runs: int) -> tuple[list[float], dict[str, tuple[float, int]]]:
    """(seconds of each run, {operator type: (kernel seconds per run, nodes)})."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="difftrain-ort-profile-")) / "unet")
    session = ort.InferenceSession(str(unet), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    shapes = {"sample": (2, 4, size // 8, size // 8), "timestep": (2,), "encoder_hidden_states": (2, 77, 768)}
    feed = {}
    for given in session.get_inputs():
        if given.name not in shapes:
            raise SystemExit(f"{unet}: input {given.name} is not one a plain SD UNet export has (ControlNet "
                             "residual inputs are not profiled here)")
        shape = list(shapes[given.name])
        if given.name == "encoder_hidden_states":
            shape[-1] = given.shape[-1]
        feed[given.name] = rng.standard_normal(shape).astype(np.float32) * (500 if given.name == "timestep" else 1)
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, feed)
        seconds.append(time.perf_counter() - started)
    events = json.loads(Path(session.end_profiling()).read_text())
    total, nodes = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            total[event["args"]["op_name"]] += event["dur"] / 1e6
            nodes[event["args"]["op_name"]] += 1
    return seconds, {op: (total[op] / runs, nodes[op] // runs) for op in total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exports", nargs="+")
    parser.add_argument("--size", type=int, default=512, help="image side; the UNet sees size / 8")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    for export in args.exports:
        seconds, ops = operator_times(Path(export) / "unet" / "model.onnx", args.size, args.runs)
        kernel = sum(t for t, _ in ops.values())
        print(f"\n{export}: UNet at {args.size} px, batch 2: {min(seconds):.2f} s a call (profiling on)")
        for op, (t, count) in sorted(ops.items(), key=lambda item: -item[1][0])[:args.top]:
            print(f"  {op:24s} {t:7.2f} s  {100 * t / kernel:5.1f} %  {count:4d} nodes")


if __name__ == "__main__":
    main()
