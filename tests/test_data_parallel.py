"""Data parallel is plain big-batch training: N processes x batch B against 1 process x batch N*B.

What holds (README, "More than one process"): at every step the N ranks together read the
records one process with batch N*B reads at that step, and the gradient DDP averages is
that batch's mean gradient. What differs by design: each process draws its own noise and
timesteps, so the weights of the two layouts are not the same numbers; with noise keyed
by record instead (tests/data_parallel_probe.py) they agree to float rounding.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from data_parallel_probe import train_with_record_noise
from launches import accelerate_launch, finish
from difftrain.data.buckets import BucketBatchSampler
from difftrain.data.sampler import EpochBatchSampler

PROBE = Path(__file__).with_name("data_parallel_probe.py")


def _global_batches(make, world: int, steps: int) -> list[list[int]]:
    """Per step, the records all `world` ranks read together, sorted (the order inside does not matter)."""
    readers = [iter(make(rank, world)) for rank in range(world)]
    return [sorted(i for reader in readers for _, _, i in next(reader)) for _ in range(steps)]


@pytest.mark.parametrize("num_records", [24, 23])  # 23: the epoch is padded by wrapping
@pytest.mark.parametrize("shards", [None, [5, 0, 9, 10]])
def test_n_ranks_of_batch_b_read_what_one_process_of_batch_nb_reads(num_records, shards):
    if shards is not None:
        shards = shards[:-1] + [num_records - sum(shards[:-1])]

    def sampler(batch: int):
        return lambda rank, world: EpochBatchSampler(num_records, batch, seed=3, rank=rank, world_size=world,
                                                     shard_sizes=shards)

    steps = 3 * 4  # four epochs
    assert _global_batches(sampler(4), 2, steps) == _global_batches(sampler(8), 1, steps)
    assert _global_batches(sampler(2), 4, steps) == _global_batches(sampler(8), 1, steps)


def test_bucketed_ranks_read_what_one_process_reads_with_gradient_accumulation():
    """A bucket batch is one shape, so 2 x B is not one 2B batch; it is 2 accumulated B batches."""
    buckets = np.random.default_rng(0).integers(0, 3, size=40)
    make = lambda rank, world: BucketBatchSampler(buckets, 4, seed=1, rank=rank, world_size=world)  # noqa: E731
    single = make(0, 1)
    steps = single.num_batches // 2  # the last step of an epoch differs when the epoch is padded
    reader = iter(single)
    accumulated = [sorted(i for _ in range(2) for _, _, i in next(reader)) for _ in range(steps)]
    assert _global_batches(make, 2, steps) == accumulated


def _launch_two(config: Path) -> subprocess.Popen:
    return accelerate_launch("--multi_gpu", "--num_processes", "2", "--main_process_port", "0", str(PROBE), str(config))


def _differences(a: Path, b: Path) -> dict[str, float]:
    """The largest absolute difference of every tensor of the two checkpoints, by file/key."""
    found = {}
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        left, right = load_file(str(a / name)), load_file(str(b / name))
        assert left.keys() == right.keys(), name
        found.update({f"{name}/{k}": (left[k].double() - right[k].double()).abs().max().item() for k in left})
    return found


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_of_batch_4_train_like_one_process_of_batch_8(make_config, tmp_path):
    """With noise fixed per record, the two layouts give the same loss curve and weights (AdamW, 4 steps)."""
    two = make_config("two", training={"batch_size": 4})
    launched = _launch_two(two)  # the single process below trains while this one imports
    train_with_record_noise(make_config("one", training={"batch_size": 8}))
    output, _ = finish(launched)
    assert launched.returncode == 0, output[-3000:]

    step = "checkpoints/step-00000004"
    differences = _differences(tmp_path / "one" / step, tmp_path / "two" / step)
    print("largest differences", sorted(differences.items(), key=lambda kv: -kv[1])[:4])
    # An attention key bias shifts every logit of a query alike, so softmax makes its gradient
    # zero; what is left is rounding, which Adam scales up to steps of lr * |g| / (|g| + eps).
    # Those biases are held to the size of such steps; every other tensor to float rounding.
    assert max(v for k, v in differences.items() if "to_k.bias" in k) < 1e-4
    assert max(v for k, v in differences.items() if "to_k.bias" not in k) < 1e-5
    assert _losses(tmp_path / "one") == pytest.approx(_losses(tmp_path / "two"), abs=1e-5)
    for run in ("one", "two"):  # both crossed into the second epoch at the same batch
        assert json.loads((tmp_path / run / step / "state.json").read_text())["position"] == {"epoch": 1, "batch": 1}
