"""Backends degrade, never break: whatever a backend's import or ``load()`` raises makes that backend
unavailable (``available_backends()`` says why, in one line) and ``backend="auto"`` takes the next
one; and the Numba kernels run where no Numba cache location is writable.

Each scenario runs in a child process (this venv's python), so a broken import cannot poison the
test process or the backends it has loaded already.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The child's common part: a small float64 model, two FusedSGD steps (momentum, decay, a schedule,
# global-norm clipping unless clip=None) with the given backend; `step(backend)` returns (the backend
# that ran, the parameters).
_STEP = """
import torch
import fused_lr
from fused_lr import FusedSGD, available_backends, schedules

def step(backend, clip=0.5):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    opt = FusedSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2, max_grad_norm=clip,
                   schedule=schedules.Cosine(10), backend=backend)
    x = torch.randn(4, 5, dtype=torch.float64)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    return opt.backend, [p.detach().clone() for p in model.parameters()]

def explicit_error(name):
    try:
        FusedSGD(torch.nn.Linear(2, 2).parameters(), lr=0.1, backend=name)
    except RuntimeError as e:
        return str(e)
    raise AssertionError(f"backend={name!r} did not raise")

# broken is unavailable with a one-line reason, auto steps on `auto`, naming broken raises that reason
def degraded(broken, auto):
    why = available_backends()[broken]
    assert isinstance(why, str) and "\\n" not in why, why
    ran, _ = step("auto")
    assert ran == auto, ran
    error = explicit_error(broken)
    assert error == f"backend {broken!r} is unavailable: {why}", error
    print("ok", why)
"""


def _run(code: str, cwd: Path, path: list[Path] = (), env: dict[str, str] | None = None) -> str:
    """Run ``_STEP`` and ``code`` (dedented) in a child python with ``path`` first on PYTHONPATH;
    its stdout."""
    child_env = {**os.environ, **(env or {})}
    paths = [*map(str, path), str(ROOT), os.environ.get("PYTHONPATH", "")]
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)  # an empty entry would mean the cwd
    child_env.setdefault("TRITON_INTERPRET", "1")
    child_env["PYTHONDONTWRITEBYTECODE"] = "1"
    done = subprocess.run([sys.executable, "-c", _STEP + textwrap.dedent(code)], cwd=cwd, env=child_env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"child failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _fake_package(root: Path, name: str, source: str) -> Path:
    """A stand-in package ``name`` (its ``__init__.py`` is ``source``) under ``root``, for the path."""
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text(source)
    return root


# A broken triton is made in the child itself, after torch has imported the real one for its own use,
# rather than by a stand-in package first on the path: every torch.optim constructor imports
# torch._dynamo, which imports triton when it is importable and needs much of it (triton.language,
# triton.backends.compiler, ...), so a stand-in breaks torch before fused_lr is asked anything.


def test_too_old_triton_is_unavailable_and_auto_moves_on(tmp_path):
    """A triton older than the backend needs: 3.3.1, which has no ``triton.knobs`` (with the real
    3.3.1 wheel installed, ``available_backends()`` raised AttributeError: module 'triton' has no
    attribute 'knobs'); the child takes knobs out of the installed triton to match. The triton
    backend is unavailable with a one-line reason naming both versions; auto on the CPU steps on
    numba; naming triton raises that reason."""
    out = _run("""
        import sys

        import torch._dynamo  # torch's own import of the real triton, before the child breaks it
        import triton

        triton.__version__ = "3.3.1"
        del triton.knobs
        sys.modules["triton.knobs"] = None  # `from triton import knobs` now fails, as on 3.3.1

        status = available_backends()
        why = status["triton"]
        assert why.startswith("triton 3.3.1 is too old") and ">= 3.4" in why, why
        assert status["reference"] is True and status["numba"] is True, status
        degraded("triton", auto="numba")
    """, tmp_path)
    assert out.startswith("ok")


def test_numba_and_triton_that_raise_leave_auto_on_the_reference(tmp_path):
    """Both optional CPU backends break, each with an exception that is neither ImportError nor
    BackendUnavailable, at each place the registry loads a backend: numba raises a RuntimeError
    when imported (a stand-in package first on the path; the numba backend's module imports it, and
    compiles a kernel, at import), and triton's ``jit`` raises a TypeError (set up in the child),
    which ``load()`` meets when it imports the Triton kernels. Each is unavailable with a one-line
    reason naming the exception; auto on the CPU takes the reference; naming numba raises one line."""
    fake = _fake_package(tmp_path / "fake", "numba", 'raise RuntimeError("numba cannot start here:\\n  simulated")\n')
    out = _run("""
        import torch._dynamo  # torch's own import of the real triton, before the child breaks it
        import triton

        def jit(*args, **kwargs):
            raise TypeError("jit() got an unexpected keyword argument (simulated)")

        triton.jit = jit
        status = available_backends()
        assert status["numba"] == ("importing fused_lr.backends.numba failed: RuntimeError: numba cannot start "
                                   "here: simulated"), status
        assert status["triton"] == ("fused_lr.backends.triton.load() failed: TypeError: jit() got an unexpected "
                                    "keyword argument (simulated)"), status
        degraded("numba", auto="reference")
    """, tmp_path, [fake])
    assert out.startswith("ok")


def _read_only(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _writable(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IWUSR)


def test_numba_runs_without_a_writable_cache(tmp_path):
    """No Numba cache location is writable: the kernels compile uncached and step like the reference.

    Numba looks for a cache directory when ``njit(cache=True)`` decorates a function
    (numba/core/caching.py: ``CacheImpl`` tries NUMBA_CACHE_DIR, the source's ``__pycache__``, then
    the user-wide ``$XDG_CACHE_HOME`` or ``~/.cache/numba``); each locator accepts its directory only
    if ``os.makedirs`` and a temporary file in it succeed, and when none does, the decorator raises
    ``RuntimeError: cannot cache function ...: no locator available``. The child gets a copy of
    fused_lr in a read-only directory, and HOME, NUMBA_CACHE_DIR and XDG_CACHE_HOME in a read-only
    directory. The tests run as root, which ignores permission bits, so each of those locations is
    also made impossible for root: it lies under a regular file (NUMBA_CACHE_DIR, HOME and
    XDG_CACHE_HOME point below ``blocker``, a file), and in the copy every ``__pycache__`` is a
    regular file. ``os.makedirs`` then fails (NotADirectoryError, FileExistsError) in numba's own,
    unpatched locator checks, the same OSError branch a read-only file system takes, so the real
    condition is reproduced without patching numba. This child holds the file's one cold compile
    of the kernels: ~14 s of CPU for the step's, ~20 s for the whole child, on the 2-core machine."""
    ro = tmp_path / "ro"
    # (without the CUDA extension, which has nothing to do with this: the cuda backend says it is not built)
    shutil.copytree(ROOT / "fused_lr", ro / "fused_lr", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    # every package's: numba_kernels' and schedules' (where eval_table's source is) included
    for package in [ro / "fused_lr", *(d for d in (ro / "fused_lr").rglob("*") if d.is_dir())]:
        (package / "__pycache__").write_text("not a directory: no in-tree cache\n")
    blocker = ro / "blocker"
    blocker.write_text("a file: nothing can be created below it\n")
    _read_only(ro)
    try:
        out = _run(f"""
            from pathlib import Path
            assert Path(fused_lr.__file__).is_relative_to({str(ro)!r}), fused_lr.__file__
            assert available_backends()["numba"] is True, available_backends()
            from fused_lr.kernels import numba_kernels
            assert "no locator available" in (numba_kernels.NO_CACHE or ""), numba_kernels.NO_CACHE
            K = numba_kernels
            for kernel in (K.eval_table, K.sumsq, K.prepare, K.update, K.sumsq_serial, K.update_serial, K._layout_id):
                assert type(kernel._cache).__name__ == "NullCache", (kernel, kernel._cache)
            # no clipping: the norm pass would add its own cold compile (~4 s of CPU) to this test's
            ran, fused = step("auto", clip=None)
            assert ran == "numba", ran
            _, reference = step("reference", clip=None)
            for a, b in zip(fused, reference):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
            print("ok", numba_kernels.NO_CACHE)
        """, tmp_path, [ro], env={"HOME": str(blocker / "home"), "NUMBA_CACHE_DIR": str(blocker / "numba"),
                                  "XDG_CACHE_HOME": str(blocker / "xdg")})
    finally:
        _writable(ro)  # so that pytest can remove tmp_path
    assert out.startswith("ok")
