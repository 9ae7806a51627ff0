"""The GPU workloads of ``make gpu-check`` (``fused-lr bench gpu WORKLOAD``): gpu_check.py runs
each in its own process and turns the JSON it writes into pass/fail lines.

  env       python, package versions and the device
  backends  fused_lr.available_backends()
  copy      the copy-bandwidth probe: a device-to-device copy, bytes read + written per second
  step      the ResNet-50 optimizer step of recipe.py, torch ``SGD(fused=True)`` +
            ``clip_grad_norm_(foreach=True)`` + ``CosineAnnealingLR`` against
            ``FusedSGD(backend="cuda"|"triton")``: host time, synchronised wall time, GPU time over
            CUDA-graph replays, launches and syncs from a profiler trace, a blocking check, and 100
            graph replays against 100 eager steps
  kernel    a driver for ncu: warm-up steps, then one step between cudaProfilerStart and Stop
  sanitize  a driver for compute-sanitizer: small mixed-dtype steps on both backends

fused_lr is driven only through its public API (FusedSGD, schedules, param_groups,
available_backends), so the backends' internals can change under it.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import shutil
import statistics
import sys
import sysconfig
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from fused_lr.tools.bench import common
from fused_lr.tools.bench.recipe import (
    BASELINE,
    LR,
    MAX_GRAD_NORM,
    MOMENTUM,
    WEIGHT_DECAY,
    Step,
    fused_step,
    model_with_grads,
    parameter_groups,
    torch_step,
)

TORCH = BASELINE
FUSED_BACKENDS = ("cuda", "triton")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
STEP_PASSES = 6  # a clipped step at the minimum: g read for the norm; p, g, b read; p, b written
UPDATE_PASSES = 5  # the update kernel's share: p, g, b read; p, b written
WARMUP = 3  # steps before timing or capture: state, tables and Triton's compilation settle
STEP_MARK = "gpu_check_step"  # the record_function range around each profiled step
SLEEP_MS = 50.0  # the kernel queued ahead of the blocking check

# CUDA API calls that make the host wait for the device. cudaFree waits for the whole device;
# a memcpy without Async returns only when the copy is done.
SYNC_CALLS = frozenset({"cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaFree",
                        "cudaFreeHost", "cuCtxSynchronize", "cuStreamSynchronize", "cuEventSynchronize", "cuMemFree",
                        "cuMemFreeHost"})
GPU_OP_CATEGORIES = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})
API_CATEGORIES = frozenset({"cuda_runtime", "cuda_driver"})
SYNC_CATEGORY = "cuda_sync"  # CUPTI's synchronisation records, where the profiler collects them


def api_base(name: str) -> str:
    """The call's name without the driver's version suffix (cuMemFree_v2 -> cuMemFree)."""
    return re.sub(r"_v\d+$", "", name)


def is_sync(name: str) -> bool:
    base = api_base(name)
    return base in SYNC_CALLS or (base.startswith(("cudaMemcpy", "cuMemcpy")) and "Async" not in base)


def is_launch(name: str) -> bool:
    """A call that puts work on a stream: a kernel, a graph, an asynchronous copy or fill."""
    base = api_base(name)
    return base.startswith(("cudaLaunch", "cuLaunch", "cudaGraphLaunch", "cuGraphLaunch")) or (
        "Async" in base and base.startswith(("cudaMemcpy", "cudaMemset", "cuMemcpy", "cuMemset")))


def count_trace(trace: dict, steps: int, mark: str = STEP_MARK, kernel_pattern: str = "update") -> dict:
    """Per-step counts from a torch.profiler chrome trace of ``steps`` steps, each inside a
    ``record_function(mark)`` range, with nothing else on the GPU while it was recorded.

    GPU operations (kernels, copies, fills) are counted over the whole trace, so they do not
    depend on which API layer launched them (torch uses the runtime API, Triton the driver
    API). Syncs and launch calls are the CUDA API calls made inside the step ranges.
    ``pattern_us``: GPU time per step of the kernels whose name matches ``kernel_pattern``.
    """
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    windows = [(e["ts"], e["ts"] + e.get("dur", 0)) for e in events
               if e.get("name") == mark and not str(e.get("cat", "")).startswith("gpu")]

    def inside(e) -> bool:
        return any(t0 <= e["ts"] <= t1 for t0, t1 in windows)

    api = [e for e in events if e.get("cat") in API_CATEGORIES and inside(e)]
    sync_records = [e for e in events if e.get("cat") == SYNC_CATEGORY and inside(e)]
    ops = [e for e in events if e.get("cat") in GPU_OP_CATEGORIES]
    kernels = [e for e in ops if e["cat"] == "kernel"]
    pattern = re.compile(kernel_pattern, re.IGNORECASE)
    syncs = Counter(api_base(e["name"]) for e in api if is_sync(e["name"]))
    names = Counter(e["name"][:120] for e in kernels)
    n = max(steps, 1)
    return dict(
        steps=steps, windows=len(windows),
        gpu_ops_per_step=len(ops) / n, kernels_per_step=len(kernels) / n,
        launch_calls_per_step=sum(is_launch(e["name"]) for e in api) / n,
        api_calls_per_step=len(api) / n,
        syncs_per_step=sum(syncs.values()) / n, sync_calls=dict(syncs),
        sync_records_per_step=len(sync_records) / n,
        kernel_names={k: v / n for k, v in names.most_common()},
        pattern_us=sum(e.get("dur", 0) for e in kernels if pattern.search(e["name"])) / n,
    )


# ---------------------------------------------------------------------------------- env, backends

def package_versions() -> dict[str, str | None]:
    from importlib import metadata

    out = {}
    for name in ("torch", "triton", "numpy", "numba", "pybind11", "pytest", "pytest-xdist", "hypothesis",
                 "pytest-benchmark", "cmake", "setuptools", "pip"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def env_info() -> dict:
    info = dict(python=sys.version.split()[0], executable=sys.executable, cpu_count=os.cpu_count(),
                ext_suffix=sysconfig.get_config_var("EXT_SUFFIX"), packages=package_versions(),
                torch_cuda=torch.version.cuda, triton_interpret=os.environ.get("TRITON_INTERPRET"),
                cuda=torch.cuda.is_available())
    if info["cuda"]:
        p = torch.cuda.get_device_properties(0)
        info["device"] = dict(name=p.name, capability=[p.major, p.minor], sms=p.multi_processor_count,
                              memory_gib=round(p.total_memory / 2**30, 1),
                              l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1), count=torch.cuda.device_count())
    else:
        info["cuda_note"] = ("torch is a CPU build" if torch.version.cuda is None
                             else "torch.cuda.is_available() is False")
    return info


def backends_info() -> dict:
    import fused_lr

    return dict(fused_lr=fused_lr.__file__, backends=fused_lr.available_backends())


# ---------------------------------------------------------------------------------- copy probe

def time_events(fn: Callable[[], None], repeat: int) -> list[float]:
    """Milliseconds per call of ``fn``, each timed with CUDA events."""
    out = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end))
    return out


def copy_probe(mib: int, repeat: int = 20) -> dict:
    """A device-to-device copy of ``mib`` MiB, far larger than any L2, counting bytes read and
    written: the bandwidth a streaming kernel can hope for on this device."""
    n = mib * 2**20 // 4
    src = torch.rand(n, device="cuda")  # random, not zeros: zeros can time faster than real data
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    ms = time_events(lambda: dst.copy_(src), repeat)
    if not torch.equal(dst, src):
        raise RuntimeError("copy probe: the copy is not equal to its source")
    med = statistics.median(ms)
    return dict(mib=mib, bytes=2 * n * 4, ms=med, ms_min=min(ms), gbps=2 * n * 4 / med / 1e6,
                gbps_max=2 * n * 4 / min(ms) / 1e6)


# ---------------------------------------------------------------------------------- the step

def resnet50_size() -> tuple[int, int]:
    """(elements, tensors) of ResNet-50's parameters, from a model on the meta device (no memory)."""
    from fused_lr.tools.models import resnet50

    with torch.device("meta"):
        params = list(resnet50().parameters())
    return sum(p.numel() for p in params), len(params)


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def torch_contender(dtype: torch.dtype) -> Step:
    """recipe.py's torch step, fused implementation, on ResNet-50's parameters on the GPU."""
    return torch_step(parameter_groups("resnet50", device="cuda", dtype=dtype), "fused")


def fused_contender(backend: str, dtype: torch.dtype) -> Step:
    """recipe.py's FusedSGD step on ResNet-50's parameters on the GPU (same seed, same numbers)."""
    return fused_step(parameter_groups("resnet50", device="cuda", dtype=dtype), backend)


def capture(fn: Callable[[], None], warmup: int = WARMUP, warm: Callable[[], None] | None = None
            ) -> torch.cuda.CUDAGraph:
    """``fn`` captured in a CUDA graph, after ``warmup`` calls of ``warm`` (default ``fn``) on a side
    stream (torch's recipe)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            (warm or fn)()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def host_ms(c: Step, steps: int) -> float:
    """Median host time of one step() call, issued to an idle device."""
    out = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        c.step()
        out.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(out) * 1e3


def wall_ms(contenders: list[Step], rounds: int, steps: int) -> dict[str, float]:
    """Synchronised wall time per step: ``steps`` eager steps then a sync, median over rounds;
    the contenders take turns, so a change in machine state hits them alike."""
    times = {c.name: [] for c in contenders}
    for _ in range(rounds):
        for c in contenders:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                c.step()
            torch.cuda.synchronize()
            times[c.name].append((time.perf_counter() - t0) / steps)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def graph_ms(graphs: dict[str, torch.cuda.CUDAGraph], rounds: int, replays: int) -> dict[str, float]:
    """GPU time per step: CUDA events around ``replays`` replays of the captured step, median over rounds."""
    times = {name: [] for name in graphs}
    for _ in range(rounds):
        for name, g in graphs.items():
            def replay(g=g):
                for _ in range(replays):
                    g.replay()
            times[name] += [ms / replays for ms in time_events(replay, 1)]
    return {name: statistics.median(ts) for name, ts in times.items()}


def profile_counts(c: Step, steps: int, path: Path) -> dict:
    """Launches and syncs per step from a torch.profiler trace (CPU + CUDA activities), which
    also sees calls made through the extension's own statically linked CUDA runtime. The trace
    is kept, gzipped, at ``path``."""
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            with record_function(STEP_MARK):
                c.step()
        torch.cuda.synchronize()  # outside the step ranges: every kernel lands in the trace
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path.with_suffix("")
    prof.export_chrome_trace(str(raw))
    trace = json.loads(raw.read_text())
    with raw.open("rb") as src, gzip.open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    return count_trace(trace, steps)


def sleep_cycles(ms: float) -> int | None:
    """Cycles of torch.cuda._sleep that keep the device busy for about ``ms``; None where torch has no _sleep."""
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is None:
        return None
    cycles = 10_000_000
    took = time_events(lambda: sleep(cycles), 2)[-1]
    return max(1, int(cycles * ms / took))


def blocking(c: Step, cycles: int | None) -> dict | None:
    """Does step() wait for the device? A kernel of SLEEP_MS is queued first: a step that syncs
    returns only after it, one that does not returns at once. Independent of any API trace."""
    if cycles is None:
        return None
    torch.cuda.synchronize()
    torch.cuda._sleep(cycles)
    t0 = time.perf_counter()
    c.step()
    took = (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize()
    return dict(host_ms=took, sleep_ms=SLEEP_MS, blocked=took > SLEEP_MS / 2)


def state_tensors(sd: dict) -> dict[str, torch.Tensor]:
    """Every tensor of an optimizer's state_dict by a readable key: per-parameter state (step
    counts, buffers) and per-group values (the schedule's clock)."""
    out = {f"state {i} {k}": v for i, st in sd["state"].items() for k, v in st.items() if isinstance(v, torch.Tensor)}
    out.update({f"group {gi} {k}": v for gi, g in enumerate(sd["param_groups"]) for k, v in g.items()
                if isinstance(v, torch.Tensor)})
    return out


def graph_matches_eager(backend: str, dtype: torch.dtype, steps: int) -> dict:
    """``steps`` replays of a captured step against as many eager steps, with fresh gradients
    each step written into the same tensors: parameters and optimizer state must be equal bit for
    bit. A warm-up, then a cosine over the run, so the schedule moves on the device at every replay."""
    from fused_lr import FusedSGD, param_groups, schedules

    def build():
        net = model_with_grads("resnet50", device="cuda", dtype=dtype)
        opt = FusedSGD(param_groups(net, WEIGHT_DECAY), lr=LR, momentum=MOMENTUM, nesterov=True,
                       max_grad_norm=MAX_GRAD_NORM, backend=backend,
                       schedule=schedules.Warmup(10, schedules.Cosine(steps), start_factor=0.1))
        return net, opt

    def fill(net, k):
        gen = torch.Generator(device="cuda").manual_seed(1000 + k)
        for p in net.parameters():
            p.grad.normal_(generator=gen)

    eager, opt_e = build()
    first = next(eager.parameters()).detach().clone()
    for k in range(WARMUP + steps):
        fill(eager, k)
        opt_e.step()

    graphed, opt_g = build()
    k = 0

    def warm_step():
        nonlocal k
        fill(graphed, k)
        opt_g.step()
        k += 1

    graph = capture(opt_g.step, warm=warm_step)  # the step is captured, not run
    for k in range(WARMUP, WARMUP + steps):
        fill(graphed, k)
        graph.replay()
    torch.cuda.synchronize()

    mismatched = [i for i, (a, b) in enumerate(zip(eager.parameters(), graphed.parameters(), strict=True))
                  if not torch.equal(a, b)]
    se, sg = state_tensors(opt_e.state_dict()), state_tensors(opt_g.state_dict())
    state_mismatched = sorted(k for k in se.keys() | sg.keys() if k not in se or k not in sg
                              or not torch.equal(se[k], sg[k]))
    return dict(steps=steps, equal=not mismatched and not state_mismatched and torch.equal(
                    opt_e.last_grad_norm, opt_g.last_grad_norm),
                mismatched_params=mismatched[:10], mismatched_state=state_mismatched[:10],
                params_moved=not torch.equal(first, next(eager.parameters())),
                lr_end=opt_e.current_lr()[0])


def attempt(record: dict, key: str, fn: Callable[[], object]) -> None:
    """``record[key] = fn()``, or what it raised under ``key + "_error"``: one failed measurement
    leaves the others standing."""
    try:
        record[key] = fn()
    except Exception as e:
        record[f"{key}_error"] = f"{type(e).__name__}: {e}"


def step_bench(dtype_name: str, trace_dir: Path, copy_gbps: float | None, equal_steps: int, rounds: int) -> dict:
    dtype = DTYPES[dtype_name]
    numel, tensors = resnet50_size()
    size = element_size(dtype)
    out = dict(dtype=dtype_name, numel=numel, tensors=tensors, buckets=1, bytes_per_step=STEP_PASSES * numel * size,
               update_bytes=UPDATE_PASSES * numel * size, copy_gbps=copy_gbps, contenders={}, graph_equal={},
               errors={})
    builders = {TORCH: partial(torch_contender, dtype),
                **{f"fused_lr {b}": partial(fused_contender, b, dtype) for b in FUSED_BACKENDS}}
    contenders = []
    for name, build in builders.items():
        try:
            c = build()
            for _ in range(WARMUP):
                c.step()
            torch.cuda.synchronize()
            contenders.append(c)
        except Exception as e:  # a missing backend is reported, the others still run
            out["errors"][name] = f"{type(e).__name__}: {e}"
    res = {c.name: {} for c in contenders}
    for c in contenders:
        res[c.name]["host_ms"] = host_ms(c, 50)
    for name, ms in wall_ms(contenders, rounds, 20).items():
        res[name]["wall_ms"] = ms
    cycles = sleep_cycles(SLEEP_MS)
    for c in contenders:
        r = res[c.name]
        trace = trace_dir / f"trace-{dtype_name}-{c.name.replace(' ', '-')}.json.gz"
        attempt(r, "profile", lambda c=c, trace=trace: profile_counts(c, 10, trace))
        attempt(r, "blocking", lambda c=c: blocking(c, cycles))
        attempt(r, "graph", lambda c=c: capture(c.device_step))
    graphs = {name: r.pop("graph") for name, r in res.items() if "graph" in r}
    for name, ms in graph_ms(graphs, rounds, 50).items():
        res[name]["gpu_ms"] = ms
        res[name]["gbps"] = out["bytes_per_step"] / ms / 1e6
    for name, r in res.items():
        pattern_us = r.get("profile", {}).get("pattern_us", 0)
        if name != TORCH and pattern_us > 0:
            r["update_gbps"] = out["update_bytes"] / pattern_us / 1e3
    out["contenders"] = res
    del graphs, contenders
    torch.cuda.empty_cache()
    for b in FUSED_BACKENDS:
        eq = {}
        attempt(eq, "result", lambda b=b: graph_matches_eager(b, dtype, equal_steps))
        out["graph_equal"][b] = eq.get("result") or dict(error=eq["result_error"])
    return out


# ---------------------------------------------------------------------------------- tool drivers

def kernel_driver(backend: str, dtype_name: str) -> dict:
    """Warm-up steps, then exactly one step inside cudaProfilerStart/Stop, for
    ``ncu --profile-from-start off``."""
    c = fused_contender(backend, DTYPES[dtype_name])
    for _ in range(WARMUP):
        c.step()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    c.step()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    numel, _ = resnet50_size()
    return dict(backend=backend, dtype=dtype_name, numel=numel,
                update_bytes=UPDATE_PASSES * numel * element_size(DTYPES[dtype_name]))


def sanitize_driver(device: str = "cuda", backends: tuple[str, ...] = FUSED_BACKENDS) -> dict:
    """Small steps that reach every kernel path: four dtypes (one launch bucket each), sizes
    around the chunk boundaries, clipping by norm and by value, nesterov, an lr schedule, and
    GradScaler's unscale and skip. Under compute-sanitizer an out-of-bounds or misaligned access
    is an error; here the results must stay finite and the skipped step must not count."""
    from fused_lr import FusedSGD, schedules

    sizes = [1, 7, 1000, 4097, 65537, 3 * 65536 + 5]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    steps = {}
    for backend in backends:
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(n, generator=gen).to(device=device, dtype=dt).requires_grad_()
                  for dt in dtypes for n in sizes]
        opt = FusedSGD([dict(params=params[::2]), dict(params=params[1::2], weight_decay=0.0)], lr=0.1,
                       momentum=0.9, nesterov=True, weight_decay=1e-4, max_grad_norm=1.0, clip_value=0.5,
                       schedule=schedules.Warmup(2, schedules.Cosine(20)), backend=backend)
        scaler = torch.amp.GradScaler(device, init_scale=2.0**8)
        for i in range(6):  # three plain steps, then three through GradScaler, the middle one skipped (inf)
            opt.zero_grad()
            loss = sum((p.float() * (k + 1)).sum() for k, p in enumerate(params))
            if i < 3:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss * (math.inf if i == 4 else 1.0)).backward()
                scaler.step(opt)
                scaler.update()
        if not all(bool(torch.isfinite(p).all()) for p in params):
            raise RuntimeError(f"sanitize: backend {backend} left non-finite parameters")
        steps[backend] = float(opt.state_dict()["state"][0]["step"])
        if steps[backend] != 5:
            raise RuntimeError(f"sanitize: backend {backend} counted {steps[backend]} steps, expected 5 of 6")
    return dict(steps=steps)


# ---------------------------------------------------------------------------------- command line

WORKLOADS = {"env": "python, package versions and the device", "backends": "fused_lr.available_backends()",
             "copy": "the copy-bandwidth probe", "step": "the ResNet-50 step: torch fused against cuda and triton",
             "kernel": "a driver for ncu: one step between cudaProfilerStart and Stop",
             "sanitize": "a driver for compute-sanitizer: small mixed-dtype steps on both backends"}


def main(argv: list[str] | None = None) -> int:
    parser = common.parser("fused-lr bench gpu", __doc__.split("\n\n")[0] + " Each prints or writes (--json) its "
                           "result.")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="{" + ",".join(WORKLOADS) + "}")
    for name, about in WORKLOADS.items():
        p = sub.add_parser(name, help=about, description=about)
        p.add_argument("--json", type=Path, help="where to write the result (default: print it)")
        if name == "copy":
            p.add_argument("--mib", type=int, default=512, help="size of the copied buffer (default 512 MiB)")
        if name in ("step", "kernel"):
            p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
        if name == "step":
            p.add_argument("--trace-dir", type=Path, required=True)
            p.add_argument("--copy-json", type=Path, help="the copy probe's result (measured here when absent)")
            p.add_argument("--equal-steps", type=int, default=100)
            p.add_argument("--rounds", type=int, default=9)
        if name == "kernel":
            p.add_argument("--backend", choices=FUSED_BACKENDS, required=True)
    args = parser.parse_args(argv)
    if args.cmd not in ("env", "backends") and not torch.cuda.is_available():
        parser.error("no CUDA device here (torch.cuda.is_available() is False)")
    if args.cmd == "env":
        result = env_info()
    elif args.cmd == "backends":
        result = backends_info()
    elif args.cmd == "copy":
        result = copy_probe(args.mib)
    elif args.cmd == "step":
        if args.copy_json is not None and args.copy_json.is_file():
            gbps = json.loads(args.copy_json.read_text())["gbps"]
        else:
            gbps = copy_probe(512)["gbps"]
        result = step_bench(args.dtype, args.trace_dir, gbps, args.equal_steps, args.rounds)
    elif args.cmd == "kernel":
        result = kernel_driver(args.backend, args.dtype)
    else:
        result = sanitize_driver()
    text = json.dumps(result, indent=2, default=str)
    if args.json:
        args.json.write_text(text + "\n")
    else:
        print(text)
    return 0

