"""Helpers shared by the tests and the benchmarks: local ranks spawned as torchrun would."""
from .spawn import free_port, run_ranks, spawn

__all__ = ["free_port", "run_ranks", "spawn"]
