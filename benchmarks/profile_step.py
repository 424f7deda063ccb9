"""Where a training step's time goes, measured with torch's profiler, for the demo step and a text2image step.

    .venv/bin/python benchmarks/profile_step.py [--steps 20] [--batch 4] [--size 128] [--ops N] [--attention KERNEL]
        [--precision no|bf16] [--only demo|text2image] [--keep-host-memory auto|true|false]
        [--cache] [--compile model|blocks]

Each run builds the real Trainer from a config (the demo's, and text2image on Stable
Diffusion 1.5's shape at a quarter of its width, uncached unless `--cache`), then drives the same calls its
loop makes, one step at a time, inside `torch.profiler.profile` with a `record_function`
range per phase: data loading, the method's loss (split by forward hooks into VAE encode,
text encode and UNet forward), backward, optimizer, EMA, logging (the loss's `.item()`),
plus one checkpoint save. The table is each phase's share of the profiled wall time; the
first steps are warm-up and not profiled. `--ops N` also prints the N operators with the most
self time (what found the bf16 attention kernel that `training.attention: auto` replaces on a
CPU); `--attention` runs both steps with that `training.attention`; `--precision` is the text2image
step's `training.mixed_precision` (the demo's config says `auto`). Each table ends with the page
faults and system time a step costs the host: what `training.keep_host_memory` removes (compare a
run with `--keep-host-memory false`). `--cache` profiles the text2image step on cached latents and
text (the cache is filled before profiling), `--compile` with `training.compile: true` at that scope;
a compiled UNet's forward is not split off (a hook inside the compiled frame would change its
graph) and shows in "loss (rest)".
"""

from __future__ import annotations

import contextlib
import io
import resource
import time
from pathlib import Path

import torch
import yaml
from _common import COMPILE_SCOPES, compile_settings, device_name, step_arguments, workspace
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("data loading", "VAE encode", "text encode", "UNet forward", "loss (rest)", "backward", "optimizer",
          "EMA", "logging", "checkpoint")


def _ranged(module: torch.nn.Module, name: str) -> None:
    """Open a profiler range when `module` starts its forward and close it when it ends."""
    open_ranges = []
    module.register_forward_pre_hook(lambda *_: open_ranges.append(record_function(name).__enter__()))
    module.register_forward_hook(lambda *_: open_ranges.pop().__exit__(None, None, None))


def profile_trainer(raw: dict, steps: int, warmup: int = 3, ops: int = 0) -> dict[str, float]:
    """The phases' seconds over `steps` profiled steps of the Trainer `raw` configures."""
    from difftrain.config import parse_config
    from difftrain.data.dataset import make_loader
    from difftrain.training.optim import clip_gradients
    from difftrain.training.trainer import Trainer

    with contextlib.redirect_stdout(io.StringIO()):
        trainer = Trainer(parse_config(raw), progress=False)
    trainer._recover_run_dir()
    trainer._write_run_files()
    method, device = trainer.method, trainer.accelerator.device
    vae, text_encoder = getattr(method, "vae", None), getattr(method, "text_encoder", None)
    if vae is not None:
        _ranged(vae.encoder, "VAE encode")
    if text_encoder is not None:
        _ranged(text_encoder, "text encode")
    if not trainer.compiled:
        _ranged(trainer.modules["unet"], "UNet forward")
    batches = iter(make_loader(trainer.dataset, trainer.sampler, 0, method.collate))

    def step():
        with record_function("data loading"):
            batch = next(batches)
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        with record_function("loss (rest)"):
            loss = method.loss(trainer.wrapped, batch, trainer.noise_generator)
        with record_function("backward"):
            trainer.accelerator.backward(loss)
        with record_function("optimizer"):
            if trainer.config.training.max_grad_norm:
                clip_gradients(trainer.accelerator, trainer.parameters, trainer.config.training.max_grad_norm)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            trainer.lr_schedule.step()
        with record_function("EMA"):
            for name, ema in trainer.emas.items():
                ema.step(trainer.modules[name])
        with record_function("logging"):
            loss.detach().item()  # what the loop does every log.every_steps

    for _ in range(warmup):
        step()
    # What training.keep_host_memory removes: freed blocks faulted back in, page by page, every
    # step. Counted outside the profiler, whose own event buffers fault in pages as they grow.
    usage = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(warmup):
        step()
    after = resource.getrusage(resource.RUSAGE_SELF)
    host = {"page faults a step": (after.ru_minflt - usage.ru_minflt) / warmup,
            "system time a step": (after.ru_stime - usage.ru_stime) / warmup}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        for trainer.step in range(1, steps + 1):
            step()
        with record_function("checkpoint"):
            trainer.save_checkpoint()
        wall = time.perf_counter() - started
    if ops:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=ops))
    totals = {event.key: event.cpu_time_total / 1e6 for event in prof.key_averages() if event.key in PHASES}
    # Nested ranges: the loss's own range holds the encoders' and the UNet's; report its remainder.
    inside = sum(totals.get(name, 0.0) for name in ("VAE encode", "text encode", "UNet forward"))
    totals["loss (rest)"] = totals.get("loss (rest)", 0.0) - inside
    totals["(unattributed)"] = wall - sum(totals.values())
    return {"wall": wall, "steps": steps, "host": host, **totals}


def print_table(title: str, result: dict) -> None:
    wall = result["wall"]
    print(f"\n{title}: {result['steps']} steps + 1 checkpoint in {wall:.1f} s "
          f"({result['steps'] / wall:.2f} steps/s including the checkpoint)")
    for name in (*PHASES, "(unattributed)"):
        if name in result:
            print(f"  {name:16s} {result[name]:7.2f} s  {result[name] / wall:6.1%}")
    host = result["host"]
    print(f"  host memory: {host['page faults a step']:,.0f} page faults and "
          f"{host['system time a step'] * 1000:.0f} ms of system time a step")


def main() -> None:
    parser = step_arguments(__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=0, help="also print the N operators with the most self time")
    parser.add_argument("--attention", choices=("auto", "sdpa", "default"), default="auto",
                        help="training.attention of both steps")
    parser.add_argument("--precision", choices=("no", "bf16", "auto"), default="no",
                        help="training.mixed_precision of the text2image step")
    parser.add_argument("--only", choices=("demo", "text2image"), help="profile one of the two steps")
    parser.add_argument("--keep-host-memory", choices=("auto", "true", "false"), default="auto",
                        help="training.keep_host_memory of both steps (false: glibc's malloc defaults, whose page "
                             "faults the table's last line counts)")
    parser.add_argument("--cache", action="store_true", help="the text2image step on cached latents and text")
    parser.add_argument("--compile", choices=COMPILE_SCOPES, help="the text2image step compiled at this scope")
    args = parser.parse_args()
    space = workspace(args.size, args.batch)
    print(f"device: {device_name(space.device)}")
    if args.only != "text2image":
        profile_demo(space, args)
    if args.only != "demo":
        profile_text2image(space, args)


def profile_demo(space, args) -> None:
    from difftrain.data.shapes import write_shapes_dataset

    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    demo.update(output_dir=str(space.work / "demo"))
    demo["data"]["path"] = str(write_shapes_dataset(space.work / "shapes32", num_images=512, size=32))
    demo["log"]["tensorboard"] = False
    demo["training"].update(attention=args.attention, keep_host_memory=args.keep_host_memory)
    print_table(f"demo step (class-conditional, UNet preset {demo['model']['preset']}, 32 px, "
                f"batch {demo['training']['batch_size']})",
                profile_trainer(demo, args.steps, ops=args.ops))


def profile_text2image(space, args) -> None:
    text2image = {
        "output_dir": str(space.work / "t2i"), "method": "text2image",
        "data": {"path": str(space.data_dir), "resolution": args.size, "random_flip": False,
                 "cache": {"latents": args.cache, "text": args.cache}},
        "model": {"base": str(space.model_dir)},
        "training": {"max_steps": 10 * args.steps, "batch_size": args.batch, "learning_rate": 1e-4,
                     "attention": args.attention, "mixed_precision": args.precision,
                     "keep_host_memory": args.keep_host_memory, **compile_settings(args.compile)},
        "log": {"tensorboard": False},
    }
    compiled = f", compiled {args.compile}" if args.compile else ""
    print_table(f"text2image step (SD 1.5 at a quarter width, {args.size} px, batch {args.batch}, "
                f"{'cached' if args.cache else 'no cache'}, precision {args.precision}{compiled})",
                profile_trainer(text2image, args.steps, ops=args.ops))


if __name__ == "__main__":
    main()
