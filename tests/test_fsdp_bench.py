"""``fused-lr bench fsdp`` (fused_lr/tools/bench/fsdp.py) end to end at a tiny size: two gloo ranks
start, both steps run on the Numba backend, and the report ends in its verdict lines. Its timings mean
nothing at this size. And the ranks' thread variables leave the caller's environment as it was."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fused_lr import available_backends
from fused_lr.tools.bench import fsdp

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(available_backends()["numba"] is not True, reason="numba backend unavailable")
def test_fsdp_bench_runs_and_gives_its_verdict(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    report = tmp_path / "out" / "fsdp.json"
    run = subprocess.run([sys.executable, "-m", "fused_lr.tools.bench", "fsdp", "--mparams", "0.01", "--repeat", "2",
                          "--warmup", "1", "--views", "--json", str(report)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert out.count("backends ['numba']") == 2  # both ranks, every contender
    assert "sharded/views (same memory)" in out
    assert "verdict: the FSDP2 numba step is" in out
    assert "undisturbed" in out or "DISTURBED" in out
    assert [r["rank"] for r in json.loads(report.read_text())["ranks"]] == [0, 1]


def test_the_ranks_thread_counts_leave_the_callers_environment(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("NUMBA_NUM_THREADS", raising=False)
    with fsdp.environ({"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}):
        assert os.environ["OMP_NUM_THREADS"] == os.environ["NUMBA_NUM_THREADS"] == "1"  # what the ranks inherit
    assert os.environ["OMP_NUM_THREADS"] == "7" and "NUMBA_NUM_THREADS" not in os.environ


def test_an_unwritable_json_is_one_line_before_the_ranks_start(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as exc:
        fsdp.main(["--json", str(blocker / "out" / "fsdp.json")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and f"cannot write to --json's folder {blocker / 'out'}" in err
