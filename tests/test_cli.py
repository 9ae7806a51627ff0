"""The ``fused-lr`` command on tiny budgets: demo with each optimizer, demo --compare, the compare
figure, info, bench (its checks before the run, its figure and verdict, the benchmarks leaving the
environment alone), bad arguments, start-up cost, and (marked slow) a plain install without the
[demo] extra."""

import csv
import importlib.util
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
from fused_lr.tools import cli, plots
from fused_lr.tools.bench import common as step_common
from fused_lr.tools.bench import host as host_bench
from fused_lr.tools.bench import pytest_plugin
from fused_lr.tools.bench import step as step_bench
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
    assert_png(tmp_path / "demo-sgd.png")
    history = json.loads((tmp_path / "demo-sgd.json").read_text())
    assert len(history["loss"]) == len(history["lr"]) == len(history["grad_norm"]) == 20
    assert_loss_drops(history)
    # warm-up starts at 0 and nothing exceeds the peak lr
    assert history["lr"][0] == 0.0 and max(history["lr"]) <= 0.1
    assert f"test accuracy {history['final_test_acc']:.2%}" in out
    assert f"wrote {tmp_path / 'demo-sgd.png'} and {tmp_path / 'demo-sgd.json'}" in out


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
    history = json.loads((tmp_path / f"demo-{optimizer}.json").read_text())
    assert history["optimizer"] == OPTIMIZERS[optimizer].cls
    assert history["config"]["optimizer"] == optimizer
    assert f"{OPTIMIZERS[optimizer].cls} lr {OPTIMIZERS[optimizer].lr}" in out  # its own defaults, in the header
    assert history["final_test_acc"] > BETTER_THAN_CHANCE, history["test_acc"]
    assert_png(tmp_path / f"demo-{optimizer}.png")
    # named by the optimizer: the runs of different optimizers into one folder keep each other's files
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"demo-{optimizer}.json", f"demo-{optimizer}.png"]


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
    assert_png(tmp_path / "demo-sgd.png")
    assert_loss_drops(json.loads((tmp_path / "demo-sgd.json").read_text()))


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


def test_compare_zooms_on_the_finish(tmp_path):
    # the first epoch's evaluation is at ~25 %, the finishes at 97.8-99.3 % (measured): on the whole
    # axis they are one line, so an inset shows the second half of the run from just below the lowest
    steps = list(range(1, 169))
    finals = [0.978 + 0.015 * k / (len(COMPARE_RUNS) - 1) for k in range(len(COMPARE_RUNS))]
    runs = [SimpleNamespace(name=run.name, steps=168, optimizer=OPTIMIZERS[run.optimizer].cls,
                            backend="torch" if run.name == CONTROL else "numba", lr_norm_power=run.lr_norm_power,
                            loss=[2.0 / k for k in steps], train_acc=[0.5] * 168, lr=[0.1] * 168, grad_norm=[1.0] * 168,
                            eval_step=[21 * e for e in range(1, 9)],
                            test_acc=[0.25, 0.8, 0.93, 0.96, 0.97, final - 0.004, final - 0.002, final],
                            final_test_acc=final)
            for run, final in zip(COMPARE_RUNS, finals, strict=True)]
    fig = plot_compare(runs, tmp_path / "compare.png")
    acc = fig.axes[2]
    assert acc.get_ylim()[0] < 0.25  # the whole run stays on the main axis
    (inset,) = acc.child_axes
    low, high = inset.get_ylim()
    assert 0.95 < low < min(finals) and max(finals) < high <= 1.0, (low, high)
    assert inset.get_xlim()[0] < 84 < 168 < inset.get_xlim()[1]  # from mid-run to the end
    assert len(inset.get_lines()) == len(COMPARE_RUNS)


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
    listed = {ln.split()[0]: ln for ln in lines[lines.index("backends") + 1 : -1]}
    assert set(listed) == set(NAMES)
    for name, status in available_backends().items():
        assert ("usable" in listed[name]) if status is True else (f"unavailable: {status}" in listed[name])
    from fused_lr.core import meta

    assert lines[-1] == ("per-step checks: compiled (fused_lr._meta)" if meta.IMPL == "compiled"
                         else f"per-step checks: Python ({meta.WHY_PYTHON})")


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


def _fake_result(model: str, spread: float = 1.1) -> step_bench.ModelResult:
    """A step benchmark's result without running it: ``spread`` is each row's median/fastest."""
    rows = [dict(name=name, median_ms=ms, min_ms=ms / spread, speedup=10.0 / ms, speedup_min=10.0 / ms,
                 stream_fraction=5.0 / ms, stream_fraction_min=5.0 / ms)
            for name, ms in (("torch fused", 10.0), ("fused_lr numba", 6.0))]
    return step_bench.ModelResult(model, 62, 11_700_000, 6 * 4 * 11_700_000, 5.0, 4.9, rows)


@pytest.fixture
def fake_bench(monkeypatch):
    """The step benchmark's measurements replaced by fixed numbers: what is left is main()'s checks,
    its printing, bench.json and bench.png. ``ran`` lists the models "timed"."""
    ran = []
    monkeypatch.setattr(step_bench, "run_model", lambda model, *a, **k: ran.append(model) or _fake_result(model))
    monkeypatch.setattr(step_bench, "probe_gbps", lambda: 40.0)
    monkeypatch.setattr(host_bench, "run", lambda **k: ran.append("host") or [])
    return ran


@pytest.mark.parametrize("how", ["below a file", "/proc"])
@pytest.mark.parametrize("host", [False, True], ids=["step", "host"])
def test_bench_unwritable_out_is_one_line_before_the_run(fake_bench, tmp_path, capsys, how, host):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "out" if how == "below a file" else Path("/proc/fused-lr-bench")
    rc = main(["bench", *(["--host"] if host else []), "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert rc == 2 and fake_bench == [] and stdout == ""  # nothing timed, nothing printed
    assert err.count("\n") == 1 and f"cannot write to --out {out}" in err and "Traceback" not in err, err


def test_bench_without_matplotlib_writes_its_json_and_says_why_no_figure(fake_bench, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as on a plain install: importing it fails
    assert main(["bench", "--models", "resnet18", "--repeat", "1", "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert fake_bench == ["resnet18"] and err == ""
    assert json.loads((tmp_path / "bench.json").read_text())["results"][0]["model"] == "resnet18"
    assert not (tmp_path / "bench.png").exists()
    assert out.splitlines()[-1] == (f"wrote {tmp_path / 'bench.json'}; bench.png skipped: matplotlib is not installed "
                                    "(pip install matplotlib, or 'fused_lr[demo]')")


def test_bench_png_carries_a_disturbed_verdict(fake_bench, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(step_bench, "run_model", lambda model, *a, **k: _fake_result(model, spread=2.0))
    figures = []
    real = plots.plot_bench
    monkeypatch.setattr(plots, "plot_bench", lambda *a, **k: figures.append(real(*a, **k)))
    assert main(["bench", "--models", "resnet18", "resnet50", "--repeat", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    verdict = next(line for line in out.splitlines() if line.startswith("DISTURBED"))
    assert "median/fastest above 1.25" in verdict
    assert_png(tmp_path / "bench.png")
    (fig,) = figures
    title = fig.get_suptitle()
    assert "DISTURBED, do not trust these figures" in title and "median/fastest above 1.25" in title.replace("\n", " ")
    assert fig._suptitle.get_color() == "tab:red"
    assert out.splitlines()[-1] == f"wrote {tmp_path / 'bench.json'} and {tmp_path / 'bench.png'}"


def test_bench_png_of_an_undisturbed_run_says_so(tmp_path):
    fig = plots.plot_bench([_fake_result("resnet18")], tmp_path / "bench.png", step_common.verdict([]))
    assert fig.get_suptitle().splitlines()[-1].startswith("undisturbed:")
    assert fig._suptitle.get_color() == "black"


def test_bench_help_names_every_benchmark(capsys):
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for command in ("--host", "fused-lr bench fsdp", "fused-lr bench gpu ", "fused-lr bench gpu-check",
                    "pytest benchmarks/ --benchmark-only"):
        assert command in out


@pytest.mark.parametrize("args,message", [(["--repeat", "0"], "--repeat must be >= 1"),
                                          (["--idle-ms", "-1"], "--idle-ms must be between 0 and 10000")])
def test_bench_bad_argument_is_one_line(capsys, args, message):
    assert main(["bench", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_idle_cadence_pauses_before_each_step_but_not_the_bound(monkeypatch):
    """--idle-ms: every timed step but the streaming bound's waits that long after the cache sweep,
    untimed; the bound stays back to back."""
    events = []
    monkeypatch.setattr(step_bench.time, "sleep", lambda s: events.append(("idle", s)))
    fns = {"step": lambda: events.append("step"), step_bench.STREAM: lambda: events.append("bound")}
    times = step_bench.time_interleaved(fns, repeat=2, warmup=0, before=lambda: events.append("sweep"),
                                        idle_s=0.03, busy=(step_bench.STREAM,))
    assert events == ["sweep", ("idle", 0.03), "step", "sweep", "bound"] * 2
    assert {name: len(t) for name, t in times.items()} == {"step": 2, step_bench.STREAM: 2}


def test_benchmarks_leave_the_environment_alone(monkeypatch):
    # The host benchmark used to set TRITON_INTERPRET=1 while pytest collected it, which made the
    # step benchmarks collected after it time interpreted Triton (seconds a step). Collecting the
    # benchmarks (their modules, conftest's parametrisation) and building every contender they
    # time must leave os.environ as it was, and the stubbed Triton host path must not need it.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _torch_sets_its_own_variables()
    before = dict(os.environ)
    modules = {f.stem: _load_module(f) for f in sorted((ROOT / "benchmarks").glob("*.py"))}
    params = {}
    metafunc = SimpleNamespace(fixturenames=("model", "optimizer", "contender"),
                               parametrize=lambda name, values, **k: params.setdefault(name, list(values)))
    modules["conftest"].pytest_generate_tests(metafunc)
    assert not any("triton" in name for name in params["contender"]), params["contender"]
    built = host_bench.contenders()
    assert list(built) == list(host_bench.available())
    if "fused_lr triton (launches stubbed)" in built:
        new_grads, step = built["fused_lr triton (launches stubbed)"]
        new_grads()
        step()  # the host path runs, its launches stubbed
    assert dict(os.environ) == before


def _torch_sets_its_own_variables() -> None:
    """torch._dynamo writes its default TORCHINDUCTOR_CACHE_DIR into os.environ when first imported
    (which constructing a torch optimizer does): torch's own doing, once per process, not the
    benchmarks'. Done before the snapshot."""
    import torch._dynamo  # noqa: F401


def _load_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"_benchmarks_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pytest_plugin_points_benchmark_only_at_the_benchmarks(tmp_path):
    def load(argv, where=ROOT, benchmark_only=True, paths=()):
        ns = SimpleNamespace(benchmark_only=benchmark_only, file_or_dir=list(paths), pyargs=False)
        config = SimpleNamespace(known_args_namespace=ns, invocation_params=SimpleNamespace(dir=where), rootpath=ROOT)
        args = list(argv)
        pytest_plugin.pytest_load_initial_conftests(early_config=config, parser=None, args=args)
        return args, ns.file_or_dir

    assert load(["--benchmark-only"]) == (["--benchmark-only", "benchmarks"], ["benchmarks"])
    assert load(["-q"], benchmark_only=False) == (["-q"], [])  # plain pytest: the tests, as before
    assert load(["--benchmark-only", "tests"], paths=["tests"]) == (["--benchmark-only", "tests"], ["tests"])
    assert load(["--benchmark-only"], where=tmp_path) == (["--benchmark-only"], [])  # not at the root


@pytest.mark.slow  # 10-20 s: pytest collects the benchmarks in a process of its own
def test_pytest_benchmark_only_at_the_root_collects_the_benchmarks():
    script = ("import os, pytest, torch._dynamo; before = dict(os.environ); "
              "pytest.main(['--benchmark-only', '--collect-only', '-q', '-p', 'no:cacheprovider']); "
              "print('changed', sorted(k for k in before.keys() | os.environ.keys() "
              "if before.get(k) != os.environ.get(k)))")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTEST_ADDOPTS")}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    ids = [line for line in run.stdout.splitlines() if "::" in line]
    assert ids and all(line.startswith("benchmarks/") for line in ids), run.stdout[-2000:]
    assert any("test_host.py" in line for line in ids) and any("test_step.py" in line for line in ids)
    assert not any("test_step" in line and "triton" in line for line in ids)
    assert run.stdout.splitlines()[-1] == "changed []"


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
