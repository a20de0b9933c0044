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


def test_buckets_cover_the_buffer_and_start_small():
    numels = [100] * 10
    lay = Layout(numels, [list(range(10))])
    # 4-byte elements: first bucket about 400 B (one param), then about 1200 B (three)
    b = lay.buckets(4, bucket_bytes=1200, first_bucket_bytes=400)
    assert [len(x.members) for x in b] == [1, 3, 3, 3]
    assert b[0].start == 0 and b[-1].end == lay.numel
    assert all(x.end == y.start for x, y in zip(b, b[1:])), "no gaps between buckets"
    assert Layout([3], [[0]]).buckets(4, 1, 1)[0].members == (0,), "one oversized param is its own bucket"


def test_reordered_follows_the_ready_order_within_groups():
    lay = Layout([4, 4, 4, 4, 4], [[0, 1, 2], [3, 4]])
    new = lay.reordered([2, 4, 0, 3])  # param 1 never reported ready
    assert new.groups[0].members == (2, 0, 1), "ready order first, absent params after, in their old order"
    assert new.groups[1].members == (4, 3)
    assert new.numels == lay.numels


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
