"""data.shard_mixing: batches from shard sources draw from K shards at once, seeded and resumable."""

from __future__ import annotations

import bisect
import json
import pickle
import tracemalloc

import numpy as np
import pytest
from test_sampler import take
from test_sources import make_laion
from test_train_e2e import assert_same_checkpoint

from difftrain.cli import main
from difftrain.config import ConfigError, parse_config, resume_conflicts
from difftrain.data.buckets import BucketBatchSampler
from difftrain.data.sampler import EpochBatchSampler, Position, ShardBlockedOrder
from difftrain.data.shards import build_shards
from difftrain.data.sources import open_source

CLASS_SORTED = [64] * 8  # a class-sorted folder cut into shards: shard k holds class k alone
UNEVEN = [7, 0, 5, 9, 3, 6, 11, 2]  # 43 records; an empty shard, and a last group of fewer shards


def shard_of(index: int, sizes: list[int]) -> int:
    return bisect.bisect_right(np.cumsum(sizes).tolist(), index)


def mean_classes_per_batch(mixing: int, seed: int = 0) -> float:
    sampler = EpochBatchSampler(sum(CLASS_SORTED), 8, seed, shard_sizes=CLASS_SORTED, shard_mixing=mixing)
    batches = take(sampler, sampler.batches_per_epoch)
    return float(np.mean([len({shard_of(i, CLASS_SORTED) for _, _, i in batch}) for batch in batches]))


def test_mixing_puts_several_classes_in_a_batch_of_class_sorted_shards():
    assert mean_classes_per_batch(1) == 1.0  # shard-blocked: each batch is one class
    assert all(mean_classes_per_batch(4, seed) >= 3 for seed in range(3))  # about 4 * (1 - (3/4)^8) = 3.6


def test_one_shard_mixing_is_the_shard_blocked_order_of_before():
    # Written down from the sampler before shard_mixing existed: a run it checkpointed resumes the same.
    before = [10, 11, 9, 7, 8, 42, 41, 23, 21, 22, 34, 30, 40, 37, 36, 33, 35, 38, 39, 31, 32, 24, 27, 25, 29, 28,
              26, 6, 2, 1, 3, 0, 4, 5, 16, 13, 17, 20, 19, 18, 15, 14, 12, 10]
    assert EpochBatchSampler(43, 4, seed=2, shard_sizes=UNEVEN).epoch_indices(5) == before
    assert EpochBatchSampler(43, 4, seed=2, shard_sizes=UNEVEN, shard_mixing=1).epoch_indices(5) == before


@pytest.mark.parametrize("mixing", [2, 3, 8, 20])
def test_mixed_epoch_covers_every_record_once_and_reads_one_group_at_a_time(mixing):
    sampler = EpochBatchSampler(43, batch_size=43, seed=7, shard_sizes=UNEVEN, shard_mixing=mixing)
    for epoch in range(3):
        order = sampler.epoch_indices(epoch)
        assert sorted(order) == list(range(43))
        # Each group's stretch of the epoch reads at most `mixing` shards, and no shard in two stretches.
        starts = ShardBlockedOrder(np.array(UNEVEN), 7, epoch, mixing).group_start.tolist()
        stretches = [{shard_of(i, UNEVEN) for i in order[a:b]} for a, b in zip(starts, starts[1:])]
        assert max(map(len, stretches)) <= mixing and sum(map(len, stretches)) == 7  # the non-empty shards
    assert sampler.epoch_indices(0) != sampler.epoch_indices(1)
    other_seed = EpochBatchSampler(43, batch_size=43, seed=8, shard_sizes=UNEVEN, shard_mixing=mixing)
    assert sampler.epoch_indices(0) != other_seed.epoch_indices(0)


def test_a_group_holds_the_shards_of_consecutive_slots_interleaved():
    order = EpochBatchSampler(43, 43, seed=1, shard_sizes=UNEVEN, shard_mixing=3).epoch_indices(0)
    blocked = EpochBatchSampler(43, 43, seed=1, shard_sizes=UNEVEN).epoch_indices(0)
    shard_order = ShardBlockedOrder(np.array(UNEVEN), seed=1, epoch=0).shard_order.tolist()
    assert shard_order == [6, 1, 4, 0, 3, 2, 5, 7]  # the empty shard 1 inside the first group
    shards = [shard_of(i, UNEVEN) for i in blocked]
    assert [s for k, s in enumerate(shards) if k == 0 or s != shards[k - 1]] == [6, 4, 0, 3, 2, 5, 7]
    # Mixing cuts that same order 3 slots at a time, the empty shard taking its slot too.
    groups = [{6, 4}, {0, 3, 2}, {5, 7}]
    start = 0
    for group in groups:
        size = sum(UNEVEN[s] for s in group)
        assert {shard_of(i, UNEVEN) for i in order[start : start + size]} == group
        start += size
    assert order != blocked


def test_mixed_ranks_are_disjoint_and_resume_mid_epoch_exactly():
    def sampler(rank: int) -> EpochBatchSampler:
        return EpochBatchSampler(43, 3, seed=4, rank=rank, world_size=2, shard_sizes=UNEVEN, shard_mixing=3)

    single = EpochBatchSampler(43, 43, seed=4, shard_sizes=UNEVEN, shard_mixing=3).epoch_indices(1)
    seen = [sampler(r).epoch_indices(1) for r in range(2)]
    # 8 batches of 3 on each of 2 ranks: 48 slots, the last 5 wrap to the epoch's start.
    for rank in range(2):
        assert seen[rank] == [single[(k * 2 + rank) % 43] for k in range(24)]
    assert set(seen[0][:22]).isdisjoint(seen[1][:21]) and set(seen[0]) | set(seen[1]) == set(range(43))

    straight = take(sampler(1), 20)  # 8 batches an epoch: into the third epoch
    resumed = sampler(1)
    resumed.start = resumed.position_after(*straight[10][0][:2])
    assert resumed.start == Position(1, 3)
    assert take(resumed, 9) == straight[11:]


def test_mixed_sampler_memory_is_one_group():
    sizes = [10_000] * 5_000  # 50 million records
    take(EpochBatchSampler(43, 4, seed=0, shard_sizes=UNEVEN, shard_mixing=2), 1)  # lazy imports outside the count
    tracemalloc.start()
    try:
        sampler = EpochBatchSampler(50_000_000, 64, seed=0, rank=3, world_size=8, shard_sizes=sizes, shard_mixing=4)
        sampler.start = Position(2, sampler.batches_per_epoch // 2)
        batches = take(sampler, 3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3_000_000  # 5,000 shards' numbers and one group of 40,000 records, not 400 MB
    assert len({shard_of(i, sizes) for _, _, i in batches[0]}) > 1


def test_bucket_batches_mix_the_shards_too():
    buckets = np.arange(sum(CLASS_SORTED)) % 2  # two buckets, each spread over every shard
    for mixing, expected in ((1, 1.0), (4, 3.0)):
        sampler = BucketBatchSampler(buckets, 8, seed=1, shard_sizes=CLASS_SORTED, shard_mixing=mixing)
        batches = sampler.epoch_batches(0)
        assert sorted(batches.ravel().tolist()) == list(range(sum(CLASS_SORTED)))
        classes = np.mean([len({shard_of(int(i), CLASS_SORTED) for i in batch}) for batch in batches])
        assert classes >= expected and (mixing > 1 or classes == 1.0)


def test_bucket_batches_read_each_shard_about_once_an_epoch(tmp_path):
    source = open_source("laion", make_laion(tmp_path, parts=12, per_part=40), progress=False)
    # Three buckets of uneven size, scattered over the shards, the rarest about one batch a shard.
    buckets = np.random.default_rng(0).choice(3, size=len(source), p=[0.6, 0.3, 0.1])
    sampler = BucketBatchSampler(buckets, 4, seed=3, shard_sizes=source.shard_sizes)
    batches = sampler.epoch_batches(0)
    assert len(batches) == sum(-(-int(c) // 4) for c in np.bincount(buckets))  # ceil(records / 4) a bucket
    assert all(len(set(buckets[batch].tolist())) == 1 for batch in batches)
    assert set(batches.ravel().tolist()) == set(range(len(source)))  # a bucket's last batch repeats, none is lost

    def loads(order) -> int:
        source.shard_loads, source._loaded = 0, type(source._loaded)()
        for batch in order:
            [source.read(int(i)) for i in batch]
        return source.shard_loads

    source.shards_in_memory = 2  # what training holds with buckets: this group's shard and the last one's
    walked = loads(batches)
    # The same batches in a shuffled order, as before they were cut group by group: a shard at nearly every batch.
    shuffled = loads(batches[np.random.default_rng(1).permutation(len(batches))])
    assert (walked, shuffled) == (12, 120)  # each of the 12 shards once, against a load at nearly every batch


def test_sampler_rejects_a_bad_shard_mixing():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="shard_mixing must be a whole number of shards >= 1"):
            EpochBatchSampler(43, 4, seed=0, shard_sizes=UNEVEN, shard_mixing=bad)


# --------------------------------------------------------------- the source's shards in memory
def test_source_holds_k_shards_and_reads_each_once_an_epoch(tmp_path):
    source = open_source("laion", make_laion(tmp_path, parts=8, per_part=4), progress=False)
    source.shards_in_memory = 4
    sampler = EpochBatchSampler(32, 4, seed=0, shard_sizes=source.shard_sizes, shard_mixing=4)
    held, classes = [], []
    for batch in take(sampler, 2 * sampler.batches_per_epoch):
        captions = [source.read(i).captions[0] for _, _, i in batch]
        assert [c.split()[1] for c in captions] == [str(shard_of(i, source.shard_sizes)) for _, _, i in batch]
        classes.append(len({c.split()[1] for c in captions}))
        held.append(len(source._loaded))
        if batch[0][:2] == (0, sampler.batches_per_epoch - 1):
            loads_after_first_epoch = source.shard_loads
    assert max(held) == 4 and loads_after_first_epoch == 8
    assert source.shard_loads <= 16  # the next epoch's first group may find a shard still held
    assert np.mean(classes) > 2
    # One shard in memory, the same order rereads a shard at nearly every switch between them.
    single = open_source("laion", tmp_path / "filelist.txt", progress=False)
    for batch in take(sampler, sampler.batches_per_epoch):
        [single.read(i) for _, _, i in batch]
    assert single.shard_loads > 16


def test_pickled_source_keeps_its_shard_count_but_none_of_its_shards(tmp_path):
    source = open_source("laion", make_laion(tmp_path, parts=3, per_part=2), progress=False)
    source.shards_in_memory = 2
    for index in range(6):
        source.read(index)
    assert list(source._loaded) == [1, 2]  # the least recently used went first
    copy = pickle.loads(pickle.dumps(source))
    assert copy.shards_in_memory == 2 and not copy._loaded
    assert copy.read(5).captions == source.read(5).captions


# --------------------------------------------------------------- config and a whole run
def test_config_validates_shard_mixing(tmp_path):
    def data(**values) -> dict:
        return {"output_dir": str(tmp_path), "data": {"path": "x", **values}}

    assert parse_config(data()).data.shard_mixing == 1
    assert parse_config(data(source="laion", shard_mixing=4)).data.shard_mixing == 4
    assert parse_config(data(source="hf", streaming=True, shard_mixing=4)).data.shard_mixing == 4
    with pytest.raises(ConfigError, match="data.shard_mixing = 0: Input should be greater than or equal to 1"):
        parse_config(data(source="laion", shard_mixing=0))
    with pytest.raises(ConfigError, match="data.shard_mixing = 4 applies to shard sources .* not folder"):
        parse_config(data(shard_mixing=4))
    # It changes the order of the batches, so a resume must keep it.
    saved, changed = parse_config(data(source="laion")), parse_config(data(source="laion", shard_mixing=4))
    assert resume_conflicts(saved, changed) == ["data.shard_mixing: checkpoint has 1, this config has 4"]


def test_a_run_config_sets_the_sampler_and_the_shards_in_memory(tmp_path):
    from difftrain.training.run_data import build_sampler, open_images

    listing = make_laion(tmp_path / "data", parts=4, per_part=3)
    raw = {"output_dir": str(tmp_path / "run"), "data": {"source": "laion", "path": str(listing), "shard_mixing": 3}}
    config = parse_config(raw)
    dataset = open_images(config, progress=False)
    assert dataset.source.shards_in_memory == 3
    sampler = build_sampler(config, dataset, rank=0, world_size=1)
    assert isinstance(sampler, EpochBatchSampler) and sampler.shard_mixing == 3
    raw["data"]["buckets"] = {"enabled": True, "step": 8}
    dataset = open_images(parse_config(raw), progress=False)
    assert dataset.source.shards_in_memory == 6  # a group's shards, and the group's before it
    sampler = build_sampler(parse_config(raw), dataset, rank=0, world_size=1)
    assert isinstance(sampler, BucketBatchSampler) and sampler.shard_sizes.tolist() == [3, 3, 3, 3]


@pytest.mark.parametrize("buckets", [False, True], ids=["square", "buckets"])
def test_mixed_laion_run_resumes_exactly(make_config, tmp_path, shapes_dir, buckets):
    folder = open_source("folder", shapes_dir, progress=False)
    listing = build_shards(folder, tmp_path / "shards", "laion", records_per_shard=4, progress=False)
    data = {"source": "laion", "path": str(listing), "shard_mixing": 3, "buckets": {"enabled": buckets, "step": 8}}
    # 24 records in 6 shards, 6 batches an epoch: the resume is mid-epoch and the run crosses into the next.
    straight = make_config("straight", data=data, training={"max_steps": 9}, checkpoint={"every_steps": 3})
    assert main(["train", str(straight), "--no-progress"]) == 0
    halves = make_config("halves", data=data, training={"max_steps": 3}, checkpoint={"every_steps": 3})
    assert main(["train", str(halves), "--no-progress"]) == 0
    assert main(["train", str(halves), "--no-progress", "--set", "training.max_steps=9", "--resume", "latest"]) == 0
    step = "checkpoints/step-00000009"
    assert_same_checkpoint(tmp_path / "straight" / step, tmp_path / "halves" / step)


def test_a_checkpoint_of_another_order_rule_resumes_at_the_next_epoch(make_config, tmp_path, shapes_dir, capsys):
    folder = open_source("folder", shapes_dir, progress=False)
    listing = build_shards(folder, tmp_path / "shards", "laion", records_per_shard=4, progress=False)
    data = {"source": "laion", "path": str(listing), "buckets": {"enabled": True, "step": 8}}
    run = make_config("run", data=data, training={"max_steps": 3}, checkpoint={"every_steps": 3})
    assert main(["train", str(run), "--no-progress"]) == 0
    state_file = tmp_path / "run" / "checkpoints" / "step-00000003" / "state.json"
    state = json.loads(state_file.read_text())
    assert (state["order_rule"], state["position"]) == (2, {"epoch": 0, "batch": 3})
    del state["order_rule"]  # as a checkpoint from before the rule changed, mid-epoch
    state_file.write_text(json.dumps(state))
    assert main(["train", str(run), "--no-progress", "--set", "training.max_steps=4", "--resume", "latest"]) == 0
    assert "another rule than the one step-00000003 was trained with; training goes on from the start of epoch 1" in (
        capsys.readouterr().out)
    later = json.loads((tmp_path / "run" / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert later["position"] == {"epoch": 1, "batch": 1}
