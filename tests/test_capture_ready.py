"""A boundary engine.step() dispatches no torch op at all: no host read of a device value (the
old step read the lagged skip count with a tensor index and .item()), no event query, no
allocation (the old step cloned the flag), no zeroing kernel from torch. That is what lets a
CUDA graph capture it; on a GPU the capture itself is tested in test_cuda_graph.py."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from pyengine import Engine, EngineConfig


class TorchOps(TorchDispatchMode):
    """Records every aten op dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("accum", [1, 2])
def test_a_boundary_step_dispatches_no_torch_op(precision, accum):
    m = model()
    e = Engine(m, EngineConfig(precision=precision, grad_accum_steps=accum, clip_grad_norm=1.0,
                               initial_loss_scale=256.0))
    sched = torch.optim.lr_scheduler.LambdaLR(e.optimizer, lambda k: 1.0 / (k + 1))  # a new lr every step
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    x, y = torch.randn(4, 8, dtype=dt), torch.randn(4, 4, dtype=dt)
    for k in range(5 * accum):
        e.backward(F.mse_loss(m(x), y))
        if (k + 1) % accum:
            e.step()
            continue
        with TorchOps() as rec:
            e.step()
        assert rec.ops == [], f"step {k}: {rec.ops}"
        sched.step()
    assert e.global_step == 5


def test_capture_needs_a_cuda_model_and_says_so():
    m = model()
    e = Engine(m, EngineConfig())
    with pytest.raises(RuntimeError, match="CUDA graphs need a model on a CUDA device"):
        e.capture(lambda: e.backward(m(torch.randn(2, 8)).sum()))
