#!/usr/bin/env bash
# One prepared GPU check, for a lent machine: build with CUDA, CUDA tests (+ compute-sanitizer
# memcheck where it works), kernel/step/allreduce benchmarks. Ends within ~8 minutes on one
# GPU; everything lands under $OUT (default ./gpu_check_out).
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
timeout 240 python3 -m pytest -q -x -m cuda tests/ 2>&1 | tail -25
echo "== cuda tests done at $((SECONDS - t0)) s"
if command -v compute-sanitizer >/dev/null; then
  timeout 90 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -x -m cuda \
    tests/test_cuda_ops.py -k "matches_cpu and not 16777219" 2>&1 | tail -8
  echo "== memcheck rc=$? at $((SECONDS - t0)) s"
fi
timeout 120 python3 -m pyengine.bench kernels --device cuda --out "$OUT"
timeout 90 python3 -m pyengine.bench step --device cuda --out "$OUT"
echo "== done in $((SECONDS - t0)) s"
