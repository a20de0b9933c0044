"""Loads the compiled modules: _C always, _cuda where it was built (and imports)."""
import os

try:
    from . import _C  # noqa: F401  (imported for the package: pyengine._C)
except ImportError as _exc:  # a source tree that was never built, or a broken install
    _here = os.path.dirname(os.path.abspath(__file__))
    raise ImportError(
        f"pyengine's compiled core (_C) is missing from {_here}: this looks like an unbuilt source tree. Build it "
        "in place with `pip install -e .`, or run from another folder so the installed package is imported "
        f"({_exc})") from None

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
