"""step_scalars, the step's one native call: the same numbers as the separate ops it fuses
(unscale_check_sumsq, clip_coef, update_loss_scale), from a gradient buffer or from bucket rows."""
import math

import pytest
import torch

from conftest import DTYPES
from pyengine import _native, ops
from pyengine.scalars import STEP_SLOTS, StepScalars

C = _native._C


def run_fused(scalars, max_norm, grad=None, rows=None, cfg=None, boundaries=None, phase=None, abort_word=None):
    a = C.StepScalarArgs()
    if abort_word is not None:
        a.abort_word = abort_word.data_ptr()
    if boundaries is not None:
        a.boundaries = boundaries.data_ptr()
    if phase is not None:
        a.phase = phase
    if rows is not None:
        a.bucket_rows, a.buckets = rows.data_ptr(), rows.shape[0]
    else:
        a.grad, a.grad_dtype, a.n = grad.data_ptr(), {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[
            grad.dtype], grad.numel()
    a.scalars, a.inv_scale = scalars.tensor.data_ptr(), scalars.ptr("inv_scale")
    a.loss_scale_state = scalars.loss_scale_state.data_ptr()
    a.max_norm = max_norm
    a.loss_scale = cfg or ops.loss_scale_config(C, 2.0, 0.5, 1.0, 2.0**24, 3, 2, False)
    C.step_scalars(a, 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 4097, 2**20 + 5])
@pytest.mark.parametrize("bad", [None, float("inf"), float("nan")])
def test_fused_equals_the_separate_ops(dtype, n, bad):
    g = (torch.randn(n) * 300).to(dtype)
    if bad is not None and n:
        g[n // 2] = bad
    fused = StepScalars("cpu", 1024.0, 2)
    fused.tensor[:4] = 7.0  # stale values from a previous step must not leak in
    boundaries = torch.tensor([2**24], dtype=torch.int64)
    run_fused(fused, 1.0, grad=g, boundaries=boundaries)
    sep = StepScalars("cpu", 1024.0, 2)
    ops.unscale_check_sumsq(g, sep.found_inf, sep.sumsq, inv_scale=sep.inv_scale)
    ops.clip_coef(sep.sumsq, 1.0, sep.norm_and_coef, inv_scale=sep.inv_scale)
    ops.update_loss_scale(sep.loss_scale_state, sep.found_inf, growth_interval=3, hysteresis=2)
    assert boundaries.item() == 2**24 + 1, "the fused call also counts the boundary step, exactly"
    assert torch.equal(fused.tensor.nan_to_num(nan=-1.0), sep.tensor.nan_to_num(nan=-1.0))
    assert fused.found_inf.item() == (0.0 if bad is None or n == 0 else 1.0)


def test_rows_fold_in_order_and_flag_any_nonfinite():
    rows = torch.tensor([[1.5, 0.0], [2.25, 0.0], [4.0, 0.0]])
    s = StepScalars("cpu", 1.0, 2)
    run_fused(s, math.inf, rows=rows)
    assert s.sumsq.item() == 7.75 and s.found_inf.item() == 0.0
    assert s.grad_norm.item() == pytest.approx(7.75**0.5, rel=1e-7)  # one fp32 sqrt
    assert s.grad_coef.item() == 1.0, "no clipping, scale 1"
    rows[1, 1] = float("nan")
    run_fused(s, math.inf, rows=rows)
    assert s.found_inf.item() == 1.0 and s.skipped_total.item() == 1.0
    assert STEP_SLOTS["grad_coef"] == STEP_SLOTS["grad_norm"] + 1


def test_boundaries_counted_in_int64_by_the_phases_that_finish_a_step():
    assert "boundaries" not in STEP_SLOTS, "the count lives in an int64, not in a float slot"
    g = torch.randn(4097)
    s = StepScalars("cpu", 1.0, 2)
    count = torch.tensor([2**31 + 5], dtype=torch.int64)
    run_fused(s, 1.0, grad=g, boundaries=count, phase=C.STEP_ALL)
    assert count.item() == 2**31 + 6
    run_fused(s, 1.0, grad=g, boundaries=count, phase=C.STEP_LOCAL)
    assert count.item() == 2**31 + 6, "the local phase of a sharded step does not count"
    run_fused(s, 1.0, grad=g, boundaries=count, phase=C.STEP_GLOBAL)
    assert count.item() == 2**31 + 7
    before = s.tensor.clone()
    run_fused(s, 1.0, grad=g)  # no counter: nothing counted, nothing else written there
    assert torch.equal(s.tensor[4:8], before[4:8]), "the reserved slots stay untouched"


@pytest.mark.parametrize("phase", [None, C.STEP_GLOBAL])
def test_an_aborted_communicator_flags_the_step(phase):
    """The abort word set (the communicator aborted: its collectives may have returned
    part-way) flags the step, so the optimizer skips it; clear, the rows decide."""
    rows = torch.tensor([[1.5, 0.0], [2.25, 0.0]])
    word = torch.zeros(1, dtype=torch.int32)
    for value, flagged in ((0, 0.0), (1, 1.0), (-7, 1.0)):
        word[0] = value
        s = StepScalars("cpu", 1.0, 2)
        if phase == C.STEP_GLOBAL:  # the rows were folded and combined over the ranks before
            run_fused(s, math.inf, rows=rows, phase=C.STEP_LOCAL, abort_word=word)
            assert s.found_inf.item() == 0.0, "the local phase leaves the abort to the global one"
        run_fused(s, math.inf, rows=rows, phase=phase, abort_word=word)
        assert s.found_inf.item() == flagged, value
        assert s.loss_scale_state[4].item() == flagged, "counted as a skipped step"
