"""Mutation check: each mutant is a bug the test suite must catch.

For every mutant this copies the installed package (Python sources and compiled modules) to
a temporary folder, applies one small edit, and runs the test modules that guard that
behaviour against the mutated copy, stopping at the first red test. It prints which test
caught which mutant, and exits 1 if any mutant survives (the suite is green on it) or no
longer applies (the code it edits has changed: update the mutant). A mutant counts as caught
only if its tests pass on the unmutated copy (--baseline checks that too; CI runs the whole
suite just before this).

    python tests/mutation_check.py            # all mutants
    python tests/mutation_check.py --only clip-skipped
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

TESTS = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Mutant:
    name: str
    what: str
    file: str  # relative to the package folder
    find: str  # exact text; every occurrence is replaced, at least one must exist
    replace: str
    tests: Tuple[str, ...]  # test modules (or node ids) that guard the behaviour, fastest first


MUTANTS = [
    Mutant("no-unscale", "fp16 gradients are never unscaled (inv_scale reads as 1 everywhere)",
           "scalars.py", 'return getattr(self, name).data_ptr()',
           'return 0 if name == "inv_scale" else getattr(self, name).data_ptr()',
           ("test_grads.py", "test_engine.py")),
    Mutant("no-wire-divide", "a half-precision wire sums the ranks' gradients instead of averaging them",
           "ddp/reducer.py", "alpha = 1.0 / self.world if predivide else 1.0", "alpha = 1.0",
           ("test_ddp.py::test_reduced_precision_wire",)),
    Mutant("clip-skipped", "clip_grad_norm is ignored",
           "plan.py", "a.max_norm = math.inf if max_norm is None else float(max_norm)", "a.max_norm = math.inf",
           ("test_engine.py", "test_grads.py")),
    Mutant("bias-correction-off-by-one", "Adam's step count starts at 1, so bias correction is one step late",
           "counts.py", "self.counters = torch.zeros(n_groups + n,", "self.counters = torch.ones(n_groups + n,",
           ("test_engine.py",)),
    Mutant("grads-not-cleared", "the gradients are not cleared after the update",
           "plan.py", "dtype_code(opt_grads), self.zero_in_pass", "dtype_code(opt_grads), False",
           ("test_engine.py", "test_grads.py")),
    Mutant("scale-never-backs-off", "an overflow never lowers the fp16 loss scale",
           "scaler.py", "ops.loss_scale_config(mod, 2.0, 0.5,", "ops.loss_scale_config(mod, 2.0, 1.0,",
           ("test_engine.py",)),
    Mutant("ready-order-ignored", "the bucket rebuild keeps the old layout instead of the gradient-ready order",
           "layout.py", "groups = [sorted(g.members, key=lambda i: rank.get(i, late)) for g in self.groups]",
           "groups = [list(g.members) for g in self.groups]",
           ("test_layout.py",)),
    Mutant("zero-scalars-not-combined", "ZeRO-1 ranks skip and clip on their own slice's flag and norm",
           "ddp/reducer.py", "self.comm.allreduce(flag_and_sumsq, average=False).wait()", "pass",
           ("test_zero.py::test_fp16_overflow_is_skipped_by_every_rank_together",
            "test_zero.py::test_zero1_binding_clip_scales_as_unsharded")),
    Mutant("skipped-params-updated", "parameters that got no gradient (unused, frozen) are decayed and their moments "
           "advanced, unlike torch.optim",
           "step.py", "        if used.count(0) == 0:\n            return ()", "        if True:\n            return ()",
           ("test_torch_parity.py::test_parameter_without_gradient_is_untouched_as_in_torch",
            "test_torch_parity.py::test_layer_frozen_after_build_is_left_alone_and_keeps_its_step_count")),
    Mutant("cohorts-not-split", "a skipped parameter keeps sharing its step count with the updated ones",
           "counts.py", "            if c in updated:", "            if False:",
           ("test_torch_parity.py::test_layer_frozen_after_build_is_left_alone_and_keeps_its_step_count",)),
    Mutant("cast-not-undone", "a refused module cast leaves the weights it moved out of the engine's buffers",
           "module_guard.py", "            _restore(saved)", "            pass",
           ("test_torch_parity.py::test_refused_module_cast_leaves_the_model_as_it_was",)),
    Mutant("forward-reads-before-gather", "a module's forward does not wait for its parameters' all-gather",
           "ddp/reducer.py", "self.overlap.wait_gather(self._bucket_of[i])", "pass",
           ("test_zero.py::test_overlapped_param_gather_trains_as_unsharded_across_the_bucket_rebuild",)),
    Mutant("tree-left-fold", "deterministic mode folds each rank's micro-batches left to right, not in the midpoint tree",
           "deterministic.py", "mid = lo + (hi - lo) // 2\n            if j < mid:", "mid = hi - 1\n            if j < mid:",
           ("test_deterministic_parts.py",)),
    Mutant("zero-grad-keeps-partials", "zero_grad() inside a deterministic window leaves the earlier micro-batches' "
           "partial sums", "grads.py", "if self.tree is not None:\n            slots", "if False:\n            slots",
           ("test_deterministic_parts.py",)),
    Mutant("shards-owned-by-rank", "the deterministic layout gives rank r slice r, not the slice the exchange leaves it",
           "layout.py", "return bit_reverse(rank, self.shard_world) if self.deterministic else rank", "return rank",
           ("test_deterministic_parts.py",)),
    Mutant("loss-factor-per-rank", "deterministic mode scales the loss by 1/grad_accum_steps, not 1/G over all ranks",
           "step.py", "self._global_micro = parts.config.grad_accum_steps * parts.world_size",
           "self._global_micro = parts.config.grad_accum_steps",
           ("test_deterministic.py::test_bitwise_equal_at_1_2_and_4_ranks",)),
    Mutant("failed-backward-keeps-grads", "a caught failure in backward leaves its window's gradients to the next step",
           "step.py", "            p.guard.discard()", "            pass",
           ("test_failed_backward.py",)),
    Mutant("abandon-unordered", "a failed backward's queued CUDA collectives are not ordered before the compute stream",
           "ddp/overlap.py", "        torch.cuda.current_stream(self.device).wait_stream(self.stream)\n        self._spans = []",
           "        self._spans = []", ("test_overlap_protocol.py",)),
    Mutant("replay-skips-host-part", "a replayed CUDA graph shares the live skip flag and misses in-place weight loads",
           "graph.py", "        pipeline.before_boundary()\n", "", ("test_graph_replay.py",)),
    Mutant("launch-on-current-device", "the engine's kernels launch on whatever CUDA device is current",
           "devices.py", "        if index is None or torch.cuda.current_device() == index:",
           "        if True:", ("test_device_guard.py",)),
]


def _package_dir() -> Path:
    import pyengine

    return Path(pyengine.__file__).resolve().parent


def _prepare(root: Path, m: Mutant) -> str:
    """Copies the package and the tests under root and applies the mutant; returns an error
    message when the mutant no longer applies."""
    pkg = root / "pyengine"
    shutil.copytree(_package_dir(), pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copytree(TESTS, root / "tests", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    target = pkg / m.file
    text = target.read_text()
    count = text.count(m.find)
    if count == 0:
        return f"{m.file} no longer contains {m.find!r}: update this mutant"
    target.write_text(text.replace(m.find, m.replace))
    return ""


def run_mutant(m: Mutant, timeout: float) -> dict:
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix=f"pyengine-mutant-{m.name}-") as tmp:
        root = Path(tmp)
        err = _prepare(root, m)
        if err:
            return {"mutant": m.name, "status": "stale", "detail": err, "seconds": time.time() - t0}
        env = dict(os.environ, PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")
        env.pop("PYENGINE_TEST_SEED", None)
        where = subprocess.run([sys.executable, "-c", "import pyengine; print(pyengine.__file__)"], env=env,
                               cwd=root, capture_output=True, text=True)
        if not where.stdout.strip().startswith(str(root)):
            return {"mutant": m.name, "status": "error", "seconds": time.time() - t0,
                    "detail": f"the mutated copy is not the package imported ({where.stdout.strip() or where.stderr})"}
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "--tb=no", "-rf", "-p", "no:cacheprovider",
               *[f"tests/{t}" for t in m.tests]]
        try:
            res = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"mutant": m.name, "status": "timeout", "detail": f"no verdict in {timeout:.0f} s",
                    "seconds": time.time() - t0}
    failed = re.findall(r"^FAILED (\S+)", res.stdout, flags=re.M)
    if res.returncode == 1 and failed:
        return {"mutant": m.name, "status": "caught", "detail": failed[0], "seconds": time.time() - t0}
    if res.returncode == 0:
        return {"mutant": m.name, "status": "SURVIVED", "detail": "every selected test passed",
                "seconds": time.time() - t0}
    tail = (res.stdout + res.stderr).strip().splitlines()[-3:]
    return {"mutant": m.name, "status": "error", "detail": " | ".join(tail), "seconds": time.time() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[], help="run only this mutant (repeatable)")
    ap.add_argument("--timeout", type=float, default=150.0, help="seconds per mutant (150)")
    ap.add_argument("--baseline", action="store_true", help="first run every mutant's tests unmutated")
    args = ap.parse_args(argv)
    names = {m.name for m in MUTANTS}
    unknown = sorted(set(args.only) - names)
    if unknown:
        ap.error(f"unknown mutant(s) {unknown}; known: {sorted(names)}")
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    t0 = time.time()
    rows = []
    if args.baseline:
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        r = run_mutant(Mutant("unmutated", "", "__init__.py", "", "", tests), args.timeout * 2)
        ok = r["status"] == "SURVIVED"  # every test passed, as it must without a mutant
        print(f"{'ok' if ok else 'FAILED':>8}  {'baseline (no mutant)':<27} {r['seconds']:5.1f} s  "
              f"{'' if ok else r['detail']}", flush=True)
        if not ok:
            return 1
    for m in chosen:
        r = run_mutant(m, args.timeout)
        rows.append(r)
        print(f"{r['status']:>8}  {m.name:<27} {r['seconds']:5.1f} s  {r['detail']}", flush=True)
    bad = [r for r in rows if r["status"] != "caught"]
    print(f"{len(rows) - len(bad)} of {len(rows)} mutants caught in {time.time() - t0:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
