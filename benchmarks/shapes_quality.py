"""How well a shapes model draws: the share of clean shapes over several seeds, judged by `difftrain data judge-shapes`.

    .venv/bin/python benchmarks/shapes_quality.py runs/demo [other runs or model folders ...] [--seeds 4]

Each model draws 16 images per seed (Euler ancestral, 30 steps, EMA weights: what `make demo`
draws, seed 0 being its grid) and every image is judged alone. One grid is 16 coin flips;
64 images tell two training recipes apart far better, which is how the README's recipe
comparison was read (the demo's 2,100 steps: 78 % clean of 64, 14/16 on the seed-0 grid).
"""

from __future__ import annotations

import argparse

from difftrain.data.shapes_judge import judge_image
from difftrain.generate.unconditional import sample_grid


def clean_share(model: str, seeds: int) -> tuple[float, int]:
    """(share of clean images over all seeds, clean cells of the seed-0 grid)."""
    verdicts = []
    for seed in range(seeds):
        _, images = sample_grid(model, num_images=16, scheduler="euler_a", steps=30, seed=seed)
        verdicts.append([judge_image(image).clean for image in images])
    return sum(map(sum, verdicts)) / (16 * seeds), sum(verdicts[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="run folders or unconditional model folders")
    parser.add_argument("--seeds", type=int, default=4)
    args = parser.parse_args()
    for model in args.models:
        share, grid = clean_share(model, args.seeds)
        print(f"{model}: {share:.0%} clean of {16 * args.seeds}, seed-0 grid {grid}/16")


if __name__ == "__main__":
    main()
