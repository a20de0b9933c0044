"""The CUDA launch shape's host decisions (pyengine/launch_shape.h), through _C: the grid is one
wave at most, and the head peel / per-array vector mask move the most bytes as vectors."""
import random

import pytest

from pyengine import _C

SMS, PER_SM, BLOCK, VEC = 132, 5, 256, 4  # an H200 at 48 registers/thread
WAVE = SMS * PER_SM
BASE = 1 << 20  # 16-byte aligned, like an allocation


def grid(work):
    return _C._grid_blocks(work, BLOCK, SMS, PER_SM)


def test_grid_is_one_wave_exactly():
    assert grid(WAVE * BLOCK) == WAVE
    assert grid(WAVE * BLOCK + 1) == WAVE  # not a second, partial wave
    assert grid(8 * SMS * BLOCK) == WAVE  # the old cap of 8 per SM


def test_grid_below_one_wave_covers_the_work():
    assert grid(1) == 1
    assert grid(BLOCK) == 1
    assert grid(BLOCK + 1) == 2
    assert grid(100 * BLOCK - 3) == 100


def test_grid_of_no_work_is_one_block():
    assert grid(0) == 1


def test_grid_of_huge_work_is_one_wave():
    assert grid(1 << 50) == WAVE
    assert _C._grid_blocks(1 << 50, BLOCK, SMS, 2) == 2 * SMS


def plan(arrays, n):
    """arrays: (address, element bytes) pairs; address 0 is an absent array."""
    return _C._vector_plan([a for a, _ in arrays], [e for _, e in arrays], n, VEC)


def f32(offset, at=0):
    """An fp32 array `offset` elements past an aligned address."""
    return (BASE + at * 65536 + 4 * offset, 4)


def b16(offset, at=0):
    return (BASE + at * 65536 + 2 * offset, 2)


def test_all_aligned_no_peel_every_array_vector():
    assert plan([f32(0, 0), f32(0, 1), f32(0, 2), b16(0, 3), b16(0, 4)], 4099) == (0, 0b11111)


def test_one_misaligned_array_keeps_the_others_vector():
    # a peel of 3 would align array 1 alone (4 bytes of 16 per element): no peel, 3 of 4 vector
    assert plan([f32(0, 0), f32(1, 1), f32(0, 2), f32(0, 3)], 4099) == (0, 0b1101)


@pytest.mark.parametrize("offset", [1, 2, 3])
def test_the_same_offset_everywhere_is_peeled(offset):
    # offset + head = 4 puts every array on a group boundary
    assert plan([f32(offset, 0), f32(offset, 1), f32(offset, 2)], 4099) == (VEC - offset, 0b111)
    assert plan([b16(offset, 0), b16(offset, 1)], 4099) == (VEC - offset, 0b11)


def test_mixed_dtypes_the_peel_with_the_most_bytes():
    # peel 3 aligns the fp32 arrays (offset 1), peel 2 the bf16 ones (offset 2)
    assert plan([f32(1, 0), f32(1, 1), b16(2, 2), b16(2, 3)], 4099) == (3, 0b0011)  # 8 bytes vs 4
    assert plan([f32(1, 0), b16(2, 1), b16(2, 2), b16(2, 3)], 4099) == (2, 0b1110)  # 6 bytes vs 4
    # an fp32 array at offset 2 and a bf16 one at offset 2: peel 2 aligns both
    assert plan([f32(2, 0), b16(2, 1)], 4099) == (2, 0b11)


def test_absent_arrays_count_as_aligned_and_weigh_nothing():
    assert plan([(0, 4), f32(1, 1)], 4099) == (3, 0b11)
    assert plan([(0, 4), (0, 2)], 4099) == (0, 0b11)
    assert plan([f32(0, 0), (0, 4), f32(1, 2)], 4099) == (0, 0b011)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 6])
def test_no_peel_past_the_last_whole_group(n):
    # the peel that would align both (3) leaves no whole group of 4: nothing to gain
    head, mask = plan([f32(1, 0), f32(1, 1)], n)
    assert head <= n and (head, mask) == (0, 0)


def test_peel_once_a_group_fits_after_it():
    assert plan([f32(1, 0), f32(1, 1)], 7) == (3, 0b11)


def brute_force(arrays, n):
    """Every peel, every group of every array checked at its address: the most vector bytes,
    the smallest peel among equals, and the arrays whose every group lines up (group 0 when
    there is none)."""
    best = None
    for head in range(min(VEC, n + 1)):
        groups = (n - head) // VEC
        mask, moved = 0, 0
        for k, (addr, size) in enumerate(arrays):
            starts = [addr + (head + VEC * g) * size for g in range(max(groups, 1))]
            if addr == 0 or all(s % (VEC * size) == 0 for s in starts):
                mask |= 1 << k
                if addr:
                    moved += groups * VEC * size
        if best is None or moved > best[0]:
            best = (moved, head, mask)
    return best[1], best[2]


def test_plan_matches_brute_force(fixed_seed):
    rng = random.Random(fixed_seed)
    for _ in range(3000):
        arrays = []
        for k in range(rng.randint(1, 6)):
            size = rng.choice([2, 4])
            addr = 0 if rng.random() < 0.15 else BASE + k * 65536 + size * rng.randrange(8)
            arrays.append((addr, size))
        n = rng.choice([rng.randrange(12), rng.randrange(200)])
        assert plan(arrays, n) == brute_force(arrays, n), (arrays, n, fixed_seed)
