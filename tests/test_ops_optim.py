"""Fused Adam / AdamW / SGD / Lion against float64 references and torch.optim, flag-and-skip,
maximize, exact int64 step counts and bias corrections as torch computes them."""
import math

import numpy as np
import pytest
import torch

from conftest import DTYPES, OFFSETS, SIZES, assert_close, unaligned
from pyengine import _native, ops

KINDS = ["adamw", "adam", "sgd", "lion"]


def f32(x):
    """x as the float32 the core's hyper block holds, back in a Python float."""
    return float(np.float32(x))


def counter(value=0, device="cpu"):
    return torch.tensor([value], dtype=torch.int64, device=device)


def adam_ref(p, m, v, g, step, lr, b1, b2, eps, wd, decoupled, maximize=False):
    p, m, v, g = (x.double().clone() for x in (p, m, v, g))
    if maximize:
        g = -g
    if decoupled:
        p *= 1 - lr * wd
    else:
        g = g + wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    bc1, bc2 = 1 - b1**step, 1 - b2**step
    p = p - (lr / bc1) * m / (v.sqrt() / bc2**0.5 + eps)
    return p, m, v


def lion_ref(p, m, g, lr, b1, b2, wd, maximize=False):
    """lion-pytorch's update in float64; also returns the sign argument c."""
    p, m, g = (x.double().clone() for x in (p, m, g))
    if maximize:
        g = -g
    p = p * (1 - lr * wd)
    c = b1 * m + (1 - b1) * g
    p = p - lr * torch.sign(c)
    m = b2 * m + (1 - b2) * g
    return p, m, c


def assert_lion_close(p, m, ep, em, c, m_in, g_in, lr, b1, msg):
    """Lion's master within fp32 roundings of the float64 reference, except where the sign
    argument c is so close to 0 that fp32 may round it to the other sign (or to 0): there the
    update may be any of -lr, 0, +lr."""
    # c is a sum of two fp32 products and one fp32 sum: 3 roundings of its largest term
    slack = 3 * 2.0**-24 * (b1 * m_in.double().abs() + (1 - b1) * g_in.double().abs())
    ambiguous = c.abs() <= slack
    pd = p.double()
    base = ep + lr * torch.sign(c)  # the decayed weight, before the sign step
    for s in (-1.0, 0.0, 1.0):
        near = (pd - (base - lr * s)).abs() <= 1e-6 * base.abs() + 1e-8
        ep = torch.where(ambiguous & near, pd, ep)
    # three fp32 roundings (decay factor, decay, step) of values up to max(|p|, lr): a few
    # 2^-24 relative, absolute slack where p - lr*sign cancels to near zero
    assert_close(p, ep, rtol=4e-7, atol=1e-8, msg=f"{msg} master")
    # m: two fp32 products and a sum, absolute slack where they cancel
    assert_close(m, em, rtol=4e-7, atol=1e-6, msg=f"{msg} exp_avg")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("grad_dtype", DTYPES)
@pytest.mark.parametrize("model_dtype", [None, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("decoupled", [True, False])
def test_adam_against_float64(n, grad_dtype, model_dtype, decoupled):
    offset = OFFSETS[n % 3]
    p = unaligned(n, torch.float32, offset)
    m = unaligned(n, torch.float32, offset, scale=0.1)
    v = unaligned(n, torch.float32, offset).abs_().mul_(0.01)
    g = unaligned(n, grad_dtype, (offset + 1) % 4, scale=1000.0)
    step = counter(4)
    model = None if model_dtype is None else torch.empty(n + 1, dtype=model_dtype)[1:]
    mult = torch.tensor([1 / 1024.0])
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ep, em, ev = adam_ref(p, m, v, g.double() / 1024.0, 5, 1e-2, 0.9, 0.95, 1e-8, 0.1, decoupled)
    ops.adam_step(p, m, v, g, step, grad_scale=mult, model=model, decoupled=decoupled, **kw)
    assert step.item() == 5
    # Absolute slack: a few fp32 ulps of the largest term (|g| ~ 5), since g + wd*p and the
    # moment updates can cancel to values near zero.
    assert_close(p, ep, rtol=1e-5, atol=1e-6, msg="master")
    assert_close(m, em, rtol=1e-5, atol=2e-6, msg="exp_avg")
    assert_close(v, ev, rtol=1e-5, atol=2e-6, msg="exp_avg_sq")
    if model is not None:
        assert torch.equal(model, p.to(model_dtype)), "model copy is the rounded master"


def sgd_ref(p, buf, g, lr, mom, damp, wd, nesterov, first, maximize=False):
    p, buf, g = (x.double().clone() for x in (p, buf, g))
    if maximize:
        g = -g
    g = g + wd * p
    if mom:
        buf = g.clone() if first else mom * buf + (1 - damp) * g
        g = g + mom * buf if nesterov else buf
    return p - lr * g, buf


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("grad_dtype", DTYPES)
@pytest.mark.parametrize("variant", ["plain", "momentum", "nesterov", "dampening"])
@pytest.mark.parametrize("first", [True, False])
def test_sgd_against_float64(n, grad_dtype, variant, first):
    mom = 0.0 if variant == "plain" else 0.9
    damp = 0.3 if variant == "dampening" else 0.0
    nesterov = variant == "nesterov"
    p = unaligned(n, torch.float32, 1)
    buf = unaligned(n, torch.float32, 3)
    g = unaligned(n, grad_dtype, 0)
    step = counter(0 if first else 3)
    model = torch.empty(n, dtype=torch.bfloat16)
    ep, eb = sgd_ref(p, buf, g, 0.05, mom, damp, 1e-3, nesterov, first)
    ops.sgd_step(p, g, step, lr=0.05, momentum=mom, dampening=damp, weight_decay=1e-3, nesterov=nesterov,
                 momentum_buf=buf if mom else None, model=model)
    # three or four fp32 roundings (decay, momentum, step) of the float64 result; absolute
    # slack where the terms cancel to near zero
    assert_close(p, ep, rtol=1e-6, atol=1e-6, msg="master")
    if mom:
        assert_close(buf, eb, rtol=1e-6, atol=1e-6, msg="momentum")
    assert torch.equal(model, p.to(torch.bfloat16))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("grad_dtype", DTYPES)
@pytest.mark.parametrize("model_dtype", [None, torch.float16, torch.bfloat16])
def test_lion_against_float64(n, grad_dtype, model_dtype):
    offset = OFFSETS[n % 3]
    p = unaligned(n, torch.float32, offset)
    m = unaligned(n, torch.float32, (offset + 2) % 4, scale=0.1)
    g = unaligned(n, grad_dtype, (offset + 1) % 4, scale=100.0)
    p0, m0 = p.clone(), m.clone()
    step = counter(6)
    model = None if model_dtype is None else torch.empty(n + 1, dtype=model_dtype)[1:]
    mult = torch.tensor([1 / 1024.0])
    lr, b1, b2, wd = 1e-2, 0.9, 0.99, 0.1
    gs = g.double() / 1024.0
    ep, em, c = lion_ref(p0, m0, gs, f32(lr), f32(b1), f32(b2), f32(wd))
    ops.lion_step(p, m, g, step, lr=lr, betas=(b1, b2), weight_decay=wd, grad_scale=mult, model=model)
    assert step.item() == 7
    assert_lion_close(p, m, ep, em, c, m0, gs, f32(lr), f32(b1), "lion")
    if model is not None:
        assert torch.equal(model, p.to(model_dtype)), "model copy is the rounded master"


def test_lion_sign_of_zero_is_zero():
    # c = 0.9*m + 0.1*g == 0 exactly: no step but the decay, as torch.sign(0) == 0
    p, m, g = torch.ones(3), torch.zeros(3), torch.tensor([0.0, 1.0, -1.0])
    ops.lion_step(p, m, g, counter(), lr=0.5, betas=(0.9, 0.99))
    assert p.tolist() == [1.0, 0.5, 1.5]


def _torch_optimizer(kind, params, maximize=False):
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, maximize=maximize)
    if kind == "adam":
        return torch.optim.Adam(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, maximize=maximize)
    return torch.optim.SGD(params, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1, maximize=maximize)


@pytest.mark.parametrize("kind", ["adamw", "adam", "sgd"])
@pytest.mark.parametrize("maximize", [False, True])
def test_matches_torch_optim_over_20_steps(kind, maximize):
    n = 10007
    ref = torch.nn.Parameter(torch.randn(n))
    opt = _torch_optimizer(kind, [ref], maximize)
    p = ref.detach().clone()
    m, v, step = torch.zeros(n), torch.zeros(n), counter()
    for _ in range(20):
        g = torch.randn(n)
        ref.grad = g.clone()
        opt.step()
        if kind == "sgd":
            ops.sgd_step(p, g, step, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1, momentum_buf=m,
                         maximize=maximize)
        else:
            ops.adam_step(p, m, v, g, step, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1,
                          decoupled=kind == "adamw", maximize=maximize)
    assert step.item() == 20
    # torch's formulas in another operation order (and torch's double betas against the
    # hyper block's float32 ones in the bias corrections): ulps per step, 20 steps
    assert_close(p, ref.detach(), rtol=1e-5, atol=1e-6, msg=kind)


def test_lion_maximize_is_descent_on_the_negated_gradient():
    n = 4099
    p, m, g = torch.randn(n), torch.randn(n) * 0.1, torch.randn(n)
    runs = []
    for grad, maximize in ((g, True), (-g, False)):
        pp, mm = p.clone(), m.clone()
        ops.lion_step(pp, mm, grad, counter(), lr=1e-2, weight_decay=0.1, maximize=maximize)
        runs.append((pp, mm))
    # -(g x s) == (-g) x s in fp32: the same bits
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    ep, em, c = lion_ref(p, m, g, f32(1e-2), f32(0.9), f32(0.99), f32(0.1), maximize=True)
    assert_lion_close(runs[0][0], runs[0][1], ep, em, c, m, g, f32(1e-2), f32(0.9), "lion maximize")


@pytest.mark.parametrize("n", [1, 4097])
@pytest.mark.parametrize("grad_dtype", DTYPES)
@pytest.mark.parametrize("kind", ["adamw", "adam", "sgd", "lion"])
def test_maximize_against_float64(n, grad_dtype, kind):
    p = unaligned(n, torch.float32, 1)
    m = unaligned(n, torch.float32, 3, scale=0.1)
    v = unaligned(n, torch.float32, 0).abs_().mul_(0.01)
    g = unaligned(n, grad_dtype, 2)
    p0, m0, v0 = p.clone(), m.clone(), v.clone()
    if kind in ("adam", "adamw"):
        ep, em, ev = adam_ref(p0, m0, v0, g, 3, 1e-2, 0.9, 0.95, 1e-8, 0.1, kind == "adamw", maximize=True)
        ops.adam_step(p, m, v, g, counter(2), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, decoupled=kind == "adamw",
                      maximize=True)
        # as test_adam_against_float64
        assert_close(p, ep, rtol=1e-5, atol=1e-6, msg="master")
        assert_close(v, ev, rtol=1e-5, atol=2e-6, msg="exp_avg_sq")
    elif kind == "sgd":
        ep, em = sgd_ref(p0, m0, g, 0.05, 0.9, 0.0, 1e-3, False, False, maximize=True)
        ops.sgd_step(p, g, counter(3), lr=0.05, momentum=0.9, weight_decay=1e-3, momentum_buf=m, maximize=True)
        # as test_sgd_against_float64
        assert_close(p, ep, rtol=1e-6, atol=1e-6, msg="master")
    else:
        ep, em, c = lion_ref(p0, m0, g, f32(1e-2), f32(0.9), f32(0.99), f32(0.1), maximize=True)
        ops.lion_step(p, m, g, counter(), lr=1e-2, weight_decay=0.1, maximize=True)
        assert_lion_close(p, m, ep, em, c, m0, g, f32(1e-2), f32(0.9), "lion")
        return
    # the moment: two or three fp32 roundings, absolute slack where the terms cancel
    assert_close(m, em, rtol=1e-5, atol=2e-6, msg="state1")


@pytest.mark.parametrize("dampening", [0.0, 0.3])
def test_sgd_momentum_zero_with_a_buffer_equals_torch_and_leaves_it(dampening):
    n = 4097
    ref = torch.nn.Parameter(torch.randn(n))
    opt = torch.optim.SGD([ref], lr=0.1, momentum=0.0, dampening=dampening, weight_decay=0.01)
    p, buf, step = ref.detach().clone(), torch.randn(n), counter()
    buf0 = buf.clone()
    for _ in range(3):
        g = torch.randn(n)
        ref.grad = g.clone()
        opt.step()
        ops.sgd_step(p, g, step, lr=0.1, momentum=0.0, dampening=dampening, weight_decay=0.01, momentum_buf=buf)
    assert "momentum_buffer" not in opt.state[ref] or opt.state[ref]["momentum_buffer"] is None
    assert torch.equal(buf.view(torch.int32), buf0.view(torch.int32)), "momentum 0: the buffer is untouched"
    # torch's add(param, alpha=wd) and add_(grad, alpha=-lr): the same two fp32 roundings, 3 steps
    assert_close(p, ref.detach(), rtol=1e-6, atol=1e-7, msg="sgd momentum 0")


def _run(kind, p, m, v, g, step, **kw):
    if kind in ("adamw", "adam"):
        ops.adam_step(p, m, v, g, step, lr=0.5, weight_decay=0.5, decoupled=kind == "adamw", **kw)
    elif kind == "sgd":
        ops.sgd_step(p, g, step, lr=0.5, momentum=0.9, weight_decay=0.5, momentum_buf=m, **kw)
    else:
        ops.lion_step(p, m, g, step, lr=0.5, weight_decay=0.5, **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_flagged_step_leaves_everything_bitwise_unchanged(kind):
    n = 4097
    p, m, v = torch.randn(n), torch.randn(n), torch.rand(n)
    g = torch.randn(n)
    step = counter(7)
    model = p.to(torch.float16)
    before = [x.clone() for x in (p, m, v, step, model)]
    for flag in (torch.tensor([1.0]), torch.tensor([float("nan")])):
        _run(kind, p, m, v, g, step, found_inf=flag, model=model)
        for a, b in zip((p, m, v, step, model), before):
            assert torch.equal(a.view(torch.int8), b.view(torch.int8))
    _run(kind, p, m, v, g, step, found_inf=torch.tensor([0.0]))
    assert step.item() == 8 and not torch.equal(p, before[0])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("grad_dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_nonfinite_gradient_skips_the_step(kind, grad_dtype, bad):
    n = 2**20 + 5
    p, m, v = torch.randn(n), torch.randn(n), torch.rand(n)
    g = unaligned(n, grad_dtype, 1)
    g[n - 3] = bad
    step, model = counter(2**24), p.to(torch.bfloat16)
    before = [x.clone() for x in (p, m, v, step, model)]
    flag, sumsq = torch.zeros(1), torch.zeros(1)
    ops.unscale_check_sumsq(g, flag, sumsq)
    assert flag.item() == 1.0
    _run(kind, p, m, v, g, step, found_inf=flag, model=model, zero_grad=True)
    for a, b in zip((p, m, v, step, model), before):
        assert torch.equal(a.view(torch.int8), b.view(torch.int8)), "a skipped step changes nothing"
    assert bool((g == 0).all()), "the gradient is still cleared when asked"


def test_inf_gradient_without_flag_check_poisons_only_that_element():
    p, m, v = torch.zeros(5), torch.zeros(5), torch.zeros(5)
    g = torch.tensor([1.0, float("inf"), 1.0, float("nan"), -1.0])
    ops.adamw_step(p, m, v, g, counter(), lr=0.1)
    assert p.isfinite().tolist() == [True, False, True, False, True]


@pytest.mark.parametrize("grad_dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("skip", [False, True])
def test_zero_grad_in_the_same_pass(grad_dtype, kind, skip):
    n = 4099
    p, m, v = torch.randn(n), torch.randn(n), torch.rand(n)
    g = unaligned(n, grad_dtype, 1)
    results = []
    for zero in (False, True):
        pp, mm, vv, gg, st = p.clone(), m.clone(), v.clone(), g.clone(), counter(2)
        flag = torch.tensor([1.0 if skip else 0.0])
        _run(kind, pp, mm, vv, gg, st, found_inf=flag, zero_grad=zero)
        results.append((pp, mm, vv, gg, st))
    for a, b in zip(results[0][:3], results[1][:3]):
        assert torch.equal(a, b), "clearing the gradient must not change the update"
    assert torch.equal(results[0][3], g), "zero_grad=False leaves the gradient alone"
    assert bool((results[1][3] == 0).all()), "zero_grad=True clears it, skipped step or not"
    assert results[1][4].item() == (2 if skip else 3)


@pytest.mark.parametrize("kind", KINDS)
def test_step_counter_is_exact_past_2_24(kind, device="cpu"):
    p, m, v, g = (torch.rand(8, device=device) for _ in range(4))
    step = counter(2**24, device)
    _run(kind, p, m, v, g, step)
    assert step.item() == 2**24 + 1, "a float32 count would stay at 2**24"
    step.fill_(2**31 + 5)
    _run(kind, p, m, v, g, step)
    assert step.item() == 2**31 + 6


def test_advance_step_false_leaves_the_counter():
    C = _native._C
    n = 16
    p, m, v, g, hyper = torch.zeros(n), torch.zeros(n), torch.zeros(n), torch.ones(n), torch.zeros(C.HYPER_SLOTS)
    names = next(o for o in C.OPTIMIZERS if o["name"] == "adamw")["hyper"]
    for name, value in dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8).items():
        hyper[names.index(name)] = value
    step = counter(41)
    a = C.OptimizerArgs()
    a.master, a.state1, a.state2, a.grad, a.n = p.data_ptr(), m.data_ptr(), v.data_ptr(), g.data_ptr(), n
    a.step, a.hyper, a.advance_step = step.data_ptr(), hyper.data_ptr(), False
    C.adamw_step(a, 0)
    assert step.item() == 41 and bool((p != 0).all())


# ----------------------------------------------------------------------------------------
# bias corrections: torch's float64 formula, rounded to float32 once

BC_STEPS = [1, 2, 3, 10, 1000, 2**24 - 1, 2**24, 2**24 + 1, 2**31 + 5]


def ulps(a, b):
    """Distance in float32 units in the last place (same-sign values)."""
    ia, ib = np.float32(a).view(np.int32).astype(np.int64), np.float32(b).view(np.int32).astype(np.int64)
    return abs(int(ia) - int(ib))


def torch_bias_terms(lr, beta1, beta2, step):
    """torch.optim.Adam's Python-float step_size and bias_correction2_sqrt: in double, from
    the betas as the user wrote them (the core's hyper block holds them as doubles)."""
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    return lr / bc1, math.sqrt(bc2)


def one_step_coefficients(beta1, beta2, step, device="cpu", lr=1e-3, kind="adamw"):
    """(step_size, bias_correction2_sqrt) as one Adam step on crafted inputs reveals them.

    m = v = g = 1, beta in [0.5, 1) or 0: m and v stay exactly 1 (b + (1 - b) == 1 in fp32),
    eps = 0 and p = 0, so p_new = -step_size / (1 / bc2_sqrt) exactly when beta2 == 0 (the
    step size itself) and -lr * (1 / (1 / bc2_sqrt)) when beta1 == 0.
    """
    p, m, v, g = torch.zeros(4, device=device), *(torch.ones(4, device=device) for _ in range(3))
    st = counter(step - 1, device)
    ops.adam_step(p, m, v, g, st, lr=lr, betas=(beta1, beta2), eps=0.0, decoupled=kind == "adamw")
    assert st.item() == step
    assert m.eq(1).all() and v.eq(1).all(), "the crafted moments stay exactly 1"
    return -p[0].item()


@pytest.mark.parametrize("beta1", [0.9, 0.999])
@pytest.mark.parametrize("kind", ["adamw", "adam"])
def test_step_size_matches_torchs_double_formula(beta1, kind, device="cpu"):
    for step in BC_STEPS:
        want, _ = torch_bias_terms(1e-3, beta1, 0.0, step)
        got = one_step_coefficients(beta1, 0.0, step, device, kind=kind)
        # one rounding of the double lr / (1 - beta1**step) into float32; 1 ulp for the
        # last bit of a libm (or CUDA) pow
        assert ulps(got, want) <= 1, (step, got, want)


@pytest.mark.parametrize("beta2", [0.99, 0.999])
def test_bias_correction2_matches_torchs_double_formula(beta2, device="cpu"):
    for step in BC_STEPS:
        _, want = torch_bias_terms(1.0, 0.0, beta2, step)
        got = one_step_coefficients(0.0, beta2, step, device, lr=1.0)
        # float32(sqrt(1 - beta2**step)) then two fp32 reciprocals (sqrt(v)/bc2_sqrt, m/denom):
        # 2 ulps
        assert ulps(got, want) <= 2, (step, got, want)


def test_the_bias_correction_test_rejects_the_fp32_formula():
    """The fp32 formula the core used to have, 1 - powf(beta, step), misses by far more than
    the 2 ulps the tests above allow (here at step 2): those tests would catch it."""
    for step in (2, 3):
        _, want = torch_bias_terms(1.0, 0.0, 0.999, step)
        old = np.sqrt(np.float32(1) - np.power(np.float32(0.999), np.float32(step)))
        assert ulps(old, want) > 8, (step, old, want)
