"""The Engine on one process: parity with torch.optim, mixed precision, loss scaling,
accumulation, checkpoints, schedulers and errors."""
import copy

import pytest
import torch

from conftest import assert_close
from pyengine import Engine, EngineConfig
from pyengine.checkpoint import CheckpointError
from pyengine.train.model import GPT, PRESETS, decay_groups


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.GELU(), torch.nn.Linear(32, 32), torch.nn.GELU(),
                               torch.nn.Linear(32, 3))


def batches(n, bs=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 12, generator=g), torch.randn(bs, 3, generator=g)) for _ in range(n)]


def mse(model, x, y):
    return ((model(x) - y) ** 2).mean()


@pytest.mark.parametrize("kind", ["adamw", "adam", "sgd"])
@pytest.mark.parametrize("clip", [None, 0.3])
def test_fp32_matches_torch_optimizer_with_clipping(kind, clip):
    model, ref = mlp(), mlp()
    cfg = EngineConfig(optimizer=kind, lr=1e-2, weight_decay=0.05, momentum=0.9 if kind == "sgd" else 0.0,
                       clip_grad_norm=clip)
    engine = Engine(model, cfg)
    if kind == "adamw":
        opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.05)
    elif kind == "adam":
        opt = torch.optim.Adam(ref.parameters(), lr=1e-2, weight_decay=0.05)
    else:
        opt = torch.optim.SGD(ref.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.05)
    for x, y in batches(20):
        engine.backward(mse(model, x, y))
        assert engine.step()
        opt.zero_grad()
        mse(ref, x, y).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        opt.step()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        # torch's optimizers do the same fp32 arithmetic in another order: ulps per step, 20 steps
        assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6, msg=name)
    assert engine.global_step == 20 and engine.skipped_steps == 0


def test_accumulation_matches_one_large_batch():
    model, ref = mlp(), mlp()
    e1 = Engine(model, EngineConfig(lr=1e-2, grad_accum_steps=4, clip_grad_norm=1.0))
    e2 = Engine(ref, EngineConfig(lr=1e-2, clip_grad_norm=1.0))
    data = batches(12, bs=8)
    for i in range(0, 12, 4):
        chunk = data[i:i + 4]
        for j, (x, y) in enumerate(chunk):
            e1.backward(mse(model, x, y))
            updated = e1.step()
            assert bool(updated) == (j == 3)
        x = torch.cat([c[0] for c in chunk])
        y = torch.cat([c[1] for c in chunk])
        e2.backward(mse(ref, x, y))
        e2.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        # the mean of 4 micro-batch means against one 32-row mean: fp32 summation order
        assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6, msg="accumulation")
    assert e1.global_step == 3


def gpt_losses(precision, steps=30, accum_dtype="fp32", seed=0):
    torch.manual_seed(seed)
    model = GPT(copy.deepcopy(PRESETS["tiny"]))
    cfg = EngineConfig(precision=precision, lr=3e-3, weight_decay=0.1, clip_grad_norm=1.0, accum_dtype=accum_dtype,
                       loss_scale_window=10)
    engine = Engine(model, cfg, param_groups=decay_groups(model, 0.1))
    g = torch.Generator().manual_seed(123)
    text = torch.randint(0, 16, (4096,), generator=g)  # a small alphabet: learnable quickly
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, text.numel() - 65, (8,), generator=g)
        x = torch.stack([text[s:s + 64] for s in starts])
        y = torch.stack([text[s + 1:s + 65] for s in starts])
        loss = model(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses, engine


@pytest.mark.parametrize("precision,accum", [("bf16", "fp32"), ("fp16", "fp32"), ("fp16", "param")])
def test_half_precision_tracks_fp32_loss(precision, accum):
    ref, _ = gpt_losses("fp32")
    got, engine = gpt_losses(precision, accum_dtype=accum)
    assert ref[-1] < ref[0] - 1.0, "the fp32 run itself must learn"
    tail = lambda xs: sum(xs[-5:]) / 5
    # half-precision weights round to 8 (bf16) or 11 (fp16) bits each step, so the two loss
    # curves drift apart by noise; 0.15 nats is a tenth of what the fp32 run learns
    assert abs(tail(got) - tail(ref)) < 0.15, (tail(got), tail(ref))
    if precision == "fp16":
        assert engine.loss_scale >= 1.0


def test_injected_inf_skips_that_step_and_backs_off_with_hysteresis():
    model = mlp()
    cfg = EngineConfig(precision="fp16", lr=1e-2, initial_loss_scale=1024.0, hysteresis=2, loss_scale_window=1000)
    engine = Engine(model, cfg)
    data = batches(6)
    snapshots = []
    for i, (x, y) in enumerate(data):
        loss = mse(model, x.half(), y.half())
        if i in (2, 3):
            loss = loss * float("inf")
        before = [p.detach().clone() for p in model.parameters()]
        master_before = engine.flat.master_flat.clone()
        state_before = {k: v.clone() for k, v in engine.flat.state.items()}
        engine.backward(loss)
        result = engine.step()
        snapshots.append((bool(result), engine.loss_scale))
        if i in (2, 3):
            assert result.skipped
            assert torch.equal(engine.flat.master_flat, master_before)
            for k, v in state_before.items():
                assert torch.equal(engine.flat.state[k], v), k
            assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    # first overflow spends the hysteresis, the second backs off x0.5
    assert [s[1] for s in snapshots] == [1024.0, 1024.0, 1024.0, 512.0, 512.0, 512.0]
    assert [s[0] for s in snapshots] == [True, True, False, False, True, True]
    assert engine.global_step == 4 and engine.skipped_steps == 2


def test_loss_scale_grows_after_window():
    model = mlp()
    engine = Engine(model, EngineConfig(precision="fp16", initial_loss_scale=256.0, loss_scale_window=3))
    for x, y in batches(7):
        engine.backward(mse(model, x.half(), y.half()))
        engine.step()
    assert engine.loss_scale == 1024.0


def test_many_consecutive_skips_raise_naming_parameters():
    model = mlp()
    engine = Engine(model, EngineConfig(precision="fp16", max_consecutive_skips=3, hysteresis=1))
    x, y = batches(1)[0]
    with pytest.raises(FloatingPointError, match=r"3 consecutive steps were skipped .* 0\.weight"):
        for _ in range(10):
            model[0].weight.register_hook(lambda g: g * float("nan"))
            engine.backward(mse(model, x.half(), y.half()))
            engine.step()


def test_checkpoint_resume_is_bitwise(tmp_path):
    data = batches(10)

    def train(engine, model, part):
        for x, y in part:
            engine.backward(mse(model, x.half(), y.half()))
            engine.step()

    cfg = EngineConfig(precision="fp16", lr=1e-2, clip_grad_norm=1.0, loss_scale_window=3)
    m1 = mlp()
    e1 = Engine(m1, cfg)
    train(e1, m1, data)
    m2 = mlp()
    e2 = Engine(m2, cfg)
    train(e2, m2, data[:4])
    path = e2.save(tmp_path / "ckpt")
    m3 = mlp(seed=99)
    e3 = Engine(m3, cfg)
    e3.load(path)
    assert e3.loss_scale == e2.loss_scale and e3.global_step == e2.global_step
    train(e3, m3, data[4:])
    for a, b in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(e1.flat.master_flat, e3.flat.master_flat)


def test_save_is_atomic(tmp_path, monkeypatch):
    model = mlp()
    engine = Engine(model, EngineConfig())
    path = tmp_path / "ckpt"
    engine.save(path)
    good = {f.name: f.read_bytes() for f in path.iterdir()}

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        engine.save(path)
    assert {f.name: f.read_bytes() for f in path.iterdir()} == good, "the previous checkpoint is whole"
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".ckpt.partial")] == ["ckpt"]


def test_state_dict_mid_window_refuses():
    model = mlp()
    engine = Engine(model, EngineConfig(grad_accum_steps=2))
    x, y = batches(1)[0]
    engine.backward(mse(model, x, y))
    engine.step()
    with pytest.raises(RuntimeError, match="pending"):
        engine.state_dict()


def test_lr_scheduler_changes_lr():
    model, ref = mlp(), mlp()
    engine = Engine(model, EngineConfig(optimizer="sgd", lr=0.1))
    sched = torch.optim.lr_scheduler.StepLR(engine.optimizer, step_size=2, gamma=0.1)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    ref_sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    for x, y in batches(5):
        engine.backward(mse(model, x, y))
        engine.step()
        sched.step()
        opt.zero_grad()
        mse(ref, x, y).backward()
        opt.step()
        ref_sched.step()
    assert engine.optimizer.param_groups[0]["lr"] == pytest.approx(0.001)
    for a, b in zip(model.parameters(), ref.parameters()):
        # torch.optim.SGD's arithmetic in another order: ulps per step
        assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6, msg="scheduled sgd")


def test_param_groups_per_group_hyperparameters():
    model, ref = mlp(), mlp()
    groups = lambda m: [{"params": [m[0].weight, m[2].weight, m[4].weight], "weight_decay": 0.5, "lr": 2e-2},
                        {"params": [m[0].bias, m[2].bias, m[4].bias], "weight_decay": 0.0}]
    engine = Engine(model, EngineConfig(lr=1e-2), param_groups=groups(model))
    opt = torch.optim.AdamW(groups(ref), lr=1e-2)
    for x, y in batches(8):
        engine.backward(mse(model, x, y))
        engine.step()
        opt.zero_grad()
        mse(ref, x, y).backward()
        opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        # torch.optim.AdamW's arithmetic in another order: ulps per step, 8 steps
        assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6, msg="groups")


def test_tied_and_frozen_parameters():
    model = GPT(copy.deepcopy(PRESETS["tiny"]))
    model.pos.weight.requires_grad_(False)
    frozen = model.pos.weight.detach().clone()
    engine = Engine(model, EngineConfig(lr=1e-2))
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    assert n_trainable <= engine.flat.layout.numel < n_trainable + 16 * len(trainable), "each param once, padded"
    for s in engine.flat.layout.slots:
        assert s.offset % 16 == 0, "every parameter starts 16-element aligned"
    assert model.head.weight is model.tok.weight
    x = torch.randint(0, 256, (2, 64))
    engine.backward(model(x, x))
    engine.step()
    assert torch.equal(model.pos.weight, frozen)
    assert model.head.weight.data_ptr() == model.tok.weight.data_ptr()


def test_memory_per_param():
    e = Engine(mlp(), EngineConfig(precision="bf16", accum_dtype="param"))
    assert e.memory_per_param()["total"] == 16
    e = Engine(mlp(), EngineConfig(precision="fp16", accum_dtype="fp32"))
    assert e.memory_per_param()["total"] == 18  # half grads are transient, fp32 main grads persist
    e = Engine(mlp(), EngineConfig(precision="fp32"))
    assert e.memory_per_param()["total"] == 16


def test_errors_are_clear():
    model = mlp()
    engine = Engine(model, EngineConfig())
    with pytest.raises(RuntimeError, match="no backward since the last step"):
        engine.step()
    x, y = batches(1)[0]
    with pytest.raises(ValueError, match="loss must be a scalar"):
        engine.backward(model(x))
    with pytest.raises(ValueError, match="does not require grad"):
        with torch.no_grad():
            engine.backward(mse(model, x, y))
    with pytest.raises(TypeError, match="loss must be a tensor"):
        engine.backward(1.0)
    with pytest.raises(ValueError, match="precision: 'fp8' is not one of"):
        EngineConfig(precision="fp8")
    with pytest.raises(TypeError, match="grad_accum_steps: expected an int"):
        EngineConfig(grad_accum_steps=2.5)
    with pytest.raises(ValueError, match="unknown field"):
        EngineConfig.from_dict({"precison": "fp16"})
    with pytest.raises(ValueError, match="zero_stage: 2 is not one of"):
        EngineConfig(zero_stage=2)
    with pytest.raises(ValueError, match="overlap_param_gather: only with zero_stage=1"):
        EngineConfig(overlap_param_gather=True)
    m = mlp()
    with pytest.raises(ValueError, match="missing from param_groups: 0.bias"):
        Engine(m, EngineConfig(), param_groups=[{"params": [p for n, p in m.named_parameters() if n != "0.bias"]}])
    m = mlp()
    with pytest.raises(ValueError, match="appears in param_groups"):
        Engine(m, EngineConfig(), param_groups=[{"params": list(m.parameters())}, {"params": [m[0].weight]}])
    with pytest.raises(ValueError, match="not a parameter of the model"):
        Engine(mlp(), EngineConfig(), param_groups=[{"params": list(mlp().parameters())}])


def test_model_on_several_devices_rejected():
    m = mlp()
    m[4].to("meta")
    with pytest.raises(ValueError, match="spread over several devices"):
        Engine(m, EngineConfig())


def test_group_lr_validation_error():
    m = mlp()
    with pytest.raises(ValueError, match=r"param_groups\[0\].*lr"):
        Engine(m, EngineConfig(), param_groups=[{"params": list(m.parameters()), "lr": -1.0}])


def test_optimizer_state_dict_is_torch_format_and_round_trips():
    model, ref = mlp(), mlp()
    engine = Engine(model, EngineConfig(lr=1e-2, weight_decay=0.05))
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.05)
    for x, y in batches(5):
        engine.backward(mse(model, x, y))
        engine.step()
        opt.zero_grad()
        mse(ref, x, y).backward()
        opt.step()
    ours, theirs = engine.optimizer.state_dict(), opt.state_dict()
    assert ours["param_groups"][0]["params"] == theirs["param_groups"][0]["params"]
    params = list(model.parameters())
    for k, st in theirs["state"].items():
        assert float(ours["state"][k]["step"]) == float(st["step"])
        i = next(j for j, p in enumerate(engine.params) if p is params[k])
        for key in ("exp_avg", "exp_avg_sq"):
            got = ours["state"][k][key]
            assert got.shape == st[key].shape
            assert torch.equal(got.flatten(), engine.flat.view(engine.flat.state[key], i)), "the engine's own state"
            # torch's AdamW rounds differently (foreach vs our fused pass), so from step 2 the
            # weights, hence the gradients, differ in their last bits; a small gradient that is
            # a difference of larger terms differs relatively more: compare at the tensor's scale
            assert_close(got, st[key], rtol=0, atol=1e-4 * float(st[key].abs().max()), msg=f"{k}.{key}")
    other = Engine(mlp(seed=3), EngineConfig(lr=1e-2, weight_decay=0.05))
    other.optimizer.load_state_dict(theirs)  # a torch.optim.AdamW checkpoint loads into the engine
    again = other.optimizer.state_dict()
    for k, st in theirs["state"].items():
        assert torch.equal(again["state"][k]["exp_avg_sq"], st["exp_avg_sq"])


def test_load_refuses_other_param_groups_and_single_files_before_writing_anything(tmp_path):
    model = mlp()
    params = list(model.parameters())
    engine = Engine(model, EngineConfig(), param_groups=[{"params": params[:2]}, {"params": params[2:]}])
    x, y = batches(1)[0]
    engine.backward(mse(model, x, y))
    engine.step()
    engine.save(tmp_path / "two_groups")
    other = mlp()
    named = dict(other.named_parameters())
    regrouped = Engine(other, EngineConfig(), param_groups=[  # the same count, other members
        {"params": [p for n, p in named.items() if n.endswith("weight")]},
        {"params": [p for n, p in named.items() if n.endswith("bias")]}])
    one_group = Engine(mlp(), EngineConfig())
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(ValueError, match="param groups hold other parameters"):
        regrouped.load(tmp_path / "two_groups")
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters())), "nothing was written"
    with pytest.raises(ValueError, match="param groups hold other parameters"):
        one_group.load(tmp_path / "two_groups")
    torch.save({"master": []}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="is a file; this version of pyengine saves and loads checkpoint folders"):
        one_group.load(tmp_path / "old.pt")
    sd = engine.state_dict()
    with pytest.raises(ValueError, match="the checkpoint has 2 param group"):
        one_group.load_state_dict(sd)


# -- cast_inputs: fp32 batches feed a half-precision engine ----------------------------------------
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cast_inputs_fp32_batches_match_precast_bitwise(precision):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    a, b = mlp(), mlp()
    ea = Engine(a, EngineConfig(precision=precision, lr=1e-2, loss_scale=1024.0 if precision == "fp16" else "dynamic"))
    eb = Engine(b, EngineConfig(precision=precision, lr=1e-2, loss_scale=1024.0 if precision == "fp16" else "dynamic",
                                cast_inputs=False))
    for x, y in batches(4):
        ea.backward(((a(x) - y.to(dtype)) ** 2).float().mean())  # fp32 x: cast by the engine
        ea.step()
        eb.backward(((b(x.to(dtype)) - y.to(dtype)) ** 2).float().mean())  # cast by hand
        eb.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert pa.dtype == dtype
        assert torch.equal(pa, pb)
    ea.close()
    eb.close()


def test_cast_inputs_false_gives_torchs_own_error():
    model = mlp()
    engine = Engine(model, EngineConfig(precision="bf16", cast_inputs=False))
    with pytest.raises(RuntimeError, match="dtype"):
        model(torch.randn(2, 12))
    engine.close()


class _Mixed(torch.nn.Module):
    """Takes token ids, an fp32 tensor inside a nested structure, and a keyword tensor."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 12)
        self.lin = torch.nn.Linear(12, 3)
        self.seen = {}

    def forward(self, ids, extra, scale=None):
        self.seen = {"ids": ids.dtype, "nested": extra["feats"][0].dtype, "mask": extra["feats"][1].dtype,
                     "scale": scale.dtype}
        return self.lin(self.emb(ids) + extra["feats"][0]) * scale


def test_cast_inputs_nested_and_keyword_floats_cast_integers_untouched_close_removes_hook():
    torch.manual_seed(0)
    model = _Mixed()
    engine = Engine(model, EngineConfig(precision="bf16"))
    ids = torch.randint(0, 10, (2, 5))
    extra = {"feats": [torch.randn(2, 5, 12), torch.ones(2, 5, dtype=torch.bool)]}
    out = model(ids, extra, scale=torch.tensor(2.0))
    assert model.seen == {"ids": torch.int64, "nested": torch.bfloat16, "mask": torch.bool, "scale": torch.bfloat16}
    engine.backward(out.float().sum())
    engine.step()
    assert ids.dtype == torch.int64 and extra["feats"][0].dtype == torch.float32  # the caller's tensors stay
    assert len(model._forward_pre_hooks) == 1
    engine.close()
    assert len(model._forward_pre_hooks) == 0
    with pytest.raises(RuntimeError, match="dtype"):
        model(ids, extra, scale=torch.tensor(2.0))


def test_cast_inputs_no_hook_in_fp32_and_in_the_fingerprint():
    from pyengine.distributed import fingerprint

    model = mlp()
    engine = Engine(model, EngineConfig())
    assert len(model._forward_pre_hooks) == 0
    engine.close()
    named = list(model.named_parameters())
    assert fingerprint(named, EngineConfig(cast_inputs=True)) != fingerprint(named, EngineConfig(cast_inputs=False))
