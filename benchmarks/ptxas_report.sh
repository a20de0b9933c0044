#!/usr/bin/env bash
# Registers per thread of the kernels that carry the step (ptxas -v, sm_90) and the blocks of
# 256 threads per SM that this allows on sm_90. Needs nvcc only, no GPU.
#
#   benchmarks/ptxas_report.sh [source root (default: this checkout)] [--all]
#
# Note: the flags are CMakeLists.txt's for pe_cuda_kernels in a Release build (-O3 -DNDEBUG
# --fmad=false, C++17, the same include paths), one architecture: ptxas allocates registers per
# architecture, and sm_90 is the H200's.
set -euo pipefail
ROOT=$(cd "${1:-$(dirname "$0")/..}" && pwd)
ALL=${2:-}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

for src in "$ROOT"/csrc/cuda/*.cu; do
  nvcc -c "$src" -o "$OUT/$(basename "$src").o" -std=c++17 -O3 -DNDEBUG --fmad=false -Xcompiler=-fPIC \
    -I"$ROOT/csrc" -I"$ROOT/csrc/include" -DPE_CUDA_ARCHS='"90"' \
    -gencode arch=compute_90,code=sm_90 -Xptxas -v 2>"$OUT/$(basename "$src").log"
done

echo "# ptxas -v, sm_90, nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')," \
  "sources at $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo "$ROOT")"
cat >"$OUT/parse.py" <<'EOF'
import re, subprocess, sys

# sm_90 limits (CUDA occupancy calculator): 65536 registers, allocated per warp in units of
# 256; at most 64 warps, 32 blocks and 228 KiB of shared memory per SM, 1 KiB of it reserved
# per block.
REGS, REG_UNIT, WARPS, BLOCKS, SMEM, SMEM_PER_BLOCK = 65536, 256, 64, 32, 228 * 1024, 1024
BLOCK = 256
WARPS_PER_BLOCK = BLOCK // 32

def blocks_per_sm(regs, smem):
    per_warp = -(-regs * 32 // REG_UNIT) * REG_UNIT
    by_regs = (REGS // per_warp) // WARPS_PER_BLOCK
    by_warps = WARPS // WARPS_PER_BLOCK
    by_smem = SMEM // (smem + SMEM_PER_BLOCK)
    limits = {"registers": by_regs, "warps": by_warps, "blocks": BLOCKS, "shared": by_smem}
    n = min(limits.values())
    return n, "/".join(k for k, v in limits.items() if v == n)

ACCESS = {"0": "in", "1": "out", "2": "inout", "3": "in_zero", "4": "none"}
DTYPE = {"float": "f32", "__half": "f16", "__nv_bfloat16": "bf16", "pyengine::cuda::NoArray": "-"}

def label(name):
    """A short name for the kernels of interest, None for the others."""
    if name.startswith("void pyengine::cuda::elementwise_kernel<"):
        op = re.search(r"registry::(\w+)>|kernels::(\w+)Elem>", name)
        op = op.group(1) or op.group(2)
        template_args = name.split(">(")[0]  # not the parameter list, which repeats them
        arrays = re.findall(r"Array<([\w:]+)(?: const)?, \(pyengine::cuda::Access\)(\d)>", template_args)
        args = " ".join(f"{DTYPE.get(t, t)}:{ACCESS[a]}" for t, a in arrays)
        variant = " all-vector" if "elementwise_kernel<true" in name else ""
        return op, f"{op}({args}){variant}"
    m = re.match(r"void pyengine::cuda::\(anonymous namespace\)::sumsq_stage1<([\w:]+), ([\w:]+)>", name)
    if m:
        return "sumsq_stage1", f"sumsq_stage1(src {DTYPE[m.group(1)]}, dst {DTYPE[m.group(2)]})"
    return None

KEEP = {"adamw", "Accumulate", "Scale", "sumsq_stage1"}
rows, entry = [], None
lines = [l for path in sys.argv[2:] for l in open(path)]
for line in lines:
    m = re.search(r"Compiling entry function '(\w+)' for 'sm_90'", line)
    if m:
        entry = m.group(1)
        continue
    m = re.search(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?", line)
    if m and entry:
        rows.append((entry, int(m.group(1)), int(m.group(2) or 0)))
        entry = None
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and rows and int(m.group(1)) + int(m.group(2)) > 0:
        print(f"# SPILLS in the next entry: {line.strip()}")

names = subprocess.run(["c++filt"], input="\n".join(r[0] for r in rows), capture_output=True,
                       text=True, check=True).stdout.splitlines()
table = []
for (mangled, regs, smem), name in zip(rows, names):
    got = label(name)
    if got is None or (got[0] not in KEEP and sys.argv[1] != "--all"):
        continue
    n, limit = blocks_per_sm(regs, smem)
    table.append((got[1], regs, smem, n, limit))

print(f"# blocks/SM: blocks of {BLOCK} threads resident per sm_90 SM (64 warps cap it at 8)")
print(f"{'kernel':<64} {'regs':>4} {'smem':>6} {'blocks/SM':>9}  limited by")
for name, regs, smem, n, limit in sorted(set(table)):
    print(f"{name:<64} {regs:>4} {smem:>6} {n:>9}  {limit}")
EOF
python3 "$OUT/parse.py" "$ALL" "$OUT"/*.log
