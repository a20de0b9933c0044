"""The benchmark commands run end to end (tiny sizes) and write their JSON; no timing is checked."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("which,extra", [("kernels", []), ("step", []), ("overhead", []), ("models", []),
                                         ("allreduce", ["--nproc", "2"]),
                                         ("ddp", ["--nproc", "2"]), ("ddp-zero1", ["--nproc", "2", "--zero", "1"])])
def test_bench_runs(which, extra, tmp_path):
    res = subprocess.run([sys.executable, "-m", "pyengine.bench", which.split("-")[0], "--quick", "--out", str(tmp_path), *extra],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    files = list(tmp_path.glob(f"{which}-cpu-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["rows"] and data["device"] and data["torch"]
    if which == "ddp-zero1":  # fp32 sharded over 2 ranks: 8 + 8/2 B/param, and the trace it measured
        zero0, zero1 = data["rows"][0], data["rows"][1]
        assert zero0["bytes_per_param"] == 16 and zero1["bytes_per_param"] == 12 and 0 <= zero1["comm_during_backward"] <= 1
        assert list(tmp_path.glob("trace-ddp-cpu-zero1.rank0.json"))


def test_bench_ddp_deterministic(tmp_path):
    """--deterministic: the default path and deterministic=True side by side on 2 ranks, 2
    micro-batches each; the counted bytes match the exchange's model, the parser finds the
    fixed-pairing bucket spans in the trace, and the change measured beside it keeps the bits."""
    res = subprocess.run([sys.executable, "-m", "pyengine.bench", "ddp", "--deterministic", "--quick", "--nproc", "2",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    files = list(tmp_path.glob("ddp-deterministic-2ranks-cpu-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    default, det = data["rows"]
    assert data["grad_accum_per_rank"] == 2 and det["micro_batches_per_step"] == 4
    assert default["memory_per_param"]["total"] == 16 and "tree_partials" not in default["memory_per_param"]
    # two micro-batches a rank: the second lands on the first, no partial buffer
    assert det["memory_per_param"]["tree_partials"] == 0 and det["bytes_per_param"] == 16
    # 2 ranks: a ring's 2 (d-1)/d is the fp32 gradients once; halving + doubling send half each, of
    # gradients padded to whole norm chunks (a little more)
    assert default["wire_bytes_per_step"] == 4 * default["params"]
    assert det["wire_bytes_per_step"] == det["wire_bytes_model"] >= default["wire_bytes_per_step"]
    assert det["rounds_per_step"] > 0 and det["parts_ms"]["exchange_send_recv"] > 0
    for r in (default, det):
        assert 0 <= r["comm_during_backward"] <= 1 and r["step_ms"] > 0
    trace = json.loads(Path(det["trace"]).read_text())["traceEvents"]
    assert any(e["name"].startswith("fixed-pairing allreduce bucket ") for e in trace)
    assert set(data["isolated"]) >= {"ring_allreduce_ms", "tree_allreduce_ms", "tree_fold_micro_ms", "chunk_norm_ms"}
    # the change measured beside the engine's exchange gives its bits
    assert data["isolated"]["changed_exchange_same_bits"] is True
