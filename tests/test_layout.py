"""The pure parts: buffer layout, buckets, the ready-order rebuild and the bucket tracker,
without a tensor or a process group."""
import pytest

from pyengine.ddp.buckets import BucketTracker
from pyengine.layout import ALIGN, Layout


def test_offsets_aligned_groups_contiguous_and_padding_counted():
    lay = Layout([5, 16, 1, 33], [[3, 0], [1, 2]])
    assert [s.offset % ALIGN for s in lay.slots] == [0, 0, 0, 0]
    assert lay.order == (3, 0, 1, 2)
    assert [(g.start, g.end) for g in lay.groups] == [(0, 64), (64, 96)]
    assert lay.slots[3].offset == 0 and lay.slots[0].offset == 48  # 33 -> 48
    assert lay.numel == 96
    with pytest.raises(ValueError, match="exactly one group"):
        Layout([1, 2], [[0], [0, 1]])


def test_buckets_cover_the_buffer_start_small_and_stay_within_groups():
    lay = Layout([100] * 10, [list(range(6)), list(range(6, 10))], bucket_elems=300, first_bucket_elems=100)
    # elements, not bytes: the first bucket about 100 (one param), then about 300 (three)
    assert [len(b.members) for b in lay.buckets] == [1, 3, 2, 3, 1]
    assert [b.group for b in lay.buckets] == [0, 0, 0, 1, 1], "a bucket never spans two groups"
    assert lay.buckets[0].start == 0 and lay.buckets[-1].end == lay.numel
    assert all(x.end == y.start for x, y in zip(lay.buckets, lay.buckets[1:])), "no gaps between buckets"
    assert Layout([3], [[0]], bucket_elems=1, first_bucket_elems=1).buckets[0].members == (0,), \
        "one oversized param is its own bucket"
    assert [b.members for b in Layout([4, 4], [[0], [1]]).buckets] == [(0,), (1,)], "no sizes: a bucket per group"


def test_shards_are_equal_aligned_slices_of_every_bucket():
    world = 4
    lay = Layout([5, 100, 7, 64, 1], [[0, 1, 2], [3, 4]], bucket_elems=120, first_bucket_elems=10,
                 shard_world=world)
    for b in lay.buckets:
        assert b.numel % (world * ALIGN) == 0, "each rank's slice of each bucket is ALIGN-aligned"
    assert lay.numel % world == 0 and lay.shard_numel == lay.numel // world
    covered = []
    for r in range(world):
        owned = lay.owned(r)
        assert [o.bucket for o in owned] == list(range(len(lay.buckets)))
        assert owned[0].local == 0 and all(a.local + a.numel == b.local for a, b in zip(owned, owned[1:]))
        assert sum(o.numel for o in owned) == lay.shard_numel
        covered += [(o.start, o.end) for o in owned]
    covered.sort()
    assert covered[0][0] == 0 and covered[-1][1] == lay.numel
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:])), "the ranks' slices tile the buffer"
    # segments skip padding and map back to (param, offset within it)
    pieces = [seg for o in lay.owned(0) + lay.owned(1) + lay.owned(2) + lay.owned(3)
              for seg in lay.segments(o.start, o.end)]
    per_param = {}
    for i, _, _, n in pieces:
        per_param[i] = per_param.get(i, 0) + n
    assert per_param == {0: 5, 1: 100, 2: 7, 3: 64, 4: 1}


def test_reordered_follows_the_ready_order_within_groups():
    lay = Layout([4, 4, 4, 4, 4], [[0, 1, 2], [3, 4]], bucket_elems=8, shard_world=2)
    new = lay.reordered([2, 4, 0, 3])  # param 1 never reported ready
    assert new.groups[0].members == (2, 0, 1), "ready order first, absent params after, in their old order"
    assert new.groups[1].members == (4, 3)
    assert new.numels == lay.numels and (new.bucket_elems, new.shard_world) == (8, 2)


def test_tracker_launches_in_index_order_only():
    t = BucketTracker([(0, 1), (2,), (3, 4)], record_order=True)
    t.arm()
    assert t.mark_ready(2) == [], "bucket 1 must wait for bucket 0"
    assert t.mark_ready(4) == []
    assert t.mark_ready(0) == []
    assert t.mark_ready(1) == [0, 1]
    assert t.missing() == [3]
    assert t.mark_missing_ready() == [2]
    assert t.all_launched
    with pytest.raises(ValueError):
        t.mark_ready(1)
    t.disarm()
    assert t.take_ready_order() == [2, 4, 0, 1, 3]
    assert t.take_ready_order() is None, "the order is recorded for the first iteration only"


def test_tracker_refuses_a_second_arm():
    t = BucketTracker([(0,)], record_order=False)
    t.arm()
    with pytest.raises(RuntimeError, match="twice"):
        t.arm()
    t.disarm()
    t.arm()
    assert t.take_ready_order() is None
