"""scripts/fsdp_bench.py end to end at a tiny size: two gloo ranks start, both steps run on the
Numba backend, and the report ends in its verdict lines. Its timings mean nothing at this size."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fused_lr import available_backends

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(available_backends()["numba"] is not True, reason="numba backend unavailable")
def test_fsdp_bench_runs_and_gives_its_verdict():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "fsdp_bench.py"), "--mparams", "0.01", "--repeat",
                          "2", "--warmup", "1", "--views"], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert out.count("backends ['numba']") == 2  # both ranks, every contender
    assert "sharded/views (same memory)" in out
    assert "verdict: the FSDP2 numba step is" in out
    assert "undisturbed" in out or "DISTURBED" in out
