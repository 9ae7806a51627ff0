"""``make gpu-check`` (``python3 -m fused_lr.tools.bench gpu-check``): every GPU check of fused_lr
in one command, for a bare GPU machine.

Each item runs in its own subprocess under its own time limit, and the run goes on after a
failure. Everything lands in one folder (--out, else $GPU_CHECK_OUT, else out/gpu-check):
summary.md and summary.json (pass/fail/skip per item, each check's value and target), every
item's log, the JSON its workload wrote (gpu.py, ``fused-lr bench gpu``), pytest's JUnit XML and
the profiler traces. The machine's own python with a CUDA build of torch runs everything; the
extension is built there offline (no build isolation, nothing fetched). ``--list`` shows the
items and their time budgets. This module imports no torch: the workloads do, in their processes.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fused_lr.tools.bench import common

ROOT = Path(__file__).resolve().parents[3]  # the checkout: fused_lr/tools/bench/ is three folders down
BENCH = ("-m", "fused_lr.tools.bench", "gpu")  # the workloads (gpu.py), each run as `python -m ... gpu NAME`
TOTAL_BUDGET = 465  # seconds: the whole check ends inside 8 minutes, archive included
MIN_START = 10  # seconds: an item is not started with less than this left
MARKER = ".gpu-check"  # marks a folder this script wrote, so a re-run may empty it
ALWAYS = ("env", "build")  # run under --only too: every other item needs them on a bare machine

# The targets the check measures (issue 12).
EAGER_SPEEDUP = 1.25  # ResNet-50 fp32 clipped step, eager wall time, over torch's fused path
GRAPH_SPEEDUP = 1.3  # the same, both steps captured in CUDA graphs (GPU time per replay)
UPDATE_FRACTION = 0.85  # the update kernel's bandwidth over the copy probe's
LAUNCHES_PER_BUCKET = 3  # GPU operations per dtype bucket per step (norm partials, prepare, update)
TORCH = "torch fused"  # recipe.BASELINE: gpu.py's name for torch's SGD(fused=True) + clip_grad_norm_
FUSED_BACKENDS = ("cuda", "triton")

# Where a tool may live when it is not on PATH: the CUDA toolkit's folders and Nsight Compute's.
TOOL_DIRS = ["$CUDA_HOME/bin", "/usr/local/cuda/bin", "/usr/local/cuda/compute-sanitizer",
             "/opt/nvidia/nsight-compute/*"]
TOOLS = ("nvcc", "ncu", "compute-sanitizer", "nvidia-smi", "cmake", "make", "ninja")


@dataclass
class Check:
    name: str
    value: str
    target: str
    ok: bool


@dataclass
class Result:
    name: str
    status: str  # "pass" | "fail" | "skip"
    reason: str  # one line: the outcome, the first failure, or why it was skipped
    seconds: float = 0.0
    checks: list[Check] = field(default_factory=list)
    data: dict = field(default_factory=dict)


@dataclass
class Item:
    name: str
    budget: int  # seconds
    about: str
    run: Callable  # (ctx, item, timeout) -> Result
    needs_gpu: bool = True
    tool: str | None = None  # an external tool it needs
    parallel: bool = False  # correctness only: may run beside the other parallel items


@dataclass
class Ctx:
    out: Path
    python: str
    deadline: float  # time.monotonic() by which everything must end
    budget: float
    workers: int  # pytest-xdist workers per test item (0: none)
    tools: dict[str, str | None]
    env: dict = field(default_factory=dict)  # what the env item found
    results: dict[str, Result] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.deadline - time.monotonic()


# ------------------------------------------------------------------------------ processes and files

@dataclass
class Proc:
    rc: int | None  # None: killed at its time limit
    seconds: float
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""


def run_cmd(cmd: list, log: Path, timeout: float, env: dict | None = None, append: bool = False) -> Proc:
    """Run ``cmd`` in the repository root, stdout and stderr into ``log``; at ``timeout`` its
    whole process group (pytest's workers, a profiled program) is killed."""
    t0 = time.monotonic()
    with log.open("a" if append else "w") as f:
        f.write(f"$ {shlex.join(map(str, cmd))}\n")
        f.flush()
        try:
            proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        except OSError as e:
            f.write(f"[gpu-check] could not start: {e}\n")
            return Proc(127, time.monotonic() - t0, log)
        try:
            rc = proc.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
            f.write(f"\n[gpu-check] killed at its time limit of {timeout:.0f} s\n")
        except BaseException:  # Ctrl-C: take the group down with us
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    return Proc(rc, time.monotonic() - t0, log)


def child_env(**extra: str) -> dict:
    env = dict(os.environ)
    # Triton runs compiled on the GPU machine, never interpreted (the interpreter of the Triton
    # there fails with its numpy: see constraints-cpu.txt); no launch-blocking distortions either
    env.pop("TRITON_INTERPRET", None)
    env.pop("CUDA_LAUNCH_BLOCKING", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def last_error(text: str) -> str:
    """The line of a log most likely to say what went wrong, shortened to one line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.search(r"Error|error:|ERROR|FAILED|Traceback|killed at its time limit", ln):
            return ln[:200]
    return lines[-1][:200] if lines else "no output"


def find_tool(name: str) -> str | None:
    """``name`` on PATH, else in the CUDA toolkit's or Nsight Compute's usual folders."""
    found = shutil.which(name)
    if found:
        return found
    for pattern in TOOL_DIRS:
        for folder in sorted(glob.glob(os.path.expandvars(pattern)), reverse=True):  # newest version first
            exe = Path(folder) / name
            if exe.is_file() and os.access(exe, os.X_OK):
                return str(exe)
    return None


def tool_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    return next((ln for ln in lines if re.search(r"version|release", ln, re.IGNORECASE)),
                lines[-1] if lines else "unknown")


def failed(name: str, proc: Proc, what: str) -> Result:
    why = f"timed out after {proc.seconds:.0f} s" if proc.rc is None else f"exit {proc.rc}: {last_error(proc.text())}"
    return Result(name, "fail", f"{what}: {why}", proc.seconds)


def from_checks(name: str, proc: Proc, checks: list[Check], data: dict, passed: str) -> Result:
    bad = [c for c in checks if not c.ok]
    if bad:
        reason = f"{bad[0].name}: {bad[0].value} (target {bad[0].target})"
        if len(bad) > 1:
            reason += f"; {len(bad) - 1} more failed"
    elif proc.rc != 0:
        reason = "timed out" if proc.rc is None else f"exit {proc.rc}: {last_error(proc.text())}"
    else:
        return Result(name, "pass", passed, proc.seconds, checks, data)
    return Result(name, "fail", reason, proc.seconds, checks, data)


# ------------------------------------------------------------------------------ items

def workload(ctx: Ctx, name: str, stem: str, timeout: float, *args) -> tuple[Proc, Path, dict | None]:
    """Runs ``fused-lr bench gpu NAME ARGS --json STEM.json`` (gpu.py) in its own process, its output
    into STEM.log; returns the process, the JSON's path and what it holds (None: nothing readable)."""
    path = ctx.out / f"{stem}.json"
    proc = run_cmd([ctx.python, *BENCH, name, *args, "--json", path], ctx.out / f"{stem}.log", timeout, child_env())
    return proc, path, load_json(path)


def item_env(ctx: Ctx, item: Item, timeout: float) -> Result:
    proc, path, data = workload(ctx, "env", "env", timeout)
    data = data or dict(cuda=False, cuda_note=f"the env probe failed: {last_error(proc.text())}")
    data["tools"] = {name: None if p is None else dict(path=p, version=tool_version(p))
                     for name, p in ctx.tools.items()}
    if ctx.tools.get("nvidia-smi"):
        query = [ctx.tools["nvidia-smi"], "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem",
                 "--format=csv,noheader"]
        try:
            data["nvidia_smi"] = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            data["nvidia_smi"] = f"failed: {e}"
    path.write_text(json.dumps(data, indent=2) + "\n")
    ctx.env = data
    dev = data.get("device")
    value = describe_device(data) if dev else data.get("cuda_note", "no device")
    checks = [Check("CUDA device visible to torch", value, "a CUDA device", bool(dev))]
    return from_checks(item.name, proc, checks, data, value)


def describe_device(env: dict) -> str:
    dev = env.get("device") or {}
    cc = ".".join(map(str, dev.get("capability", [])))
    return f"{dev.get('name')} (cc {cc}, {dev.get('sms')} SMs, {dev.get('memory_gib')} GiB)"


def cuda_arch(env: dict) -> str:
    """CMake's architecture for the device found (90 for an H100), 90 when unknown."""
    cap = (env.get("device") or {}).get("capability")
    return f"{cap[0]}{cap[1]}" if cap else "90"


def item_build(ctx: Ctx, item: Item, timeout: float) -> Result:
    log = ctx.out / "build.log"
    env = child_env(FUSED_LR_CUDA="1", FUSED_LR_CUDA_ARCHS=cuda_arch(ctx.env))
    if not ctx.tools.get("make") and ctx.tools.get("ninja") and "CMAKE_GENERATOR" not in env:
        env["CMAKE_GENERATOR"] = "Ninja"  # CMake's default generator needs make
    pip = [ctx.python, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]
    t0, started = time.monotonic(), time.time()
    proc = run_cmd(pip, log, timeout, env)
    checks = [Check("pip install --no-build-isolation --no-deps --no-index -e . (FUSED_LR_CUDA=1)",
                    "timed out" if proc.rc is None else f"exit {proc.rc}", "exit 0", proc.rc == 0)]
    route = "pip editable install"
    if proc.rc not in (0, None) and timeout - proc.seconds > MIN_START:
        # the module still matters to every later item: build it in place the older way
        route = "setup.py build_ext --inplace (after pip failed)"
        proc = run_cmd([ctx.python, "setup.py", "build_ext", "--inplace"], log, timeout - proc.seconds, env,
                       append=True)
    proc.seconds = time.monotonic() - t0
    suffix = ctx.env.get("ext_suffix") or ".so"
    # only a module this build wrote counts: one left by an earlier run proves nothing
    built = [p for p in sorted((ROOT / "fused_lr").glob(f"_cuda*{suffix}")) if p.stat().st_mtime >= started - 1]
    checks.append(Check(f"extension module fused_lr/_cuda{suffix}, written by this build",
                        built[0].name if built else "missing", "present", bool(built)))
    m = re.search(r"fused_lr: built (\S+) in (\d+) s", proc.text())
    data = dict(route=route, seconds=round(proc.seconds, 1), cmake_seconds=int(m.group(2)) if m else None,
                arch=env["FUSED_LR_CUDA_ARCHS"], generator=env.get("CMAKE_GENERATOR", "CMake's default"),
                module=built[0].name if built else None)
    return from_checks(item.name, proc, checks, data, f"{data['module']} by {route} in {proc.seconds:.0f} s")


def item_backends(ctx: Ctx, item: Item, timeout: float) -> Result:
    proc, _, data = workload(ctx, "backends", "backends", timeout)
    if data is None:
        return failed(item.name, proc, "backends probe")
    found = data.get("backends", {})
    checks = [Check(f"backend {b} available", "yes" if found.get(b) is True else str(found.get(b, "not registered")),
                    "available", found.get(b) is True) for b in FUSED_BACKENDS]
    return from_checks(item.name, proc, checks, data, "cuda and triton available")


def item_copy(ctx: Ctx, item: Item, timeout: float) -> Result:
    proc, _, data = workload(ctx, "copy", "copy-probe", timeout)
    if data is None:
        return failed(item.name, proc, "copy probe")
    gbps = data.get("gbps", 0.0)
    checks = [Check(f"device-to-device copy of {data.get('mib')} MiB (read + written)", f"{gbps:.0f} GB/s", "> 0",
                    gbps > 0)]
    return from_checks(item.name, proc, checks, data, f"{gbps:.0f} GB/s")


def copy_gbps(ctx: Ctx) -> float | None:
    r = ctx.results.get("copy-probe")
    return r.data.get("gbps") if r is not None and r.status == "pass" else None


def ratio_check(name: str, base: float | None, new: float | None, target: float, why_missing: str) -> Check:
    if not base or not new:
        return Check(name, f"not measured ({why_missing})", f">= {target:.2f}x", False)
    return Check(name, f"{base / new:.2f}x", f">= {target:.2f}x", base / new >= target)


def step_checks(data: dict, speed_targets: bool) -> list[Check]:
    """Pass/fail lines for one ``gpu.py step`` result. The speed targets (issue 12) are
    for fp32; syncs, launches and graph equality hold for every dtype."""
    contenders, errors = data.get("contenders", {}), data.get("errors", {})
    base = contenders.get(TORCH, {})
    copy, buckets = data.get("copy_gbps"), data.get("buckets", 1)
    checks = []
    for b in FUSED_BACKENDS:
        name = f"fused_lr {b}"
        r = contenders.get(name)
        if r is None:
            checks.append(Check(f"{b}: step runs", errors.get(name, "did not run"), "runs", False))
            continue
        if speed_targets:
            torch_why = errors.get(TORCH, base.get("graph_error", "torch's step did not run"))
            checks.append(ratio_check(f"{b}: eager wall time per step, speed-up over torch fused", base.get("wall_ms"),
                                      r.get("wall_ms"), EAGER_SPEEDUP, torch_why))
            checks.append(ratio_check(f"{b}: CUDA-graph GPU time per step, speed-up over torch fused (graphed)",
                                      base.get("gpu_ms"), r.get("gpu_ms"), GRAPH_SPEEDUP,
                                      r.get("graph_error") or torch_why))
            upd = r.get("update_gbps")
            frac = upd / copy if upd and copy else None
            checks.append(Check(f"{b}: update kernel bandwidth / copy probe (profiler kernel time, minimum bytes)",
                                f"{frac:.0%} ({upd:.0f} of {copy:.0f} GB/s)" if frac else "not measured",
                                f">= {UPDATE_FRACTION:.0%}", bool(frac) and frac >= UPDATE_FRACTION))
        prof = r.get("profile", {})
        if "profile_error" in r:
            checks.append(Check(f"{b}: host syncs per step (profiler API trace)",
                                f"not measured: {r['profile_error']}", "0", False))
        elif not prof.get("api_calls_per_step"):
            checks.append(Check(f"{b}: host syncs per step (profiler API trace)",
                                "no CUDA API calls recorded in the step ranges, so none could be counted", "0", False))
        else:
            syncs = prof.get("syncs_per_step", 0) + prof.get("sync_records_per_step", 0)
            named = ", ".join(f"{k} {v}" for k, v in prof.get("sync_calls", {}).items())
            checks.append(Check(f"{b}: host syncs per step (profiler API trace)",
                                f"{syncs:g}" + (f" ({named})" if named else ""), "0", syncs == 0))
        block = r.get("blocking")
        if "blocking_error" in r:
            checks.append(Check(f"{b}: step returns while a kernel is queued (no wait)",
                                f"not measured: {r['blocking_error']}", "no wait", False))
        elif block:
            checks.append(Check(f"{b}: step returns while a {block['sleep_ms']:.0f} ms kernel is queued (no wait)",
                                f"returned in {block['host_ms']:.2f} ms", f"< {block['sleep_ms'] / 2:.0f} ms",
                                not block["blocked"]))
        ops = prof.get("gpu_ops_per_step")
        checks.append(Check(f"{b}: GPU operations per step ({buckets} dtype bucket{'s' * (buckets > 1)})",
                            "not measured" if ops is None else f"{ops:g}", f"<= {LAUNCHES_PER_BUCKET * buckets}",
                            ops is not None and 0 < ops <= LAUNCHES_PER_BUCKET * buckets))
        eq = data.get("graph_equal", {}).get(b, {})
        steps = eq.get("steps", "?")
        if "error" in eq or not eq:
            value = eq.get("error", "not run")
        elif eq.get("equal"):
            value = "equal" if eq.get("params_moved") else "equal, but the parameters never moved"
        else:
            value = f"differ: params {eq.get('mismatched_params')}, state {eq.get('mismatched_state')}"
        checks.append(Check(f"{b}: {steps} CUDA-graph replays == {steps} eager steps, bit for bit", value, "equal",
                            value == "equal"))
    return checks


def item_step(dtype: str) -> Callable:
    def run(ctx: Ctx, item: Item, timeout: float) -> Result:
        proc, _, data = workload(ctx, "step", item.name, timeout, "--dtype", dtype, "--trace-dir", ctx.out / "traces",
                                 "--copy-json", ctx.out / "copy-probe.json")
        if data is None:
            return failed(item.name, proc, f"ResNet-50 {dtype} step")
        checks = step_checks(data, speed_targets=dtype == "float32")
        return from_checks(item.name, proc, checks, data, f"{sum(c.ok for c in checks)} of {len(checks)} checks pass")
    return run


UNIT_SCALE = {"byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "Tbyte": 1e12,
              "nsecond": 1e-9, "usecond": 1e-6, "msecond": 1e-3, "second": 1.0}


def parse_ncu_csv(text: str) -> dict[str, float]:
    """``metric -> value`` in bytes or seconds from ncu's ``--csv`` output (the details page: one
    row per metric after a header with "Metric Name"); ncu's own and the program's other lines
    are ignored. Raises ValueError on a unit it does not know."""
    rows = [ln for ln in text.splitlines() if ln.startswith('"')]
    header = next((i for i, ln in enumerate(rows) if '"Metric Name"' in ln), None)
    if header is None:
        return {}
    out = {}
    for row in csv.DictReader(rows[header:]):
        name, unit, value = row.get("Metric Name"), row.get("Metric Unit", ""), row.get("Metric Value", "")
        if not name or name in out:  # one kernel is profiled; keep its first row per metric
            continue
        if unit not in UNIT_SCALE:
            raise ValueError(f"ncu reported {name} in {unit!r}, a unit this parser does not know")
        try:
            out[name] = float(value.replace(",", "")) * UNIT_SCALE[unit]
        except ValueError:
            continue  # "n/a"
    return out


def item_ncu(ctx: Ctx, item: Item, timeout: float) -> Result:
    log, t0 = ctx.out / "ncu.log", time.monotonic()
    log.unlink(missing_ok=True)
    copy = copy_gbps(ctx)
    data, checks, ncu_errors = {"copy_gbps": copy}, [], []
    for i, b in enumerate(FUSED_BACKENDS):
        share = (timeout - (time.monotonic() - t0)) / (len(FUSED_BACKENDS) - i)
        info = ctx.out / f"ncu-{b}.json"
        cmd = [ctx.tools["ncu"], "--profile-from-start", "off", "--kernel-name", "regex:update", "--launch-count", "1",
               "--clock-control", "none", "--metrics", "dram__bytes.sum,gpu__time_duration.sum", "--csv",
               "--print-units", "base", ctx.python, *BENCH, "kernel", "--backend", b, "--dtype", "float32",
               "--json", info]
        start = log.stat().st_size if log.exists() else 0
        proc = run_cmd(cmd, log, share, child_env(LC_ALL="C"), append=True)
        text = proc.text()[start:]
        try:
            metrics = parse_ncu_csv(text)
        except ValueError as e:
            metrics, text = {}, f"{text}\n==ERROR== {e}"
        nbytes, secs = metrics.get("dram__bytes.sum"), metrics.get("gpu__time_duration.sum")
        name = f"{b}: update kernel DRAM bandwidth (ncu) / copy probe"
        if not nbytes or not secs:
            err = next((ln for ln in text.splitlines()
                        if ln.startswith("==ERROR==") or "No kernels were profiled" in ln), None)
            why = err or ("timed out" if proc.rc is None else last_error(text))
            ncu_errors.append(why)
            checks.append(Check(name, f"not measured: {why[:160]}", f">= {UPDATE_FRACTION:.0%}", False))
            continue
        gbps = nbytes / secs / 1e9
        expected = (load_json(info) or {}).get("update_bytes")
        data[b] = dict(dram_bytes=nbytes, seconds=secs, gbps=gbps, expected_bytes=expected,
                       traffic_ratio=nbytes / expected if expected else None)
        frac = gbps / copy if copy else None
        checks.append(Check(name, f"{frac:.0%} ({gbps:.0f} of {copy:.0f} GB/s)" if frac else
                            f"{gbps:.0f} GB/s, no copy probe to compare", f">= {UPDATE_FRACTION:.0%}",
                            bool(frac) and frac >= UPDATE_FRACTION))
    seconds = time.monotonic() - t0
    if len(ncu_errors) == len(FUSED_BACKENDS) and all(e.startswith("==ERROR==") for e in ncu_errors):
        # ncu itself could not profile here (e.g. no access to the counters): not a finding about the code
        return Result(item.name, "skip", f"ncu could not profile on this machine: {ncu_errors[0][:160]}", seconds,
                      checks, data)
    proc = Proc(0, seconds, log)
    return from_checks(item.name, proc, checks, data, "; ".join(c.value for c in checks))


def item_memcheck(ctx: Ctx, item: Item, timeout: float) -> Result:
    log, path = ctx.out / "memcheck.log", ctx.out / "memcheck.json"
    cmd = [ctx.tools["compute-sanitizer"], "--tool", "memcheck", "--error-exitcode", "99", "--print-limit", "20",
           ctx.python, *BENCH, "sanitize", "--json", path]
    # without torch's caching allocator every tensor is its own allocation, so an access past
    # a tensor's end is outside any allocation and memcheck sees it
    proc = run_cmd(cmd, log, timeout, child_env(PYTORCH_NO_CUDA_MEMORY_CACHING="1"))
    text = proc.text()
    if "Device not supported" in text or "Target application not supported" in text:
        line = next(ln for ln in text.splitlines() if "not supported" in ln)
        return Result(item.name, "skip", f"compute-sanitizer cannot run on this machine: {line.strip()[:160]}",
                      proc.seconds)
    m = re.search(r"ERROR SUMMARY: (\d+) error", text)
    errors = int(m.group(1)) if m else None
    data = dict(errors=errors, driver=load_json(path))
    checks = [Check("memcheck errors (both backends, 4 dtypes, clipping, GradScaler)",
                    "no ERROR SUMMARY line" if errors is None else str(errors), "0", errors == 0),
              Check("driver finished", "yes" if data["driver"] else "no", "yes", bool(data["driver"]))]
    return from_checks(item.name, proc, checks, data, "0 errors")


def parse_junit(path: Path) -> dict:
    """Counts and names from pytest's JUnit XML."""
    out = dict(passed=[], failed=[], skipped={}, total=0)
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return out
    for case in root.iter("testcase"):
        out["total"] += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            out["failed"].append(name)
        elif (skip := case.find("skipped")) is not None:
            reason = (skip.get("message") or "").strip()[:160]
            out["skipped"][reason] = out["skipped"].get(reason, 0) + 1
        else:
            out["passed"].append(name)
    return out


def junit_checks(junit: dict, expect: tuple[str, ...]) -> list[Check]:
    """No failures, and tests of each backend (named by ``expect``) among those that passed."""
    failed = junit["failed"]
    checks = [Check(f"{junit['total']} tests: none failed", f"{len(failed)} failed" + (
        f" ({', '.join(n.split('::')[-1] for n in failed[:3])}{', ...' if len(failed) > 3 else ''})" if failed else ""),
        "0 failed", not failed)]
    for key in expect:
        n = sum(key in name for name in junit["passed"])
        checks.append(Check(f"tests with {key} passed", str(n), ">= 1", n > 0))
    return checks


def item_pytest(files: tuple[str, ...], select: str | None, expect: tuple[str, ...], workers: int) -> Callable:
    def run(ctx: Ctx, item: Item, timeout: float) -> Result:
        xml = ctx.out / f"{item.name}.xml"
        cmd = [ctx.python, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", *files, "--junitxml", xml]
        if select:
            cmd += ["-k", select]
        n = min(workers, ctx.workers)
        if n > 1 and (ctx.env.get("packages") or {}).get("pytest-xdist"):
            cmd += ["-n", str(n)]
        proc = run_cmd(cmd, ctx.out / f"{item.name}.log", timeout, child_env())
        junit = parse_junit(xml)
        checks = junit_checks(junit, expect)
        data = dict(total=junit["total"], passed=len(junit["passed"]), failed=junit["failed"], skipped=junit["skipped"])
        return from_checks(item.name, proc, checks, data, f"{data['passed']} passed, "
                                                          f"{sum(junit['skipped'].values())} skipped")
    return run


GPU_CASES = "cuda-cuda or triton-cuda"  # backend_cases() ids: backend-device


def items() -> list[Item]:
    """Every item, in running order: the timed ones alone on the GPU, then the correctness
    ones side by side."""
    both = ("cuda-cuda", "triton-cuda")
    return [
        Item("env", 30, "python, package and tool versions, the device", item_env, needs_gpu=False),
        Item("build", 240, "the CUDA extension, built offline: pip install --no-build-isolation --no-deps -e .",
             item_build),
        Item("backends", 60, "fused_lr.available_backends(): cuda and triton both available", item_backends),
        Item("copy-probe", 60, "device-to-device copy bandwidth, the yardstick for the kernels", item_copy),
        Item("step-fp32", 150, "ResNet-50 step, fp32: torch fused vs FusedSGD cuda/triton: times, launches, syncs",
             item_step("float32")),
        Item("step-bf16", 150, "ResNet-50 step, bf16: the same", item_step("bfloat16")),
        Item("ncu", 150, "update kernel's DRAM bytes and time from ncu, against the copy probe", item_ncu, tool="ncu"),
        Item("tests-graph", 120, "tests/test_gpu_step.py: graph replay == eager, no host sync",
             item_pytest(("tests/test_gpu_step.py",), None, ("[cuda]", "[triton]"), 1), parallel=True),
        Item("tests-parity", 240, "tests/test_parity.py on cuda and triton: the parity matrix against torch",
             item_pytest(("tests/test_parity.py",), GPU_CASES, both, 4), parallel=True),
        Item("tests-amp", 180, "tests/test_amp.py on cuda and triton: GradScaler, autocast",
             item_pytest(("tests/test_amp.py",), GPU_CASES, both, 3), parallel=True),
        Item("tests-many-tensors", 180, "tests/test_many_tensors.py on cuda and triton",
             item_pytest(("tests/test_many_tensors.py",), GPU_CASES, both, 3), parallel=True),
        Item("tests-errors", 150, "tests/test_errors.py on cuda and triton: failed steps change nothing",
             item_pytest(("tests/test_errors.py",), f"{GPU_CASES} or moved_to_another_device", both, 3),
             parallel=True),
        Item("memcheck", 240, "compute-sanitizer memcheck over small steps of both backends", item_memcheck,
             tool="compute-sanitizer", parallel=True),
    ]


# ------------------------------------------------------------------------------ running

def skip_reason(item: Item, ctx: Ctx) -> str | None:
    if item.needs_gpu and not ctx.env.get("device"):
        return f"no CUDA device here ({ctx.env.get('cuda_note', 'the env item found none')})"
    if item.tool and not ctx.tools.get(item.tool):
        return f"{item.tool} not found (searched PATH, {', '.join(TOOL_DIRS)})"
    if ctx.left() < MIN_START:
        return f"not started: the total budget of {ctx.budget:.0f} s was spent"
    return None


def run_one(ctx: Ctx, item: Item) -> Result:
    reason = skip_reason(item, ctx)
    if reason:
        return Result(item.name, "skip", reason)
    t0 = time.monotonic()
    try:
        result = item.run(ctx, item, min(item.budget, ctx.left()))
    except Exception as e:  # a bug in one item must not cost the others
        result = Result(item.name, "fail", f"gpu_check error: {type(e).__name__}: {e}")
    result.seconds = result.seconds or time.monotonic() - t0
    return result


def run_items(ctx: Ctx, chosen: list[Item], report: Callable[[Result], None]) -> None:
    """Run ``chosen`` in order, consecutive parallel items together; results into ctx.results."""
    i = 0
    while i < len(chosen):
        batch = [chosen[i]]
        while chosen[i].parallel and i + len(batch) < len(chosen) and chosen[i + len(batch)].parallel:
            batch.append(chosen[i + len(batch)])
        i += len(batch)
        if len(batch) == 1:
            results = [run_one(ctx, batch[0])]
        else:
            with ThreadPoolExecutor(len(batch)) as pool:
                results = list(pool.map(lambda it: run_one(ctx, it), batch))
        for r in results:
            ctx.results[r.name] = r
            report(r)


# ------------------------------------------------------------------------------ summary

def counts(results: list[Result]) -> dict[str, int]:
    return {s: sum(r.status == s for r in results) for s in ("pass", "fail", "skip")}


def md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def step_table(r: Result) -> list[str]:
    d = r.data
    copy = d.get("copy_gbps")
    lines = [f"### {r.name}: ResNet-50 step, {d.get('dtype')}, {d.get('numel', 0) / 1e6:.1f} M parameters in "
             f"{d.get('tensors')} tensors; copy probe {copy or 0:.0f} GB/s", "",
             "| step | host ms | wall ms | GPU ms (graph) | GB/s (min. bytes) | of copy | update kernel GB/s "
             "| GPU ops/step | API syncs/step |",
             "|---|---|---|---|---|---|---|---|---|"]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for name, c in d.get("contenders", {}).items():
        prof = c.get("profile", {})
        gbps = c.get("gbps")
        lines.append(f"| {name} | {f(c.get('host_ms'), '.3f')} | {f(c.get('wall_ms'), '.3f')} | "
                     f"{f(c.get('gpu_ms'), '.3f')} | {f(gbps, '.0f')} | "
                     f"{f(gbps / copy if gbps and copy else None, '.0%')} | {f(c.get('update_gbps'), '.0f')} | "
                     f"{f(prof.get('gpu_ops_per_step'), 'g')} | {f(prof.get('syncs_per_step'), 'g')} |")
    for name, err in d.get("errors", {}).items():
        lines.append(f"| {name} | {md_cell(err)} | | | | | | | |")
    return lines + [""]


def summary_md(ctx: Ctx, results: list[Result], seconds: float) -> str:
    n = counts(results)
    env = ctx.env
    pk = env.get("packages") or {}
    head = "FAIL" if n["fail"] else "PASS"
    lines = [f"# gpu-check: {head}: {n['pass']} pass, {n['fail']} fail, {n['skip']} skip, in {seconds:.0f} s "
             f"(budget {ctx.budget:.0f} s)", ""]
    if env.get("device"):
        smi = env.get("nvidia_smi")
        lines.append(f"Device: {describe_device(env)}" + (f"; nvidia-smi: {smi}" if smi else ""))
    lines.append(f"Python {env.get('python')}, torch {pk.get('torch')} (CUDA {env.get('torch_cuda')}), "
                 f"triton {pk.get('triton')}, numpy {pk.get('numpy')}, numba {pk.get('numba')}; "
                 f"folder {ctx.out}")
    lines += ["", "| item | status | s | result |", "|---|---|---|---|"]
    lines += [f"| {r.name} | {r.status} | {r.seconds:.0f} | {md_cell(r.reason)} |" for r in results]
    checks = [(r.name, c) for r in results for c in r.checks]
    if checks:
        lines += ["", "## Checks", "", "| item | check | value | target | |", "|---|---|---|---|---|"]
        lines += [f"| {item} | {md_cell(c.name)} | {md_cell(c.value)} | {c.target} | {'pass' if c.ok else 'FAIL'} |"
                  for item, c in checks]
    steps = [r for r in results if r.name.startswith("step-") and r.data.get("contenders")]
    if steps:
        lines += ["", "## ResNet-50 optimizer step", "",
                  "host: one step() call issued to an idle device; wall: 20 eager steps then a sync; GPU: CUDA events "
                  "over 50 replays of the captured step; GB/s: the clipped step's minimum traffic (6 passes) over the "
                  "GPU time; update kernel: its profiler time against its 5 passes.", ""]
        for r in steps:
            lines += step_table(r)
    return "\n".join(lines) + "\n"


def recap(results: list[Result]) -> str:
    """The verdict in a few lines: the counts, then every failed check or failed item."""
    n = counts(results)
    lines = [f"gpu-check {'FAIL' if n['fail'] else 'PASS'}: {n['pass']} pass, {n['fail']} fail, {n['skip']} skip"]
    for r in results:
        bad = [c for c in r.checks if not c.ok]
        lines += [f"  FAIL {r.name}: {c.name}: {c.value} (target {c.target})" for c in bad]
        if r.status == "fail" and not bad:
            lines.append(f"  FAIL {r.name}: {r.reason}")
    return "\n".join(lines)


def write_summary(ctx: Ctx, results: list[Result], argv: list[str]) -> str:
    seconds = time.monotonic() - ctx.started
    text = summary_md(ctx, results, seconds)
    (ctx.out / "summary.md").write_text(text)
    n = counts(results)
    report = dict(status="fail" if n["fail"] else "pass", counts=n, seconds=round(seconds, 1), budget=ctx.budget,
                  argv=argv, out=str(ctx.out), env=ctx.env,
                  targets=dict(eager_speedup=EAGER_SPEEDUP, graph_speedup=GRAPH_SPEEDUP,
                               update_fraction=UPDATE_FRACTION, syncs_per_step=0,
                               launches_per_bucket=LAUNCHES_PER_BUCKET),
                  items=[asdict(r) for r in results])
    (ctx.out / "summary.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return text


def write_archive(out: Path, archive: Path) -> None:
    archive.parent.mkdir(parents=True, exist_ok=True)
    skip = archive.resolve()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(out, arcname=out.name, filter=lambda info: None if (out.parent / info.name).resolve() == skip else info)


# ------------------------------------------------------------------------------ command line

def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = common.parser("fused-lr bench gpu-check", __doc__.split("\n\n")[0],
                           "Exit status: 0 when no item failed (skips allowed), 1 otherwise.")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("GPU_CHECK_OUT") or "out/gpu-check"),
                        help="the folder for everything (default $GPU_CHECK_OUT or out/gpu-check); emptied first "
                             "when an earlier gpu-check wrote it")
    pick = parser.add_mutually_exclusive_group()
    pick.add_argument("--only", nargs="+", metavar="ITEM",
                      help="run only these items, and env and build, which the others need on a bare machine")
    pick.add_argument("--skip", nargs="+", metavar="ITEM", help="run all but these items")
    parser.add_argument("--budget", type=float, default=TOTAL_BUDGET,
                        help=f"seconds for the whole check (default {TOTAL_BUDGET}); items left over are skipped")
    parser.add_argument("--workers", type=int, default=4, help="pytest-xdist workers per test item at most (default "
                                                               "4; 0 or 1: none)")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter the items run with (default: this one)")
    parser.add_argument("--archive", type=Path, default=os.environ.get("GPU_CHECK_ARCHIVE") or None,
                        help="also write the folder as this .tar.gz (default $GPU_CHECK_ARCHIVE)")
    parser.add_argument("--list", action="store_true", help="list the items and their time budgets, then exit")
    args = parser.parse_args(argv)
    names = [it.name for it in items()]
    for given in (args.only or []) + (args.skip or []):
        if given not in names:
            parser.error(f"unknown item {given!r}; choose from {', '.join(names)}")
    if args.skip and "env" in args.skip:
        parser.error("the env item cannot be skipped: every other item's skip decision reads it")
    if not args.budget > 0:
        parser.error(f"--budget must be > 0 seconds, got {args.budget:g}")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    return parser, args


def prepare_out(parser: argparse.ArgumentParser, out: Path) -> Path:
    """An empty folder for this run. A folder that an earlier run wrote is emptied; any other
    non-empty folder is refused rather than deleted."""
    out = out.resolve()
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            parser.error(f"--out {out} is not empty and no earlier gpu-check wrote it; choose an empty or new folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by fused-lr bench gpu-check (make gpu-check); a re-run empties this folder\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    every = items()
    if args.list:
        for it in every:
            extra = f" [needs {it.tool}]" if it.tool else ""
            print(f"{it.name:<20} {it.budget:>4} s  {it.about}{extra}")
        print(f"total budget {TOTAL_BUDGET} s; items marked parallel run side by side: "
              f"{', '.join(it.name for it in every if it.parallel)}")
        return 0
    out = prepare_out(parser, args.out)
    ctx = Ctx(out=out, python=args.python, deadline=time.monotonic() + args.budget, budget=args.budget,
              workers=args.workers, tools={t: find_tool(t) for t in TOOLS})
    chosen = [it for it in every if it.name == "env" or (
        (args.only is None or it.name in (*args.only, *ALWAYS)) and (args.skip is None or it.name not in args.skip))]
    print(f"gpu-check: {len(chosen)} items into {out} (budget {args.budget:.0f} s)", flush=True)

    def report(r: Result) -> None:
        print(f"[{time.monotonic() - ctx.started:4.0f} s] {r.name:<20} {r.status:<4} {r.seconds:4.0f} s  {r.reason}",
              flush=True)

    run_items(ctx, chosen, report)
    results = [ctx.results.get(it.name) or Result(it.name, "skip", "not selected (--only/--skip)") for it in every]
    text = write_summary(ctx, results, sys.argv[1:] if argv is None else argv)
    if args.archive:
        write_archive(out, args.archive)
    print("\n" + text)
    print(recap(results))  # last, so that the end of a long output still holds the verdict
    if args.archive:
        print(f"archive: {args.archive}")
    return 1 if counts(results)["fail"] else 0

