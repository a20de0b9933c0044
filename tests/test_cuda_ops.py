"""CUDA kernels against the CPU kernels (and float64 where it matters). Skipped without a GPU."""
import math

import pytest
import torch

from conftest import DTYPES, OFFSETS, SIZES, assert_close, unaligned
from pyengine import ops
import test_ops_optim as cpu_optim
from test_ops_optim import KINDS, _run, assert_lion_close, counter, f32, lion_ref

pytestmark = pytest.mark.cuda


def both(*tensors):
    return [t.clone() for t in tensors], [t.cuda() for t in tensors]


@pytest.mark.parametrize("n", SIZES + [2**24 + 3])
@pytest.mark.parametrize("src_dtype", DTYPES)
@pytest.mark.parametrize("dst_dtype", DTYPES)
def test_cast_scale_matches_cpu(n, src_dtype, dst_dtype):
    src = unaligned(n, src_dtype, n % 3)
    out_cpu = torch.empty(n, dtype=dst_dtype)
    out_gpu = torch.empty(n + 1, dtype=dst_dtype, device="cuda")[1:]
    ops.cast_scale(src, out_cpu, 0.37)
    ops.cast_scale(src.cuda(), out_gpu, 0.37)
    assert torch.equal(out_gpu.cpu(), out_cpu)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("src_dtype", DTYPES)
def test_accumulate_matches_cpu(n, src_dtype):
    dst = unaligned(n, torch.float32, 1)
    src = unaligned(n, src_dtype, 0)
    d_gpu = dst.cuda()
    ops.accumulate_(dst, src, 0.5)
    ops.accumulate_(d_gpu, src.cuda(), 0.5)
    assert torch.equal(d_gpu.cpu(), dst)


@pytest.mark.parametrize("n", SIZES + [2**24 + 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("write", [False, True])
def test_unscale_check_sumsq_matches_cpu_and_is_deterministic(n, dtype, write):
    g = unaligned(n, dtype, n % 3, scale=100.0)
    inv = torch.tensor([1 / 64.0])
    res = []
    for dev in ("cpu", "cuda", "cuda"):
        gg = g.to(dev)
        out = torch.empty_like(gg) if write else None
        flag, sumsq = torch.zeros(1, device=dev), torch.zeros(1, device=dev)
        ops.unscale_check_sumsq(gg, flag, sumsq, inv_scale=inv.to(dev), out=out)
        res.append((flag.item(), sumsq.item(), None if out is None else out.cpu()))
    assert res[1][1] == res[2][1], "CUDA sum must be bitwise reproducible"
    assert res[0][0] == res[1][0] == 0.0
    # both sum fp32 squares in 8192-element chunks folded in double, in other lane orders: each
    # chunk's sum is off by about sqrt(1024) x 2^-24 relative, far under 1e-5
    assert math.isclose(res[0][1], res[1][1], rel_tol=1e-5, abs_tol=1e-30)
    if write:
        assert torch.equal(res[0][2], res[1][2])


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_flag_on_cuda(bad, dtype):
    g = torch.randn(2**20 + 5, device="cuda").to(dtype)
    g[2**20 + 4] = bad
    flag, sumsq = torch.zeros(1, device="cuda"), torch.zeros(1, device="cuda")
    ops.unscale_check_sumsq(g, flag, sumsq)
    assert flag.item() == 1.0


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("grad_dtype", DTYPES)
@pytest.mark.parametrize("model_dtype", [None, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["adamw", "adam", "lion"])
def test_optimizer_matches_cpu(n, grad_dtype, model_dtype, kind):
    p, m = unaligned(n, torch.float32, 1), unaligned(n, torch.float32, 0, scale=0.1)
    v = unaligned(n, torch.float32, 0).abs_()
    g = unaligned(n, grad_dtype, 3)
    step, mult, flag = counter(2), torch.tensor([0.5]), torch.zeros(1)
    cpu, gpu = both(p, m, v, g, step, mult, flag)
    mc = None if model_dtype is None else torch.empty(n, dtype=model_dtype)
    mg = None if model_dtype is None else torch.empty(n, dtype=model_dtype, device="cuda")
    for t, model in ((cpu, mc), (gpu, mg)):
        if kind == "lion":
            ops.lion_step(t[0], t[1], t[3], t[4], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, grad_scale=t[5],
                          found_inf=t[6], model=model)
        else:
            ops.adam_step(*t[:5], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, decoupled=kind == "adamw",
                          grad_scale=t[5], found_inf=t[6], model=model)
    assert gpu[4].item() == cpu[4].item() == 3
    for a, b in zip(cpu[:4], gpu[:4]):
        # the same fp32 formulas (--fmad=false, -ffp-contract=off) and the same double bias
        # corrections; CUDA's pow may differ in the last double bit, which can move a float
        # coefficient by an ulp that the division carries on: a few ulps (2e-6 is 16),
        # absolute slack for values that cancel to near zero
        assert_close(b.cpu(), a, rtol=2e-6, atol=1e-7, msg=f"{kind} cuda vs cpu")
    if mc is not None:
        assert torch.equal(mg.cpu(), gpu[0].cpu().to(model_dtype))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("grad_dtype", DTYPES)
@pytest.mark.parametrize("model_dtype", [None, torch.float16, torch.bfloat16])
def test_lion_against_float64_cuda(n, grad_dtype, model_dtype):
    offset = OFFSETS[n % 3]
    p = unaligned(n, torch.float32, offset, device="cuda")
    m = unaligned(n, torch.float32, (offset + 2) % 4, device="cuda", scale=0.1)
    g = unaligned(n, grad_dtype, (offset + 1) % 4, device="cuda", scale=100.0)
    p0, m0 = p.cpu(), m.cpu()
    model = None if model_dtype is None else torch.empty(n + 1, dtype=model_dtype, device="cuda")[1:]
    step = counter(0, "cuda")
    gs = g.cpu().double() / 1024.0
    ep, em, c = lion_ref(p0, m0, gs, f32(1e-2), f32(0.9), f32(0.99), f32(0.1))
    ops.lion_step(p, m, g, step, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1,
                  grad_scale=torch.tensor([1 / 1024.0], device="cuda"), model=model)
    assert step.item() == 1
    # as test_lion_against_float64
    assert_lion_close(p.cpu(), m.cpu(), ep, em, c, m0, gs, f32(1e-2), f32(0.9), "lion cuda")
    if model is not None:
        assert torch.equal(model.cpu(), p.cpu().to(model_dtype))


@pytest.mark.parametrize("kind", KINDS)
def test_maximize_matches_cpu(kind):
    n = 100003
    p, m, v, g = torch.randn(n), torch.randn(n) * 0.1, torch.rand(n) * 0.01, torch.randn(n).half()
    cpu, gpu = both(p, m, v, g, counter(4))
    for t in (cpu, gpu):
        _run(kind, *t, maximize=True)
    for a, b in zip(cpu[:3], gpu[:3]):
        # as test_optimizer_matches_cpu
        assert_close(b.cpu(), a, rtol=2e-6, atol=1e-7, msg=f"{kind} maximize cuda vs cpu")
    # and maximize is descent on -g, bit for bit
    neg = [t.clone() for t in gpu]
    _run(kind, gpu[0], gpu[1], gpu[2], gpu[3], gpu[4], maximize=True)
    _run(kind, neg[0], neg[1], neg[2], -neg[3], neg[4])
    assert all(torch.equal(a, b) for a, b in zip(gpu[:3], neg[:3]))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("grad_dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_nonfinite_gradient_skips_the_step_cuda(kind, grad_dtype, bad):
    n = 2**20 + 5
    p, m, v = (torch.randn(n, device="cuda") for _ in range(3))
    g = unaligned(n, grad_dtype, 1, device="cuda")
    g[n - 3] = bad
    step, model = counter(2**24, "cuda"), p.to(torch.bfloat16)
    before = [x.clone() for x in (p, m, v, step, model)]
    flag, sumsq = torch.zeros(1, device="cuda"), torch.zeros(1, device="cuda")
    ops.unscale_check_sumsq(g, flag, sumsq)
    _run(kind, p, m, v, g, step, found_inf=flag, model=model, zero_grad=True)
    for a, b in zip((p, m, v, step, model), before):
        assert torch.equal(a.view(torch.int8), b.view(torch.int8)), "a skipped step changes nothing"
    assert bool((g == 0).all()), "the gradient is still cleared when asked"


@pytest.mark.parametrize("beta1", [0.9, 0.999])
@pytest.mark.parametrize("kind", ["adamw", "adam"])
def test_step_size_matches_torch_on_cuda(beta1, kind):
    cpu_optim.test_step_size_matches_torchs_double_formula(beta1, kind, device="cuda")


@pytest.mark.parametrize("beta2", [0.99, 0.999])
def test_bias_correction2_matches_torch_on_cuda(beta2):
    cpu_optim.test_bias_correction2_matches_torchs_double_formula(beta2, device="cuda")


@pytest.mark.parametrize("kind", KINDS)
def test_step_counter_is_exact_past_2_24_cuda(kind):
    cpu_optim.test_step_counter_is_exact_past_2_24(kind, device="cuda")


def test_sgd_momentum_zero_with_a_buffer_cuda():
    n = 4097
    p, buf, g = torch.randn(n), torch.randn(n), torch.randn(n)
    cpu, gpu = both(p, buf, g, counter(5))
    for t in (cpu, gpu):
        ops.sgd_step(t[0], t[2], t[3], lr=0.1, momentum=0.0, weight_decay=0.01, momentum_buf=t[1])
    assert torch.equal(gpu[1].cpu(), buf), "momentum 0: the buffer is untouched"
    # the same two unfused fp32 operations: an ulp at most
    assert_close(gpu[0].cpu(), cpu[0], rtol=1e-6, atol=1e-7, msg="sgd momentum 0")


@pytest.mark.parametrize("variant", [dict(momentum=0.0), dict(momentum=0.9, nesterov=True)])
def test_sgd_matches_cpu_and_skips(variant):
    n = 4097
    p, buf, g = torch.randn(n), torch.randn(n), torch.randn(n, dtype=torch.float16).float()
    cpu, gpu = both(p, buf, g, counter())
    for t in (cpu, gpu):
        ops.sgd_step(t[0], t[2], t[3], lr=0.1, momentum_buf=t[1] if variant["momentum"] else None, **variant)
    # the same unfused fp32 operations (--fmad=false, -ffp-contract=off): an ulp at most
    assert_close(gpu[0].cpu(), cpu[0], rtol=1e-6, atol=1e-7, msg="sgd")
    before = gpu[0].clone()
    ops.sgd_step(gpu[0], gpu[2], gpu[3], lr=0.1, found_inf=torch.ones(1, device="cuda"))
    assert torch.equal(gpu[0], before) and gpu[3].item() == 1


def test_flatten_many_tensors_cuda():
    tensors = [torch.randn(i * 37 % 70001 + 1, device="cuda").half() for i in range(1500)]
    flat = torch.empty(sum(t.numel() for t in tensors), device="cuda")
    ops.flatten(tensors, flat, 2.0)
    assert torch.equal(flat, torch.cat([t.float() * 2.0 for t in tensors]))
    back = [torch.empty_like(t) for t in tensors]
    ops.unflatten(flat, back, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(back, tensors))


def test_loss_scale_and_clip_on_device():
    state = ops.new_loss_scale_state(2.0**16, 2, "cuda")
    flag = torch.ones(1, device="cuda")
    for _ in range(2):
        ops.update_loss_scale(state, flag, hysteresis=2)
    assert state[0].item() == 2.0**15
    out = torch.empty(2, device="cuda")
    ops.clip_coef(torch.tensor([4.0], device="cuda"), 1.0, out, inv_scale=state[1:2])
    # one fp32 sqrt and one division: an ulp
    assert math.isclose(out[0].item(), 2.0) and math.isclose(out[1].item(), 2.0**-15 / (2.0 + 1e-6), rel_tol=1e-6)


def test_no_host_sync_in_ops():
    n = 1 << 20
    g = torch.randn(n, device="cuda").half()
    p, m, v = (torch.randn(n, device="cuda") for _ in range(3))
    flag, sumsq, out = torch.zeros(1, device="cuda"), torch.zeros(1, device="cuda"), torch.empty(2, device="cuda")
    step, state = counter(0, "cuda"), ops.new_loss_scale_state(2.0**16, 2, "cuda")
    e = torch.zeros(n, device="cuda")
    ws = ops.sumsq_workspace(g)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.unscale_check_sumsq(g, flag, sumsq, inv_scale=state[1:2], workspace=ws)
        ops.clip_coef(sumsq, 1.0, out, inv_scale=state[1:2])
        ops.adamw_step(p, m, v, g, step, lr=1e-3, grad_scale=out[1:2], found_inf=flag)
        ops.lion_step(p, e, g, step, lr=1e-4, grad_scale=out[1:2], found_inf=flag)
        ops.update_loss_scale(state, flag)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert step.item() == 2


def test_runs_on_the_current_stream():
    s = torch.cuda.Stream()
    x = torch.randn(1 << 22, device="cuda")
    out = torch.empty_like(x, dtype=torch.float16)
    with torch.cuda.stream(s):
        ops.cast_scale(x, out, 2.0)
    s.synchronize()
    assert torch.equal(out, (x * 2.0).half())


def test_cupy_arrays():
    cupy = pytest.importorskip("cupy")
    src = cupy.random.standard_normal(100003, dtype=cupy.float32)
    out = cupy.empty(100003, dtype=cupy.float16)
    ops.cast_scale(src, out, 0.5)
    assert bool(cupy.all(out == (src * 0.5).astype(cupy.float16)))
    flag, sumsq = cupy.zeros(1, dtype=cupy.float32), cupy.zeros(1, dtype=cupy.float32)
    ops.unscale_check_sumsq(src, flag, sumsq, out=None)
    assert abs(float(sumsq[0]) - float((src.astype(cupy.float64) ** 2).sum())) < 1e-4 * float(sumsq[0])
    assert float(flag[0]) == 0.0


def test_device_mismatch_cuda():
    with pytest.raises(ValueError, match="same device"):
        ops.accumulate_(torch.zeros(4, device="cuda"), torch.zeros(4))


@pytest.mark.parametrize("skip", [False, True])
def test_zero_grad_cuda(skip):
    n = 100003
    p, m, v = (torch.randn(n, device="cuda") for _ in range(3))
    v.abs_()
    g = torch.randn(n, device="cuda").half()
    p2, m2, v2 = p.clone(), m.clone(), v.clone()
    flag = torch.full((1,), 1.0 if skip else 0.0, device="cuda")
    ops.adamw_step(p, m, v, g.clone(), counter(0, "cuda"), lr=0.1, found_inf=flag)
    ops.adamw_step(p2, m2, v2, g, counter(0, "cuda"), lr=0.1, found_inf=flag, zero_grad=True)
    assert torch.equal(p, p2) and torch.equal(m, m2) and torch.equal(v, v2)
    assert bool((g == 0).all())


@pytest.mark.parametrize("n", SIZES + [2**24 + 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fill_on_cuda(n, dtype):
    x = torch.empty(n + 1, dtype=dtype, device="cuda")[1:]
    ops.fill_(x, -2.5)
    assert bool((x == -2.5).all())


@pytest.mark.parametrize("rows", [False, True])
def test_step_scalars_match_cpu(rows):
    from pyengine import _native
    from pyengine.scalars import StepScalars

    g = torch.randn(2**20 + 5) * 50
    bucket_rows = torch.tensor([[3.0, 0.0], [5.0, 0.0]])
    out = []
    for dev, mod in (("cpu", _native._C), ("cuda", _native._cuda)):
        s = StepScalars(dev, 256.0, 2)
        a = mod.StepScalarArgs()
        keep = []
        if rows:
            r = bucket_rows.to(dev)
            keep.append(r)
            a.bucket_rows, a.buckets = r.data_ptr(), 2
        else:
            gg = g.to(dev)
            ws = ops.sumsq_workspace(gg) if dev == "cuda" else None
            keep += [gg, ws]
            a.grad, a.n = gg.data_ptr(), gg.numel()
            a.workspace = 0 if ws is None else ws.data_ptr()
        a.scalars, a.inv_scale, a.loss_scale_state = s.tensor.data_ptr(), s.ptr("inv_scale"), s.loss_scale_state.data_ptr()
        a.max_norm = 1.0
        a.loss_scale = ops.loss_scale_config(mod, 2.0, 0.5, 1.0, 2.0**24, 1, 2, False)
        count = counter(2**24, dev)
        keep.append(count)
        a.boundaries = count.data_ptr()
        mod.step_scalars(a, 0 if dev == "cpu" else torch.cuda.current_stream().cuda_stream)
        out.append(s.tensor.cpu())
        assert count.item() == 2**24 + 1, dev
    # the norm's fp32 chunk sums in another lane order (see above): relative 1e-5 at most
    torch.testing.assert_close(out[1], out[0], rtol=1e-5, atol=0)
