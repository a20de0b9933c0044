"""Actions a PyTorch user takes that once changed training without a word: each now works as
in PyTorch (compared step by step with torch.optim) or raises UsageError at the call."""
import io
import zipfile

import pytest
import torch
import torch.nn.functional as F

import pyengine
from pyengine import Engine, EngineConfig

# Tolerance of the fp32 comparisons: both sides run the same fp32 formulas with a few
# different roundings per element and step (torch.optim's lerp/addcdiv against the fused
# expression), so weights agree to a few ulps of their size per step taken.
RTOL, ATOL = 2e-6, 1e-7


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def pair(seed=0):
    return mlp(seed), mlp(seed)


def data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)) for _ in range(n)]


def close(a, b, what):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=RTOL, atol=ATOL, msg=f"{what}: {n}")


def torch_step(model, opt, x, y):
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    opt.step()


def engine_step(model, engine, x, y):
    engine.backward(F.mse_loss(model(x), y))
    return engine.step()


# -- row 1: momentum set after the Engine was built -------------------------------------------------
@pytest.mark.parametrize("dampening", [0.0, 0.3])
def test_momentum_turned_on_later_applies_as_in_torch(dampening):
    m, ref = pair()
    e = Engine(m, EngineConfig(optimizer="sgd", lr=0.05, dampening=dampening))
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, dampening=dampening)
    for k, (x, y) in enumerate(data(7)):
        if k == 2:
            for o in (e.optimizer, opt):
                o.param_groups[0]["momentum"] = 0.9
        if k == 5:  # momentum off again: the buffer stays, the plain gradient steps
            for o in (e.optimizer, opt):
                o.param_groups[0]["momentum"] = 0.0
        engine_step(m, e, x, y)
        torch_step(ref, opt, x, y)
        close(m, ref, f"step {k}")
    theirs = opt.state_dict()["state"]
    mine = e.optimizer.state_dict()["state"]
    for k in theirs:
        torch.testing.assert_close(mine[k]["momentum_buffer"], theirs[k]["momentum_buffer"], rtol=RTOL, atol=ATOL)


def test_one_cycle_lr_with_cycle_momentum_drives_sgd_momentum():
    m, ref = pair()
    e = Engine(m, EngineConfig(optimizer="sgd", lr=0.05))
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    s1 = torch.optim.lr_scheduler.OneCycleLR(e.optimizer, max_lr=0.1, total_steps=10, cycle_momentum=True)
    s2 = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10, cycle_momentum=True)
    for k, (x, y) in enumerate(data(8)):
        engine_step(m, e, x, y)
        torch_step(ref, opt, x, y)
        s1.step()
        s2.step()
        close(m, ref, f"step {k}")
    assert e.optimizer.param_groups[0]["momentum"] == opt.param_groups[0]["momentum"] > 0


# -- row 2: optimizer.zero_grad() between backward and the updating step ------------------------------
def test_optimizer_zero_grad_to_none_before_the_update_raises_at_the_call():
    m = mlp()
    e = Engine(m, EngineConfig())
    (x, y), = data(1)
    e.backward(F.mse_loss(m(x), y))
    before = e.flat.grad_flat.clone()
    with pytest.raises(pyengine.UsageError, match="skip every parameter"):
        e.optimizer.zero_grad()
    assert torch.equal(e.flat.grad_flat, before), "nothing cleared"
    assert e.step(), "the step goes on with the gradient it had"


def test_zero_grad_without_none_before_the_update_steps_with_zeros_as_torch():
    m, ref = pair()
    e = Engine(m, EngineConfig(weight_decay=0.1, lr=0.1))
    opt = torch.optim.AdamW(ref.parameters(), lr=0.1, weight_decay=0.1)
    for k, (x, y) in enumerate(data(4)):
        e.backward(F.mse_loss(m(x), y))
        F.mse_loss(ref(x), y).backward()
        if k == 2:
            e.optimizer.zero_grad(set_to_none=False)
            opt.zero_grad(set_to_none=False)
        e.step()
        opt.step()
        opt.zero_grad()
        close(m, ref, f"step {k}")


def test_zero_grad_inside_an_accumulation_window_discards_as_torch():
    m, ref = pair()
    e = Engine(m, EngineConfig(lr=0.1, grad_accum_steps=3))
    opt = torch.optim.AdamW(ref.parameters(), lr=0.1, weight_decay=0.0)
    xs = data(6)
    for k, (x, y) in enumerate(xs):
        e.backward(F.mse_loss(m(x), y))
        F.mse_loss(ref(x), y).div(3).backward()
        if k % 3 == 0:  # after the first micro-batch, before its (non-boundary) step
            e.optimizer.zero_grad()
            opt.zero_grad()
        e.step()
        if k % 3 == 2:
            opt.step()
            opt.zero_grad()
    close(m, ref, "after two windows")


# -- rows 4 and 6: parameters torch.optim skips ------------------------------------------------------
def test_layer_frozen_after_build_is_left_alone_and_keeps_its_step_count():
    m, ref = pair()
    e = Engine(m, EngineConfig(lr=0.05, weight_decay=0.1))
    opt = torch.optim.AdamW(ref.parameters(), lr=0.05, weight_decay=0.1)
    for k, (x, y) in enumerate(data(9)):
        if k == 2:
            m[0].requires_grad_(False)
            ref[0].requires_grad_(False)
        if k == 5:
            m[0].requires_grad_(True)
            ref[0].requires_grad_(True)
        engine_step(m, e, x, y)
        torch_step(ref, opt, x, y)
        close(m, ref, f"step {k}")
    steps = [float(v["step"]) for v in e.optimizer.state_dict()["state"].values()]
    assert steps == [float(v["step"]) for v in opt.state_dict()["state"].values()] == [6, 6, 9, 9]


class Unused(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(6, 3)
        self.b = torch.nn.Linear(6, 3)  # used only on odd steps

    def forward(self, x, use_b=False):
        return self.a(x) + (self.b(x) if use_b else 0)


def test_parameter_without_gradient_is_untouched_as_in_torch():
    m, ref = Unused(), Unused()
    e = Engine(m, EngineConfig(lr=0.05, weight_decay=0.1))
    opt = torch.optim.AdamW(ref.parameters(), lr=0.05, weight_decay=0.1)
    for k, (x, y) in enumerate(data(6)):
        e.backward(F.mse_loss(m(x, use_b=k % 2 == 1), y))
        e.step()
        opt.zero_grad()
        F.mse_loss(ref(x, use_b=k % 2 == 1), y).backward()
        opt.step()
        close(m, ref, f"step {k}")
    assert [float(v["step"]) for v in e.optimizer.state_dict()["state"].values()] == [6, 6, 3, 3]


# -- row 5: unfreezing what the engine does not hold --------------------------------------------------
def test_unfreezing_a_layer_frozen_at_build_raises_naming_it():
    m = mlp()
    m[0].requires_grad_(False)
    e = Engine(m, EngineConfig())
    (x, y), = data(1)
    engine_step(m, e, x, y)
    m[0].requires_grad_(True)
    with pytest.raises(pyengine.UsageError, match=r"0\.weight was frozen .* when the Engine was built"):
        e.backward(F.mse_loss(m(x), y))


def test_frozen_parameter_listed_in_param_groups_trains_once_unfrozen():
    m, ref = pair()
    for model in (m, ref):
        model[0].requires_grad_(False)
    e = Engine(m, EngineConfig(lr=0.05), param_groups=[{"params": list(m.parameters())}])
    opt = torch.optim.AdamW(ref.parameters(), lr=0.05, weight_decay=0.0)
    for k, (x, y) in enumerate(data(6)):
        if k == 3:
            m[0].requires_grad_(True)
            ref[0].requires_grad_(True)
        engine_step(m, e, x, y)
        torch_step(ref, opt, x, y)
        close(m, ref, f"step {k}")


# -- row 7: a refused cast leaves the model as it was --------------------------------------------------
class Conv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(2, 3, 3)
        self.norm = torch.nn.BatchNorm2d(3)
        self.head = torch.nn.Linear(3 * 4 * 4, 2)

    def forward(self, x):
        return self.head(self.norm(self.conv(x)).flatten(1))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("cast", [lambda m: m.to(memory_format=torch.channels_last), lambda m: m.half(),
                                  lambda m: m.double()])
def test_refused_module_cast_leaves_the_model_as_it_was(cast, precision):
    m = Conv()
    e = Engine(m, EngineConfig(precision=precision))  # bf16: p.grad is the fp32-main-grad placeholder
    x = torch.randn(2, 2, 6, 6).to(torch.bfloat16 if precision == "bf16" else torch.float32)
    e.backward(m(x).square().mean())
    e.step()
    tensors = list(m.parameters()) + list(m.buffers())
    before = [(t.data_ptr(), t.stride(), t.dtype, t.detach().clone()) for t in tensors]
    with pytest.raises(pyengine.UsageError, match="moved or cast"):
        cast(m)
    after = list(m.parameters()) + list(m.buffers())
    for (ptr, stride, dtype, values), t in zip(before, after):
        assert (t.data_ptr(), t.stride(), t.dtype) == (ptr, stride, dtype)
        assert torch.equal(t.detach(), values)
    for _ in range(17):  # past the engine's periodic placement check: every weight still trains
        e.backward(m(x).square().mean())
        e.step()
    assert not torch.equal(m.conv.weight.detach(), before[0][3])


# -- rows 8 and 9: checkpoints of another precision -----------------------------------------------------
def test_fp16_checkpoint_into_fp32_engine_imports_no_loss_scale(tmp_path):
    src = mlp()
    e16 = Engine(src, EngineConfig(precision="fp16", initial_loss_scale=2.0**16))
    (x, y), = data(1)
    e16.backward(F.mse_loss(src(x.half()), y.half()))
    e16.step()
    e16.save(tmp_path / "c16")
    m = mlp()
    e = Engine(m, EngineConfig(precision="fp32"))
    e.load(tmp_path / "c16")
    assert e.loss_scale == 1.0
    e.backward(F.mse_loss(m(x), y))
    ref = mlp()
    ref.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
    F.mse_loss(ref(x), y).backward()
    torch.testing.assert_close(m[2].bias.grad.clone(), ref[2].bias.grad, rtol=1e-6, atol=1e-7)


def test_bf16_checkpoint_into_fp16_engine_keeps_its_own_loss_scale(tmp_path):
    src = mlp()
    e_bf = Engine(src, EngineConfig(precision="bf16"))
    (x, y), = data(1)
    e_bf.backward(F.mse_loss(src(x.bfloat16()), y.bfloat16()))
    e_bf.step()
    e_bf.save(tmp_path / "cbf")
    e = Engine(mlp(), EngineConfig(precision="fp16", initial_loss_scale=2.0**12))
    e.load(tmp_path / "cbf")
    assert e.loss_scale == 2.0**12
    assert e.global_step == 1 and e.skipped_steps == 0


def test_fp16_checkpoint_into_fp16_engine_keeps_the_scale(tmp_path):
    src = mlp()
    e16 = Engine(src, EngineConfig(precision="fp16", initial_loss_scale=2.0**10, loss_scale_window=1))
    (x, y), = data(1)
    e16.backward(F.mse_loss(src(x.half()), y.half()))
    e16.step()  # a clean step with window 1: the scale grows
    grown = e16.loss_scale
    sd = e16.state_dict()
    e = Engine(mlp(), EngineConfig(precision="fp16", initial_loss_scale=2.0**4))
    e.load_state_dict(sd)
    assert e.loss_scale == grown == 2.0**11


# -- row 10: torch.optim group entries the kernels do not implement ----------------------------------------
def test_amsgrad_is_refused_by_name_at_build_and_when_set_later():
    m = mlp()
    with pytest.raises(ValueError, match="amsgrad=True is not supported"):
        Engine(m, EngineConfig(), param_groups=[{"params": list(m.parameters()), "amsgrad": True}])
    e = Engine(m, EngineConfig())
    assert e.optimizer.param_groups[0]["amsgrad"] is False, "torch.optim's entries are there"
    e.optimizer.param_groups[0]["amsgrad"] = True
    (x, y), = data(1)
    e.backward(F.mse_loss(m(x), y))
    with pytest.raises(ValueError, match="amsgrad=True is not supported"):
        e.step()


# -- row 13: saving a submodule writes that submodule ------------------------------------------------------
def test_submodule_state_dict_saves_its_own_bytes():
    m, ref = pair()
    e = Engine(m, EngineConfig())  # noqa: F841 (kept alive: it trains the model)
    stored = []
    for model in (m, ref):
        with zipfile.ZipFile(io.BytesIO(_saved(model[2].state_dict()))) as z:
            stored.append(sorted((i.filename.split("/", 1)[1], i.file_size) for i in z.infolist()
                                 if "/data/" in i.filename))
    assert stored[0] == stored[1] == [("data/0", 8 * 3 * 4), ("data/1", 3 * 4)], stored  # torch's bytes, no more
    sd = m[2].state_dict()
    sd["bias"].fill_(3.0)  # a state dict's tensors still alias the model, as in PyTorch
    assert torch.equal(m[2].bias.detach(), torch.full((3,), 3.0))
    loaded = torch.load(io.BytesIO(_saved(m[2].state_dict())))
    assert type(loaded["weight"]) is torch.Tensor and loaded["weight"].untyped_storage().nbytes() == 8 * 3 * 4


def _saved(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# -- rows 11 and 12: exact step counts, bias corrections as torch's float64 formula ---------------------
def test_step_counts_past_two_to_the_24_stay_exact():
    m, ref = pair()
    e = Engine(m, EngineConfig(lr=1e-3))
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.0)
    (x, y), = data(1)
    torch_step(ref, opt, x, y)
    sd = opt.state_dict()
    big = 2**24 + 3
    for v in sd["state"].values():
        v["step"] = torch.tensor(float(big), dtype=torch.float64)  # float32 could not hold it
    e.optimizer.load_state_dict(sd)
    for _ in range(3):
        engine_step(m, e, x, y)
    steps = [v["step"] for v in e.optimizer.state_dict()["state"].values()]
    assert all(s.dtype == torch.float64 and int(s) == big + 3 for s in steps), steps  # a float32 count stalls at 2**24
    assert e.boundary_steps == 3 and e.scalars.boundaries.dtype == torch.int64


@pytest.mark.parametrize("kind", ["adamw", "adam"])
def test_adam_with_a_large_lr_matches_torch_to_ulps(kind):
    """lr = 1 makes each update as large as the weights, so a relative error of the step size
    shows in the weights: the bias corrections in fp32 (1 - powf(beta, step)) were 1.7e-6
    off at step 2, 1 - beta2 in fp32 1.3e-5 off. Both sides now round the same double
    scalars once; the fused expression and torch's lerp/addcdiv differ by a few roundings of
    the update (lr x ~1) per step."""
    m, ref = pair()
    e = Engine(m, EngineConfig(optimizer=kind, lr=1.0, betas=(0.9, 0.999), weight_decay=0.01))
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    opt = cls(ref.parameters(), lr=1.0, betas=(0.9, 0.999), weight_decay=0.01)
    for k, (x, y) in enumerate(data(4)):
        engine_step(m, e, x, y)
        torch_step(ref, opt, x, y)
        for p, q in zip(m.parameters(), ref.parameters()):
            err = (p.detach() - q.detach()).abs().max().item()
            assert err <= 16 * 2**-24 * (k + 1), f"step {k}: {err / 2**-24:.1f} units of lr"
        ref.load_state_dict(m.state_dict())  # lockstep: each step is compared from the same weights
        mine = e.optimizer.state_dict()
        for st, theirs in zip(mine["state"].values(), opt.state_dict()["state"].values()):
            theirs["exp_avg"].copy_(st["exp_avg"])
            theirs["exp_avg_sq"].copy_(st["exp_avg_sq"])


# -- Lion, added through the core's registry -------------------------------------------------------------
def lion_reference(params, grads, state, lr, betas, wd):
    """The formula of lion-pytorch, in torch ops."""
    for p, g in zip(params, grads):
        m = state.setdefault(id(p), torch.zeros_like(p))
        p.mul_(1 - lr * wd)
        p.add_((m * betas[0]).add(g, alpha=1 - betas[0]).sign_(), alpha=-lr)
        m.mul_(betas[1]).add_(g, alpha=1 - betas[1])


def test_lion_trains_as_its_reference_and_saves_torch_format_state():
    m, ref = pair()
    e = Engine(m, EngineConfig(optimizer="lion", lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1))
    state = {}
    for k, (x, y) in enumerate(data(5)):
        engine_step(m, e, x, y)
        ref.zero_grad()
        F.mse_loss(ref(x), y).backward()
        with torch.no_grad():
            lion_reference(list(ref.parameters()), [p.grad for p in ref.parameters()], state, 1e-3, (0.9, 0.99), 0.1)
        close(m, ref, f"step {k}")
    sd = e.optimizer.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg"} and int(sd["state"][0]["step"]) == 5
    for st, p in zip(sd["state"].values(), ref.parameters()):
        torch.testing.assert_close(st["exp_avg"], state[id(p)], rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="eps.*does not use it"):
        EngineConfig(optimizer="lion", eps=1e-6)


def test_a_copy_of_the_model_is_plain_pytorch():
    """copy.deepcopy and torch.save of the whole model give models no engine trains: they cast,
    move and pickle as PyTorch's, and the original stays guarded."""
    import copy

    m = Conv()
    e = Engine(m, EngineConfig())  # noqa: F841 (kept alive: it trains the model)
    c = copy.deepcopy(m)
    c.double()
    assert c.conv.weight.dtype == torch.float64 and m.conv.weight.dtype == torch.float32
    loaded = torch.load(io.BytesIO(_saved(m)), weights_only=False)
    loaded.half()
    assert loaded.head.weight.dtype == torch.float16
    loaded.float()
    Engine(loaded, EngineConfig())  # a copy is no engine's: a new Engine may take it
    with pytest.raises(pyengine.UsageError):
        m.half()
    assert m.conv.weight.dtype == torch.float32
