"""The PyTorch habits of test_grads.py on 2 gloo ranks: clearing gradients before backward
changes nothing, clearing or clipping them between backward and step is a clear error."""
import pytest
import torch
import torch.nn.functional as F

from dist_util import ok, run_ranks

pytestmark = pytest.mark.slow

HABITS = ["none", "model.zero_grad()", "model.zero_grad(set_to_none=False)", "optimizer.zero_grad()",
          "p.grad = None"]


def habits_rank(rank, world, precision):
    from pyengine import Engine, EngineConfig
    from pyengine.grads import GradientAccessError

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    def make(accum=1):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        e = Engine(m, EngineConfig(precision=precision, lr=1e-2, grad_accum_steps=accum, initial_loss_scale=2.0**8,
                                   bucket_mb=1e-4, first_bucket_mb=1e-4))
        return m, e

    def batch(k):
        g = torch.Generator().manual_seed(100 * k + rank)
        return torch.randn(4, 8, generator=g).to(dt), torch.randn(4, 2, generator=g).to(dt)

    out = {"params": {}, "errors": {}}
    start = None
    for habit in HABITS:
        m, e = make(accum=2)
        if start is None:
            start = torch.cat([p.detach().float().flatten() for p in m.parameters()])
        for k in range(8):
            if habit == "model.zero_grad()":
                m.zero_grad()
            elif habit == "model.zero_grad(set_to_none=False)":
                m.zero_grad(set_to_none=False)
            elif habit == "optimizer.zero_grad()" and k % 2 == 0:
                e.optimizer.zero_grad()
            elif habit == "p.grad = None" and k % 2 == 0:
                m[2].bias.grad = None
            x, y = batch(k)
            e.backward(F.mse_loss(m(x), y))
            e.step()
        out["params"][habit] = torch.cat([p.detach().float().flatten() for p in m.parameters()])
        out["steps"] = e.global_step
        e.close()
    # the reference for the model.zero_grad() runs: the first micro-batch of each window weighs 0
    m, e = make(accum=2)
    for k in range(8):
        x, y = batch(k)
        loss = F.mse_loss(m(x), y)
        e.backward(loss * 0.0 if k % 2 == 0 else loss)
        e.step()
    out["params"]["first micro-batch weighs 0"] = torch.cat([p.detach().float().flatten() for p in m.parameters()])
    e.close()
    out["start"] = start
    for what in ("zero_grad after backward", "clip_grad_norm_"):
        m, e = make()
        x, y = batch(0)
        e.backward(F.mse_loss(m(x), y))
        try:
            if what == "clip_grad_norm_":
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            else:
                m.zero_grad(set_to_none=False)
            e.step()
        except GradientAccessError as exc:
            out["errors"][what] = str(exc)
    return out


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_habits_on_two_ranks(precision):
    out = ok(run_ranks(habits_rank, 2, precision), 2)
    for r in out:
        params = r["params"]
        # clearing at the window's start (before its first backward) changes nothing
        for habit in ("optimizer.zero_grad()", "p.grad = None"):
            assert torch.equal(params[habit], params["none"]), habit
        # clearing before every backward keeps only each window's last micro-batch, as in PyTorch
        for habit in ("model.zero_grad()", "model.zero_grad(set_to_none=False)"):
            assert torch.equal(params[habit], params["first micro-batch weighs 0"]), habit
        assert not torch.equal(params["none"], r["start"]), "training must move the weights"
        assert r["steps"] == 4
        assert "averaged across ranks" in r["errors"]["zero_grad after backward"]
        assert "EngineConfig(clip_grad_norm=...)" in r["errors"]["clip_grad_norm_"]
    assert torch.equal(out[0]["params"]["none"], out[1]["params"]["none"]), "ranks agree"


def skipped_rank(rank, world, zero_stage):
    from pyengine import Engine, EngineConfig

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a = torch.nn.Linear(6, 8)
            self.b = torch.nn.Linear(8, 3)
            self.c = torch.nn.Linear(6, 3)  # used on odd steps only

        def forward(self, x, use_c):
            return self.b(torch.tanh(self.a(x))) + (self.c(x) if use_c else 0)

    m = Net()
    e = Engine(m, EngineConfig(lr=0.05, weight_decay=0.1, find_unused_parameters=True, zero_stage=zero_stage,
                               bucket_mb=1e-4, first_bucket_mb=1e-4))
    frozen_at = {}
    for k in range(8):
        if k == 2:
            m.a.requires_grad_(False)
            frozen_at = {n: p.detach().clone() for n, p in m.a.named_parameters()}
        if k == 5:
            for n, p in m.a.named_parameters():
                assert torch.equal(p.detach(), frozen_at[n]), f"a.{n} moved while frozen"
            m.a.requires_grad_(True)
        g = torch.Generator().manual_seed(100 * k + rank)
        x, y = torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)
        e.backward(F.mse_loss(m(x, use_c=k % 2 == 1), y))
        e.step()
    steps = e.counts.per_param().tolist()
    return {"steps": steps, "params": torch.cat([p.detach().flatten() for p in m.parameters()])}


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_frozen_and_unused_parameters_are_skipped_on_two_ranks(zero_stage):
    """As torch.optim behind DDP(find_unused_parameters=True): a layer frozen after the build
    and a parameter no rank used keep their weights and their step counts."""
    out = ok(run_ranks(skipped_rank, 2, zero_stage), 2)
    for r in out:
        assert r["steps"] == [5, 5, 8, 8, 4, 4], r["steps"]  # a: 3 steps frozen; c: used on 4 of 8
    assert torch.equal(out[0]["params"], out[1]["params"]), "ranks agree"
