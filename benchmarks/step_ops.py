"""Operations dispatched in one text-to-image training step, difftrain's uncached step against the plain loop
the seeds write, phase by phase: a proxy, measurable on a CPU, for the kernel launches of a GPU step that
is bound by launching them (the lent H200's: README, sd15_training.py).

    .venv/bin/python benchmarks/step_ops.py [--size 64] [--batch 4]

Each aten operation the dispatcher runs is at least one kernel launch on a GPU. Counted with a
TorchDispatchMode on the SD-quarter model (fp32), one step after a first: the loss (VAE and text
encode, noise, UNet forward), the backward, the optimizer (the plain loop's AdamW as on CUDA, where
its default is the foreach implementation; difftrain's is fused), and difftrain's EMA update and
gradient clipping, which the plain loop does not do. Reads of a value back to the host are not
counted: on a CPU the foreach AdamW reads each parameter's step count, host work, not a launch.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io

import torch
from _common import workspace
from text2image_step import PlainLoop
from torch.utils._python_dispatch import TorchDispatchMode

PHASES = ("loss", "backward", "optimizer", "EMA", "clipping")


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.operations = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is not torch.ops.aten._local_scalar_dense:
            self.operations[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def difftrain_step(space, size: int, batch: int) -> dict[str, Count]:
    from difftrain.config import parse_config
    from difftrain.data.dataset import make_loader
    from difftrain.training.optim import clip_gradients
    from difftrain.training.trainer import Trainer

    raw = {"output_dir": str(space.work / "run"), "method": "text2image", "model": {"base": str(space.model_dir)},
           "data": {"path": str(space.data_dir), "resolution": size, "random_flip": False},
           "training": {"max_steps": 3, "batch_size": batch, "ema": {"decay": 0.999}, "max_grad_norm": 1.0},
           "log": {"tensorboard": False}}
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = Trainer(parse_config(raw), progress=False)
    batches = iter(make_loader(trainer.dataset, trainer.sampler, 0, trainer.method.collate))

    def step(counts: dict) -> None:
        batch_ = next(batches)
        with counts["loss"]:
            loss = trainer.method.loss(trainer.wrapped, batch_, trainer.noise_generator)
        with counts["backward"]:
            loss.backward()
        with counts["clipping"]:
            clip_gradients(trainer.accelerator, trainer.parameters, 1.0)
        with counts["optimizer"]:
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
        with counts["EMA"]:
            for name, ema in trainer.emas.items():
                ema.step(trainer.modules[name])

    step(collections.defaultdict(contextlib.nullcontext))
    counts = {phase: Count() for phase in PHASES}
    step(counts)
    return counts


def plain_step(space, size: int, batch: int) -> dict[str, Count]:
    """text2image_step.py's plain loop, one step after a first, AdamW as CUDA runs it (foreach)."""
    loop = PlainLoop.build(space.model_dir, torch.device("cpu"), foreach=True)
    pixels, captions = torch.rand(batch, 3, size, size) * 2 - 1, ["a red circle"] * batch
    loop.step(pixels, captions)
    counts = {phase: Count() for phase in PHASES}
    loop.step(pixels, captions, counts.__getitem__)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    space = workspace(args.size, args.batch)
    ours, theirs = difftrain_step(space, args.size, args.batch), plain_step(space, args.size, args.batch)
    print(f"SD quarter width, {args.size} px, batch {args.batch}, fp32: aten operations in one step")
    print(f"{'phase':10s} {'difftrain':>10s} {'plain loop':>10s} {'x plain':>8s}  the largest differences")
    total = {"difftrain": 0, "plain": 0}
    for phase in PHASES:
        mine, plain = ours[phase].operations, theirs[phase].operations
        total["difftrain"] += sum(mine.values())
        total["plain"] += sum(plain.values())
        differences = sorted(((name, mine[name] - plain[name]) for name in set(mine) | set(plain)
                              if mine[name] != plain[name]), key=lambda item: -abs(item[1]))[:4]
        ratio = f"{sum(mine.values()) / sum(plain.values()):8.3f}" if plain else f"{'-':>8s}"
        print(f"{phase:10s} {sum(mine.values()):10d} {sum(plain.values()):10d} {ratio}  "
              + ", ".join(f"{name.removeprefix('aten.')} {change:+d}" for name, change in differences))
    print(f"{'step':10s} {total['difftrain']:10d} {total['plain']:10d} {total['difftrain'] / total['plain']:8.3f}")


if __name__ == "__main__":
    main()
