"""The CUDA elementwise ops and the sum of squares with their arrays at every element offset
0..3 from an aligned allocation: the head peel and the per-array vector choice must not change
a single bit. Skipped without a GPU."""
import itertools

import pytest
import torch

from conftest import assert_close
from pyengine import ops
from test_ops_optim import counter

pytestmark = pytest.mark.cuda

SIZES = [0, 1, 3, 4099, 2**20 + 3]
OFFSETS = range(4)  # elements; a CUDA allocation is 512-byte aligned, so offset 0 is aligned


class Placed:
    """One array of each offset's view, refilled from the same values before each run."""

    def __init__(self, values):
        self.values = values.cuda()
        n = values.numel()
        self.buf = torch.empty(n + max(OFFSETS), dtype=values.dtype, device="cuda")
        assert self.buf.data_ptr() % 16 == 0
        self.views = [self.buf[o:o + n] for o in OFFSETS]

    def at(self, offset):
        view = self.views[offset]
        view.copy_(self.values)
        return view


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("src_dtype,dst_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                 (torch.float32, torch.float32), (torch.float16, torch.bfloat16)])
def test_cast_scale_at_every_offset_matches_cpu(n, src_dtype, dst_dtype):
    src = torch.randn(n).to(src_dtype)
    expected = torch.empty(n, dtype=dst_dtype)
    ops.cast_scale(src, expected, 0.37)
    s, d = Placed(src), Placed(torch.zeros(n, dtype=dst_dtype))
    for so, do in itertools.product(OFFSETS, repeat=2):
        out = d.at(do)
        ops.cast_scale(s.at(so), out, 0.37)
        assert torch.equal(out.cpu(), expected), (so, do)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_accumulate_at_every_offset_matches_cpu(n, src_dtype):
    dst, src = torch.randn(n), torch.randn(n).to(src_dtype)
    expected = ops.accumulate_(dst.clone(), src, 0.5)
    d, s = Placed(dst), Placed(src)
    for do, so in itertools.product(OFFSETS, repeat=2):
        out = d.at(do)
        ops.accumulate_(out, s.at(so), 0.5)
        assert torch.equal(out.cpu(), expected), (do, so)


def adamw(p, m, v, g, step, model, zero_grad):
    ops.adam_step(p, m, v, g, step, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, decoupled=True,
                  grad_scale=torch.tensor([0.5], device=p.device), model=model, zero_grad=zero_grad)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("zero_grad", [False, True])
def test_adamw_at_every_offset(n, grad_dtype, model_dtype, zero_grad):
    p, m, v = torch.randn(n), torch.randn(n) * 0.1, torch.rand(n) * 0.01
    g = torch.randn(n).to(grad_dtype)
    cpu = [p.clone(), m.clone(), v.clone()]
    adamw(*cpu, g.clone(), counter(2), None, False)
    arrays = [Placed(p), Placed(m), Placed(v), Placed(g)]
    if model_dtype is not None:
        arrays.append(Placed(torch.zeros(n, dtype=model_dtype)))
    step = counter(2, "cuda")
    aligned = None
    for offsets in itertools.product(OFFSETS, repeat=len(arrays)):
        views = [a.at(o) for a, o in zip(arrays, offsets)]
        model = views[4] if model_dtype is not None else None
        step.fill_(2)
        adamw(*views[:4], step, model, zero_grad)
        got = [x.clone() for x in views[:3]]
        if aligned is None:  # offsets all 0: against the CPU
            aligned = got
            for a, b in zip(cpu, got):
                # as test_cuda_ops.test_optimizer_matches_cpu: the same fp32 formulas, CUDA's pow
                # may move a double bias correction by its last bit, a few ulps at most
                assert_close(b.cpu(), a, rtol=2e-6, atol=1e-7, msg="adamw cuda vs cpu")
        for a, b in zip(aligned, got):
            assert torch.equal(a, b), offsets  # the same arithmetic per element, any load path
        if model is not None:
            assert torch.equal(model, got[0].to(model_dtype)), offsets
        assert bool((views[3] == 0).all()) == (zero_grad or n == 0), offsets


@pytest.mark.parametrize("n", SIZES + [2**24 + 3])
@pytest.mark.parametrize("src_dtype,dst_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                                 (torch.float32, torch.float32), (torch.float32, None)])
def test_unscale_check_sumsq_at_every_offset_is_bitwise_the_aligned_sum(n, src_dtype, dst_dtype):
    src = (torch.randn(n) * 100.0).to(src_dtype)
    inv = torch.tensor([1 / 64.0], device="cuda")
    s = Placed(src)
    d = Placed(torch.zeros(n, dtype=dst_dtype)) if dst_dtype is not None else None
    expected = None
    for so, do in itertools.product(OFFSETS, repeat=2):
        if d is None and do > 0:
            continue
        out = d.at(do) if d is not None else None
        flag, sumsq = torch.zeros(1, device="cuda"), torch.zeros(1, device="cuda")
        ops.unscale_check_sumsq(s.at(so), flag, sumsq, inv_scale=inv, out=out)
        got = (flag.item(), sumsq.item(), None if out is None else out.clone())
        if expected is None:
            expected = got
        assert got[0] == 0.0
        assert got[1] == expected[1], (so, do)  # fixed chunks, fixed order: bitwise
        if out is not None:
            assert torch.equal(got[2], expected[2]), (so, do)
            assert torch.equal(got[2].cpu(), (src.cuda().float() * inv).to(dst_dtype).cpu()), (so, do)
