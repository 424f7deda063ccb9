import bisect
import tracemalloc

import numpy as np
import pytest

from difftrain.data.sampler import EpochBatchSampler, Position


def take(sampler, n):
    iterator = iter(sampler)
    return [next(iterator) for _ in range(n)]


def test_ranks_see_disjoint_shards_that_cover_the_epoch():
    ranks = [EpochBatchSampler(10, batch_size=2, seed=3, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].batches_per_epoch == 3  # 10 records, 4 per step across ranks -> padded to 12
    seen = [[i for batch in take(s, 3) for (_, _, i) in batch] for s in ranks]
    assert set(seen[0]) | set(seen[1]) == set(range(10))
    assert len(seen[0]) == len(seen[1]) == 6


def test_epochs_are_different_permutations_and_reproducible():
    a = EpochBatchSampler(20, 4, seed=1)
    assert a.epoch_indices(0) != a.epoch_indices(1)
    assert a.epoch_indices(0) == EpochBatchSampler(20, 4, seed=1).epoch_indices(0)
    assert a.epoch_indices(0) != EpochBatchSampler(20, 4, seed=2).epoch_indices(0)


def test_starting_at_a_position_continues_the_same_sequence():
    straight = take(EpochBatchSampler(9, 2, seed=0), 12)
    resumed = EpochBatchSampler(9, 2, seed=0)
    epoch, batch, _ = straight[6][0]
    resumed.start = resumed.position_after(*straight[5][0][:2])
    assert resumed.start == Position(epoch, batch)
    assert take(resumed, 6) == straight[6:]


# --------------------------------------------------------------- sharded sources
SHARDS = [7, 0, 5, 9, 3, 6]  # 30 records; an empty shard, as a dead tar part would leave


def shard_of(index, sizes=SHARDS):
    return bisect.bisect_right(np.cumsum(sizes).tolist(), index)


def test_sharded_epoch_covers_every_record_once_plus_wrapped_padding():
    sampler = EpochBatchSampler(30, batch_size=4, seed=5, shard_sizes=SHARDS)
    assert sampler.batches_per_epoch == 8  # 30 records -> 32 slots, the last 2 wrap
    order = sampler.epoch_indices(0)
    assert sorted(order[:30]) == list(range(30))
    assert order[30:] == order[:2]


def test_sharded_order_is_shard_blocked():
    order = EpochBatchSampler(30, batch_size=5, seed=5, shard_sizes=SHARDS).epoch_indices(3)
    shards = [shard_of(i) for i in order]
    runs = [s for k, s in enumerate(shards) if k == 0 or s != shards[k - 1]]
    assert sorted(runs) == [0, 2, 3, 4, 5]  # each non-empty shard in exactly one run
    assert runs != [0, 2, 3, 4, 5]  # and the shards themselves were shuffled
    within = [i for i in order if shard_of(i) == 3]
    assert sorted(within) == list(range(12, 21)) and within != sorted(within)


def test_sharded_epochs_are_reproducible_and_differ():
    a = EpochBatchSampler(30, 4, seed=1, shard_sizes=SHARDS)
    assert a.epoch_indices(0) == EpochBatchSampler(30, 4, seed=1, shard_sizes=SHARDS).epoch_indices(0)
    assert a.epoch_indices(0) != a.epoch_indices(1)
    assert a.epoch_indices(0) != EpochBatchSampler(30, 4, seed=2, shard_sizes=SHARDS).epoch_indices(0)


def test_sharded_ranks_are_disjoint_and_interleave_one_order():
    single = EpochBatchSampler(30, batch_size=3, seed=4, shard_sizes=SHARDS).epoch_indices(2)
    ranks = [EpochBatchSampler(30, 3, seed=4, rank=r, world_size=2, shard_sizes=SHARDS) for r in range(2)]
    assert ranks[0].batches_per_epoch == 5  # 30 records, 6 a step -> no padding
    seen = [r.epoch_indices(2) for r in ranks]
    assert set(seen[0]).isdisjoint(seen[1]) and set(seen[0]) | set(seen[1]) == set(range(30))
    assert seen[0] == single[0::2] and seen[1] == single[1::2]  # the default's rank rule


def test_sharded_resume_continues_the_same_sequence():
    straight = take(EpochBatchSampler(30, 4, seed=0, rank=1, world_size=3, shard_sizes=SHARDS), 9)
    resumed = EpochBatchSampler(30, 4, seed=0, rank=1, world_size=3, shard_sizes=SHARDS)
    resumed.start = resumed.position_after(*straight[5][0][:2])
    assert resumed.start == Position(2, 0)  # 3 batches an epoch: resume in a new one
    assert take(resumed, 3) == straight[6:]
    resumed.start = Position(1, 1)  # and in the middle of one
    assert take(resumed, 5) == straight[4:]


def test_sharded_sampler_memory_is_flat_in_the_data_set_size():
    sizes = [10_000] * 5_000  # 50 million records: an O(N) int64 epoch order is 400 MB
    take(EpochBatchSampler(30, 4, seed=0, shard_sizes=SHARDS), 1)  # lazy imports happen outside the count
    tracemalloc.start()
    try:
        sampler = EpochBatchSampler(50_000_000, batch_size=64, seed=0, rank=3, world_size=8, shard_sizes=sizes)
        first = take(sampler, 3)
        sampler.start = Position(7, sampler.batches_per_epoch // 2)
        middle = take(sampler, 3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000  # a few arrays of 5,000 shards and one shard's permutation
    assert [len(b) for b in first + middle] == [64] * 6
    assert middle[0][0][:2] == (7, 48_828)
    # Rank 3's batch reads global positions 3, 11, 19, ...: within one shard of 10,000.
    assert len({shard_of(i, sizes) for (_, _, i) in first[0]}) == 1


class Records:
    """Ten records, each its own index (the sampler hands out (epoch, batch, index) keys)."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, key) -> int:
        return key[2]


def test_starting_the_loader_draws_nothing_from_the_global_rng():
    """A resume starts a new loader after restoring the RNG; a draw there (DataLoader's worker base seed) would
    shift every later use of the global generator, dropout on a CPU among them, against a run that never stopped."""
    import torch

    from difftrain.data.dataset import make_loader

    for workers in (0, 2):
        before = torch.get_rng_state()
        batches = iter(make_loader(Records(), EpochBatchSampler(10, 2, seed=0), workers, collate_fn=list))
        assert next(batches) and torch.equal(torch.get_rng_state(), before), workers
        del batches


def test_a_record_repeated_in_its_batch_draws_its_own_view_each_time(tmp_path):
    import json

    import numpy as np
    import torch
    from PIL import Image

    from difftrain.data.buckets import BucketBatchSampler
    from difftrain.data.dataset import ImageDataset
    from difftrain.data.sampler import batch_keys
    from difftrain.data.sources import open_source

    assert batch_keys(2, 5, [7, 7, 3, 7]) == [(2, 5, 7), (2, 5, 7, 1), (2, 5, 3), (2, 5, 7, 2)]
    # One wide image alone in its bucket fills a batch of 4 by itself: four different views, not one four times.
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 40, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    for name in ("a.png", "b.png", "c.png", "d.png"):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": name, "text": "x", "captions": ["one", "two", "three", "four"]}) + "\n"
        for name in ("wide.png", "a.png", "b.png", "c.png", "d.png")))
    source = open_source("folder", tmp_path, progress=False)
    wide = [record.key for record in map(source.read, range(len(source)))].index("wide.png")
    ids = np.array([int(i != wide) for i in range(len(source))])
    sampler = BucketBatchSampler(ids, 4, seed=0, buckets=[(32, 16), (16, 16)])
    data = ImageDataset(source, 16, "random", True, seed=0, max_pixels=10**8, buckets=sampler.target_size)
    [alone] = [keys for keys, _ in zip(sampler, range(sampler.batches_per_epoch)) if keys[0][2] == wide]
    items = [data[key] for key in alone]
    views = {(item["caption"], item["pixel_values"].numpy().tobytes()) for item in items}
    assert len(alone) == 4 and len(views) == 4, [key for key in alone]
    assert all(torch.equal(data[key]["pixel_values"], item["pixel_values"]) for key, item in zip(alone, items))


def test_tagged_captions_are_shuffled_and_thinned_as_kohya_does_with_the_trigger_kept_first(tmp_path):
    import json
    import random

    from PIL import Image

    from difftrain.config import ConfigError, parse_config
    from difftrain.data.captions import CaptionTags
    from difftrain.data.dataset import ImageDataset
    from difftrain.data.sources import open_source

    tags = CaptionTags(shuffle=True, keep=1, dropout=0.25)
    caption = "sks, 1girl, red hair, smile, outdoors, sky, tree, hat"
    drawn = [tags(caption, random.Random(i)) for i in range(400)]
    assert all(text.split(", ")[0] == "sks" for text in drawn)  # the trigger stays first
    assert len({text for text in drawn}) > 100  # orders and subsets vary
    kept = sum(len(text.split(", ")) - 1 for text in drawn) / (400 * 7)
    assert 0.70 < kept < 0.80  # each later tag survives with probability 0.75
    assert tags(caption, random.Random(3)) == tags(caption, random.Random(3))  # from the item's seeded generator
    assert CaptionTags(keep=2)(" a ,b,, c ", random.Random(0)) == "a, b, c"  # inactive: tidied, same order
    sentence = "a photo of sks dog"  # no tags: never shuffled nor dropped whole
    assert {CaptionTags(True, 0, 0.9)(sentence, random.Random(i)) for i in range(50)} == {sentence}

    Image.new("RGB", (16, 16), "red").save(tmp_path / "0.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": caption}) + "\n")
    data = ImageDataset(open_source("folder", tmp_path, progress=False), 16, "center", False, seed=0,
                        max_pixels=10**8, caption_tags=tags)
    epochs = [data[(epoch, 0, 0)]["caption"] for epoch in range(6)]
    assert len(set(epochs)) > 1 and epochs == [data[(epoch, 0, 0)]["caption"] for epoch in range(6)]  # resumable
    base = {"method": "text2image", "data": {"path": "x", "cache": {"text": True}}, "model": {"base": "b"}}
    with pytest.raises(ConfigError, match="shuffle_caption / caption_tag_dropout_rate with data.cache.text"):
        parse_config({**base, "text2image": {"shuffle_caption": True}})


@pytest.mark.parametrize("kind", ["plain", "shards", "buckets"])
@pytest.mark.parametrize("written_by, world", [(2, 1), (1, 3), (4, 2), (2, 3)])
def test_a_position_moves_to_another_number_of_processes_skipping_nothing(kind, written_by, world):
    """Every record the old processes had yet to read in the epoch is read by the new ones, and no more than
    world - 1 batches' worth of what they had read is read again (beside the padding of the epoch's end)."""
    from difftrain.data.buckets import BucketBatchSampler

    records, size, seed = 96, 4, 5
    ids = np.random.default_rng(0).integers(0, 3, records)

    def sampler(rank, processes):
        if kind == "buckets":
            return BucketBatchSampler(ids, size, seed, rank, processes)
        return EpochBatchSampler(records, size, seed, rank=rank, world_size=processes,
                                 shard_sizes=[24] * 4 if kind == "shards" else None)

    def epoch_read(processes, position):
        """(records the processes read in epoch 1 before `position`, from it to the epoch's end)."""
        before, rest = [], []
        for rank in range(processes):
            ranked = sampler(rank, processes)
            keys = [key[:3] for batch in take(ranked, 2 * ranked.batches_per_epoch) for key in batch if key[0] == 1]
            before += [index for _, batch, index in keys if batch < position.batch]
            rest += [index for _, batch, index in keys if batch >= position.batch]
        return before, rest

    ranked = sampler(0, world)
    for batch in range(sampler(0, written_by).batches_per_epoch):
        moved = ranked.position_for_world(Position(1, batch), written_by)
        assert moved.epoch == 1
        old_before, old_rest = epoch_read(written_by, Position(1, batch))
        new_before, new_rest = epoch_read(world, moved)
        assert set(old_rest) - set(old_before) <= set(new_rest)
        assert len(set(new_rest) & set(old_before)) < world * size + ranked.batches_per_epoch * world * size - records


@pytest.mark.parametrize("records, batch, world", [(10, 2, 2), (97, 4, 3), (64, 8, 1)])
def test_the_epoch_order_is_the_one_checkpoints_were_written_with(records, batch, world):
    """The order as it was drawn before it was kept as an array (lists of Python ints), for resumed runs."""
    import math

    import torch

    for rank in range(world):
        sampler = EpochBatchSampler(records, batch, seed=7, rank=rank, world_size=world)
        for epoch in range(3):
            order = torch.randperm(records, generator=torch.Generator().manual_seed(7 * 1_000_003 + epoch)).tolist()
            total = sampler.batches_per_epoch * batch * world
            assert sampler.epoch_indices(epoch) == (order * math.ceil(total / records))[:total][rank::world]
