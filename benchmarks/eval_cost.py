"""What evaluation costs: Inception feature extraction in images/s, and its share of the demo's training time.

    python benchmarks/eval_cost.py                 # defaults: 300 demo steps, eval every 100
    python benchmarks/eval_cost.py --steps 1500 --every 500   # the whole demo

Part 1 times torch-fidelity's InceptionV3 (random weights: the same arithmetic as the real
ones) in its own layout and in ours at several batch sizes, and the FID of a small set by
the general eigenproblem against the n x n route evaluation takes. Part 2 trains the demo config
(configs/demo.yaml, on a fresh shapes set) three times in this process: without evaluation,
with it and a cold reference cache, and with it again on the warm cache; the share is the
extra wall time over the run without. The last lines extrapolate to the demo's full length.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import _common  # noqa: E402,F401  (offline, like every benchmark)

ROOT = Path(__file__).resolve().parents[1]


def extraction_rates(weights: Path, images: list, size: int, batches: list[int]) -> dict[str, float]:
    """images/s by batch size, channels_last (what difftrain runs) and, as the baseline, torch-fidelity's
    contiguous layout."""
    from difftrain.evaluate.inception import InceptionFeatures

    rates = {}
    for layout, batch in [("contiguous", 1), ("contiguous", 32)] + [("channels_last", b) for b in batches]:
        extractor = InceptionFeatures(weights, batch_size=batch)
        if layout == "contiguous":
            extractor.network = extractor.network.to(memory_format=torch.contiguous_format)
        extractor(images[:batch], size)  # warm-up
        started = time.perf_counter()
        extractor(images, size)
        rates[f"{layout}, batch {batch}"] = len(images) / (time.perf_counter() - started)
    return rates


def train_demo(data: Path, out: Path, steps: int, evaluation: dict | None) -> float:
    from difftrain.config import parse_config
    from difftrain.training.trainer import train

    raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    raw.update(output_dir=str(out))
    raw["data"]["path"] = str(data)
    raw["training"]["max_steps"] = steps
    raw["log"]["tensorboard"] = False
    raw["sample"]["every_steps"] = 10 * steps  # the same previews in every variant: only the last step's
    if evaluation:
        raw["eval"] = evaluation
    with contextlib.redirect_stdout(io.StringIO()):
        started = time.perf_counter()
        train(parse_config(raw), progress=False)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="demo steps per training run")
    parser.add_argument("--every", type=int, default=100, help="eval.every_steps")
    parser.add_argument("--num-images", type=int, default=None, help="eval.num_images (default: the config's)")
    parser.add_argument("--reference-max", type=int, default=None, help="eval.reference_max (default: the config's)")
    parser.add_argument("--demo-steps", type=int, default=1500)
    parser.add_argument("--demo-every", type=int, default=500)
    args = parser.parse_args()

    from difftrain.config import EvalConfig
    from difftrain.data.shapes import write_shapes_dataset
    from difftrain.evaluate.inception import write_random_inception
    from difftrain.sampling.images import to_pil

    work = _common.scratch("difftrain-eval-bench-")
    weights = write_random_inception(work / "inception.safetensors")
    print(f"device: {_common.device_name(torch.device('cpu'))}; Inception weights random (same cost as the real ones)")

    images = to_pil(torch.rand(96, 3, 32, 32) * 2 - 1)
    rates = extraction_rates(weights, images, 32, [1, 4, 8, 32, 64])
    print("\nInception features, 32 px images (resized to 299 inside the network), against torch-fidelity's own "
          "layout at batch 32:")
    baseline = rates["contiguous, batch 32"]
    for name, rate in rates.items():
        print(f"  {name:26s} {rate:6.1f} images/s   x{rate / baseline:.2f}")

    from difftrain.evaluate.metrics import Statistics, frechet_distance, frechet_distance_of

    generated, reference = torch.randn(64, 2048), Statistics.of(torch.randn(2000, 2048))
    timed = {}
    routes = {"general 2048 x 2048 eigenproblem (baseline)":
              lambda: frechet_distance(Statistics.of(generated), reference),
              "n x n route (what evaluation runs)": lambda: frechet_distance_of(generated, reference)}
    for name, fid in routes.items():
        started = time.perf_counter()
        value = fid()
        timed[name] = (time.perf_counter() - started, value)
    base = next(iter(timed.values()))[0]
    print("\nFID of 64 images against 2,000 (2048-d features):")
    for name, (seconds, value) in timed.items():
        print(f"  {name:45s} {seconds:6.3f} s  x{base / seconds:6.1f}   FID {value:.6f}")

    defaults = EvalConfig()
    evaluation = {"every_steps": args.every, "inception_weights": str(weights), "cache_dir": str(work / "cache"),
                  "num_images": args.num_images or defaults.num_images,
                  "reference_max": args.reference_max or defaults.reference_max}
    data = write_shapes_dataset(work / "shapes", num_images=2400, size=32, seed=0)
    plain = train_demo(data, work / "plain", args.steps, None)
    cold = train_demo(data, work / "cold", args.steps, evaluation)
    warm = train_demo(data, work / "warm", args.steps, evaluation)
    history = [json.loads(line) for line in (work / "warm" / "metrics.jsonl").read_text().splitlines()]
    per_eval = [h["seconds"] for h in history if h.get("eval")]
    print(f"\nDemo config, {args.steps} steps, eval every {args.every} ({evaluation['num_images']} images, "
          f"metrics {', '.join(defaults.metrics)}, {defaults.scheduler} {defaults.steps} steps, "
          f"reference {evaluation['reference_max']} images):")
    print(f"  no evaluation            {plain:7.1f} s")
    print(f"  evaluation, cold cache   {cold:7.1f} s   share of the run {(cold - plain) / cold:6.1%} "
          f"(includes the reference's features, once)")
    print(f"  evaluation, warm cache   {warm:7.1f} s   share of the run {(warm - plain) / warm:6.1%}")
    print(f"  one evaluation           {sum(per_eval) / len(per_eval):7.1f} s (mean of {len(per_eval)})")

    step_seconds = plain / args.steps
    evals = len(range(args.demo_every, args.demo_steps + 1, args.demo_every)) + (args.demo_steps % args.demo_every != 0)
    train_seconds = step_seconds * args.demo_steps
    eval_seconds = evals * sum(per_eval) / len(per_eval)
    print(f"\nExtrapolated to the demo ({args.demo_steps} steps, eval every {args.demo_every}: {evals} evaluations): "
          f"{eval_seconds:.0f} s of evaluation on {train_seconds:.0f} s of training = "
          f"{eval_seconds / (train_seconds + eval_seconds):.1%} with a warm reference cache")


if __name__ == "__main__":
    main()
