"""examples/train_loop.py: a resumed run ends bit for bit where the uninterrupted one does, and
mistakes (arguments, checkpoints) end in one line on stderr, never a traceback."""

import contextlib
import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cases import backend_cases

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "train_loop.py"


SCHEDULERS = ("fused", "torch")


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_loop", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def resumed(example, tmp_path_factory):
    """{(backend, scheduler): (output of the uninterrupted run, output of the resumed run)} with a
    tiny budget: each run here writes a checkpoint at step 3 of 8, and one fresh process resumes
    them all (a process per run would pay seconds each to start python and import torch)."""
    folder = tmp_path_factory.mktemp("resume")
    cpu_backends = [p.values[0] for p in backend_cases() if p.values[1] == "cpu" and not p.marks]
    full, resume_args = {}, {}
    for backend in cpu_backends:
        for scheduler in SCHEDULERS:
            common = ["--steps", "8", "--backend", backend, "--scheduler", scheduler]
            ckpt = str(folder / f"{backend}-{scheduler}.pt")
            with contextlib.redirect_stdout(io.StringIO()) as out:
                example.main([*common, "--save-at", "3", "--ckpt", ckpt])
            full[backend, scheduler] = out.getvalue()
            resume_args[backend, scheduler] = [*common, "--resume", ckpt]
    driver = (f"import importlib.util\n"
              f"spec = importlib.util.spec_from_file_location('train_loop', {str(SCRIPT)!r})\n"
              f"example = importlib.util.module_from_spec(spec)\n"
              f"spec.loader.exec_module(example)\n"
              f"for args in {list(resume_args.values())!r}:\n"
              f"    print('{MARK}')\n"
              f"    example.main(args)\n")
    proc = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, cwd=ROOT, env=os.environ,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    outputs = proc.stdout.split(MARK + "\n")[1:]
    assert len(outputs) == len(resume_args)
    return {case: (full[case], out) for case, out in zip(resume_args, outputs)}


MARK = "=== next run ==="


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("backend,device", backend_cases())
def test_resumes_bit_for_bit(backend, device, scheduler, resumed):
    """Autocast + GradScaler + checkpoint: resumed in a new process from its checkpoint at step
    3, a run ends bit for bit where the uninterrupted run ends."""
    if device != "cpu":
        pytest.skip("the example picks its own device; its CPU run is the one tested here")
    full, again = resumed[backend, scheduler]
    final = [line for line in full.splitlines() if line.startswith("final")]
    assert f"backend {backend}" in full and "saved" in full
    assert final and final == [line for line in again.splitlines() if line.startswith("final")]
    assert "step     1" not in again and "step     8" in again  # it did continue, not restart


@pytest.fixture(scope="module")
def checkpoints(example, tmp_path_factory):
    """Checkpoints at step 4 of an 8-step run: one per --scheduler, and one of the fused run in
    the older layout that did not record --steps."""
    folder = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for scheduler in ("fused", "torch"):
        paths[scheduler] = folder / f"{scheduler}.pt"
        example.main(["--steps", "8", "--save-at", "4", "--ckpt", str(paths[scheduler]), "--scheduler", scheduler,
                      "--backend", "reference"])
    state = torch.load(paths["fused"], weights_only=True)
    del state["steps"]
    paths["old"] = folder / "old.pt"
    torch.save(state, paths["old"])
    (folder / "notes.pt").write_text("not a checkpoint")
    paths["garbage"] = folder / "notes.pt"
    return paths


@pytest.mark.parametrize("args, mentions", [
    (["--backend", "nope"], "unknown backend 'nope'"),
    (["--steps", "1"], "--steps must be at least 2"),
    (["--steps", "8", "--save-at", "8"], "--save-at"),
    (["--save-at", "3", "--ckpt", "/no/such/folder/ck.pt"], "cannot write --ckpt"),
    (["--steps", "3", "--resume", "{fused}"], "resume it with --steps 8"),
    (["--steps", "3", "--resume", "{old}"], "is at step 4, so --steps 3 leaves nothing to train"),
    (["--steps", "8", "--resume", "{fused}", "--scheduler", "torch"], "resume it with --scheduler fused"),
    (["--steps", "8", "--resume", "{torch}", "--scheduler", "fused"], "resume it with --scheduler torch"),
    (["--resume", "{garbage}"], "is not a checkpoint"),
    (["--resume", "/no/such/ck.pt"], "cannot read --resume"),
])
def test_mistakes_get_one_line(args, mentions, example, checkpoints, capsys):
    args = [a.format(**{k: str(v) for k, v in checkpoints.items()}) for a in args]
    with pytest.raises(SystemExit) as exit_:
        example.main(args)
    out, err = capsys.readouterr()
    assert exit_.value.code == 2
    assert err.count("\n") == 1 and err.startswith("train_loop.py: error: ") and mentions in err, err
    assert "Traceback" not in err and out == ""  # nothing trained
