"""A step whose communicator was aborted is skipped on the device: after an abort the
pending collectives may return part-way, and the compute stream has already been told to
wait for them, so the step cannot rely on the host seeing the error first. The communicator's
abort word (NcclComm's, in mapped host memory) reaches step_scalars; here a host word stands
in for it on two gloo ranks (the NCCL path runs in tests/test_cuda_nccl.py)."""
import pytest
import torch

from dist_util import ok, run_ranks

pytestmark = pytest.mark.slow


def aborted_rank(rank, world, zero_stage, deterministic):
    from pyengine import Engine, EngineConfig
    from pyengine.comm.torch_comm import TorchComm

    word = torch.zeros(1, dtype=torch.int32)
    TorchComm.abort_word = word.data_ptr()  # as NcclComm's watchdog would set it
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
    engine = Engine(model, EngineConfig(lr=1e-2, zero_stage=zero_stage, deterministic=deterministic,
                                        bucket_mb=0.0005, first_bucket_mb=0.0005))
    x = torch.randn(4, 8)
    results = []
    for k in range(4):
        if k == 2:
            word[0] = 1
            before = [p.detach().clone() for p in model.parameters()]
        engine.backward(model(x).pow(2).mean())
        results.append(bool(engine.step()))
        if k == 2:
            unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            word[0] = 0
    return {"results": results, "unchanged": unchanged, "skipped": engine.skipped_steps,
            "buckets": len(engine.reducer.buckets)}


@pytest.mark.parametrize("zero_stage,deterministic", [(0, False), (1, False), (0, True)],
                         ids=["zero0", "zero1", "deterministic"])
def test_a_step_after_an_abort_is_skipped(zero_stage, deterministic):
    for r in ok(run_ranks(aborted_rank, 2, zero_stage, deterministic), 2):
        assert r["buckets"] > 1
        assert r["results"] == [True, True, False, True]
        assert r["unchanged"] and r["skipped"] == 1
