#!/usr/bin/env bash
# One prepared GPU check, for a lent machine, in about 6 minutes: build with CUDA, the CUDA
# tests (CUDA-graph cases in processes of their own), compute-sanitizer memcheck on the op
# tests, then the kernel, step, overhead and model benchmarks. Everything lands under $OUT
# (default ./gpu_check_out): the log and the benchmarks' JSON files.
set -uo pipefail
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
exec > >(tee "$LOG") 2>&1
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYENGINE_FORCE_CUDA=1 PYENGINE_CUDA_ARCHS=${PYENGINE_CUDA_ARCHS:-90}
echo "== $(date -u) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
t0=$SECONDS
python3 -m pip install -q --no-build-isolation --no-deps -e . || { echo "BUILD FAILED"; exit 1; }
echo "== build $((SECONDS - t0)) s"
python3 -c "import pyengine, json; print(json.dumps(pyengine.build_info()))"
python3 -c "import pytest_xdist" 2>/dev/null && PAR="-n 4" || PAR=""
timeout 240 python3 -m pytest -q $PAR -m cuda tests/ -p no:cacheprovider 2>&1 | tail -30
echo "== cuda tests done at $((SECONDS - t0)) s"
if command -v compute-sanitizer >/dev/null; then
  timeout 90 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -x -m cuda \
    tests/test_cuda_ops.py -k "matches_cpu and not 16777219" -p no:cacheprovider 2>&1 | tail -8
  echo "== memcheck rc=$? at $((SECONDS - t0)) s"
fi
timeout 60 python3 -m pyengine.bench kernels --device cuda --out "$OUT"
timeout 40 python3 -m pyengine.bench step --device cuda --out "$OUT"
timeout 40 python3 -m pyengine.bench overhead --device cuda --out "$OUT"
timeout 150 python3 -m pyengine.bench models --device cuda --out "$OUT"
echo "== done in $((SECONDS - t0)) s"
