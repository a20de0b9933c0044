"""The package as users get it: build info, and a wheel installed into a fresh virtualenv."""
import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

import pyengine

ROOT = Path(__file__).resolve().parents[1]


def test_build_info():
    info = pyengine.build_info()
    assert info["version"] == pyengine.__version__
    assert info["cpu_simd"] in ("avx2", "generic")
    assert info["omp_threads"] >= 1
    if info["cuda_compiled"]:
        assert info["cuda_archs"], "archs must be reported when CUDA kernels are compiled"
    assert isinstance(info["nccl_compiled"], bool)


def test_import_without_gpu_reports_no_device():
    if pyengine._cuda is None:
        pytest.skip("built without CUDA kernels")
    code = "import pyengine; print(pyengine._cuda.device_count(), pyengine.cuda_available())"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "False"]


@pytest.mark.slow
def test_wheel_installs_into_fresh_venv(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(ROOT)], check=True, cwd=ROOT)
    wheel = next(wheels.glob("pyengine-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    # numpy only: the compiled core needs no torch (and no CUDA library) to import and run.
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel), "numpy"], check=True)
    code = (
        "import json, numpy as np, pyengine; from pyengine import ops\n"
        "a = np.arange(5, dtype=np.float32); out = np.zeros(5, dtype=np.float16)\n"
        "ops.cast_scale(a, out, 0.5)\n"
        "print(json.dumps({'out': out.tolist(), 'info': pyengine.build_info()}))\n"
    )
    res = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["out"] == [0.0, 0.5, 1.0, 1.5, 2.0]
    if shutil.which("nvcc") and not os.environ.get("PYENGINE_NO_CUDA"):
        assert data["info"]["cuda_compiled"], "nvcc was on PATH, the wheel must carry the CUDA kernels"


@pytest.mark.slow
def test_cpu_only_wheel_when_cuda_is_skipped(tmp_path):
    import zipfile

    env = dict(os.environ, PYENGINE_NO_CUDA="1", PYENGINE_BUILD_DIR=str(tmp_path / "build"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "wheels"), str(ROOT)], check=True, cwd=ROOT, env=env)
    wheel = next((tmp_path / "wheels").glob("pyengine-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("pyengine/_C.") for n in names)
    assert not any(n.startswith("pyengine/_cuda.") for n in names), "no CUDA module when CUDA is skipped"
    assert "pyengine/ops.py" in names and "pyengine/train/cli.py" in names


EXPECTED_OPTIMIZERS = (
    {"name": "adamw", "function": "adamw_step", "states": ("exp_avg", "exp_avg_sq"),
     "hyper": ("lr", "beta1", "beta2", "eps", "weight_decay", "maximize")},
    {"name": "adam", "function": "adam_step", "states": ("exp_avg", "exp_avg_sq"),
     "hyper": ("lr", "beta1", "beta2", "eps", "weight_decay", "maximize")},
    {"name": "sgd", "function": "sgd_step", "states": ("momentum_buffer",),
     "hyper": ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")},
    {"name": "lion", "function": "lion_step", "states": ("exp_avg",),
     "hyper": ("lr", "beta1", "beta2", "weight_decay", "maximize")},
)


def test_both_modules_export_one_optimizer_list():
    mods = [pyengine._native._C] + ([pyengine._native._cuda] if pyengine._native._cuda is not None else [])
    for mod in mods:
        assert mod.OPTIMIZERS == EXPECTED_OPTIMIZERS, mod.__name__
        for o in mod.OPTIMIZERS:
            assert callable(getattr(mod, o["function"])), (mod.__name__, o["function"])
            assert len(o["hyper"]) <= pyengine._native._C.HYPER_SLOTS
        assert not hasattr(mod, "AdamConfig") and not hasattr(mod, "SgdConfig"), "the hyper block is the one source"
    assert "boundaries" not in pyengine._native._C.STEP_SLOTS, "boundary steps are counted in an int64"
    if len(mods) == 2:
        assert mods[0].OPTIMIZERS == mods[1].OPTIMIZERS
