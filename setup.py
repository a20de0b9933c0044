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


def _build_dir():
    return Path(os.environ.get("PYENGINE_BUILD_DIR")
                or ROOT / "build" / f"cmake-py{sys.version_info[0]}{sys.version_info[1]}")


def _module_file(build_dir, module):
    found = sorted(build_dir.glob(f"{module}.*.so")) + sorted(build_dir.glob(f"{module}.*.pyd"))
    return found[0] if found else None


class CMakeBuild(build_ext):
    def run(self):
        # One CMake project builds every module. Build it first, then keep only the modules it
        # produced: _cuda is optional (no nvcc), and setuptools must not expect it then.
        build_dir = _build_dir()
        self._cmake(build_dir)
        self.extensions = [e for e in self.extensions if _module_file(build_dir, e.name.split(".")[-1])]
        self.distribution.ext_modules = self.extensions
        if not any(e.name.endswith("_cuda") for e in self.extensions):
            stale = Path(self.get_ext_fullpath("pyengine._cuda"))  # in place, or in build_lib
            if stale.exists():
                stale.unlink()
        super().run()

    def build_extension(self, ext):
        module = ext.name.split(".")[-1]
        source = _module_file(_build_dir(), module)
        if source is None:
            raise RuntimeError(f"pyengine: CMake did not produce {module}")
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        self.copy_file(str(source), str(target))

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
        # A module left by an earlier configuration (CUDA, then none) must not ship.
        for old in build_dir.glob("_cuda.*"):
            old.unlink()
        subprocess.run(args, check=True)
        subprocess.run(["cmake", "--build", str(build_dir)], check=True)


setup(
    version=VERSION,
    ext_modules=[CMakeExtension("pyengine._C"), CMakeExtension("pyengine._cuda")],
    cmdclass={"build_ext": CMakeBuild},
)
