"""How well a shapes model draws: the share of clean shapes over several seeds, judged by `difftrain data judge-shapes`.

    .venv/bin/python benchmarks/shapes_quality.py runs/demo [other runs or model folders ...] [--seeds 4] [--cfg G] [--no-ema]

Each model draws 16 images per seed (Euler ancestral, 30 steps, EMA weights: what `make demo`
draws, seed 0 being its grid; --scheduler and --steps change the sampler) and every image is judged alone; a class-conditional model draws
its classes in turn at its guidance (or --cfg), and the judge's colour and shape also say
whether each image is the class asked for. One grid is 16 coin flips; 128 images (--seeds 8)
tell two training recipes apart far better, and even then a training seed can move a run's
share by 30 points (README, "Samplers"): compare recipes over several training seeds.
"""

from __future__ import annotations

import argparse

from difftrain.data.shapes_judge import judge_image
from difftrain.generate.unconditional import sample_grid


def clean_share(model: str, seeds: int, guidance_scale: float | None = None, use_ema: bool = True,
                scheduler: str = "euler_a", steps: int = 30) -> tuple[float, int, float | None]:
    """(share of clean images over all seeds, clean cells of the seed-0 grid, and for a
    class-conditional model the share that are clean and of the class asked for, else None)."""
    verdicts, asked = [], []
    for seed in range(seeds):
        _, images = sample_grid(model, num_images=16, scheduler=scheduler, steps=steps, seed=seed,
                                guidance_scale=guidance_scale, use_ema=use_ema)
        judged = [judge_image(image) for image in images]
        verdicts.append([verdict.clean for verdict in judged])
        asked += [verdict.clean and f"a {verdict.colour} {verdict.shape}" == image.info["class"]
                  for verdict, image in zip(judged, images) if "class" in image.info]
    return sum(map(sum, verdicts)) / (16 * seeds), sum(verdicts[0]), (sum(asked) / len(asked) if asked else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="run folders or unconditional model folders")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--cfg", type=float, help="a class-conditional model's guidance (default: its training's)")
    parser.add_argument("--no-ema", action="store_true", help="a run's or checkpoint's raw weights, not the EMA ones")
    parser.add_argument("--scheduler", default="euler_a", help="the sampler (difftrain sample --scheduler names)")
    parser.add_argument("--steps", type=int, default=30, help="sampling steps")
    args = parser.parse_args()
    for model in args.models:
        share, grid, of_class = clean_share(model, args.seeds, args.cfg, use_ema=not args.no_ema,
                                            scheduler=args.scheduler, steps=args.steps)
        asked = "" if of_class is None else f", {of_class:.0%} clean and of the class asked for"
        print(f"{model}: {share:.0%} clean of {16 * args.seeds}, seed-0 grid {grid}/16{asked}")


if __name__ == "__main__":
    main()
