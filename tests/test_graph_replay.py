"""StepGraph.replay()'s host side, on the CPU: a stand-in graph replays the step's work
(forward, backward, the boundary's passes) with none of the host code that ran once at
capture, as torch.cuda.CUDAGraph does. Each replay's result keeps its own skip flag; weights
loaded in place between replays reach the fp32 master weights; LR schedulers see each replay.
The real capture runs in tests/test_cuda_graph.py on a GPU."""
import warnings
from unittest import mock

import pytest
import torch

from pyengine import Engine, EngineConfig
from pyengine.graph import StepGraph


class CpuGraph:
    """What CUDAGraph.replay() re-runs: the device work of step_fn and engine.step(). The
    pipeline's host parts are stubbed while it runs and the window's count is left as the
    capture left it."""

    def __init__(self, engine, step_fn):
        self.engine, self.step_fn = engine, step_fn

    def replay(self):
        e = self.engine
        pipe, boundaries = e._pipeline, e.window.boundaries
        with mock.patch.object(pipe, "before_boundary", lambda: None), \
                mock.patch.object(pipe, "new_result", lambda: None), \
                mock.patch.object(e.optimizer, "notify_step", lambda: None):
            self.step_fn()
            pipe.boundary()
        e.window.boundaries = boundaries


def setup(precision, warmup=2):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    engine = Engine(model, EngineConfig(precision=precision, lr=1e-2, initial_loss_scale=256.0, hysteresis=1))
    dt = engine.flat.param_dtype
    x, y, poison = torch.zeros(4, 8, dtype=dt), torch.zeros(4, 4, dtype=dt), torch.ones(())

    def step_fn():
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float()) * poison
        engine.backward(loss)
        return loss

    for _ in range(warmup):  # what capture's warm-up does: real eager steps
        feed(x, y, poison, 0)
        step_fn()
        engine.step()
    graph = StepGraph.__new__(StepGraph)
    graph.engine, graph.graph, graph.outputs = engine, CpuGraph(engine, step_fn), None
    return model, engine, graph, (x, y, poison), step_fn


def feed(x, y, poison, k, bad=False):
    g = torch.Generator().manual_seed(k)
    x.copy_(torch.randn(x.shape, generator=g))
    y.copy_(torch.randn(y.shape, generator=g))
    poison.fill_(float("inf") if bad else 1.0)


def test_each_replay_result_keeps_its_own_flag():
    _, engine, graph, inputs, _ = setup("fp16")
    feed(*inputs, 1)
    first = graph.replay()
    feed(*inputs, 2, bad=True)
    second = graph.replay()
    assert second.skipped and not bool(second)
    assert bool(first) and not first.skipped, "the first replay's result read the second's live flag"
    assert engine.skipped_steps == 1


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_weights_loaded_in_place_between_replays_reach_the_master_weights(precision):
    """model.load_state_dict copies into the parameters (the half copies the graph reads and
    writes); the step must start from them, as an eager step does."""
    torch.manual_seed(5)
    other = {k: torch.randn_like(v) * 0.1 for k, v in setup(precision, warmup=0)[0].state_dict().items()}
    finals = []
    for mode in ("eager", "replay"):
        model, engine, graph, inputs, step_fn = setup(precision)
        for k in range(4):
            if k == 2:
                model.load_state_dict(other)
            feed(*inputs, 10 + k)
            if mode == "eager":
                step_fn()
                engine.step()
            else:
                graph.replay()
        finals.append(engine.flat.master_flat.clone())
    assert torch.equal(finals[1], finals[0])
    assert not torch.equal(finals[0], setup(precision)[1].flat.master_flat), "the load changed nothing"


def test_lr_schedulers_see_each_replay():
    _, engine, graph, inputs, _ = setup("bf16")
    sched = torch.optim.lr_scheduler.StepLR(engine.optimizer, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()"
        for k in range(3):
            feed(*inputs, k)
            graph.replay()
            sched.step()
    assert engine.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / 8)
    assert engine.boundary_steps == 5 and engine.global_step == 5
