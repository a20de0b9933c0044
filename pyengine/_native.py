"""Loads the compiled modules: _C always, _cuda where it was built (and imports)."""
from . import _C  # noqa: F401  (a missing _C is a broken install: let the ImportError speak)

try:
    from . import _cuda
except ImportError:  # built without nvcc
    _cuda = None


def cuda_available() -> bool:
    """CUDA kernels compiled in and at least one GPU visible to the CUDA driver."""
    return _cuda is not None and _cuda.device_count() > 0


def cuda_module():
    if _cuda is None:
        raise RuntimeError(
            "pyengine was built without CUDA kernels (no nvcc at build time); reinstall with nvcc "
            "on PATH, or set PYENGINE_FORCE_CUDA=1 to make the build fail when it is missing"
        )
    return _cuda
