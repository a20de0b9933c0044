"""The benchmark commands run end to end (tiny sizes) and write their JSON; no timing is checked."""
import json
import subprocess
import sys

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
