"""What `difftrain eval` holds in memory: its images by name (StoredImages, read back a batch at a time) against
the same images held as PIL images until the end (how eval held them before 2026-12-06).

    python benchmarks/eval_memory.py                    # 300 noise images at 512 px, Inception score only
    python benchmarks/eval_memory.py --images 600 --size 256

Each variant runs in a fresh process (peak RSS only grows), measuring the same folder with the same
random-weight Inception; the numbers must agree, and the peak RSS and wall time of each are printed with
their ratio. Noise PNGs are the worst case for the re-reading: they do not compress, so decoding is slowest.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _common  # noqa: E402,F401  (offline, like every benchmark)


def measure(folder: Path, weights: Path, held: bool) -> dict:
    """One variant in this process: Inception score of the folder, its wall time and this process's peak RSS."""
    from difftrain.evaluate import run
    from difftrain.evaluate.reference import ImageRecords
    from difftrain.evaluate.scores import Networks

    if held:  # each image kept from the one decode that reads the folder, as eval held them
        kept: dict[int, object] = {}
        walk = ImageRecords.images

        def images(self):
            for index, record, image in walk(self):
                kept[index] = image
                yield index, record, image

        ImageRecords.images, ImageRecords.image = images, lambda self, index: kept[index]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        result = run.evaluate(str(folder), run.EvalOptions(metrics=["is"], networks=Networks(inception=str(weights))),
                              out, progress=False)
    return {"is": result.metrics["is"], "seconds": time.perf_counter() - started,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--variant", choices=["stored", "held"], help=argparse.SUPPRESS)  # (the child's part)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(Path(args.folder), Path(args.weights), args.variant == "held")))
        return
    import numpy as np
    from PIL import Image

    from difftrain.evaluate.inception import write_random_inception

    with tempfile.TemporaryDirectory() as work:
        folder, weights = Path(work) / "images", write_random_inception(Path(work) / "inception.safetensors")
        folder.mkdir()
        rng = np.random.default_rng(0)
        for index in range(args.images):
            pixels = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{index:05d}.png")
        found = {}
        for variant in ("held", "stored"):
            child = subprocess.run([sys.executable, __file__, "--variant", variant, "--folder", str(folder),
                                    "--weights", str(weights)], capture_output=True, text=True, check=True)
            found[variant] = json.loads(child.stdout.strip().splitlines()[-1])
    held, stored = found["held"], found["stored"]
    assert held["is"] == stored["is"], (held, stored)
    image_mb = args.images * args.size * args.size * 3 / 2**20
    print(f"{args.images} noise images at {args.size} px ({image_mb:.0f} MB decoded), Inception score only:")
    for name, values in found.items():
        print(f"  {name:6s}  peak RSS {values['peak_mb']:7.0f} MB   {values['seconds']:6.1f} s")
    print(f"  stored / held: memory x{stored['peak_mb'] / held['peak_mb']:.2f}, "
          f"time x{stored['seconds'] / held['seconds']:.2f} (each PNG decoded once per metric network)")


if __name__ == "__main__":
    main()
