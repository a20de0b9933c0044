"""Which row of the expected-behaviour table (fuzz_actions.ROWS) the fuzzer finds, and how
soon: one small program per row, played alone, then N random programs of a profile, each
played to its first failure (hypothesis would stop the whole run at the first one).

    PYTHONPATH=. python3 tests/fuzz_survey.py [N] [profile] [seed]
"""
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fuzz_actions as fa  # noqa: E402
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402


def prog(kind="mlp", opt="sgd", actions=(), **over):
    hp = {"lr": 0.1, "weight_decay": 0.1}
    hp.update({"momentum": 0.9, "nesterov": False, "dampening": 0.0} if opt == "sgd" else
              {"betas": (0.5, 0.75), "eps": 1e-8})
    hp.update(over.pop("hp", {}))
    p = {"profile": "fp32", "kind": kind, "seed": 1, "opt": opt, "hp": hp, "groups": "one", "build_extra": {},
         "clip": None, "accum": 1, "sched": None, "actions": list(actions)}
    p.update(over)
    return p


def train(*hooks, accum=1):
    hooks = list(hooks) + [(None, None)] * (accum - len(hooks))
    return ("train", tuple({"top": t, "mid": m, "aux": False, "data": j} for j, (t, m) in enumerate(hooks)))


T = train()
TARGETED = {
    1: prog(hp={"momentum": 0.0}, actions=[("set", 0, "momentum", 0.9), T, T]),
    2: prog(actions=[T, train((None, ("zero", "opt", True)))]),
    "2b": prog(actions=[T, train((None, ("zero", "model", True)))]),
    3: prog(actions=[T, ("other",)]),
    4: prog(actions=[T, ("freeze", "l0", False), T]),
    "4b": prog(opt="adamw", actions=[T, ("freeze", "l0", False), T]),
    5: prog(kind="frozen", actions=[T, ("freeze", "l0", True), T]),
    6: prog(kind="nograd", actions=[T]),
    "6b": prog(kind="nograd", opt="adam", hp={"weight_decay": 0.0}, actions=[T]),
    7: prog(kind="conv", actions=[T, ("channels_last",)]),
    8: prog(actions=[T, ("xload", "fp16>fp32"), T]),
    9: prog(actions=[T, ("xload", "bf16>fp16")]),
    10: prog(opt="adamw", build_extra={"amsgrad": True}, actions=[T]),
    "10b": prog(opt="adamw", actions=[T, ("set", 0, "amsgrad", True), T]),
    "10c": prog(actions=[("set", 0, "maximize", True), T]),
    11: prog(opt="adamw", actions=[T, ("load_torch", 2 ** 24 + 3), T]),
    12: prog(opt="adamw", hp={"lr": 1.0, "betas": (0.9, 0.999)}, actions=[T, T, T]),
    13: prog(actions=[("save_sub", "l0")]),
}


def play(p):
    try:
        fa.run_program(p)
        return None
    except fa.Divergence as d:
        return d
    except Exception as e:  # a crash of the harness itself
        return fa.Divergence("crash", f"{type(e).__name__}: {e}")


def targeted():
    print("row | found | message")
    for row, p in TARGETED.items():
        d = play(p)
        print(f"{row} | {'yes (row %s)' % d.row if d else 'no'} | {str(d)[:400] if d else ''}")


def random_run(n, profile, s):
    rows, first, msg, count = collections.Counter(), {}, {}, [0]

    @seed(s)
    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(p=fa.programs(profile))
    def run(p):
        count[0] += 1
        d = play(p)
        if d is not None:
            rows[d.row] += 1
            first.setdefault(d.row, count[0])
            msg.setdefault(d.row, str(d)[:300])

    t0 = time.time()
    run()
    print(f"\n{count[0]} random {profile} programs (seed {s}) in {time.time() - t0:.0f} s; "
          f"{sum(rows.values())} failed")
    print("row | programs failing first on it | first at program | first message")
    for r in sorted(rows, key=str):
        print(f"{r} | {rows[r]} | {first[r]} | {msg[r]}")


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    profile = sys.argv[2] if len(sys.argv) > 2 else "fp32"
    s = int(sys.argv[3]) if len(sys.argv) > 3 else 20261201
    targeted()
    if n > 0:
        random_run(n, profile, s)
