"""``make gpu-check`` (fused_lr/tools/bench/gpu_check.py) and its GPU workloads (gpu.py), the parts
that run without a GPU: argument handling, skip reasons, the tools' output parsers, the checks against
the targets, the summary files, and the wiring from the make rule to the workloads' processes.
Stand-in tools (small shell scripts) take the place of ncu and compute-sanitizer."""

import json
import os
import re
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from fused_lr.tools.bench import gpu as gb
from fused_lr.tools.bench import gpu_check as gc
from fused_lr.tools.bench import recipe

ROOT = Path(__file__).resolve().parent.parent

NO_GPU = dict(cuda=False, cuda_note="torch.cuda.is_available() is False")
GPU = dict(cuda=True, device=dict(name="Fake GPU", capability=[9, 0], sms=132, memory_gib=79.1),
           packages={"pytest-xdist": None}, ext_suffix=".so")


def fake_env(env):
    def run(ctx, item, timeout):
        ctx.env = dict(env)
        ok = bool(env.get("device"))
        return gc.Result(item.name, "pass" if ok else "fail", "fake env", 0.01,
                         [gc.Check("CUDA device visible to torch", str(ok), "a CUDA device", ok)])
    return run


def fake_item(ctx, item, timeout):
    return gc.Result(item.name, "pass", f"fake {item.name}", 0.01)


def stub_items(monkeypatch, env):
    """Every item's work replaced by a stand-in that passes, except ncu and memcheck, and the
    env item reporting ``env``."""
    monkeypatch.setattr(gc, "item_env", fake_env(env))
    for name in ("item_build", "item_backends", "item_copy"):
        monkeypatch.setattr(gc, name, fake_item)
    monkeypatch.setattr(gc, "item_step", lambda dtype: fake_item)
    monkeypatch.setattr(gc, "item_pytest", lambda *args: fake_item)


def summary(out: Path) -> dict:
    return {r["name"]: r for r in json.loads((out / "summary.json").read_text())["items"]}


def ctx_for(tmp_path, env=GPU, tools=None, left=100.0):
    ctx = gc.Ctx(out=tmp_path, python=sys.executable, deadline=time.monotonic() + left, budget=100.0, workers=0,
                 tools=tools or {t: None for t in gc.TOOLS})
    ctx.env = dict(env)
    return ctx


def item(name):
    return next(it for it in gc.items() if it.name == name)


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


# ------------------------------------------------------------------------------ command line

def test_list_names_every_item(capsys):
    assert gc.main(["--list"]) == 0
    out = capsys.readouterr().out
    for it in gc.items():
        assert it.name in out
    assert "[needs ncu]" in out and "[needs compute-sanitizer]" in out


@pytest.mark.parametrize("argv,message", [
    (["--only", "nope"], "unknown item 'nope'"),
    (["--skip", "env"], "the env item cannot be skipped"),
    (["--budget", "0"], "--budget must be > 0 seconds"),
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--only", "build", "--skip", "ncu"], "not allowed with argument"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        gc.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert len([ln for ln in err.splitlines() if "error:" in ln]) == 1
    assert "Traceback" not in err


def test_a_folder_it_did_not_write_is_refused(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(SystemExit):
        gc.main(["--out", str(tmp_path)])
    assert "not empty and no earlier gpu-check wrote it" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_out_defaults_to_the_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("GPU_CHECK_OUT", str(tmp_path / "from-env"))
    _, args = gc.parse_args([])
    assert args.out == tmp_path / "from-env"
    monkeypatch.delenv("GPU_CHECK_OUT")
    _, args = gc.parse_args([])
    assert args.out == Path("out/gpu-check")


def test_make_gpu_check_runs_the_package_with_no_torch_in_its_own_process():
    # the rule a bare GPU machine runs: its own python3, nothing installed yet; the orchestrator
    # itself imports no torch (each workload does, in its own process)
    rule = re.search(r"^gpu-check:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE).group(1)
    assert rule == "$(GPU_PYTHON) -m fused_lr.tools.bench gpu-check --out $(GPU_CHECK_OUT)"
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "fused_lr.tools.bench", "gpu-check", "--list"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    assert all(it.name in run.stdout for it in gc.items())
    imported = {ln.split("|")[-1].strip().split(".")[0] for ln in run.stderr.splitlines()
                if ln.startswith("import time")}
    assert "fused_lr" in imported and not imported & {"torch", "numpy", "numba"}, sorted(imported)


def test_the_env_item_runs_its_workload_through_the_package(tmp_path):
    # the real subprocess: `python -m fused_lr.tools.bench gpu env --json ...` from the checkout
    ctx = ctx_for(tmp_path, env={})
    r = gc.item_env(ctx, item("env"), 120)
    assert " -m fused_lr.tools.bench gpu env --json " in (tmp_path / "env.log").read_text()
    data = json.loads((tmp_path / "env.json").read_text())
    assert data["python"] == sys.version.split()[0] and "packages" in data
    if not data["cuda"]:
        assert r.status == "fail" and r.checks[0].value == data["cuda_note"]


def test_the_workloads_share_the_step_and_its_names():
    assert gc.TORCH == gb.TORCH == recipe.BASELINE  # the summary reads the workload's contenders by name
    assert gc.FUSED_BACKENDS == gb.FUSED_BACKENDS


# ------------------------------------------------------------------------------ skips

def test_without_a_gpu_every_gpu_item_skips_with_the_reason(monkeypatch, tmp_path, capsys):
    stub_items(monkeypatch, NO_GPU)
    out, archive = tmp_path / "out", tmp_path / "gpu-check.tar.gz"
    assert gc.main(["--out", str(out), "--archive", str(archive)]) == 1  # the env item fails: no device
    items = summary(out)
    assert items["env"]["status"] == "fail"
    for name, r in items.items():
        if name != "env":
            assert r["status"] == "skip"
            assert r["reason"] == "no CUDA device here (torch.cuda.is_available() is False)"
    md = (out / "summary.md").read_text()
    assert md.startswith("# gpu-check: FAIL: 0 pass, 1 fail, 12 skip")
    assert all(f"| {name} | skip |" in md for name in items if name != "env")
    with tarfile.open(archive) as tar:
        assert {"out/summary.md", "out/summary.json", "out/.gpu-check"} <= set(tar.getnames())
    # a re-run into the same folder empties it first
    (out / "stale.log").write_text("from an earlier run")
    gc.main(["--out", str(out)])
    assert not (out / "stale.log").exists()


def test_missing_tools_skip_their_items_and_the_rest_runs(monkeypatch, tmp_path):
    stub_items(monkeypatch, GPU)
    monkeypatch.setattr(gc, "find_tool", lambda name: None)
    assert gc.main(["--out", str(tmp_path)]) == 0  # skips are not failures
    items = summary(tmp_path)
    assert items["ncu"]["status"] == "skip" and items["ncu"]["reason"].startswith("ncu not found (searched PATH, ")
    assert items["memcheck"]["status"] == "skip"
    assert items["memcheck"]["reason"].startswith("compute-sanitizer not found (searched PATH, ")
    assert {n for n, r in items.items() if r["status"] == "pass"} == {
        it.name for it in gc.items() if it.name not in ("ncu", "memcheck")}
    assert all("\n" not in r["reason"] for r in items.values())


def test_only_runs_the_named_items_with_env_and_build(monkeypatch, tmp_path):
    stub_items(monkeypatch, GPU)
    assert gc.main(["--out", str(tmp_path), "--only", "copy-probe", "tests-amp"]) == 0
    items = summary(tmp_path)
    assert {n for n, r in items.items() if r["status"] == "pass"} == {"env", "build", "copy-probe", "tests-amp"}
    assert items["backends"]["reason"] == "not selected (--only/--skip)"
    # on a machine that already holds the build, it can be left out
    assert gc.main(["--out", str(tmp_path), "--skip", "build"]) == 0
    assert summary(tmp_path)["build"]["reason"] == "not selected (--only/--skip)"


def test_an_item_is_not_started_once_the_budget_is_spent(tmp_path):
    ctx = ctx_for(tmp_path, left=gc.MIN_START / 2)
    assert gc.skip_reason(item("copy-probe"), ctx) == "not started: the total budget of 100 s was spent"
    assert gc.skip_reason(item("copy-probe"), ctx_for(tmp_path)) is None


def test_find_tool_searches_the_toolkit_folders_newest_first(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(gc, "TOOL_DIRS", [str(tmp_path / "nsight-compute" / "*")])
    assert gc.find_tool("ncu") is None
    for version in ("2025.1.0", "2025.3.1"):
        (tmp_path / "nsight-compute" / version).mkdir(parents=True)
        executable(tmp_path / "nsight-compute" / version / "ncu", "#!/bin/sh\n")
    assert gc.find_tool("ncu") == str(tmp_path / "nsight-compute" / "2025.3.1" / "ncu")


def test_a_command_past_its_time_limit_is_killed(tmp_path):
    t0 = time.monotonic()
    proc = gc.run_cmd(["sh", "-c", "sleep 30 & sleep 30"], tmp_path / "slow.log", timeout=0.3)
    assert proc.rc is None
    assert time.monotonic() - t0 < 5
    assert "killed at its time limit" in proc.text()


# ------------------------------------------------------------------------------ the build

FAKE_PYTHON = """#!/bin/sh
# a stand-in interpreter: "-m pip ..." exits with $PIP_RC; "setup.py build_ext" builds; both report the env
echo "FUSED_LR_CUDA=$FUSED_LR_CUDA FUSED_LR_CUDA_ARCHS=$FUSED_LR_CUDA_ARCHS CMAKE_GENERATOR=$CMAKE_GENERATOR"
if [ "$1" = "-m" ]; then
  [ "$PIP_RC" = 0 ] || { echo "ERROR: pip failed"; exit "$PIP_RC"; }
fi
mkdir -p fused_lr && touch fused_lr/_cuda.cpython-312-x86_64-linux-gnu.so
echo "fused_lr: built _cuda.cpython-312-x86_64-linux-gnu.so in 12 s"
"""


@pytest.mark.parametrize("pip_rc", [0, 1], ids=["pip", "fallback"])
def test_build_item_builds_offline_for_the_device(monkeypatch, tmp_path, pip_rc):
    monkeypatch.setattr(gc, "ROOT", tmp_path)
    monkeypatch.setenv("PIP_RC", str(pip_rc))
    monkeypatch.delenv("CMAKE_GENERATOR", raising=False)
    ctx = ctx_for(tmp_path, env=dict(GPU, ext_suffix=".cpython-312-x86_64-linux-gnu.so"),
                  tools={"make": None, "ninja": "/usr/bin/ninja"})
    ctx.python = str(executable(tmp_path / "python3", FAKE_PYTHON))
    r = gc.item_build(ctx, item("build"), 30)
    log = (tmp_path / "build.log").read_text()
    assert "-m pip install -v --no-build-isolation --no-deps --no-index -e ." in log
    assert "FUSED_LR_CUDA=1 FUSED_LR_CUDA_ARCHS=90 CMAKE_GENERATOR=Ninja" in log  # no make here: ninja
    assert r.data["module"] == "_cuda.cpython-312-x86_64-linux-gnu.so" and r.data["cmake_seconds"] == 12
    if pip_rc == 0:
        assert r.status == "pass" and r.data["route"] == "pip editable install"
    else:  # the module is still built for the later items, but the documented route failing is a failure
        assert r.status == "fail" and r.data["route"] == "setup.py build_ext --inplace (after pip failed)"
        assert "setup.py build_ext --inplace" in log


def test_build_item_does_not_count_an_old_module(monkeypatch, tmp_path):
    monkeypatch.setattr(gc, "ROOT", tmp_path)
    old = tmp_path / "fused_lr" / "_cuda.cpython-312-x86_64-linux-gnu.so"
    old.parent.mkdir()
    old.touch()
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    ctx = ctx_for(tmp_path, env=dict(GPU, ext_suffix=".cpython-312-x86_64-linux-gnu.so"))
    ctx.python = str(executable(tmp_path / "python3", "#!/bin/sh\necho 'error: nvcc failed'\nexit 1\n"))
    r = gc.item_build(ctx, item("build"), 30)
    assert r.status == "fail"
    assert [c.value for c in r.checks] == ["exit 1", "missing"]


# ------------------------------------------------------------------------------ the tools' outputs

NCU_HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Section Name",'
              '"Metric Name","Metric Unit","Metric Value"')


def ncu_row(metric, unit, value):
    return (f'"0","42","python3","gpu","update_kernel","1","7","Command line profiler metrics",'
            f'"{metric}","{unit}","{value}"')


def test_parse_ncu_csv_converts_units_and_ignores_other_lines():
    text = "\n".join(["==PROF== Connected to process 42", "gpu-bench: some program output", NCU_HEADER,
                      ncu_row("dram__bytes.sum", "Mbyte", "512.50"),
                      ncu_row("gpu__time_duration.sum", "usecond", "1,250.5"), "==PROF== Disconnected from process 42"])
    # one multiplication by the unit's scale: equal to rounding
    assert gc.parse_ncu_csv(text) == pytest.approx({"dram__bytes.sum": 512.5e6, "gpu__time_duration.sum": 1250.5e-6},
                                                   rel=1e-15)
    base = "\n".join([NCU_HEADER, ncu_row("dram__bytes.sum", "byte", "512,000,000")])
    assert gc.parse_ncu_csv(base) == {"dram__bytes.sum": 512e6}
    assert gc.parse_ncu_csv("==WARNING== No kernels were profiled.") == {}
    with pytest.raises(ValueError, match="'furlong'"):
        gc.parse_ncu_csv("\n".join([NCU_HEADER, ncu_row("dram__bytes.sum", "furlong", "1")]))


def fake_ncu(tmp_path, lines):
    """A stand-in ncu: writes the driver's JSON (its last argument) and prints ``lines``."""
    body = "".join(f"echo '{ln}'\n" for ln in lines)
    return str(executable(tmp_path / "ncu", '#!/bin/sh\nfor a; do last=$a; done\n'
                                            'echo \'{"update_bytes": 500000000}\' > "$last"\n' + body))


def test_ncu_item_checks_the_update_kernel_against_the_copy_probe(tmp_path):
    nbytes, ns, copy = 510_000_000, 200_000, 2800.0
    ncu = fake_ncu(tmp_path, [NCU_HEADER, ncu_row("dram__bytes.sum", "byte", nbytes),
                              ncu_row("gpu__time_duration.sum", "nsecond", ns)])
    ctx = ctx_for(tmp_path, tools={"ncu": ncu})
    ctx.results["copy-probe"] = gc.Result("copy-probe", "pass", "", data=dict(gbps=copy))
    r = gc.item_ncu(ctx, item("ncu"), 30)
    gbps = nbytes / (ns * 1e-9) / 1e9
    assert r.status == "pass", r.reason
    assert r.data["cuda"]["gbps"] == pytest.approx(gbps)
    assert r.data["cuda"]["traffic_ratio"] == pytest.approx(nbytes / 500_000_000)
    assert [c.value for c in r.checks] == [f"{gbps / copy:.0%} ({gbps:.0f} of {copy:.0f} GB/s)"] * 2


def test_ncu_item_skips_when_ncu_cannot_profile_here(tmp_path):
    ncu = fake_ncu(tmp_path, ["==ERROR== Failed to initialize the profiler: LibraryNotLoaded"])
    ctx = ctx_for(tmp_path, tools={"ncu": ncu})
    r = gc.item_ncu(ctx, item("ncu"), 30)
    assert r.status == "skip"
    assert r.reason == ("ncu could not profile on this machine: "
                        "==ERROR== Failed to initialize the profiler: LibraryNotLoaded")


@pytest.mark.parametrize("printed,status,reason", [
    ("========= ERROR SUMMARY: 0 errors", "pass", "0 errors"),
    ("========= Invalid __global__ write of size 4 bytes\n========= ERROR SUMMARY: 3 errors", "fail",
     "memcheck errors (both backends, 4 dtypes, clipping, GradScaler): 3 (target 0)"),
    ("========= Error: Device not supported", "skip",
     "compute-sanitizer cannot run on this machine: ========= Error: Device not supported"),
])
def test_memcheck_item_reads_the_error_summary(tmp_path, printed, status, reason):
    body = "".join(f"echo '{ln}'\n" for ln in printed.splitlines())
    sanitizer = executable(tmp_path / "compute-sanitizer", '#!/bin/sh\nfor a; do last=$a; done\n'
                                                           'echo \'{"steps": {"cuda": 5}}\' > "$last"\n' + body)
    r = gc.item_memcheck(ctx_for(tmp_path, tools={"compute-sanitizer": str(sanitizer)}), item("memcheck"), 30)
    assert (r.status, r.reason) == (status, reason)


def test_junit_results_need_both_backends_passing(tmp_path):
    cases = ['<testcase classname="tests.test_parity" name="test_matches_torch[cuda-cuda-plain-f32]"/>',
             '<testcase classname="tests.test_parity" name="test_matches_torch[cuda-cuda-nesterov-f32]">'
             '<failure message="boom"/></testcase>',
             '<testcase classname="tests.test_parity" name="test_matches_torch[triton-cuda-plain-f32]">'
             '<skipped message="triton: not installed"/></testcase>']
    xml = tmp_path / "junit.xml"
    xml.write_text(f'<testsuites><testsuite name="pytest">{"".join(cases)}</testsuite></testsuites>')
    junit = gc.parse_junit(xml)
    assert junit["total"] == 3 and junit["skipped"] == {"triton: not installed": 1}
    checks = {c.name: c for c in gc.junit_checks(junit, ("cuda-cuda", "triton-cuda"))}
    assert checks["3 tests: none failed"].value == "1 failed (test_matches_torch[cuda-cuda-nesterov-f32])"
    assert (checks["tests with cuda-cuda passed"].ok, checks["tests with triton-cuda passed"].ok) == (True, False)
    assert gc.parse_junit(tmp_path / "missing.xml")["total"] == 0


# ------------------------------------------------------------------------------ the step's checks

PROFILE = dict(api_calls_per_step=12.0, syncs_per_step=0.0, sync_records_per_step=0.0, sync_calls={},
               gpu_ops_per_step=3.0)


def step_data():
    return dict(
        dtype="float32", numel=1000, tensors=3, buckets=1, copy_gbps=1000.0, errors={},
        contenders={
            gb.TORCH: dict(wall_ms=1.0, gpu_ms=0.4, profile=dict(PROFILE, gpu_ops_per_step=30.0)),
            "fused_lr cuda": dict(wall_ms=0.5, gpu_ms=0.3, update_gbps=900.0, profile=PROFILE,
                                  blocking=dict(host_ms=0.2, sleep_ms=50.0, blocked=False)),
            "fused_lr triton": dict(wall_ms=0.9, gpu_ms=0.35, update_gbps=700.0,
                                    profile=dict(PROFILE, syncs_per_step=1.0, gpu_ops_per_step=4.0,
                                                 sync_calls={"cudaStreamSynchronize": 1.0}),
                                    blocking=dict(host_ms=49.0, sleep_ms=50.0, blocked=True)),
        },
        graph_equal={"cuda": dict(steps=100, equal=True, params_moved=True),
                     "triton": dict(steps=100, equal=False, mismatched_params=[3], mismatched_state=[])})


def by_name(checks, backend):
    return {c.name.split(": ", 1)[1]: (c.value, c.ok) for c in checks if c.name.startswith(backend + ":")}


def test_step_checks_against_the_targets():
    data = step_data()
    checks = gc.step_checks(data, speed_targets=True)
    cuda, triton = by_name(checks, "cuda"), by_name(checks, "triton")
    assert all(ok for _, ok in cuda.values()), cuda
    assert not any(ok for _, ok in triton.values()), triton
    eager = "eager wall time per step, speed-up over torch fused"
    graph = "CUDA-graph GPU time per step, speed-up over torch fused (graphed)"
    assert cuda[eager][0] == f"{1.0 / 0.5:.2f}x" and triton[eager][0] == f"{1.0 / 0.9:.2f}x"
    assert triton[graph][0] == f"{0.4 / 0.35:.2f}x"
    assert triton["host syncs per step (profiler API trace)"][0] == "1 (cudaStreamSynchronize 1.0)"
    assert triton["GPU operations per step (1 dtype bucket)"] == ("4", False)
    assert cuda["GPU operations per step (1 dtype bucket)"] == ("3", True)
    # bf16: the speed targets are fp32's; the rest still holds
    names = {c.name for c in gc.step_checks(data, speed_targets=False)}
    assert not any("speed-up" in n or "bandwidth" in n for n in names)
    assert "cuda: host syncs per step (profiler API trace)" in names


def test_step_checks_say_what_was_not_measured():
    data = step_data()
    del data["contenders"]["fused_lr triton"]
    data["errors"]["fused_lr triton"] = "RuntimeError: backend 'triton' is unavailable: no CUDA device"
    data["contenders"]["fused_lr cuda"]["profile"] = dict(PROFILE, api_calls_per_step=0.0)
    data["contenders"]["fused_lr cuda"]["graph_error"] = "RuntimeError: capture failed"
    data["contenders"][gb.TORCH].pop("gpu_ms")
    checks = gc.step_checks(data, speed_targets=True)
    cuda, triton = by_name(checks, "cuda"), by_name(checks, "triton")
    assert triton == {"step runs": ("RuntimeError: backend 'triton' is unavailable: no CUDA device", False)}
    assert cuda["host syncs per step (profiler API trace)"] == (
        "no CUDA API calls recorded in the step ranges, so none could be counted", False)
    assert cuda["CUDA-graph GPU time per step, speed-up over torch fused (graphed)"] == (
        "not measured (RuntimeError: capture failed)", False)
    data["contenders"]["fused_lr cuda"]["profile_error"] = "JSONDecodeError: Expecting value"
    cuda = by_name(gc.step_checks(data, speed_targets=True), "cuda")
    assert cuda["host syncs per step (profiler API trace)"] == ("not measured: JSONDecodeError: Expecting value", False)


def test_summary_lists_items_checks_and_the_step_table(tmp_path):
    ctx = ctx_for(tmp_path)
    data = step_data()
    results = [gc.Result("env", "pass", "Fake GPU", 1.0),
               gc.Result("step-fp32", "fail", "triton: ...", 30.0, gc.step_checks(data, True), data),
               gc.Result("ncu", "skip", "ncu not found (searched PATH)")]
    text = gc.write_summary(ctx, results, ["--out", str(tmp_path)])
    assert text.startswith("# gpu-check: FAIL: 1 pass, 1 fail, 1 skip")
    assert "| ncu | skip | 0 | ncu not found (searched PATH) |" in text
    assert "| step-fp32 | triton: GPU operations per step (1 dtype bucket) | 4 | <= 3 | FAIL |" in text
    assert "| fused_lr cuda | - | 0.500 | 0.300 |" in text
    last = gc.recap(results).splitlines()
    assert last[0] == "gpu-check FAIL: 1 pass, 1 fail, 1 skip"
    assert "  FAIL step-fp32: triton: GPU operations per step (1 dtype bucket): 4 (target <= 3)" in last
    assert len(last) == 1 + sum(not c.ok for c in results[1].checks)
    report = json.loads((tmp_path / "summary.json").read_text())
    assert report["status"] == "fail" and report["counts"] == {"pass": 1, "fail": 1, "skip": 1}
    assert report["items"][1]["checks"][0]["name"] == "cuda: eager wall time per step, speed-up over torch fused"
    assert report["targets"]["eager_speedup"] == gc.EAGER_SPEEDUP


# ------------------------------------------------------------------------------ gpu.py's trace counts

def ev(cat, name, ts, dur=1.0):
    return dict(ph="X", cat=cat, name=name, ts=ts, dur=dur)


def test_count_trace_counts_per_step():
    trace = {"traceEvents": [
        ev("user_annotation", gb.STEP_MARK, 0, 10), ev("user_annotation", gb.STEP_MARK, 20, 10),
        ev("gpu_user_annotation", gb.STEP_MARK, 0, 500),  # the range's GPU-side copy: not a step window
        ev("cuda_runtime", "cudaLaunchKernel", 1), ev("cuda_driver", "cuLaunchKernelEx", 2),
        ev("cuda_runtime", "cudaMemcpyAsync", 3), ev("cuda_runtime", "cudaStreamSynchronize", 21),
        ev("cuda_runtime", "cudaLaunchKernel", 22), ev("cuda_driver", "cuMemcpyDtoH_v2", 23),
        ev("cuda_sync", "Stream Sync", 21.5),
        ev("cuda_runtime", "cudaDeviceSynchronize", 40),  # after the steps
        ev("kernel", "update_kernel", 100, 30), ev("kernel", "norm_kernel", 140, 5), ev("gpu_memcpy", "Memcpy", 150),
        ev("kernel", "update_kernel", 200, 50), ev("kernel", "norm_kernel", 260, 5), ev("gpu_memset", "Memset", 270),
        {"ph": "M", "name": "process_name"},
    ]}
    c = gb.count_trace(trace, steps=2)
    assert c["windows"] == 2
    assert c["gpu_ops_per_step"] == 6 / 2 and c["kernels_per_step"] == 4 / 2
    assert c["launch_calls_per_step"] == 4 / 2  # two kernel launches each way, one async copy; not the syncs
    assert c["sync_calls"] == {"cudaStreamSynchronize": 1, "cuMemcpyDtoH": 1}
    assert c["syncs_per_step"] == 2 / 2 and c["sync_records_per_step"] == 1 / 2
    assert c["pattern_us"] == (30 + 50) / 2
    assert c["kernel_names"] == {"update_kernel": 1.0, "norm_kernel": 1.0}


@pytest.mark.parametrize("name,sync,launch", [
    ("cudaLaunchKernel", False, True), ("cuLaunchKernelEx", False, True), ("cudaGraphLaunch", False, True),
    ("cudaMemcpyAsync", False, True), ("cuMemsetD32Async", False, True), ("cudaMemcpy", True, False),
    ("cuMemcpyHtoD_v2", True, False), ("cudaStreamSynchronize", True, False), ("cudaFree", True, False),
    ("cudaStreamIsCapturing", False, False), ("cudaEventRecord", False, False),
])
def test_api_call_classes(name, sync, launch):
    assert (gb.is_sync(name), gb.is_launch(name)) == (sync, launch)


def test_bench_refuses_to_run_without_a_gpu(capsys):
    if gb.torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    with pytest.raises(SystemExit):
        gb.main(["copy"])
    assert "no CUDA device here" in capsys.readouterr().err

