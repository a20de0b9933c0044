"""p.grad under PyTorch habits: zero_grad() in every form, p.grad = None, clip_grad_norm_,
reading gradients, in fp32, bf16 and fp16, in one process (2 ranks: test_ddp_habits.py)."""
import copy

import pytest
import torch

import pyengine
import torch.nn.functional as F

from conftest import assert_close
from pyengine import Engine, EngineConfig
from pyengine.grads import EngineGrad, GradientAccessError

PRECISIONS = ["fp32", "bf16", "fp16"]
DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))


def data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 8, generator=g), torch.randn(4, 2, generator=g)) for _ in range(n)]


def train(precision, habit=None, steps=6, accum=1, **cfg):
    """Trains with an ordinary PyTorch habit inserted at the top of every micro-batch."""
    m = model()
    cfg.setdefault("initial_loss_scale", 2.0**8)  # small enough that no fp16 step overflows
    e = Engine(m, EngineConfig(precision=precision, optimizer="adamw", lr=1e-2, grad_accum_steps=accum, **cfg))
    opt = e.optimizer
    for x, y in data(steps * accum):
        if habit is not None:
            habit(m, opt)
        dt = DTYPE[precision]
        e.backward(F.mse_loss(m(x.to(dt)), y.to(dt)))
        e.step()
    return m, e


HABITS = {
    "model.zero_grad()": lambda m, opt: m.zero_grad(),
    "model.zero_grad(set_to_none=False)": lambda m, opt: m.zero_grad(set_to_none=False),
    "optimizer.zero_grad()": lambda m, opt: opt.zero_grad(),
    "optimizer.zero_grad(set_to_none=False)": lambda m, opt: opt.zero_grad(set_to_none=False),
    "p.grad = None": lambda m, opt: setattr(m[0].weight, "grad", None),
    "torch optimizer's zero_grad": lambda m, opt: torch.optim.SGD(m.parameters(), lr=0.1).zero_grad(),
}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("habit", list(HABITS))
def test_clearing_before_backward_trains_exactly_as_without(precision, habit):
    ref, e_ref = train(precision)
    got, e = train(precision, HABITS[habit])
    start = model()
    for (name, a), b, s in zip(got.named_parameters(), ref.parameters(), start.parameters()):
        assert torch.equal(a, b), f"{habit} changed training of {name}"
        assert not torch.equal(a.float(), s.float()), f"{name} never moved: the gradient was lost"
    assert e.global_step == 6
    for p, h in zip(e.params, e.grads.handles):
        assert p.grad is h, "p.grad is attached again after every backward"


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("set_to_none", [True, False])
def test_clearing_mid_window_discards_the_earlier_micro_batches_as_pytorch_does(precision, set_to_none):
    """PyTorch: zero_grad() between two backward()s keeps only the second gradient."""
    dt = DTYPE[precision]
    batches = data(4)
    runs = []
    for clear in (True, False):
        m = model()
        e = Engine(m, EngineConfig(precision=precision, lr=1e-2, grad_accum_steps=2))
        for k, (x, y) in enumerate(batches):
            if clear and k % 2 == 1:
                m.zero_grad(set_to_none=set_to_none)
            loss = F.mse_loss(m(x.to(dt)), y.to(dt))
            e.backward(loss if clear or k % 2 == 1 else loss * 0.0)  # reference: the first micro-batch weighs 0
            e.step()
        runs.append(m)
    for a, b in zip(runs[0].parameters(), runs[1].parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_clearing_between_backward_and_step_raises(precision):
    m = model()
    e = Engine(m, EngineConfig(precision=precision))
    x, y = data(1)[0]
    dt = DTYPE[precision]
    e.backward(F.mse_loss(m(x.to(dt)), y.to(dt)))
    m.zero_grad()
    with pytest.raises(RuntimeError, match=r"cleared between engine.backward\(\) and engine.step\(\).*before backward"):
        e.step()


def test_clip_grad_norm_in_fp32_works_exactly_as_in_pytorch():
    m, ref = model(), model()
    e = Engine(m, EngineConfig(precision="fp32", lr=1e-2))
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0)
    for x, y in data(6):
        e.backward(F.mse_loss(m(x), y))
        got_norm = torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)
        e.step()
        opt.zero_grad()
        F.mse_loss(ref(x), y).backward()
        want_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        opt.step()
        # the same fp32 gradients summed in another order: a few ulps of the norm
        assert_close(got_norm, want_norm, rtol=1e-6, atol=0, msg="norm clip_grad_norm_ returned")
    for a, b in zip(m.parameters(), ref.parameters()):
        # AdamW in fp32 on identical gradients: rounding of ~10 fused operations per step, 6 steps
        assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6, msg="weights")


@pytest.mark.parametrize("precision,accum_dtype,why", [
    ("bf16", "fp32", "fp32 main-grad buffer"), ("fp16", "fp32", "fp32 main-grad buffer"),
    ("fp16", "param", "fp16 loss scale"),
])
def test_clip_grad_norm_where_grads_are_not_final_raises(precision, accum_dtype, why):
    m = model()
    e = Engine(m, EngineConfig(precision=precision, accum_dtype=accum_dtype, initial_loss_scale=2.0**8))
    x, y = data(1)[0]
    dt = DTYPE[precision]
    e.backward(F.mse_loss(m(x.to(dt)), y.to(dt)))
    with pytest.raises(GradientAccessError, match=rf"{why}.*EngineConfig\(clip_grad_norm=\.\.\.\)"):
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    with pytest.raises(GradientAccessError, match=r"\.grad of 0\.weight"):
        m[0].weight.grad.sum()
    assert e.step(), "the refused call changed nothing: the step still applies"


def test_reading_grads_in_fp32_gives_the_true_gradient():
    m, ref = model(), model()
    e = Engine(m, EngineConfig(precision="fp32", grad_accum_steps=2))
    for x, y in data(2):
        e.backward(F.mse_loss(m(x), y))
        (F.mse_loss(ref(x), y) / 2).backward()
        for a, b in zip(m.parameters(), ref.parameters()):
            assert isinstance(a.grad, EngineGrad)
            # the engine's loss is divided by 2 after the fp32 product, torch's before: ulps
            assert_close(a.grad.detach().clone(), b.grad, rtol=1e-6, atol=1e-7, msg="accumulated grad")
        e.step()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", [torch.optim.SGD, torch.optim.AdamW])
def test_another_optimizer_step_is_refused_before_it_writes(precision, kind):
    """In fp32 p.grad holds the true gradient, so another optimizer could run: it would move
    the weights beside the engine's update. Refused at its step(), every precision."""
    m = model()
    e = Engine(m, EngineConfig(precision=precision))
    other = kind(m.parameters(), lr=0.1)
    x, y = data(1)[0]
    dt = torch.bfloat16 if precision == "bf16" else torch.float32
    e.backward(F.mse_loss(m(x.to(dt)), y.to(dt)))
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(pyengine.UsageError, match=r"engine.step\(\) alone"):
        other.step()
    assert all(torch.equal(a, p) for a, p in zip(before, m.parameters())), "nothing written"
    assert e.step(), "the engine goes on"
    e.close()
    other.step()  # parameters no engine trains any more: torch's business


def test_engine_optimizer_step_alone_raises():
    m = model()
    e = Engine(m, EngineConfig())
    x, y = data(1)[0]
    e.backward(F.mse_loss(m(x), y))
    with pytest.raises(RuntimeError, match=r"part of engine.step\(\)"):
        e.optimizer.step()
    assert e.step()


def test_global_step_counts_updates_with_an_empty_first_group():
    m = model()
    groups = [{"params": [], "lr": 0.5}, {"params": list(m.parameters())}]
    e = Engine(m, EngineConfig(lr=1e-2), param_groups=groups)
    for x, y in data(3):
        e.backward(F.mse_loss(m(x), y))
        e.step()
    assert e.global_step == 3


def test_fp16_global_step_excludes_skips():
    m = model()
    e = Engine(m, EngineConfig(precision="fp16", hysteresis=1, initial_loss_scale=2.0**8))
    for k, (x, y) in enumerate(data(4)):
        loss = F.mse_loss(m(x.half()), y.half())
        e.backward(loss * float("inf") if k == 1 else loss)
        e.step()
    assert (e.boundary_steps, e.skipped_steps, e.global_step) == (4, 1, 3)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_grad_norm_equals_torch_clip_grad_norm(precision):
    """engine.grad_norm is the norm of the unscaled gradient (what clip_grad_norm_ returns)."""
    m = model()
    e = Engine(m, EngineConfig(precision=precision, accum_dtype="param", clip_grad_norm=1.0,
                               initial_loss_scale=2.0**12))
    ref = copy.deepcopy(m)  # the engine's weights, in the engine's precision
    for p in ref.parameters():
        p.grad = None
    x, y = data(1)[0]
    dt = DTYPE[precision]
    e.backward(F.mse_loss(m(x.to(dt)), y.to(dt)))
    e.step()
    F.mse_loss(ref(x.to(dt)), y.to(dt)).backward()
    want = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0).float())
    # fp32: summation order only; half: each gradient rounds to 8 (bf16) / 11 (fp16) bits in
    # both runs, at magnitudes a loss-scale apart, so the norms agree to a few such ulps
    rtol = {"fp32": 1e-6, "bf16": 2**-6, "fp16": 2**-9}[precision]
    assert e.grad_norm == pytest.approx(want, rel=rtol)


def test_model_weights_written_after_engine_are_trained_from():
    """model.load_state_dict(...) after Engine(...): the next update starts from the loaded weights."""
    m = model()
    e = Engine(m, EngineConfig(precision="bf16", lr=0.0))  # lr 0: an update keeps the weights
    loaded = {k: v.float() + 1.0 for k, v in model(seed=5).state_dict().items()}
    m.load_state_dict(loaded)
    x, y = data(1)[0]
    e.backward(F.mse_loss(m(x.bfloat16()), y.bfloat16()))
    e.step()
    for k, v in m.state_dict().items():
        assert torch.equal(v, loaded[k].bfloat16()), k


def test_model_moved_after_engine_is_a_clear_error():
    m = model()
    e = Engine(m, EngineConfig())
    m[0].weight.data = m[0].weight.data.clone()
    x, y = data(1)[0]
    e.backward(F.mse_loss(m(x), y))
    with pytest.raises(RuntimeError, match=r"0\.weight no longer lives in the engine's buffers"):
        e.step()


def test_scheduler_writes_a_bad_lr_clear_error():
    m = model()
    e = Engine(m, EngineConfig())
    e.optimizer.param_groups[0]["lr"] = float("nan")
    x, y = data(1)[0]
    e.backward(F.mse_loss(m(x), y))
    with pytest.raises(ValueError, match=r"param_groups\[0\]: lr: must not be NaN"):
        e.step()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_casting_the_model_after_engine_raises_at_the_call(precision):
    m = model()
    e = Engine(m, EngineConfig(precision=precision))  # noqa: F841 (kept alive: it trains the model)
    m.to("cpu")  # already there: a no-op, allowed
    with pytest.raises(RuntimeError, match=r"moved or cast .* after Engine\(\.\.\.\)"):
        m.double()
