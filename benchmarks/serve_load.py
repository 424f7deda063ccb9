"""`difftrain serve` under load, on loopback only: many clients, mixed samplers, a full queue.

    .venv/bin/python benchmarks/serve_load.py [--clients 32] [--requests 8] [--steps 4] [--size 64]

Phase 1: `--clients` threads each send `--requests` txt2img requests (random seed, prompt and
sampler) to a server on a tiny random model. Every response must carry its own request's
seed, sampler and prompt in its infotext, and a sample of them must equal what `difftrain
generate` draws for the same settings. Prints p50/p95 latency, images/s and the process's
memory before and after. Phase 2: a server whose queue holds 4 gets 40 requests at once:
counts the 429s, then checks it still answers. Phase 3: the prompt cache, the same prompt
against fresh ones. Last, the start-up time to the first image, for the tiny model and for
one of SD 1.5's shape (quarter width, random weights).
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle", "a (red:1.3) square, blue"]
SAMPLERS = ["Euler a", "Euler", "DPM++ 2M", "DDIM", "UniPC", "Heun"]


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def post(url: str, body: dict) -> tuple[int, dict, float]:
    import requests

    started = time.perf_counter()
    response = requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=600)
    return response.status_code, response.json(), time.perf_counter() - started


def infotext(image_b64: str) -> str:
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(image_b64))).info["parameters"]


def main() -> None:
    from difftrain.generate.text2image import GenerateOptions, generate
    from difftrain.models.tiny_sd import write_tiny_sd
    from difftrain.serve.app import BackgroundServer, ServeSettings
    from difftrain.serve.requests import Limits

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    if args.size < 64 or args.size % 8:
        parser.error(f"--size {args.size}: the server draws multiples of 8 from 64 px")
    from _common import scratch

    work = scratch("difftrain-serve-")
    model = str(write_tiny_sd(work / "tiny"))

    # ----- phase 1: many clients
    running = BackgroundServer(ServeSettings(models=[model], limits=Limits(max_queue=args.clients * 2)))
    post(running.url, {"prompt": "warm up", "steps": 1, "width": args.size, "height": args.size})
    memory_before = rss_mib()
    rng = random.Random(0)
    bodies = [{"prompt": rng.choice(PROMPTS), "sampler_name": rng.choice(SAMPLERS), "seed": rng.randrange(10**6),
               "steps": args.steps, "width": args.size, "height": args.size, "cfg_scale": 6.0}
              for _ in range(args.clients * args.requests)]
    started = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        results = list(pool.map(lambda body: post(running.url, body), bodies))
    elapsed = time.perf_counter() - started
    memory_after = rss_mib()
    errors = [status for status, _, _ in results if status != 200]
    mixed = 0
    for body, (status, reply, _) in zip(bodies, results):
        text = infotext(reply["images"][0]) if status == 200 else ""
        if not (text.startswith(body["prompt"] + "\n") and f"Seed: {body['seed']}," in text
                and f"Sampler: {body['sampler_name']}," in text):
            mixed += 1
    same = 0
    for body, (_, reply, _) in list(zip(bodies, results))[:8]:
        [path] = generate(model, GenerateOptions(prompt=body["prompt"], steps=body["steps"],
                                                 scheduler=body["sampler_name"], guidance_scale=body["cfg_scale"],
                                                 seed=body["seed"], width=args.size, height=args.size),
                          work / "direct", progress=False)
        same += path.read_bytes() == base64.b64decode(reply["images"][0])
    latencies = sorted(latency for _, _, latency in results)
    print(f"phase 1: {len(bodies)} requests from {args.clients} clients, {args.steps} steps at {args.size} px, "
          f"mixed samplers: {len(errors)} errors, {mixed} mixed-up results, {same}/8 byte-identical to "
          f"`difftrain generate`")
    print(f"  latency p50 {statistics.median(latencies):.2f} s, p95 {latencies[int(0.95 * len(latencies))]:.2f} s; "
          f"{len(bodies) / elapsed:.1f} images/s; memory {memory_before:.0f} -> {memory_after:.0f} MiB")
    running.stop()

    # ----- phase 2: a full queue
    small = BackgroundServer(ServeSettings(models=[model], limits=Limits(max_queue=4)))
    burst = [{"prompt": "burst", "seed": i, "steps": args.steps, "width": args.size, "height": args.size}
             for i in range(40)]
    with ThreadPoolExecutor(40) as pool:
        statuses = [status for status, _, _ in pool.map(lambda body: post(small.url, body), burst)]
    after = post(small.url, {"prompt": "after", "steps": 2, "width": args.size, "height": args.size})[0]
    print(f"phase 2: 40 requests at once, queue of 4: {statuses.count(200)} served, {statuses.count(429)} got 429, "
          f"others {len(statuses) - statuses.count(200) - statuses.count(429)}; afterwards: HTTP {after}")

    # ----- phase 3: the prompt cache
    def timed(prompts):
        begin = time.perf_counter()
        for prompt in prompts:
            post(small.url, {"prompt": prompt, "seed": 1, "steps": 1, "width": args.size, "height": args.size})
        return (time.perf_counter() - begin) / len(prompts)

    repeated = timed(["a red circle, " * 20] * 20)
    fresh = timed([f"a red circle number {i}, " * 10 for i in range(20)])
    print(f"phase 3: 1-step requests, a repeated 60-word prompt {repeated * 1000:.0f} ms each, fresh prompts "
          f"{fresh * 1000:.0f} ms each (x{fresh / repeated:.2f})")
    small.stop()

    # ----- start-up to the first image
    from _common import sd_quarter

    quarter = str(sd_quarter(work / "quarter", 256))
    for name, spec, size in (("tiny", model, args.size), ("SD-1.5-shaped, quarter width", quarter, 256)):
        begin = time.perf_counter()
        server = BackgroundServer(ServeSettings(models=[spec]))
        status, _, _ = post(server.url, {"prompt": "first", "steps": 2, "width": size, "height": size})
        print(f"start-up to the first image ({name}, {size} px, 2 steps): {time.perf_counter() - begin:.1f} s "
              f"(HTTP {status})")
        server.stop()


if __name__ == "__main__":
    main()
