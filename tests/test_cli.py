"""The ``fused-lr`` command on tiny budgets: demo with each optimizer, demo --compare, the compare
figure, info, bench, bad arguments, start-up cost, and (marked slow) a plain install without the
[demo] extra."""

import csv
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fused_lr import available_backends
from fused_lr.backends import NAMES
from fused_lr.tools import cli
from fused_lr.tools.cli import _cpu_threads, main
from fused_lr.tools.demo import Config, load_data, train
from fused_lr.tools.plots import plot_compare
from fused_lr.tools.strategies import ADAPTIVE, COMPARE_RUNS, CONTROL, OPTIMIZERS

RUNS = {run.name: run for run in COMPARE_RUNS}

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "numpy", "numba", "rich", "matplotlib", "sklearn")  # none of them needed to start

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


# Chance on the 450 stratified test digits is 10%, and the untrained model scores that (9.78%, measured
# with --lr 1e-12); one epoch (21 steps) at each optimizer's defaults measured 26% (adagrad, whose
# first steps are the largest) to 92% (rmsprop). Twice chance tells learning from not learning with
# room on both sides.
BETTER_THAN_CHANCE = 0.2


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_each_optimizer_learns_in_one_epoch(optimizer, tmp_path, capsys):
    rc = main(["demo", "--optimizer", optimizer, "--epochs", "1", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    history = json.loads((tmp_path / "demo.json").read_text())
    assert history["optimizer"] == OPTIMIZERS[optimizer].cls
    assert history["config"]["optimizer"] == optimizer
    assert f"{OPTIMIZERS[optimizer].cls} lr {OPTIMIZERS[optimizer].lr}" in out  # its own defaults, in the header
    assert history["final_test_acc"] > BETTER_THAN_CHANCE, history["test_acc"]
    assert_png(tmp_path / "demo.png")


@pytest.mark.slow  # a whole demo in a subprocess; the in-process demo test covers the run by default
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
    assert [r["strategy"] for r in rows] == list(RUNS)
    assert {r["strategy"] for r in rows} >= {"adamw-cosine", "rmsprop", "sgd-norm-rate", CONTROL}
    for r in rows:
        run = RUNS[r["strategy"]]
        assert r["optimizer"] == ("torch.optim.SGD" if run.name == CONTROL else OPTIMIZERS[run.optimizer].cls)
        # right answers / 450 test images, written as the nearest float64 (not a float32 mean)
        acc = float(r["test_accuracy"])
        assert 0.0 <= acc <= 1.0 and round(acc * 450) / 450 == acc, r["test_accuracy"]
        assert 0.0 < float(r["optimizer_time_s"]) < float(r["total_time_s"])
        assert r["strategy"] in out  # the printed table
    assert "test accuracy" in out and "optimizer steps" in out
    assert f"cosine and {CONTROL} run the same recipe" in out

    runs = {r["name"]: r for r in json.loads((tmp_path / "compare.json").read_text())["runs"]}
    assert list(runs) == list(RUNS)
    for run in ADAPTIVE:
        curves = runs[run.name]
        assert len(curves["loss"]) == len(curves["lr"]) == len(curves["grad_norm"]) == 6
        assert curves["optimizer"] == OPTIMIZERS[run.optimizer].cls and curves["schedule"] == run.schedule
    # the gradient-norm run records its effective lr: lr x s(k) x (N + eps)^-power, s = 1 (constant
    # schedule); 1e-12 relative is float64 rounding of the same formula, a wrong power, eps or
    # norm would be off by far more
    rate = runs["sgd-norm-rate"]
    lr, eps = OPTIMIZERS["sgd"].lr * RUNS["sgd-norm-rate"].lr_scale, 1e-6
    assert rate["lr_norm_power"] > 0
    assert rate["lr"] == pytest.approx([lr * (n + eps) ** -rate["lr_norm_power"] for n in rate["grad_norm"]],
                                       rel=1e-12)
    # the rate, not the schedule, moves it
    assert len(set(rate["lr"])) > 1 and runs["constant"]["lr"] == [OPTIMIZERS["sgd"].lr] * 6


def test_compare_legend_leaves_the_curves_alone(tmp_path):
    # 13 runs: a legend inside an axes covered the curves; it must sit outside every axes
    steps = list(range(1, 11))
    runs = [SimpleNamespace(name=run.name, steps=10, optimizer=OPTIMIZERS[run.optimizer].cls,
                            backend="torch" if run.name == CONTROL else "numba", lr_norm_power=run.lr_norm_power,
                            loss=[2.0 / k for k in steps], train_acc=[0.5] * 10, lr=[0.1] * 10,
                            grad_norm=[1.0] * 10, eval_step=[5, 10], test_acc=[0.5, 0.9], final_test_acc=0.9)
            for run in COMPARE_RUNS]
    fig = plot_compare(runs, tmp_path / "compare.png")
    assert_png(tmp_path / "compare.png")
    fig.draw_without_rendering()  # lays the figure out for the canvas's renderer, which measures it
    renderer = fig.canvas.get_renderer()
    (legend,) = fig.legends
    assert len(legend.get_texts()) == len(COMPARE_RUNS)
    box = legend.get_window_extent(renderer)
    for ax in fig.axes:
        assert not box.overlaps(ax.get_window_extent(renderer)), ax.get_title()


@pytest.mark.parametrize("dtype, rel", [("float32", 1e-4), ("float64", 1e-10)])
def test_fused_cosine_tracks_the_torch_control(dtype, rel):
    # Same weights, batches and recipe: FusedSGD's cosine run and the stock SGD + clip_grad_norm_ +
    # CosineAnnealingLR control may differ only by rounding. In float32 that is a few ulps per
    # step (~1e-7 relative on the reference backend); 1e-4 leaves room for kernels that sum the
    # norm in another order. In float64 the same few ulps are ~1e-16, so 1e-10 holds with room
    # and shows that the float32 gap is rounding, not a difference in the recipe. Both are far
    # below what a wrong lr, clip or weight decay would show.
    config = Config(steps=10, dtype=dtype)
    data = load_data(torch.device("cpu"), getattr(torch, dtype))
    fused = train(config, data, RUNS["cosine"])
    control = train(config, data, RUNS[CONTROL])
    assert fused.lr == pytest.approx(control.lr, rel=1e-12)
    assert fused.loss == pytest.approx(control.loss, rel=rel)
    assert fused.grad_norm == pytest.approx(control.grad_norm, rel=rel)


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
    (["demo", "--lr", "abc"], "--lr"),
    (["demo", "--backend", "nope"], "--backend"),
    (["demo", "--device", "tpu"], "--device"),
    (["demo", "--dtype", "float16"], "--dtype"),
    (["demo", "--steps", "10", "--warmup", "10"], "--warmup"),
    (["demo", "--compare", "--schedule", "cosine"], "--compare"),
    (["demo", "--steps", "3", "--surprise"], "--surprise"),
    (["demo", "--batch-size", "5000"], "--batch-size"),
    (["demo", "--threads", "100000"], "--threads"),
    (["demo", "--seed", str(2**64)], "--seed"),
    (["demo", "--optimizer", "adam"], "--optimizer"),
    (["demo", "--optimizer", "adamw", "--momentum", "0.9"], "FusedAdamW has no momentum"),
    (["demo", "--compare", "--optimizer", "adamw"], "--optimizer adamw"),
    (["demo", "--compare", "--lr-norm-power", "1"], "--lr-norm-power"),
    # the optimizer settings are the fused optimizers' own checks, made before the demo prints anything
    (["demo", "--lr", "nan"], "FusedSGD: lr must be"),
    (["demo", "--momentum", "1.5"], "FusedSGD: momentum must be"),
    (["demo", "--compare", "--momentum", "1.5"], "FusedSGD: momentum must be"),
    (["demo", "--weight-decay", "-1"], "weight_decay must be"),
    (["demo", "--max-grad-norm", "0"], "max_grad_norm must be"),
    (["demo", "--lr-norm-power", "-1"], "lr_norm_power must be"),
    (["demo", "--optimizer", "adamw", "--lr", "-0.001"], "FusedAdamW: lr must be"),
    (["demo", "--optimizer", "rmsprop", "--momentum", "1.5"], "FusedRMSprop: momentum must be"),
    (["demo", "--optimizer", "adagrad", "--weight-decay", "-1"], "FusedAdagrad: param group 0: weight_decay must be"),
    (["nope"], "nope"),
])
def test_bad_arguments(argv, mentions, tmp_path, capsys):
    out_dir = tmp_path / "new" / "out"
    rc = main([*argv, "--out", str(out_dir)] if argv[0] == "demo" else argv)
    out, err = capsys.readouterr()
    assert rc != 0
    assert err.count("\n") == 1, f"expected one line, got {err!r}"
    assert "error" in err and mentions in err and "Traceback" not in err
    assert out == ""  # rejected before the header
    assert list(tmp_path.iterdir()) == []  # no --out folder left behind, nor the parent it would have made


def test_failure_keeps_an_existing_out_folder(tmp_path, capsys):
    # only the folders the command made are removed: one the user had stays, with its files
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", "--momentum", "1.5", "--out", str(tmp_path)]) == 2
    assert "momentum must be" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["demo", "--momentum", "1.5", "--out", str(empty)]) == 2
    assert empty.is_dir()


def test_divergence_stops_with_advice(tmp_path, capsys):
    # lr 1e6 with clipping at 1 moves the weights by up to 1e6 a step: the loss is NaN within
    # a few steps (step 8 of 40 when measured)
    rc = main(["demo", "--steps", "20", "--lr", "1e6", "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.count("\n") == 1 and "diverged" in err and "try a lower --lr" in err, err
    assert not (tmp_path / "out").exists()


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
    assert err.count("\n") == 1 and f"--backend {name}: " in err and "unavailable" in err


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


def test_demo_without_its_extra_says_what_to_install(monkeypatch, capsys):
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name, *a: None if name == "rich" else real(name, *a))
    assert main(["demo", "--steps", "3"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert "rich" in err and "pip install 'fused_lr[demo]'" in err


def _imported(command: list[str]) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Runs ``python -X importtime <command>``; returns the process and the top-level packages it imported."""
    run = subprocess.run([sys.executable, "-X", "importtime", *command], capture_output=True, text=True,
                         timeout=60, env=os.environ)
    names = {line.split("|")[-1].strip().split(".")[0] for line in run.stderr.splitlines()
             if line.startswith("import time:")}
    return run, names


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["demo", "--help"], ["demo", "--steps", "x"]])
def test_start_up_imports_nothing_heavy(args):
    # what makes `fused-lr --help` answer in a fraction of a second instead of seconds
    run, names = _imported(["-m", "fused_lr.tools.cli", *args])
    assert run.returncode == (2 if "x" in args else 0), run.stderr[-2000:]
    assert "fused_lr" in names
    assert not names & set(HEAVY), f"{' '.join(args)} imported {sorted(names & set(HEAVY))}"


def test_console_script_help_imports_nothing_heavy():
    script = Path(sys.executable).parent / "fused-lr"
    if not script.exists():
        pytest.skip(f"the fused-lr console script is not installed beside {sys.executable}")
    run, names = _imported([str(script), "--help"])
    assert run.returncode == 0 and "demo" in run.stdout, run.stderr[-2000:]
    assert not names & set(HEAVY), sorted(names & set(HEAVY))


def test_plots_do_not_import_the_demo():
    run = subprocess.run([sys.executable, "-c", "import sys, fused_lr.tools.plots; "
                          "print(sorted(m for m in sys.modules if m in ('fused_lr.tools.demo', 'torch')))"],
                         capture_output=True, text=True, timeout=60, env=os.environ)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


@pytest.mark.slow
def test_plain_install_without_extras(tmp_path):
    """Issue 13: a plain `pip install fused_lr` (no [demo] extra, no CUDA build) in a fresh venv:
    --help and info work, and demo says in one line which extra to install."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"FUSED_LR_CUDA": "0"}
    bin_ = venv / "bin"
    install = subprocess.run([str(bin_ / "pip"), "install", "-q", "-c", str(ROOT / "constraints-cpu.txt"), str(ROOT)],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1200)
    assert install.returncode == 0, install.stderr[-3000:]

    def fused_lr(*args):
        return subprocess.run([str(bin_ / "fused-lr"), *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=300)

    probe = (f"import fused_lr, importlib.util as u; print(fused_lr.__file__); "
             f"print([m for m in {tuple(cli.DEMO_EXTRA)} if u.find_spec(m)])")
    where = subprocess.run([str(bin_ / "python"), "-c", probe], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=300)
    assert where.returncode == 0, where.stderr
    path, extras = where.stdout.splitlines()
    assert path.startswith(str(venv)) and extras == "[]"  # the installed copy runs, without the extra's packages

    help_ = fused_lr("--help")
    assert help_.returncode == 0 and "demo" in help_.stdout and not help_.stderr, help_.stderr
    info = fused_lr("info")
    assert info.returncode == 0 and "backends" in info.stdout.splitlines(), info.stderr
    assert "Traceback" not in info.stderr
    demo = fused_lr("demo", "--steps", "3")
    assert demo.returncode == 1 and demo.stdout == ""
    assert demo.stderr.count("\n") == 1 and "pip install 'fused_lr[demo]'" in demo.stderr, demo.stderr
    shutil.rmtree(venv)  # 1 GB; a failing run keeps it to look into
