"""pyengine: fused mixed-precision, data-parallel training steps for PyTorch.

`import pyengine` needs neither a GPU, nor CUDA libraries, nor NCCL, nor torch: the
Engine (which needs torch) is imported on first use.
"""
from ._version import __version__
from ._native import _C, _cuda, cuda_available
from .errors import GradientAccessError, UsageError


def build_info() -> dict:
    """What this installation was built with and can use."""
    from .comm import nccl_support

    archs = _cuda.compiled_archs() if _cuda is not None else ""
    return {
        "version": __version__,
        "cpu_simd": _C.simd_level(),
        "omp_threads": _C.num_threads(),
        "cuda_compiled": _cuda is not None,
        "cuda_archs": [a for a in archs.split(",") if a],
        "cuda_devices": _cuda.device_count() if _cuda is not None else 0,
        "nccl_compiled": nccl_support(),
    }


def set_num_threads(n: int) -> None:
    """Threads used by the CPU kernels (default: OpenMP's, i.e. the cores available)."""
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"set_num_threads: n must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"set_num_threads: n must be >= 1, got {n}")
    _C.set_num_threads(n)


_LAZY = {"Engine": "engine", "EngineConfig": "config"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'pyengine' has no attribute {name!r}")


__all__ = ["Engine", "EngineConfig", "GradientAccessError", "UsageError", "build_info", "cuda_available", "set_num_threads", "__version__"]
