"""Every native launch of the engine's public entry points runs with the engine's CUDA device
current (devices.on_engine_device), and the caller's current device is left as it was. On the
CPU a fake CUDA device switch stands in for torch.cuda's; tests/test_cuda_engine.py runs a
model on cuda:1 with cuda:0 current where a machine has two GPUs."""
import pytest
import torch

from pyengine import Engine, EngineConfig
from pyengine._native import _C


class FakeDevices:
    """torch.cuda.current_device / torch.cuda.device over a fake current index."""

    def __init__(self, current):
        self.now = current
        self.switches = 0

    def current_device(self):
        return self.now

    def device(self, index):
        devices = self

        class Guard:
            def __enter__(self):
                self.saved, devices.now = devices.now, index
                devices.switches += 1

            def __exit__(self, *exc):
                devices.now = self.saved
                return False

        return Guard()


NATIVE = ("step_scalars", "adamw_step", "accumulate", "set_hyper", "fill", "update_loss_scale", "unscale_check_sumsq")


@pytest.fixture
def devices(monkeypatch):
    fake = FakeDevices(current=0)
    monkeypatch.setattr(torch.cuda, "current_device", fake.current_device)
    monkeypatch.setattr(torch.cuda, "device", fake.device)
    fake.calls = []
    for name in NATIVE:
        orig = getattr(_C, name)

        def record(*args, _orig=orig, _name=name):
            fake.calls.append((_name, fake.now))
            return _orig(*args)

        monkeypatch.setattr(_C, name, record)
    return fake


def train(engine, model, steps=3):
    for k in range(steps):
        x = torch.randn(4, 8, dtype=engine.flat.param_dtype)
        engine.backward(model(x).float().pow(2).mean())
        engine.step()


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("accum", [1, 2])
def test_the_core_launches_with_the_engine_device_current(devices, precision, accum):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 2))
    engine = Engine(model, EngineConfig(precision=precision, grad_accum_steps=accum, clip_grad_norm=1.0))
    engine._cuda_index = 1  # as if the model lived on cuda:1
    devices.calls.clear()
    train(engine, model, 3 * accum)
    sd = engine.state_dict()
    engine.load_state_dict(sd)
    train(engine, model, accum)
    launched = {name for name, _ in devices.calls}
    assert {"step_scalars", "adamw_step"} <= launched
    if precision != "fp32":
        assert "accumulate" in launched  # the fp32 main grads, from the gradient hooks
    wrong = [(name, d) for name, d in devices.calls if d != 1]
    assert not wrong, f"launched with another device current: {wrong[:5]}"
    assert devices.now == 0, "the caller's current device was not restored"


def test_no_switch_when_the_device_is_already_current(devices):
    model = torch.nn.Linear(8, 2)
    engine = Engine(model, EngineConfig())
    engine._cuda_index = 0
    train(engine, model)
    assert devices.switches == 0 and devices.calls


def test_cpu_engines_never_touch_the_cuda_device(devices):
    model = torch.nn.Linear(8, 2)
    engine = Engine(model, EngineConfig())
    assert engine._cuda_index is None
    train(engine, model)
    assert devices.switches == 0
