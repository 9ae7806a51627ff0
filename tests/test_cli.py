"""The ``fused-lr`` command on tiny budgets: demo, demo --compare, info, bench, bad arguments."""

import csv
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from fused_lr import available_backends
from fused_lr.backends import NAMES
from fused_lr.tools.cli import _cpu_threads, main
from fused_lr.tools.demo import COMPARED, CONTROL, Config, load_data, train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def one_thread():
    # as `fused-lr demo` does by default: the model is tiny, and on a busy machine more torch or
    # numba threads make it many times slower
    with _cpu_threads(1):
        yield


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert path.stat().st_size > 10_000, f"{path} is too small to hold the figure"


def assert_loss_drops(history: dict) -> None:
    # from ~2.3 (log 10, chance) the first 20 steps at lr 0.1 reach ~1.2; a third lower is well
    # inside that, and a broken update (no step, wrong sign, lr 0) cannot get there
    loss = history["loss"]
    first, last = sum(loss[:5]) / 5, sum(loss[-5:]) / 5
    assert last < 0.67 * first, f"loss did not drop: first steps {loss[:5]}, last steps {loss[-5:]}"


def test_demo_in_process(tmp_path, capsys):
    rc = main(["demo", "--steps", "20", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert_png(tmp_path / "demo.png")
    history = json.loads((tmp_path / "demo.json").read_text())
    assert len(history["loss"]) == len(history["lr"]) == len(history["grad_norm"]) == 20
    assert_loss_drops(history)
    # warm-up starts at 0 and nothing exceeds the peak lr
    assert history["lr"][0] == 0.0 and max(history["lr"]) <= 0.1
    assert f"test accuracy {history['final_test_acc']:.2%}" in out


def test_demo_console_script(tmp_path):
    script = Path(sys.executable).parent / "fused-lr"
    if not script.exists():
        pytest.skip(f"the fused-lr console script is not installed beside {sys.executable}")
    run = subprocess.run([str(script), "demo", "--steps", "20", "--schedule", "one-cycle", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    assert "test accuracy" in run.stdout
    assert_png(tmp_path / "demo.png")
    assert_loss_drops(json.loads((tmp_path / "demo.json").read_text()))


def test_compare_tiny(tmp_path, capsys):
    rc = main(["demo", "--compare", "--steps", "6", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert_png(tmp_path / "compare.png")
    with (tmp_path / "compare.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["strategy"] for r in rows] == [*COMPARED, CONTROL]
    for r in rows:
        assert 0.0 <= float(r["test_accuracy"]) <= 1.0
        assert 0.0 < float(r["optimizer_time_s"]) < float(r["total_time_s"])
        assert r["strategy"] in out  # the printed table
    assert "test accuracy" in out and "optimizer steps" in out


def test_fused_cosine_tracks_the_torch_control():
    # Same weights, batches and recipe: FusedSGD's cosine run and the stock SGD + clip_grad_norm_ +
    # CosineAnnealingLR control may differ only by float32 rounding (a few ulps per step, ~1e-7
    # relative on the reference backend). 1e-4 leaves room for kernels that sum the norm in
    # another order, and is far below what a wrong lr, clip or weight decay would show.
    config = Config(steps=10)
    data = load_data(torch.device("cpu"))
    fused = train(config, data, "cosine")
    control = train(config, data, CONTROL)
    assert fused.lr == pytest.approx(control.lr, rel=1e-12)
    assert fused.loss == pytest.approx(control.loss, rel=1e-4)
    assert fused.grad_norm == pytest.approx(control.grad_norm, rel=1e-4)


def test_info_lists_every_backend(capsys):
    assert main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith(f"torch    {torch.__version__}") for line in lines)
    listed = {ln.split()[0]: ln for ln in lines[lines.index("backends") + 1 :]}
    assert set(listed) == set(NAMES)
    for name, status in available_backends().items():
        assert ("usable" in listed[name]) if status is True else (f"unavailable: {status}" in listed[name])


def _unavailable_backend():
    return next((name for name, status in available_backends().items() if status is not True), None)


@pytest.mark.parametrize("argv, mentions", [
    (["demo", "--schedule", "nope"], "--schedule"),
    (["demo", "--steps", "-3"], "--steps"),
    (["demo", "--epochs", "0"], "--epochs"),
    (["demo", "--lr", "nan"], "--lr"),
    (["demo", "--backend", "nope"], "--backend"),
    (["demo", "--device", "tpu"], "--device"),
    (["demo", "--steps", "10", "--warmup", "10"], "--warmup"),
    (["demo", "--compare", "--schedule", "cosine"], "--compare"),
    (["demo", "--steps", "3", "--surprise"], "--surprise"),
    (["demo", "--batch-size", "5000"], "--batch-size"),
    (["nope"], "nope"),
])
def test_bad_arguments(argv, mentions, tmp_path, capsys):
    rc = main([*argv, "--out", str(tmp_path / "out")] if argv[0] == "demo" else argv)
    err = capsys.readouterr().err
    assert rc != 0
    assert err.count("\n") == 1, f"expected one line, got {err!r}"
    assert "error" in err and mentions in err and "Traceback" not in err
    assert not (tmp_path / "out" / "demo.png").exists()


def test_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    # a path below a regular file cannot be created, whoever runs the test (root included)
    rc = main(["demo", "--steps", "3", "--out", str(blocker / "out")])
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1 and "--out" in err and "Traceback" not in err


def test_unavailable_backend(capsys):
    name = _unavailable_backend()
    if name is None:
        pytest.skip("every backend is available here")
    assert main(["demo", "--steps", "3", "--backend", name]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--backend {name} is unavailable" in err


def test_cuda_device_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is available here")
    assert main(["demo", "--steps", "3", "--device", "cuda"]) != 0
    assert "no CUDA device" in capsys.readouterr().err


def test_bench_passes_its_arguments_through(monkeypatch, capsys):
    assert main(["--help"]) == 0
    assert "bench" in capsys.readouterr().out
    seen = []
    fake = types.ModuleType("fused_lr.tools.bench")
    fake.main = lambda argv=None: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "fused_lr.tools.bench", fake)
    assert main(["bench", "--help", "--steps", "5", "resnet18"]) == 7
    assert seen == [["--help", "--steps", "5", "resnet18"]]
