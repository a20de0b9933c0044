"""EngineStrategy (pyengine.integrations.lightning) against Lightning's own default.

Tolerance: fp32 AdamW at lr 1e-3, 20 steps of a 2-layer MLP. Both sides compute the same
gradients and update in fp32 with different summation orders (the engine's flat buffers and
fused kernels against autograd + torch's foreach AdamW): a few ulps of the weights per step,
and Adam's update lr * m / (sqrt(v) + eps) is at most ~lr per step whatever the gradient's
rounding, so after 20 steps |dw| <= 20 x (a few ulp(|w|~1) + rounding of lr-sized steps)
~ 20 x 4 x 1.2e-7 ~ 1e-5: atol 2e-5, rtol 1e-5.
"""
import os

import pytest

pytest.importorskip("lightning")

import torch  # noqa: E402
import lightning.pytorch as pl  # noqa: E402

from pyengine import EngineConfig  # noqa: E402
from pyengine.errors import UsageError  # noqa: E402
from pyengine.integrations.lightning import EngineStrategy  # noqa: E402

ATOL, RTOL = 2e-5, 1e-5
STEPS = 20


class MLP(pl.LightningModule):
    def __init__(self, opt="adamw", lr=1e-3, sched=False, manual=False, save_to=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.opt, self.lr, self.sched, self.save_to = opt, lr, sched, save_to
        self.losses, self.lrs = [], []
        if manual:
            self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.detach().clone())
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_end(self):
        if self.save_to is not None:
            torch.save({k: v.detach().clone() for k, v in self.state_dict().items()},
                       f"{self.save_to}.rank{self.global_rank}.pt")

    def configure_optimizers(self):
        params = [{"params": [p for n, p in self.named_parameters() if n.endswith("weight")], "weight_decay": 0.1},
                  {"params": [p for n, p in self.named_parameters() if n.endswith("bias")], "weight_decay": 0.0}]
        if self.opt == "adamw":
            opt = torch.optim.AdamW(params, lr=self.lr, betas=(0.9, 0.95))
        elif self.opt == "sgd":
            opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        elif self.opt == "two":
            return [torch.optim.AdamW(params[:1], lr=self.lr), torch.optim.AdamW(params[1:], lr=self.lr)]
        else:
            opt = torch.optim.RMSprop(params, lr=self.lr)
        if self.sched:
            s = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": s, "interval": "step"}}
        return opt


def data(n=STEPS * 2, batch=4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n * batch, 8, generator=g)
    y = x[:, :1] * 0.5 - x[:, 1:2] + 0.1 * torch.randn(n * batch, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=False)


def fit(module, engine, steps=STEPS, ckpt_path=None, callbacks=None, checkpointing=False, root=None, loader=None, **kw):
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, enable_progress_bar=False, logger=False,
                         enable_checkpointing=checkpointing, enable_model_summary=False, callbacks=callbacks,
                         strategy=EngineStrategy(EngineConfig()) if engine else "auto", default_root_dir=root,
                         use_distributed_sampler=False, **kw)  # a DDP-type strategy would shuffle
    trainer.fit(module, loader or data(), ckpt_path=ckpt_path)
    return trainer


def weights(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def close(a, b):
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=ATOL, rtol=RTOL, msg=lambda s: f"{k}: {s}")


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_matches_plain_lightning(opt):
    ref, eng = MLP(opt), MLP(opt)
    fit(ref, False)
    fit(eng, True)
    assert len(eng.losses) == len(ref.losses) == STEPS
    torch.testing.assert_close(torch.stack(eng.losses), torch.stack(ref.losses), atol=ATOL, rtol=RTOL)
    close(weights(eng), weights(ref))


def test_accumulation_and_clipping():
    ref, eng = MLP(), MLP()
    kw = dict(accumulate_grad_batches=2, gradient_clip_val=0.05)
    t = fit(ref, False, steps=10, **kw)
    e = fit(eng, True, steps=10, **kw)
    assert t.global_step == e.global_step == 10 and len(eng.losses) == 20
    torch.testing.assert_close(torch.stack(eng.losses), torch.stack(ref.losses), atol=ATOL, rtol=RTOL)
    close(weights(eng), weights(ref))
    # clipping changed the run (else the comparison would not test it)
    free = MLP()
    fit(free, False, steps=10, accumulate_grad_batches=2)
    assert not torch.allclose(weights(free)["net.0.weight"], weights(ref)["net.0.weight"], atol=1e-4)


def test_lr_scheduler_drives_engine():
    ref, eng = MLP(sched=True), MLP(sched=True)
    fit(ref, False, steps=10)
    fit(eng, True, steps=10)
    assert eng.lrs == ref.lrs and eng.lrs[-1] == pytest.approx(1e-3 * 0.5 ** 3)
    close(weights(eng), weights(ref))


def test_checkpoint_resumes_bitwise(tmp_path):
    # epochs of one batch, so the checkpoint falls on an epoch's end (a plain DataLoader cannot
    # resume mid-epoch: Lightning restarts its iterator, with or without the engine)
    full = MLP(sched=True)
    fit(full, True, steps=10, loader=data(n=1))
    first = MLP(sched=True)
    trainer = fit(first, True, steps=5, root=tmp_path, loader=data(n=1))
    path = str(tmp_path / "half.ckpt")
    trainer.save_checkpoint(path)
    assert "pyengine_engine" in torch.load(path, weights_only=False)
    second = MLP(sched=True)
    fit(second, True, steps=10, ckpt_path=path, root=tmp_path, loader=data(n=1))
    assert second.lrs == full.lrs[5:]
    assert torch.equal(torch.stack(second.losses), torch.stack(full.losses[5:]))
    for k, v in weights(full).items():
        assert torch.equal(v, weights(second)[k]), k


def test_resume_refuses_foreign_checkpoint(tmp_path):
    trainer = fit(MLP(), False, steps=2, root=tmp_path)
    path = str(tmp_path / "plain.ckpt")
    trainer.save_checkpoint(path)
    with pytest.raises(UsageError, match="no engine state"):
        fit(MLP(), True, steps=4, ckpt_path=path, root=tmp_path)


@pytest.mark.parametrize("what,kw,match", [
    ("manual", {}, "manual optimization"),
    ("rmsprop", {}, "RMSprop"),
    ("two", {}, "optimizers"),  # Lightning itself refuses several in automatic optimization
    ("adamw", {"gradient_clip_val": 1.0, "gradient_clip_algorithm": "value"}, "gradient_clip_algorithm='value'"),
    ("adamw", {"precision": "64-true"}, "precision"),
])
def test_refusals(what, kw, match):
    module = MLP(opt=what, manual=what == "manual")
    with pytest.raises((UsageError, RuntimeError), match=match):
        fit(module, True, steps=2, **kw)


def test_bf16_true_trains():
    m = MLP()
    fit(m, True, steps=10, precision="bf16-true")
    assert m.net[0].weight.dtype == torch.bfloat16
    assert all(torch.isfinite(x).all() for x in m.losses)


class Split(MLP):
    """Each rank takes its half of every global batch of 8 (rows r, r+2, ...)."""

    def train_dataloader(self):
        ds = data(n=10, batch=8).dataset
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=self.global_rank, shuffle=False)
        return torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler)


def test_mixed_precision_on_cpu_is_bf16():
    # Lightning itself turns "16-mixed" into "bf16-mixed" on the CPU (no fp16 AMP there)
    m = MLP()
    trainer = fit(m, True, steps=10, precision="16-mixed")
    assert m.net[0].weight.dtype == torch.bfloat16
    assert trainer.strategy._final_state["config"]["precision"] == "bf16"
    assert all(torch.isfinite(x).all() for x in m.losses)


def test_accumulation_of_three():
    # 3 is not a power of two: undoing Lightning's 1/3 and the engine's own 1/3 round once more
    ref, eng = MLP(), MLP()
    fit(ref, False, steps=6, accumulate_grad_batches=3)
    fit(eng, True, steps=6, accumulate_grad_batches=3)
    close(weights(eng), weights(ref))


@pytest.mark.slow
def test_two_gloo_ranks(tmp_path):
    # the one-process runs above left a process group of 1 in this process; forked ranks must
    # not inherit it
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    two = Split(save_to=str(tmp_path / "w"))
    trainer = pl.Trainer(accelerator="cpu", devices=2, max_steps=10, enable_progress_bar=False, logger=False,
                         enable_checkpointing=False, enable_model_summary=False, use_distributed_sampler=False,
                         strategy=EngineStrategy(EngineConfig(), start_method="fork"))
    trainer.fit(two)
    w0 = torch.load(tmp_path / "w.rank0.pt")
    w1 = torch.load(tmp_path / "w.rank1.pt")
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    ref = MLP()  # one process, the whole batch of 8: the same mean gradient
    fit(ref, False, steps=10, loader=data(n=10, batch=8))
    close(w0, weights(ref))
