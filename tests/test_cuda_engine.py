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


class _Linear(torch.nn.Module):
    """loss = sum(p * c): its gradient is exactly c on any device, so CPU and GPU engines see
    identical gradients and only the optimizer arithmetic is compared."""

    def __init__(self, sizes, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.ps = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(n, generator=g)) for n in sizes)
        self.cs = [torch.randn(n, generator=g) for n in sizes]

    def loss(self, k):
        return sum((p * (c * (k + 1)).to(p.device)).sum() for p, c in zip(self.ps, self.cs))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_matches_cpu_on_identical_gradients(precision):
    sizes = [4096, 1, 333, 65537]
    cpu, gpu = _Linear(sizes, 0), _Linear(sizes, 0).cuda()
    cfg = dict(precision=precision, lr=1e-2, weight_decay=0.1, clip_grad_norm=50.0, accum_dtype="param")
    e_cpu, e_gpu = Engine(cpu, EngineConfig(**cfg)), Engine(gpu, EngineConfig(**cfg))
    for k in range(6):
        e_cpu.backward(cpu.loss(k))
        e_cpu.step()
        e_gpu.backward(gpu.loss(k))
        e_gpu.step()
    # The same fp32 update on the same gradients; only the order of the norm's sum and the
    # bias-correction powf may differ in the last bit, and Adam passes a relative error of
    # the gradient scale on at most as a relative error of lr per step: a few ulps of lr.
    assert e_gpu.grad_norm == pytest.approx(e_cpu.grad_norm, rel=1e-6)
    torch.testing.assert_close(e_gpu.flat.master_flat.cpu(), e_cpu.flat.master_flat, rtol=1e-6, atol=6 * 1e-2 * 1e-5)


def test_fp16_overflow_skips_on_gpu():
    model, engine = make("cuda", "fp16")
    x = torch.randint(0, 256, (2, 64), device="cuda")
    before = engine.flat.master_flat.clone()
    for _ in range(2):
        engine.backward(model(x, x) * float("inf"))
        result = engine.step()
    assert result.skipped and torch.equal(before, engine.flat.master_flat)
    assert engine.skipped_steps == 1


def _gloo_on_one_gpu_rank(rank, world, precision, comm_dtype, zero_stage=0, clip=1.0, overlap=False):
    """One of two gloo ranks sharing cuda:0: NCCL refuses that, gloo moves CUDA tensors, so the
    CUDA overlap path (comm stream, events) of the Reducer runs on any single-GPU machine."""
    import os

    import torch.distributed as dist

    os.environ["LOCAL_RANK"] = "0"
    torch.cuda.set_device(0)
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = GPT(copy.deepcopy(PRESETS["tiny"])).cuda()
    engine = Engine(model, EngineConfig(precision=precision, lr=3e-3, clip_grad_norm=clip, comm_backend="torch",
                                        comm_dtype=comm_dtype, bucket_mb=0.05, first_bucket_mb=0.01,
                                        zero_stage=zero_stage, overlap_param_gather=overlap))
    assert engine.reducer is not None and engine.reducer.cuda and len(engine.reducer.buckets) > 2
    g = torch.Generator().manual_seed(0)
    norms = []
    for _ in range(4):
        x = torch.randint(0, 256, (2 * world, 64), generator=g).chunk(world)[rank].cuda()
        engine.backward(model(x, x))
        engine.step()
        norms.append(engine.grad_norm)
    engine.wait_for_params()
    stats = engine.stats()
    return {"params": torch.cat([p.detach().float().flatten().cpu() for p in model.parameters()]), "norms": norms,
            "collectives": stats["collectives"], "steps": engine.global_step,
            "gathers_overlap": engine.reducer._gathers_overlap}


@pytest.mark.parametrize("precision,comm_dtype", [("fp32", None), ("bf16", "bf16")])
def test_two_gloo_ranks_on_one_gpu_match_one_process(precision, comm_dtype):
    from dist_util import ok, run_ranks

    out = ok(run_ranks(_gloo_on_one_gpu_rank, 2, precision, comm_dtype), 2)
    assert torch.equal(out[0]["params"], out[1]["params"]), "ranks hold identical weights"
    assert out[0]["steps"] == 4 and out[0]["collectives"] > 0
    torch.manual_seed(0)
    model = GPT(copy.deepcopy(PRESETS["tiny"])).cuda()
    engine = Engine(model, EngineConfig(precision=precision, lr=3e-3, clip_grad_norm=1.0))
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        x = torch.randint(0, 256, (4, 64), generator=g).cuda()
        engine.backward(model(x, x))
        engine.step()
        # the mean of two half-batch losses is the full-batch loss: the same gradient, summed in
        # another order (fp32: ulps of the norm); a bf16 wire rounds each element to 2^-8
        rel = 1e-5 if comm_dtype is None else 2**-7
        assert out[0]["norms"][step] == pytest.approx(engine.grad_norm, rel=rel)


@pytest.mark.parametrize("precision,overlap", [("fp32", False), ("bf16", False), ("bf16", True)])
def test_zero1_on_two_gloo_ranks_on_one_gpu_is_bitwise_zero0(precision, overlap):
    """The CUDA side of ZeRO-1 (reduce-scatter on the comm stream, the owned-slice check and
    update, the all-gather back, and with overlap each module's forward waiting on the
    compute stream for its buckets): with a clip that never binds the same sums give the same
    weights to the bit (tests/test_zero.py says why)."""
    from dist_util import ok, run_ranks

    z1 = ok(run_ranks(_gloo_on_one_gpu_rank, 2, precision, None, 1, 1e9, overlap), 2)
    z0 = ok(run_ranks(_gloo_on_one_gpu_rank, 2, precision, None, 0, 1e9), 2)
    assert torch.equal(z1[0]["params"], z1[1]["params"]), "the all-gather gave every rank the same weights"
    assert z1[0]["gathers_overlap"] == overlap, "the GPT uses each parameter inside its own module's forward"
    assert torch.equal(z1[0]["params"], z0[0]["params"])
    for a, b in zip(z1[0]["norms"], z0[0]["norms"]):
        assert a == pytest.approx(b, rel=1e-6)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_model_on_the_second_gpu_trains_with_the_first_current(precision):
    """The core launches on the current device into the engine's stream: every public entry
    point makes the engine's device current (devices.on_engine_device) and restores the
    caller's; the run equals the same run with cuda:1 current, bitwise."""
    runs = []
    for current in (1, 0):
        torch.cuda.set_device(current)
        model, e = make("cuda:1", precision)
        x = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1)).to("cuda:1")
        for _ in range(6):
            e.backward(model(x, x))
            e.step()
        assert torch.cuda.current_device() == current
        torch.cuda.synchronize(1)
        runs.append(e.flat.master_flat.cpu())
    torch.cuda.set_device(0)
    assert torch.equal(runs[0], runs[1])


def _thousand_steps_rank(rank, world, zero_stage):
    from pyengine.ddp.overlap import MAX_UNFOLDED_WINDOWS

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(6)]).cuda()
    e = Engine(model, EngineConfig(precision="bf16", zero_stage=zero_stage, bucket_mb=0.01, first_bucket_mb=0.01))
    x = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
    events, memory = [], []
    for k in range(1000):
        e.backward(model(x).float().pow(2).mean())
        e.step()
        if k % 100 == 99:
            events.append(e.reducer.overlap._windows.events())
            memory.append(torch.cuda.memory_allocated())
    buckets = len(e.reducer.buckets)
    stats = e.stats()
    return {"events": events, "memory": memory, "limit": MAX_UNFOLDED_WINDOWS * (1 + 2 * buckets),
            "windows": stats.get("windows"), "buckets": buckets}


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 1])
def test_a_thousand_data_parallel_steps_hold_flat_events_and_memory(zero_stage):
    """Two gloo ranks sharing the GPU: the timing events held stay under the bound and the
    allocated memory is the same at step 200 as at step 1,000."""
    from dist_util import ok, run_ranks

    for r in ok(run_ranks(_thousand_steps_rank, 2, zero_stage), 2):
        assert r["buckets"] > 1
        assert max(r["events"]) <= r["limit"], r["events"]
        assert r["memory"][1:] == [r["memory"][1]] * (len(r["memory"]) - 1), r["memory"]
