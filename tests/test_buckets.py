import bisect
from collections import Counter

import numpy as np
import pytest

import math

from difftrain.data.buckets import BucketBatchSampler, assign_buckets, make_buckets, no_upscale_buckets
from difftrain.data.sampler import Position


def take(sampler, n):
    iterator = iter(sampler)
    return [next(iterator) for _ in range(n)]


def test_buckets_at_512_follow_the_rule():
    buckets = make_buckets(512, step=64)
    assert buckets == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    for width, height in buckets:
        assert width % 64 == 0 and height % 64 == 0
        assert width * height <= 512 * 512
        assert 0.5 <= width / height <= 2
        assert width * (height + 64) > 512 * 512  # as tall as the area allows for this width
    # (704, 320) fits the area but is 2.2:1, over max_ratio; (704, 384) does not fit.
    assert (704, 320) not in buckets


def test_kohya_style_bounds_give_kohyas_buckets():
    # sd-scripts' make_bucket_resolutions((512, 512), 256, 1024, 64) lists the same sizes.
    assert make_buckets(512, 64, min_side=256, max_side=1024, max_ratio=4.0) == [
        (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
        (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
    ]  # fmt: skip


def kohya_no_upscale(width: int, height: int, resolution: int, step: int) -> tuple[int, int]:
    """sd-scripts' BucketManager.select_bucket with no_upscale, one image at a time, as it reads."""
    def round_to_steps(x):
        x = int(x + 0.5)
        return x - x % step

    aspect, max_area = width / height, resolution * resolution
    if width * height > max_area:
        resized_width = math.sqrt(max_area * aspect)
        resized_height = max_area / resized_width
        b_width_rounded = round_to_steps(resized_width)
        b_height_in_wr = round_to_steps(b_width_rounded / aspect)
        ar_width_rounded = b_width_rounded / b_height_in_wr
        b_height_rounded = round_to_steps(resized_height)
        b_width_in_hr = round_to_steps(b_height_rounded * aspect)
        ar_height_rounded = b_width_in_hr / b_height_rounded
        if abs(ar_width_rounded - aspect) < abs(ar_height_rounded - aspect):
            resized = (b_width_rounded, int(b_width_rounded / aspect + 0.5))
        else:
            resized = (int(b_height_rounded * aspect + 0.5), b_height_rounded)
    else:
        resized = (width, height)
    return resized[0] - resized[0] % step, resized[1] - resized[1] % step


def test_no_upscale_buckets_are_kohyas_and_never_enlarge():
    rng = np.random.default_rng(0)
    sizes = np.concatenate([rng.integers(64, 3000, (500, 2)), [[300, 200], [1920, 1080], [1000, 1000], [512, 512]]])
    ids, buckets = no_upscale_buckets(sizes, 512, 64)
    assert len(buckets) == len(set(buckets)) and len(ids) == len(sizes)
    for (width, height), bucket in zip(sizes.tolist(), ids):
        assert buckets[bucket] == kohya_no_upscale(width, height, 512, 64), (width, height)
        bucket_width, bucket_height = buckets[bucket]
        assert bucket_width <= width and bucket_height <= height and bucket_width * bucket_height <= 512 * 512
    assert [buckets[i] for i in ids[-4:]] == [(256, 192), (640, 384), (512, 512), (512, 512)]
    # ... at finer steps and other resolutions too, where kohya's rounding may pass the budget by a fraction of a
    # step (a cap meant for raised sides made some buckets a step narrower than kohya's)
    for resolution, step in ((512, 8), (512, 16), (1024, 8), (768, 32)):
        ids, buckets = no_upscale_buckets(sizes, resolution, step)
        for (width, height), bucket in zip(sizes.tolist(), ids):
            assert buckets[bucket] == kohya_no_upscale(width, height, resolution, step), (width, height, step)
    # A side shorter than a step is the one enlargement (sd-scripts makes a 0-pixel bucket).
    assert no_upscale_buckets(np.array([[40, 100]]), 512, 64)[1] == [(64, 64)]
    # ... and where it would take a long, thin image's bucket past the pixel budget, the long side is cut to fit.
    assert no_upscale_buckets(np.array([[20000, 50], [50, 20000]]), 512, 64)[1] == [(64, 4096), (4096, 64)]


def test_bad_bucket_settings_are_refused():
    with pytest.raises(ValueError, match="multiple of step"):
        make_buckets(500, step=64)
    with pytest.raises(ValueError, match="max_ratio"):
        make_buckets(512, max_ratio=0.5)


def test_images_go_to_the_bucket_of_their_shape():
    buckets = make_buckets(512)
    sizes = np.array([(1024, 512), (600, 1200), (800, 800), (1000, 600), (900, 1000), (3000, 100)])
    assert [buckets[i] for i in assign_buckets(sizes, buckets)] == [
        (640, 384),  # 2:1 -> the widest there is
        (384, 640),  # 1:2 -> the tallest
        (512, 512),
        (640, 384),  # exactly 5:3
        (512, 512),  # 0.9: log distance 0.105 to square, 0.146 to 448x576
        (640, 384),  # 30:1 still goes to the nearest shape
    ]


def test_assignment_matches_the_rule_checked_bucket_by_bucket():
    buckets = make_buckets(512, 64, min_side=256, max_side=1024, max_ratio=4.0)
    sizes = np.random.default_rng(1).integers(1, 3000, size=(2000, 2))
    distance = np.abs(np.log(sizes[:, :1] / sizes[:, 1:]) - np.log([[w / h for w, h in buckets]]))
    assert assign_buckets(sizes, buckets).tolist() == distance.argmin(axis=1).tolist()


def test_ties_in_log_ratio_go_to_the_squarer_bucket():
    buckets = [(64, 256), (256, 256), (256, 64)]  # ratios 1/4, 1, 4
    # 1:2 is exactly halfway (in log) between 1:4 and 1:1, 2:1 between 1:1 and 4:1.
    assert assign_buckets(np.array([(100, 200), (200, 100), (100, 400)]), buckets).tolist() == [1, 1, 0]
    # No square bucket: a square image is as far from 1:2 as from 2:1, and the first listed wins.
    assert assign_buckets(np.array([(50, 50)]), [(128, 64), (64, 128)]).tolist() == [0]


def test_images_without_a_size_are_counted_in_the_error():
    with pytest.raises(ValueError, match="2 of 4 images"):
        assign_buckets(np.array([(10, 10), (0, 0), (5, 0), (3, 4)]), make_buckets(512))


def bucketed(counts):
    """Bucket ids for records 0..N-1, bucket k holding counts[k] of them, interleaved."""
    ids = np.concatenate([np.full(c, k) for k, c in enumerate(counts)])
    return np.random.default_rng(0).permutation(ids)


def test_every_batch_is_one_bucket_and_every_record_is_read():
    ids = bucketed([7, 1, 0, 12, 5])  # no bucket a multiple of 4; one has a single record
    sampler = BucketBatchSampler(ids, batch_size=4, seed=3)
    assert sampler.batches_per_epoch == 2 + 1 + 3 + 2
    for epoch in range(3):
        batches = sampler.epoch_batches(epoch)
        assert batches.shape == (8, 4)
        for batch in batches:
            assert len(set(ids[batch].tolist())) == 1
        counts = Counter(batches.ravel().tolist())
        assert set(counts) == set(range(len(ids)))
        # Only a bucket's last batch wraps: bucket 1's lone record fills all 4 slots.
        assert counts[int(np.flatnonzero(ids == 1)[0])] == 4
        assert sum(counts.values()) - len(ids) == 1 + 3 + 0 + 3


def test_bucket_epochs_are_reproducible_and_differ():
    ids = bucketed([9, 14, 6])
    a = BucketBatchSampler(ids, 3, seed=1)
    assert np.array_equal(a.epoch_batches(0), BucketBatchSampler(ids, 3, seed=1).epoch_batches(0))
    assert not np.array_equal(a.epoch_batches(0), a.epoch_batches(1))
    assert not np.array_equal(a.epoch_batches(0), BucketBatchSampler(ids, 3, seed=2).epoch_batches(0))


def test_bucket_ranks_are_disjoint_and_pad_by_wrapping():
    ids = bucketed([8, 4, 12])  # 6 full batches of 4: nothing wraps for 2 or 3 ranks
    for world in (2, 3):
        ranks = [BucketBatchSampler(ids, 4, seed=7, rank=r, world_size=world) for r in range(world)]
        seen = [set(r.epoch_batches(5).ravel().tolist()) for r in ranks]
        assert sum(len(s) for s in seen) == 24 and set().union(*seen) == set(range(24))
    ranks = [BucketBatchSampler(ids, 4, seed=7, rank=r, world_size=4) for r in range(4)]
    assert ranks[0].batches_per_epoch == 2  # 6 batches -> 8: ranks 2 and 3 repeat batches 0 and 1
    per_rank = [r.epoch_batches(5) for r in ranks]
    assert np.array_equal(per_rank[2][1], per_rank[0][0]) and np.array_equal(per_rank[3][1], per_rank[1][0])


def test_bucket_resume_continues_the_same_sequence():
    ids = bucketed([7, 1, 12, 5])
    straight = take(BucketBatchSampler(ids, 4, seed=0, rank=1, world_size=2), 12)
    resumed = BucketBatchSampler(ids, 4, seed=0, rank=1, world_size=2)
    assert resumed.batches_per_epoch == 4
    resumed.start = resumed.position_after(*straight[6][0][:2])
    assert resumed.start == Position(1, 3)
    assert take(resumed, 5) == straight[7:]
    assert all(type(key[2]) is int for batch in straight for key in batch)  # plain ints, as keys


def test_sharded_bucket_order_keeps_a_buckets_batches_within_few_shards():
    shard_sizes = [10, 10, 10, 10]
    ids = np.tile([0, 1], 20)  # two buckets, alternating through every shard
    sampler = BucketBatchSampler(ids, batch_size=5, seed=2, shard_sizes=shard_sizes)
    ends = np.cumsum(shard_sizes).tolist()
    for batch in sampler.epoch_batches(1):
        assert len(set(ids[batch].tolist())) == 1
        # Each shard holds 5 of each bucket, so a batch of 5 is one shard's share.
        assert len({bisect.bisect_right(ends, i) for i in batch.tolist()}) == 1
    assert sorted(sampler.epoch_batches(1).ravel().tolist()) == list(range(40))


def test_target_size_is_the_records_bucket():
    buckets = make_buckets(512)
    sizes = np.array([(1024, 512), (800, 800), (600, 1200)])
    sampler = BucketBatchSampler(assign_buckets(sizes, buckets), 2, seed=0, buckets=buckets)
    assert [sampler.target_size(i) for i in range(3)] == [(640, 384), (512, 512), (384, 640)]
    with pytest.raises(ValueError, match="buckets="):
        BucketBatchSampler(np.array([0, 1]), 2, seed=0).target_size(0)


def test_a_record_read_in_place_of_a_broken_one_takes_the_broken_ones_bucket(tmp_path):
    """Indexed from the header, an image can break later (truncated in a shard, replaced on disk). The next
    readable record stands in, and must come out at the size of the batch it is in: in another aspect's
    bucket its own size would not stack with the rest ("stack expects each tensor to be equal size")."""
    import torch
    from PIL import Image

    from difftrain.data.dataset import ImageDataset
    from difftrain.data.sources import open_source

    root = tmp_path / "data"
    root.mkdir()
    for name, size in (("0-wide.png", (48, 32)), ("1-tall.png", (32, 48)), ("2-wide.png", (48, 32))):
        Image.new("RGB", size, (200, 30, 30)).save(root / name)
    source = open_source("folder", root, progress=False)
    buckets = {0: (24, 16), 1: (16, 24), 2: (24, 16)}  # (width, height) by record
    data = ImageDataset(source, 16, "center", False, 0, 64_000_000, buckets=buckets.__getitem__)
    (root / "0-wide.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # broken after indexing
    stand_in, same_bucket = data[(0, 0, 0)], data[(0, 0, 2)]
    assert len(stand_in["skipped"]) == 1 and stand_in["pixel_values"].shape == same_bucket["pixel_values"].shape
    torch.stack([stand_in["pixel_values"], same_bucket["pixel_values"]])  # the batch they make
