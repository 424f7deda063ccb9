"""`difftrain data curate` on this machine: images/s per step, the cache's saving, and memory against input size.

    .venv/bin/python benchmarks/curate.py [--sizes 1000,20000] [--image-size 64] [--batch-size 64]

Tiny random-weight models (difftrain.curate.tiny: a CLIP, a BLIP, a LAION-layout aesthetic
predictor) stand in for the real ones, so the model steps' rates say how fast the pipeline
around a model is, not how fast ViT-L/14 or BLIP-large run (those are the model's cost, the
same here as in any script). Each run is a separate `difftrain data curate` process, so its
peak RSS is its own. For each input size: every step on (exact + phash + CLIP dedupe, size,
CLIP, aesthetic, captions for the 10% without one), then the same again at the first run's median
scores, which the cache answers without running a model (the ratio printed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHILD = ("import resource, sys\nfrom difftrain.cli import main\ncode = main(sys.argv[1:])\n"
         "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(code)")


def make_models(folder: Path, image_size: int) -> dict[str, Path]:
    import torch

    from difftrain.curate.tiny import laion_layout_predictor, tiny_blip, tiny_clip
    from difftrain.data.shapes import PROMPTS

    torch.manual_seed(0)
    clip, processor = tiny_clip(image_size)
    clip.save_pretrained(folder / "clip")
    processor.save_pretrained(folder / "clip")
    blip, processor = tiny_blip(sorted({w for p in PROMPTS for w in p.split()}), folder / "blip", image_size)
    blip.save_pretrained(folder / "blip")
    processor.save_pretrained(folder / "blip")
    torch.save({f"layers.{k}": v for k, v in laion_layout_predictor(32).state_dict().items()}, folder / "aesthetic.pth")
    return {"clip": folder / "clip", "blip": folder / "blip", "aesthetic": folder / "aesthetic.pth"}


def make_data(folder: Path, count: int, image_size: int) -> Path:
    """`count` shapes with captions, 10% without, 2% exact copies (the set a crawl gives, in miniature)."""
    import shutil

    from difftrain.data.shapes import write_shapes_dataset

    write_shapes_dataset(folder, num_images=count, size=image_size, seed=count)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    for row in rng.sample(rows, count // 50):
        shutil.copy(folder / row["file_name"], folder / f"copy-{row['file_name']}")
        rows.append({"file_name": f"copy-{row['file_name']}", "text": row["text"]})
    missing = set(rng.sample(range(len(rows)), len(rows) // 10))
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for i, r in enumerate(rows) if i not in missing))
    return folder


def curate(data: Path, out: Path, cache: Path, models: dict[str, Path], batch: int, clip_min: float,
           aesthetic_min: float) -> tuple[dict, float, int]:
    args = [str(data), str(out), "--cache-dir", str(cache), "--no-progress", "--force", "--batch-size", str(batch),
            "--dedupe", "exact,phash,clip", "--phash-distance", "2", "--clip-duplicate", "1.0",
            "--clip", str(models["clip"]), "--clip-min", str(clip_min),
            "--aesthetic", str(models["aesthetic"]), "--aesthetic-min", str(aesthetic_min),
            "--caption", str(models["blip"]), "--caption-max-tokens", "6"]
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", CHILD, "data", "curate", *args], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    peak = int(result.stdout.split("PEAK_RSS_KB")[1].split()[0])
    return json.loads((out.parent / f"{out.name}-report" / "report.json").read_text()), seconds, peak


def medians(scores: Path) -> tuple[float, float]:
    """The median CLIP cosine and aesthetic score of a run: thresholds that drop about half."""
    import statistics

    rows = [json.loads(line)["scores"] for line in scores.read_text().splitlines()]
    return tuple(statistics.median(r[k] for r in rows if k in r) for k in ("clip", "aesthetic"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,20000")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = make_models(root / "models", args.image_size)
        peaks = {}
        for count in (int(s) for s in args.sizes.split(",")):
            data = make_data(root / f"data-{count}", count, args.image_size)
            cache = root / f"cache-{count}"
            first, cold, peak = curate(data, root / f"out-{count}", cache, models, args.batch_size, -1.0, -1e9)
            clip_min, aesthetic_min = medians(root / f"out-{count}-report" / "scores.jsonl")
            again, warm, peak_again = curate(data, root / f"out-{count}", cache, models, args.batch_size, clip_min,
                                             aesthetic_min)
            peaks[count] = max(peak, peak_again)
            print(f"\n{count:,} images of {args.image_size} px ({first['counts']['records']:,} records with copies): "
                  f"{cold:.1f} s all steps, {first['counts']['kept']:,} kept; peak RSS {peaks[count] / 1024:.0f} MiB "
                  "(the larger of its two runs, the figure the ratio below compares)")
            for step, t in first["timings"].items():
                print(f"  {step:12s} {t['records']:7,} records  {t['per_second'] or 0:9,.0f} /s")
            print(f"  re-run with other thresholds: {warm:.1f} s (x{cold / warm:.1f} faster; model steps run: "
                  f"{[s for s in again['timings'] if s in ('clip image', 'clip text', 'caption')] or 'none'}), "
                  f"{again['counts']['kept']:,} kept")
        if len(peaks) > 1:
            low, high = min(peaks), max(peaks)
            print(f"\npeak RSS {high:,} images / {low:,} images: x{peaks[high] / peaks[low]:.2f} "
                  f"for x{high / low:.0f} the input")


if __name__ == "__main__":
    main()
