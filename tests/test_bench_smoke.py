"""The benchmark commands run end to end (tiny sizes) and write their JSON; no timing is checked."""
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("which,extra", [("kernels", []), ("step", []), ("overhead", []), ("models", []),
                                         ("allreduce", ["--nproc", "2"]),
                                         ("ddp", ["--nproc", "2"])])
def test_bench_runs(which, extra, tmp_path):
    res = subprocess.run([sys.executable, "-m", "pyengine.bench", which, "--quick", "--out", str(tmp_path), *extra],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    files = list(tmp_path.glob(f"{which}-cpu-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["rows"] and data["device"] and data["torch"]
