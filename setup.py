"""Packaging: the pure-Python package, the CUDA extension and the compiled metadata helper.

The extension fused_lr._cuda (csrc/) is built through CMake when nvcc is found on PATH or in
CUDA_HOME. FUSED_LR_CUDA=0 skips it, FUSED_LR_CUDA=1 makes a missing nvcc an error; without
nvcc the install goes on as pure Python. Once nvcc is found, a failing build fails the install.
FUSED_LR_CUDA_ARCHS overrides the CUDA architectures (CMake syntax, default "80-real;90").
When the extension is skipped, the reason is left in fused_lr/_cuda_unbuilt.txt for
fused_lr.backends.cuda.load() to report.

The helper fused_lr._meta (csrc/meta/: fused_lr.core.meta's two per-step checks in C++, linked
against libtorch) is built when torch is importable at build time and the C++ compiler works. It is
tied to that torch: it refuses to import under another version, and fused_lr.core.meta then uses
its Python functions. pip builds in an isolated environment without torch unless given
--no-build-isolation (the Makefile's venv rule installs torch and the build requirements first).
FUSED_LR_META=0 skips it, FUSED_LR_META=1 makes a failed build an error; otherwise a failure leaves
the reason in fused_lr/_meta_unbuilt.txt and the install goes on without it. (FUSED_LR_META=python,
the run-time switch to the Python functions, builds it as unset does.)
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
META_UNBUILT = "_meta_unbuilt.txt"


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


class MetaExtension(Extension):
    """fused_lr._meta: a CPython extension (no pybind11) on a few libtorch headers."""

    def __init__(self):
        super().__init__("fused_lr._meta", sources=["csrc/meta/meta.cpp"], language="c++")


def meta_mode() -> str:
    """FUSED_LR_META at build time: "0", "1" or "" (unset, or "python": that value only picks the
    Python functions at run time, and a shell that exports it should still install)."""
    mode = os.environ.get("FUSED_LR_META", "")
    if mode not in ("", "0", "1", "python"):
        raise RuntimeError(f"FUSED_LR_META must be 0, 1, python or unset, got {mode!r}")
    return "" if mode == "python" else mode


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
        self._configure_meta()
        super().run()

    def _configure_meta(self) -> None:
        """Give fused_lr._meta the build-time torch's headers and libraries, or skip it (and say why)."""
        ext = next((e for e in self.extensions if isinstance(e, MetaExtension)), None)
        if ext is None:
            return
        mode = meta_mode()
        reason = "built without the compiled helper: FUSED_LR_META=0 at install time" if mode == "0" else None
        if reason is None:
            try:
                import torch
                from torch.utils.cpp_extension import include_paths, library_paths
            except Exception as e:  # absent (pip's build isolation) or broken
                reason = (f"built without the compiled helper: torch was not importable at build time ({e}); "
                          "pip builds in an isolated environment without torch unless given --no-build-isolation")
        if reason is not None:
            if mode == "1":
                raise RuntimeError(f"FUSED_LR_META=1 but {reason}")
            self._skip_meta(ext, reason)
            return
        ext.include_dirs += include_paths()
        ext.library_dirs += library_paths()
        ext.libraries += ["c10", "torch_cpu", "torch_python"]
        ext.define_macros.append(("FUSED_LR_TORCH_VERSION", f'"{torch.__version__}"'))
        if self.compiler == "msvc" or (self.compiler is None and os.name == "nt"):
            ext.extra_compile_args += ["/std:c++20", "/O2", "/EHsc"]
        else:
            abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
            ext.extra_compile_args += ["-std=c++20", "-O2", "-g0", "-fvisibility=hidden",
                                       f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
            # found without torch imported first too (`from fused_lr import _meta` on its own)
            ext.extra_link_args += [f"-Wl,-rpath,{d}" for d in library_paths()]

    def _skip_meta(self, ext: Extension, reason: str) -> None:
        print(f"fused_lr: {reason}; fused_lr.core.meta will use its Python functions", file=sys.stderr)
        self.extensions = [e for e in self.extensions if e is not ext]
        self._mark_unbuilt(ext, reason, META_UNBUILT)

    def _build_meta(self, ext: Extension) -> None:
        start = time.monotonic()
        try:
            super().build_extension(ext)
        except Exception as e:  # no working compiler, a compile or link error
            if meta_mode() == "1":
                raise
            self._skip_meta(ext, f"built without the compiled helper: its C++ build failed ({e})")
            return
        self._mark_unbuilt(ext, None, META_UNBUILT)
        print(f"fused_lr: built {Path(self.get_ext_filename(ext.name)).name} in {time.monotonic() - start:.0f} s",
              file=sys.stderr)

    def _package_dirs(self) -> list[Path]:
        """Where fused_lr's files go: the build tree, and the source tree for editable installs."""
        dirs = [Path(self.build_lib) / "fused_lr"]
        if self.inplace or getattr(self, "editable_mode", False):
            dirs.append(ROOT / "fused_lr")
        return dirs

    def _mark_unbuilt(self, ext: Extension, reason: str | None, name: str = UNBUILT) -> None:
        for d in self._package_dirs():
            marker = d / name
            if reason is None:
                marker.unlink(missing_ok=True)
                continue
            d.mkdir(parents=True, exist_ok=True)
            marker.write_text(reason + "\n")
            # a module left by an earlier build would contradict the reason
            (d / Path(self.get_ext_filename(ext.name)).name).unlink(missing_ok=True)

    def build_extension(self, ext):
        if isinstance(ext, MetaExtension):
            return self._build_meta(ext)
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
    ext_modules=[CMakeExtension("fused_lr._cuda"), MetaExtension()],
    cmdclass={"build_ext": BuildExt},
)
