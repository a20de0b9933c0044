#!/usr/bin/env bash
# One prepared GPU check for a lent machine, inside a fixed budget (default 360 s): build with
# CUDA, the CUDA tests (CUDA-graph cases in processes of their own), the kernel and model
# benchmarks, compute-sanitizer (memcheck on the op tests; racecheck and synccheck on a
# data-parallel step of two gloo ranks sharing the GPU), the main job with no flags, ncu
# counters and ptxas register use of the fused AdamW pass. Steps run in priority order, each
# under its own timeout cut to the budget left; a step that no longer fits is logged as
# skipped. Everything lands under $OUT (default ./gpu_check_out): the log, the benchmarks' JSON
# files, the main job's report. Usage: OUT=... [BUDGET_S=360] bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-$PWD/gpu_check_out}
BUDGET_S=${BUDGET_S:-360}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
exec > >(tee "$LOG") 2>&1
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYENGINE_FORCE_CUDA=1 PYENGINE_CUDA_ARCHS=${PYENGINE_CUDA_ARCHS:-90}
echo "== $(date -u) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# step NAME SECONDS COMMAND...: runs COMMAND under min(SECONDS, budget left), logs rc and time
step() {
  local name=$1 want=$2
  shift 2
  local left=$((BUDGET_S - SECONDS))
  if ((left < 10)); then
    echo "== $name: SKIPPED (budget spent at ${SECONDS} s)"
    return
  fi
  local t=$((want < left ? want : left)) t0=$SECONDS
  echo "== $name (timeout ${t} s)"
  timeout "$t" "$@"
  echo "== $name: rc=$? in $((SECONDS - t0)) s (at ${SECONDS} s)"
}

step build 90 python3 -m pip install -q --no-build-isolation --no-deps -e . || true
python3 -c "import pyengine, json; print(json.dumps(pyengine.build_info()))" || { echo "BUILD FAILED"; exit 1; }
python3 -c "import xdist" 2>/dev/null && PAR="-n 4" || PAR=""
step "cuda tests" 150 python3 -m pytest -q $PAR -m cuda tests/ -p no:cacheprovider -rfE
step "bench kernels" 50 python3 -m pyengine.bench kernels --device cuda --out "$OUT"
step "bench models" 80 python3 -m pyengine.bench models --device cuda --out "$OUT"
if command -v compute-sanitizer >/dev/null; then
  step memcheck 30 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -x -m cuda \
    tests/test_cuda_ops.py -k "matches_cpu and not 1048579 and not 16777219" -p no:cacheprovider
  for tool in racecheck synccheck; do
    step "$tool, data-parallel step" 30 compute-sanitizer --tool "$tool" --target-processes all --error-exitcode 9 \
      python3 -m pytest -q -x tests/test_cuda_engine.py -k "two_gloo_ranks_on_one_gpu_match_one_process and fp32" \
      -p no:cacheprovider
  done
fi
step "main job, no flags" 45 pyengine-train --steps 30 --out "$OUT/train"
grep -iE "mfu|tokens/s" "$OUT"/train/report.md "$OUT"/train/*/report.md 2>/dev/null | head -5
step "bench step" 25 python3 -m pyengine.bench step --device cuda --out "$OUT"
step "bench overhead" 25 python3 -m pyengine.bench overhead --device cuda --out "$OUT"
if command -v ncu >/dev/null; then
  step "ncu, flat AdamW" 40 ncu --clock-control none -k regex:elementwise_kernel --launch-count 2 \
    --section SpeedOfLight --section Occupancy --section LaunchStats python3 -c "
import torch
from pyengine.bench.kernels import GPT2_124M, flat_adamw_cases
for name, label, nbytes, run in flat_adamw_cases(GPT2_124M, 'cuda'):
    run()
torch.cuda.synchronize()"
fi
step "ptxas registers" 40 bash benchmarks/ptxas_report.sh
echo "== done in ${SECONDS} s"
