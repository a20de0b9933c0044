"""Gloo ranks on loopback for the tests: one thread each, so 4 ranks fit 2 cores."""
import functools

from pyengine.testing import free_port, run_ranks as _run_ranks

run_ranks = functools.partial(_run_ranks, timeout=240, threads=1)
__all__ = ["free_port", "run_ranks", "ok"]


def ok(results, world):
    errors = {r: v for r, (s, v) in results.items() if s != "ok"}
    assert not errors and len(results) == world, f"ranks failed: {errors or 'missing results'}"
    return [results[r][1] for r in range(world)]
