"""A backward that raises part-way (an out-of-memory batch a loop catches and skips, a hook's
error) ends the window: the next window starts from zero gradients, nothing the failed one
accumulated reaches a step, and nothing it launched still writes the buffers (under data
parallel the collectives it started are waited for first). The oracle is the same run with
the failed window's batches left out: bitwise equal."""
import pytest
import torch

from dist_util import ok, run_ranks
from pyengine import Engine, EngineConfig


class FailWhenArmed(torch.autograd.Function):
    """Identity forward; backward raises while `armed`: the layers after it (nearer the loss)
    have received their gradients by then, the ones before it none."""

    armed = False

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        if FailWhenArmed.armed:
            raise RuntimeError("simulated failure in backward")
        return g


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(12, 48)
        self.b = torch.nn.Linear(48, 48)
        self.c = torch.nn.Linear(48, 4)

    def forward(self, x):
        return self.c(torch.tanh(self.b(FailWhenArmed.apply(torch.tanh(self.a(x))))))


def batch(window, micro, rank=0, world=1):
    g = torch.Generator().manual_seed(1000 * window + micro)
    x, y = torch.randn(4 * world, 12, generator=g), torch.randn(4 * world, 4, generator=g)
    return x.chunk(world)[rank], y.chunk(world)[rank]


def train(cfg, windows, fail=None, rank=0, world=1, device="cpu"):
    """Runs the given windows; `fail` = (window, micro) whose backward raises (caught, and the
    rest of that window skipped, as a loop that skips a bad batch does)."""
    torch.manual_seed(0)
    model = Net().to(device)
    engine = Engine(model, cfg)
    dt = engine.flat.param_dtype
    for w in windows:
        for m in range(cfg.grad_accum_steps):
            x, y = batch(w, m, rank, world)
            loss = torch.nn.functional.mse_loss(model(x.to(device, dt)), y.to(device, dt))
            FailWhenArmed.armed = (w, m) == fail
            try:
                engine.backward(loss)
            except RuntimeError as exc:
                assert "simulated failure" in str(exc)
                break
            finally:
                FailWhenArmed.armed = False
            engine.step()
    out = torch.cat([p.detach().float().flatten() for p in model.parameters()]).cpu()
    return out, engine.global_step


CASES = [dict(precision="fp32"), dict(precision="bf16"), dict(precision="fp16", initial_loss_scale=1024.0),
         dict(precision="fp32", deterministic=True)]


@pytest.mark.parametrize("accum,fail_micro", [(1, 0), (2, 0), (2, 1), (3, 1)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_a_failed_backward_leaves_nothing_behind(case, accum, fail_micro):
    cfg = EngineConfig(lr=1e-2, clip_grad_norm=0.5, grad_accum_steps=accum, **case)
    got, steps = train(cfg, range(4), fail=(1, fail_micro))
    want, ref_steps = train(cfg, [0, 2, 3])
    assert steps == ref_steps == 3
    assert torch.equal(got, want), f"max difference {(got - want).abs().max().item():g}"


def test_the_old_behaviour_would_differ():
    """The oracle separates: the failed window's earlier micro-batch, kept, changes the run."""
    cfg = EngineConfig(lr=1e-2, grad_accum_steps=2)
    want, _ = train(cfg, [0, 2, 3])
    kept, _ = train(cfg, [0, 1, 3])  # window 1's gradients applied where window 2's would be
    assert not torch.equal(kept, want)


def failing_rank(rank, world, cfg_kwargs, device="cpu"):
    cfg = EngineConfig(lr=1e-2, bucket_mb=0.002, first_bucket_mb=0.002, **cfg_kwargs)
    got, _ = train(cfg, range(4), fail=(1, cfg.grad_accum_steps - 1), rank=rank, world=world, device=device)
    want, _ = train(cfg, [0, 2, 3], rank=rank, world=world, device=device)
    return got, want


@pytest.mark.slow
@pytest.mark.parametrize("cfg_kwargs", [dict(), dict(grad_accum_steps=2, precision="bf16"), dict(zero_stage=1)],
                         ids=["fp32", "bf16-accum2", "zero1"])
def test_a_failed_boundary_backward_under_data_parallel(cfg_kwargs):
    """Both ranks fail in the boundary micro-batch after the buckets nearest the loss were
    launched: those collectives finish before the gradients are cleared, and the run goes on
    as if the window had never been."""
    for got, want in ok(run_ranks(failing_rank, 2, cfg_kwargs), 2):
        assert torch.equal(got, want), f"max difference {(got - want).abs().max().item():g}"


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: c["precision"])
def test_a_failed_backward_leaves_nothing_behind_cuda(case):
    cfg = EngineConfig(lr=1e-2, clip_grad_norm=0.5, grad_accum_steps=2, **case)
    got, _ = train(cfg, range(4), fail=(1, 1), device="cuda")
    want, _ = train(cfg, [0, 2, 3], device="cuda")
    assert torch.equal(got, want), f"max difference {(got - want).abs().max().item():g}"


@pytest.mark.cuda
@pytest.mark.parametrize("cfg_kwargs", [dict(precision="bf16"), dict(precision="bf16", zero_stage=1)],
                         ids=["bf16", "bf16-zero1"])
def test_a_failed_boundary_backward_on_two_gloo_ranks_sharing_a_gpu(cfg_kwargs):
    """On CUDA the abandoned buckets' collectives sit on the communication stream: the compute
    stream waits for them before the gradients are cleared (overlap.py, Note [abandon])."""
    for got, want in ok(run_ranks(failing_rank, 2, cfg_kwargs, "cuda"), 2):
        assert torch.equal(got, want), f"max difference {(got - want).abs().max().item():g}"
