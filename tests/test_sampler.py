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
