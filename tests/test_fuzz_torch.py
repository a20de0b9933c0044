"""Differential, property-based fuzzing of the Engine with torch.optim as the oracle.

hypothesis draws programs (a model, an optimizer and its hyper-parameters, param groups,
clipping, micro-batches per update, an LR scheduler, then a list of user actions: updates
with zero_grad in every place, param_groups writes, scheduler steps, freezing and unfreezing,
state round trips, torch.optim state loaded into the engine, a second optimizer, a
memory-format cast, checkpoints of another precision, a submodule's state_dict saved) and
fuzz_actions.py plays each on a plain PyTorch side and on an Engine side, in lockstep. See
fuzz_actions.py for the oracle and the derivation of every tolerance.

Profiles:
  fp32, one process: PYENGINE_FUZZ_EXAMPLES examples (default 300);
  bf16, one process, against torch.autocast(bfloat16) with fp32 master weights (30);
  fp32 on 2 gloo ranks against DistributedDataParallel (slow; 3 spawns of 8 programs).
The seed is fixed and printed; PYENGINE_FUZZ_SEED=N explores others. A failing program is
printed in full (hypothesis shrinks it first, except on two ranks, where each try spawns).
"""
import os

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

import fuzz_actions as fa
from dist_util import run_ranks

SEED = int(os.environ.get("PYENGINE_FUZZ_SEED", "20261201"))
EXAMPLES = int(os.environ.get("PYENGINE_FUZZ_EXAMPLES", "300"))
BF16_EXAMPLES = int(os.environ.get("PYENGINE_FUZZ_BF16_EXAMPLES", str(max(1, EXAMPLES // 10))))
DDP_SPAWNS = int(os.environ.get("PYENGINE_FUZZ_DDP_SPAWNS", "3"))
DDP_PROGRAMS = 8

COMMON = dict(deadline=None, database=None, print_blob=True, report_multiple_bugs=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])


def _announce(profile, n):
    print(f"PYENGINE_FUZZ_SEED={SEED} profile={profile} examples={n}")


@seed(SEED)
@settings(max_examples=EXAMPLES, **COMMON)
@given(prog=fa.programs("fp32"))
def test_fp32_engine_matches_torch_optim(prog):
    fa.run_program(prog)


@seed(SEED + 1)
@settings(max_examples=BF16_EXAMPLES, **COMMON)
@given(prog=fa.programs("bf16"))
def test_bf16_engine_matches_torch_autocast(prog):
    fa.run_program(prog)


@pytest.mark.slow
@seed(SEED + 2)
@settings(max_examples=DDP_SPAWNS, phases=(Phase.explicit, Phase.reuse, Phase.generate), **COMMON)
@given(progs=st.lists(fa.programs("ddp"), min_size=DDP_PROGRAMS, max_size=DDP_PROGRAMS))
def test_two_ranks_match_torch_ddp(progs, tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("fuzz-ddp"))
    results = run_ranks(fa.ddp_rank, 2, progs, tmp)
    bad = {r: v for r, (s, v) in results.items() if s != "ok"}
    assert not bad and len(results) == 2, f"ranks failed: {bad or 'missing results'}"
    out = results[0][1]
    assert out["failed"] is None, f"program {out['failed']} diverged: {out['errors']}\n{out['program']!r}"


def test_seed_is_printed():
    _announce("fp32", EXAMPLES)
    _announce("bf16", BF16_EXAMPLES)
    _announce("ddp", DDP_SPAWNS * DDP_PROGRAMS)
