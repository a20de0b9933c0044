"""Builds pyengine's native modules with CMake + Ninja and places them inside the package.

Environment:
  PYENGINE_NO_CUDA=1       build the CPU kernels only, even where nvcc is found
  PYENGINE_FORCE_CUDA=1    fail loudly when nvcc is missing
  PYENGINE_CUDA_ARCHS      CUDA architectures, e.g. "80;90" (the default) or "90"
  PYENGINE_BUILD_DIR       CMake build folder (default build/cmake-<python>), kept between
                           builds so an unchanged source is not compiled twice
  CMAKE_BUILD_PARALLEL_LEVEL   compile jobs
"""
import os
import re
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "pyengine" / "_version.py").read_text()).group(1)


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


class CMakeBuild(build_ext):
    _built = False

    def build_extension(self, ext):
        # One CMake project builds every module; build it once, then copy each module.
        build_dir = Path(os.environ.get("PYENGINE_BUILD_DIR") or ROOT / "build" / f"cmake-py{sys.version_info[0]}{sys.version_info[1]}")
        if not CMakeBuild._built:
            self._cmake(build_dir)
            CMakeBuild._built = True
        module = ext.name.split(".")[-1]
        found = sorted(build_dir.glob(f"{module}.*.so")) + sorted(build_dir.glob(f"{module}.*.pyd"))
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        if not found:
            if module == "_cuda":  # optional: not built without nvcc
                return
            raise RuntimeError(f"pyengine: CMake did not produce {module}")
        self.copy_file(str(found[0]), str(target))

    def _cmake(self, build_dir):
        import pybind11

        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPE_VERSION={VERSION}",
            f"-DPYENGINE_NO_CUDA={'ON' if _flag('PYENGINE_NO_CUDA') else 'OFF'}",
            f"-DPYENGINE_FORCE_CUDA={'ON' if _flag('PYENGINE_FORCE_CUDA') else 'OFF'}",
        ]
        if os.environ.get("PYENGINE_CUDA_ARCHS"):
            args.append(f"-DPYENGINE_CUDA_ARCHS={os.environ['PYENGINE_CUDA_ARCHS']}")
        try:
            import ninja

            args.append(f"-DCMAKE_MAKE_PROGRAM={Path(ninja.BIN_DIR) / 'ninja'}")
        except ImportError:
            pass
        subprocess.run(args, check=True)
        # Stale modules from an earlier configuration (e.g. CUDA then no CUDA) must not ship.
        for old in build_dir.glob("_cuda.*"):
            if _flag("PYENGINE_NO_CUDA"):
                old.unlink()
        subprocess.run(["cmake", "--build", str(build_dir)], check=True)


setup(
    version=VERSION,
    ext_modules=[CMakeExtension("pyengine._C"), CMakeExtension("pyengine._cuda")],
    cmdclass={"build_ext": CMakeBuild},
)
