"""The Engine on one GPU: no host-device sync in backward or step, and agreement with the CPU."""
import copy

import pytest
import torch

from pyengine import Engine, EngineConfig
from pyengine.train.model import GPT, PRESETS

pytestmark = pytest.mark.cuda


def make(device, precision, seed=0):
    torch.manual_seed(seed)
    model = GPT(copy.deepcopy(PRESETS["tiny"])).to(device)
    cfg = EngineConfig(precision=precision, lr=3e-3, weight_decay=0.1, clip_grad_norm=1.0, grad_accum_steps=2)
    return model, Engine(model, cfg)


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_no_sync_in_backward_and_step(precision):
    model, engine = make("cuda", precision)
    x = torch.randint(0, 256, (4, 64), device="cuda")
    for _ in range(2):  # warm-up: allocator, kernels
        engine.backward(model(x, x))
        engine.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            engine.backward(model(x, x))
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert engine.global_step == 3


def test_cuda_matches_cpu_fp32():
    m_cpu, e_cpu = make("cpu", "fp32")
    m_gpu, e_gpu = make("cuda", "fp32")
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        x = torch.randint(0, 256, (2, 64), generator=g)
        e_cpu.backward(m_cpu(x, x))
        e_cpu.step()
        e_gpu.backward(m_gpu(x.cuda(), x.cuda()))
        e_gpu.step()
    for a, b in zip(m_cpu.parameters(), m_gpu.parameters()):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5)


def test_fp16_overflow_skips_on_gpu():
    model, engine = make("cuda", "fp16")
    x = torch.randint(0, 256, (2, 64), device="cuda")
    before = engine.flat.master_flat.clone()
    for _ in range(2):
        engine.backward(model(x, x) * float("inf"))
        result = engine.step()
    assert result.skipped and torch.equal(before, engine.flat.master_flat)
    assert engine.skipped_steps == 1
