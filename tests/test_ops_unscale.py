"""unscale / non-finite check / sum of squares, and the clip coefficient."""
import math

import pytest
import torch

import pyengine
from conftest import DTYPES, OFFSETS, SIZES, assert_close, unaligned
from pyengine import ops


def run(grad, inv=None, out=None):
    flag = torch.zeros(1)
    sumsq = torch.zeros(1)
    ops.unscale_check_sumsq(grad, flag, sumsq, inv_scale=inv, out=out)
    return flag.item(), sumsq.item()


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", OFFSETS)
def test_read_only_norm_and_flag(n, dtype, offset):
    g = unaligned(n, dtype, offset, scale=4.0)
    before = g.clone()
    inv = torch.tensor([1 / 1024.0])
    flag, s = run(g, inv)
    expected = float((g.double() / 1024.0).pow(2).sum())
    assert flag == 0.0
    # each 8192-element chunk sums fp32 squares in 8 lanes of 1024 terms (about sqrt(1024) x
    # 2^-24 relative), and the chunks fold in double: well under 1e-5
    assert math.isclose(s, expected, rel_tol=1e-5, abs_tol=1e-30)
    assert torch.equal(g, before), "read-only mode must not write"


@pytest.mark.parametrize("n", [1, 4097, 2**20 + 5])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_unscale_into_other_buffer(n, dtype, out_dtype):
    g = unaligned(n, dtype, 1, scale=300.0)
    out = torch.empty(n + 3, dtype=out_dtype)[3:]
    inv = torch.tensor([0.25])
    flag, s = run(g, inv, out)
    assert torch.equal(out, (g.float() * 0.25).to(out_dtype))
    assert flag == 0.0
    # as in the read-only test: fp32 chunk sums folded in double
    assert math.isclose(s, float((g.double() * 0.25).pow(2).sum()), rel_tol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unscale_in_place(dtype):
    g = unaligned(4097, dtype, 3)
    expected = (g.float() * 0.5).to(dtype)
    run(g, torch.tensor([0.5]), out=g)
    assert torch.equal(g, expected)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", [0, 4096, 2**20 + 4])
def test_nonfinite_sets_flag(bad, dtype, where):
    g = torch.randn(2**20 + 5).to(dtype)
    g[where] = bad
    flag, _ = run(g)
    assert flag == 1.0


def test_fp16_max_is_finite_and_flag_is_sticky():
    g = torch.full((1000,), 65504.0, dtype=torch.float16)
    flag = torch.zeros(1)
    sumsq = torch.zeros(1)
    ops.unscale_check_sumsq(g, flag, sumsq)
    assert flag.item() == 0.0
    # 1000 equal squares near 4.3e9 summed in fp32 lanes: a few roundings of 2^-24
    assert math.isclose(sumsq.item(), 1000 * 65504.0**2, rel_tol=1e-6)
    bad = torch.tensor([float("nan")])
    ops.unscale_check_sumsq(bad, flag, sumsq)
    assert flag.item() == 1.0
    ops.unscale_check_sumsq(torch.ones(3), flag, sumsq)
    assert flag.item() == 1.0, "the flag is only ever raised, never cleared"


def test_scaling_that_overflows_sets_flag():
    g = torch.full((8,), 3e38)
    flag, _ = run(g, torch.tensor([10.0]))
    assert flag == 1.0


def test_subnormals_are_finite():
    g = torch.tensor([1e-40, -1e-42, 5.9e-8], dtype=torch.float32)
    flag, s = run(g)
    assert flag == 0.0 and s > 0


def test_sums_accumulate_across_calls():
    a, b = torch.randn(5000), torch.randn(3001)
    flag = torch.zeros(1)
    sumsq = torch.zeros(1)
    ops.unscale_check_sumsq(a, flag, sumsq)
    ops.unscale_check_sumsq(b, flag, sumsq)
    # fp32 chunk sums folded in double, and the running total kept in fp32 between calls
    assert math.isclose(sumsq.item(), float(a.double().pow(2).sum() + b.double().pow(2).sum()), rel_tol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sum_is_identical_for_one_and_two_threads(dtype):
    g = torch.randn(2**22 + 77).to(dtype)
    results = []
    for threads in (1, 2, 1):
        pyengine.set_num_threads(threads)
        results.append(run(g)[1])
    pyengine.set_num_threads(2)
    assert results[0] == results[1] == results[2]


@pytest.mark.parametrize("max_norm", [None, 0.5, 1e6])
def test_clip_coef_matches_clip_grad_norm(max_norm):
    grads = [torch.randn(100) * 3, torch.randn(7, 3)]
    sumsq = torch.zeros(1)
    flag = torch.zeros(1)
    for g in grads:
        ops.unscale_check_sumsq(g * 8.0, flag, sumsq, inv_scale=torch.tensor([0.125]))
    out = torch.empty(2)
    ops.clip_coef(sumsq, max_norm, out, inv_scale=torch.tensor([0.125]))
    ref = [g.clone().requires_grad_() for g in grads]
    for r, g in zip(ref, grads):
        r.grad = g.clone()
    norm = torch.nn.utils.clip_grad_norm_(ref, max_norm if max_norm else float("inf"))
    # one fp32 sqrt of sums that agree to ~1e-7, and one division: a few ulps
    assert math.isclose(out[0].item(), norm.item(), rel_tol=1e-6)
    coef = 1.0 if max_norm is None else min(1.0, max_norm / (norm.item() + 1e-6))
    assert math.isclose(out[1].item(), 0.125 * coef, rel_tol=1e-6)
    assert_close(ref[0].grad, grads[0] * coef, rtol=1e-6, atol=1e-7, msg="coef")


def test_clip_coef_nonfinite_norm():
    out = torch.empty(2)
    ops.clip_coef(torch.tensor([float("inf")]), 1.0, out)
    assert out[0].item() == float("inf") and out[1].item() == 0.0


def test_finite_values_whose_squares_overflow_do_not_raise_the_flag():
    g = torch.ones(20000)
    g[12345] = 1e20  # finite, but its square is not
    flag, s = run(g)
    assert flag == 0.0, "the flag means inf/NaN values, not an overflowing norm"
    assert s == float("inf")
    g[54] = float("nan")
    assert run(g)[0] == 1.0
