"""Fused Adam / AdamW / SGD against float64 references and torch.optim, and flag-and-skip."""
import pytest
import torch

from conftest import DTYPES, OFFSETS, SIZES, assert_close, unaligned
from pyengine import ops


def adam_ref(p, m, v, g, step, lr, b1, b2, eps, wd, decoupled):
    p, m, v, g = (x.double().clone() for x in (p, m, v, g))
    if decoupled:
        p *= 1 - lr * wd
    else:
        g = g + wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    bc1, bc2 = 1 - b1**step, 1 - b2**step
    p = p - (lr / bc1) * m / (v.sqrt() / bc2**0.5 + eps)
    return p, m, v


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
    step = torch.tensor([4.0])
    model = None if model_dtype is None else torch.empty(n + 1, dtype=model_dtype)[1:]
    mult = torch.tensor([1 / 1024.0])
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ep, em, ev = adam_ref(p, m, v, g.double() / 1024.0, 5, 1e-2, 0.9, 0.95, 1e-8, 0.1, decoupled)
    ops.adam_step(p, m, v, g, step, grad_scale=mult, model=model, decoupled=decoupled, **kw)
    assert step.item() == 5.0
    # Absolute slack: a few fp32 ulps of the largest term (|g| ~ 5), since g + wd*p and the
    # moment updates can cancel to values near zero.
    assert_close(p, ep, rtol=1e-5, atol=1e-6, msg="master")
    assert_close(m, em, rtol=1e-5, atol=2e-6, msg="exp_avg")
    assert_close(v, ev, rtol=1e-5, atol=2e-6, msg="exp_avg_sq")
    if model is not None:
        assert torch.equal(model, p.to(model_dtype)), "model copy is the rounded master"


def sgd_ref(p, buf, g, lr, mom, damp, wd, nesterov, first):
    p, buf, g = (x.double().clone() for x in (p, buf, g))
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
    step = torch.tensor([0.0 if first else 3.0])
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


def _torch_optimizer(kind, params):
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    if kind == "adam":
        return torch.optim.Adam(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    return torch.optim.SGD(params, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1)


@pytest.mark.parametrize("kind", ["adamw", "adam", "sgd"])
def test_matches_torch_optim_over_20_steps(kind):
    n = 10007
    ref = torch.nn.Parameter(torch.randn(n))
    opt = _torch_optimizer(kind, [ref])
    p = ref.detach().clone()
    m, v, step = torch.zeros(n), torch.zeros(n), torch.zeros(1)
    for _ in range(20):
        g = torch.randn(n)
        ref.grad = g.clone()
        opt.step()
        if kind == "sgd":
            ops.sgd_step(p, g, step, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1, momentum_buf=m)
        else:
            ops.adam_step(p, m, v, g, step, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1,
                          decoupled=kind == "adamw")
    # torch's formulas in another operation order: ulps per step, 20 steps
    assert_close(p, ref.detach(), rtol=1e-5, atol=1e-6, msg=kind)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_flagged_step_leaves_everything_bitwise_unchanged(kind):
    n = 4097
    p, m, v = torch.randn(n), torch.randn(n), torch.rand(n)
    g = torch.randn(n)
    step = torch.tensor([7.0])
    model = p.to(torch.float16)
    before = [x.clone() for x in (p, m, v, step, model)]
    flag = torch.tensor([1.0])
    if kind == "adamw":
        ops.adamw_step(p, m, v, g, step, lr=1.0, weight_decay=0.5, found_inf=flag, model=model)
    else:
        ops.sgd_step(p, g, step, lr=1.0, momentum=0.9, momentum_buf=m, found_inf=flag, model=model)
    for a, b in zip((p, m, v, step, model), before):
        assert torch.equal(a.view(torch.int8), b.view(torch.int8))
    flag.zero_()
    ops.adamw_step(p, m, v, g, step, lr=1.0, found_inf=flag)
    assert step.item() == 8.0 and not torch.equal(p, before[0])


def test_inf_gradient_without_flag_check_poisons_only_that_element():
    p, m, v = torch.zeros(5), torch.zeros(5), torch.zeros(5)
    g = torch.tensor([1.0, float("inf"), 1.0, float("nan"), -1.0])
    ops.adamw_step(p, m, v, g, torch.zeros(1), lr=0.1)
    assert p.isfinite().tolist() == [True, False, True, False, True]


@pytest.mark.parametrize("grad_dtype", DTYPES)
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
@pytest.mark.parametrize("skip", [False, True])
def test_zero_grad_in_the_same_pass(grad_dtype, kind, skip):
    n = 4099
    p, m, v = torch.randn(n), torch.randn(n), torch.rand(n)
    g = unaligned(n, grad_dtype, 1)
    results = []
    for zero in (False, True):
        pp, mm, vv, gg, st = p.clone(), m.clone(), v.clone(), g.clone(), torch.tensor([2.0])
        flag = torch.tensor([1.0 if skip else 0.0])
        if kind == "adamw":
            ops.adamw_step(pp, mm, vv, gg, st, lr=0.1, found_inf=flag, zero_grad=zero)
        else:
            ops.sgd_step(pp, gg, st, lr=0.1, momentum=0.9, momentum_buf=mm, found_inf=flag, zero_grad=zero)
        results.append((pp, mm, vv, gg, st))
    for a, b in zip(results[0][:3], results[1][:3]):
        assert torch.equal(a, b), "clearing the gradient must not change the update"
    assert torch.equal(results[0][3], g), "zero_grad=False leaves the gradient alone"
    assert bool((results[1][3] == 0).all()), "zero_grad=True clears it, skipped step or not"
    assert results[1][4].item() == (2.0 if skip else 3.0)
