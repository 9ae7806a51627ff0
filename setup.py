"""Packaging: the pure-Python package and the CUDA extension.

The extension fused_lr._cuda (csrc/) is built through CMake when nvcc is found on PATH or in
CUDA_HOME. FUSED_LR_CUDA=0 skips it, FUSED_LR_CUDA=1 makes a missing nvcc an error; without
nvcc the install goes on as pure Python. Once nvcc is found, a failing build fails the install.
FUSED_LR_CUDA_ARCHS overrides the CUDA architectures (CMake syntax, default "80-real;90").
When the extension is skipped, the reason is left in fused_lr/_cuda_unbuilt.txt for
fused_lr.backends.cuda.load() to report.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
UNBUILT = "_cuda_unbuilt.txt"


def find_nvcc() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    home = os.environ.get("CUDA_HOME")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return None


def find_cmake() -> str:
    try:  # the cmake wheel that pyproject.toml's build requirements install
        import cmake

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except ImportError:
        exe = shutil.which("cmake")
        if exe is None:
            raise RuntimeError("fused_lr: nvcc was found but cmake was not; pip install cmake") from None
        return exe


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class BuildExt(build_ext):
    def run(self):
        ext = next(e for e in self.extensions if isinstance(e, CMakeExtension))
        mode = os.environ.get("FUSED_LR_CUDA", "")
        if mode not in ("", "0", "1"):
            raise RuntimeError(f"FUSED_LR_CUDA must be 0, 1 or unset, got {mode!r}")
        nvcc = None if mode == "0" else find_nvcc()
        if nvcc is None:
            if mode == "1":
                raise RuntimeError("FUSED_LR_CUDA=1 but nvcc was found neither on PATH nor in CUDA_HOME")
            reason = ("built without CUDA: FUSED_LR_CUDA=0 at install time" if mode == "0"
                      else "built without CUDA: nvcc not found at install time (PATH, CUDA_HOME)")
            print(f"fused_lr: {reason}; installing the pure-Python package", file=sys.stderr)
            self.extensions = [e for e in self.extensions if e is not ext]
            self._mark_unbuilt(ext, reason)
        else:
            ext.nvcc = nvcc
            self._mark_unbuilt(ext, None)
        super().run()

    def _package_dirs(self) -> list[Path]:
        """Where fused_lr's files go: the build tree, and the source tree for editable installs."""
        dirs = [Path(self.build_lib) / "fused_lr"]
        if self.inplace or getattr(self, "editable_mode", False):
            dirs.append(ROOT / "fused_lr")
        return dirs

    def _mark_unbuilt(self, ext: Extension, reason: str | None) -> None:
        for d in self._package_dirs():
            marker = d / UNBUILT
            if reason is None:
                marker.unlink(missing_ok=True)
                continue
            d.mkdir(parents=True, exist_ok=True)
            marker.write_text(reason + "\n")
            # a module left by an earlier build would contradict the reason
            (d / Path(self.get_ext_filename(ext.name)).name).unlink(missing_ok=True)

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = find_cmake()
        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CUDA_COMPILER={ext.nvcc}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
        ]
        if os.environ.get("FUSED_LR_CUDA_ARCHS"):
            configure.append(f"-DFUSED_LR_CUDA_ARCHS={os.environ['FUSED_LR_CUDA_ARCHS']}")
        start = time.monotonic()
        subprocess.run(configure, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", str(os.cpu_count() or 1)], check=True)
        built = out_dir / Path(self.get_ext_filename(ext.name)).name
        if not built.is_file():
            raise RuntimeError(f"fused_lr: the CMake build did not produce {built}")
        print(f"fused_lr: built {built.name} in {time.monotonic() - start:.0f} s", file=sys.stderr)


setup(
    packages=find_packages(include=["fused_lr", "fused_lr.*"]),
    ext_modules=[CMakeExtension("fused_lr._cuda")],
    cmdclass={"build_ext": BuildExt},
)
