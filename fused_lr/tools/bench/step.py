"""CPU step benchmark (``fused-lr bench``): torch's SGD or AdamW paths against the fused_lr
backends on ResNet parameter sets.

Every contender performs the same training step (recipe.py) on the exact parameter set of a
ResNet (fp32, random gradients). In the same run a plain streaming pass moves the bytes the step
must move (the gradients once for the norm, then what the update reads and writes), which gives
the machine's bound for the step. Contenders are timed interleaved, one step each per round, so a
change in machine load hits all of them alike, and each from cold caches (a read pass over twice
the last-level cache runs untimed before every timed step). Both libraries run with the same
thread count (``--threads``). Every run ends with its verdict on its own disturbance (common.py),
which bench.png carries too.

``--idle-ms MS`` times each step as a training loop meets it: after the cache sweep, the process
sits idle for MS milliseconds before the step (as Numba's thread pool does while torch's threads
run the forward and backward), so waking the pool lands in the step. The streaming bound is
timed back to back either way: it is the machine's, not a cadence's.

``--host`` times the host side alone instead (host.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from fused_lr import backends
from fused_lr.core.layout import SIZES
from fused_lr.tools.bench import common
from fused_lr.tools.bench.recipe import (
    BASELINE,
    LR,
    MAX_GRAD_NORM,
    MODELS,
    MOMENTUM,
    OPTIMIZERS,
    TORCH_IMPLS,
    TOTAL_STEPS,
    WEIGHT_DECAY,
    fused_step,
    parameter_groups,
    torch_step,
)

CHUNK = SIZES["NUMBA_CHUNK"]  # the plain read pass works in the fused kernels' chunks
STREAM = "streaming bound"
# Backends whose CPU support is an interpreter (Triton under TRITON_INTERPRET=1: seconds a step,
# a test vehicle, not a CPU backend): timed only when --backends names them.
INTERPRETED = ("triton",)


def cpu_backends() -> list[str]:
    """The fused_lr backends the step benchmark times by default: those available here that run
    natively on CPU tensors."""
    return [n for n, ok in backends.available_backends().items()
            if ok is True and "cpu" in backends.devices(n) and n not in INTERPRETED]


def contenders(model: str, fused_backends: list[str], optimizer: str = "sgd") -> dict[str, Callable[[], None]]:
    """name -> step function, each on its own copy of the model's parameters."""
    steps = [torch_step(parameter_groups(model), impl, optimizer) for impl in TORCH_IMPLS]
    steps += [fused_step(parameter_groups(model), b, optimizer) for b in fused_backends]
    return {s.name: s.step for s in steps}


def stream_steps(numel: int, optimizer: str = "sgd") -> dict[str, Callable[[], None]]:
    """The streaming bound as one call: the two plain passes that move a clipped step's bytes over
    ``numel`` fp32 elements, back to back as the fused step makes its two: the gradients once (the
    norm), then what the optimizer's update reads and writes. One call, so the update pass may
    find in the cache what the read pass left there exactly as the fused step's update may. The
    parameters and gradients are plain torch allocations, as a model's are; the state arrays lie
    where the optimizer puts new state (fused_lr/core/arena.py), so bound and step use the same
    kind of memory."""
    from fused_lr.core.arena import states_like
    from fused_lr.kernels import numba_stream

    update = getattr(numba_stream, OPTIMIZERS[optimizer][4])
    p, g = torch.rand(numel), torch.rand(numel)
    n_states = update.py_func.__code__.co_argcount - 2
    states = [s.copy_(torch.rand(numel)) for s in states_like([p] * n_states, [0.0] * n_states)]
    update_args = [t.numpy() for t in (p, g, *states)]

    def both():
        numba_stream.read_pass(update_args[1], CHUNK)
        update(*update_args)

    return {STREAM: both}


def cache_evictor() -> Callable[[], None]:
    """A read pass over twice the last-level cache: run before each timed step, so that every
    contender starts from cold caches, as an optimizer step does after a forward and backward,
    whatever contender ran before it (on a machine whose cache holds most of a step's working set,
    the previous contender's leftovers would otherwise decide several percent)."""
    from fused_lr.kernels import numba_stream

    buf = np.ones(2 * (common.last_level_cache_bytes() or 64 << 20) // 8)  # 64 MiB where none is listed
    return lambda: numba_stream.read_pass(buf, CHUNK)


def time_interleaved(fns: dict[str, Callable[[], None]], repeat: int, warmup: int = 3,
                     before: Callable[[], None] | None = None, idle_s: float = 0.0,
                     busy: tuple[str, ...] = ()) -> dict[str, list[float]]:
    """Seconds per call of each function, one call of each per round (``before`` runs untimed
    ahead of each call, then an idle pause of ``idle_s`` seconds, except before those in ``busy``)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            if before is not None:
                before()
            if idle_s and name not in busy:
                time.sleep(idle_s)
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


@dataclass
class ModelResult:
    model: str
    tensors: int
    numel: int
    bytes_moved: int  # by one clipped step at the minimum: the norm pass + the update's fp32 passes
    stream_ms: float  # the streaming bound: median of the read pass + update pass call
    stream_min_ms: float  # the same from the fastest call (robust to load from other processes)
    rows: list[dict] = field(default_factory=list)


def probe_gbps(numel: int = 1 << 24, repeat: int = 5) -> float:
    """The update pass's bandwidth on ``numel`` fp32 elements (5 fp32 passes), best of ``repeat``."""
    from fused_lr.kernels import numba_stream

    p, g, b = (torch.rand(numel).numpy() for _ in range(3))
    numba_stream.update_pass(p, g, b)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        numba_stream.update_pass(p, g, b)
        best = min(best, time.perf_counter() - t0)
    return 5 * 4 * numel / best / 1e9


def run_model(model: str, repeat: int, fused_backends: list[str], optimizer: str = "sgd",
              idle_ms: float = 0.0) -> ModelResult:
    groups = parameter_groups(model)
    params = [p for g in groups for p in g["params"]]
    numel = sum(p.numel() for p in params)
    fns = contenders(model, fused_backends, optimizer)
    fns.update(stream_steps(numel, optimizer))
    times = time_interleaved(fns, repeat, before=cache_evictor(), idle_s=idle_ms / 1e3, busy=(STREAM,))
    med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    low = {name: min(ts) * 1e3 for name, ts in times.items()}
    passes = 1 + OPTIMIZERS[optimizer][3]
    result = ModelResult(model, len(params), numel, passes * 4 * numel, med.pop(STREAM), low.pop(STREAM))
    for name, ms in med.items():
        result.rows.append(dict(name=name, median_ms=ms, min_ms=low[name], speedup=med[BASELINE] / ms,
                                speedup_min=low[BASELINE] / low[name], stream_fraction=result.stream_ms / ms,
                                stream_fraction_min=result.stream_min_ms / low[name]))
    return result


def format_table(results: list[ModelResult]) -> str:
    """Ratios from medians, and in brackets from the fastest step of each (less hit by load)."""
    lines = [f"{'model':<9} {'step':<20} {'median ms':>10} {'min ms':>8} {'x vs ' + BASELINE + ' (min)':>23} "
             f"{'% of stream bound (min)':>24}"]
    for r in results:
        for row in r.rows:
            lines.append(f"{r.model:<9} {row['name']:<20} {row['median_ms']:>10.2f} {row['min_ms']:>8.2f} "
                         f"{row['speedup']:>15.2f} ({row['speedup_min']:5.2f}) "
                         f"{100 * row['stream_fraction']:>15.0f}% ({100 * row['stream_fraction_min']:3.0f}%)")
        lines.append(f"{r.model:<9} {'streaming bound':<20} {r.stream_ms:>10.2f} {r.stream_min_ms:>8.2f}   "
                     f"{r.numel / 1e6:.1f} M params in {r.tensors} tensors, {r.bytes_moved // (4 * r.numel)} fp32 "
                     f"passes: "
                     f"{r.bytes_moved / r.stream_ms / 1e6:.0f} GB/s ({r.bytes_moved / r.stream_min_ms / 1e6:.0f} GB/s)")
    return "\n".join(lines)


def plot(results: list[ModelResult], path: Path, verdict: str) -> str | None:
    """Draws bench.png with the run's verdict on it; without matplotlib, returns a one-line hint
    instead."""
    if importlib.util.find_spec("matplotlib") is None:
        return f"{path.name} skipped: matplotlib is not installed (pip install matplotlib, or 'fused_lr[demo]')"
    from fused_lr.tools.plots import plot_bench

    plot_bench(results, path, verdict)
    return None


EPILOG = """other benchmarks (each with its own --help):
  fused-lr bench --host        host cost per step: ResNet-50's 161 tensors at 1-8 elements, GPU launches stubbed
  fused-lr bench fsdp          FSDP2 on gloo CPU ranks: the Numba step on the local shards (make bench-fsdp)
  fused-lr bench gpu ...       one GPU workload (env, backends, copy, step, kernel, sanitize), JSON out
  fused-lr bench gpu-check     every GPU check on a bare GPU machine (make gpu-check)
pytest-benchmark times the same functions: pytest benchmarks/ --benchmark-only (make bench)"""


def main(argv: list[str] | None = None) -> int:
    parser = common.parser("fused-lr bench", __doc__.split("\n\n")[0], EPILOG)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["resnet18", "resnet50"])
    parser.add_argument("--repeat", type=int, default=20, help="timed steps per contender (default 20)")
    parser.add_argument("--backends", nargs="+", default=None,
                        help="fused_lr backends to time (default: every available CPU backend, not interpreted ones)")
    parser.add_argument("--out", type=Path, default=Path("out/bench"),
                        help="folder for bench.json and bench.png (host.json with --host)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="worker threads for torch and Numba alike (default: every core)")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="sgd",
                        help="the step to time: clip + SGD momentum or clip + AdamW, with a cosine schedule")
    parser.add_argument("--idle-ms", type=float, default=0.0,
                        help="idle pause before each timed step, as a training loop's forward and backward leave "
                             "Numba's threads (default 0: back to back)")
    parser.add_argument("--host", action="store_true",
                        help="time the host side only: ResNet-50's 161 tensors at 1-8 elements, GPU launches stubbed")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    if not 0 <= args.idle_ms <= 10_000:
        parser.error("--idle-ms must be between 0 and 10000")
    if args.host:
        from fused_lr.tools.bench import host

        return common.run_into(parser, args.out, lambda: host.run_main(args))
    available = [n for n, ok in backends.available_backends().items() if ok is True and "cpu" in backends.devices(n)]
    chosen = cpu_backends() if args.backends is None else args.backends
    if missing := [b for b in chosen if b not in available]:
        parser.error(f"backend(s) {missing} cannot run on CPU here; available: {available}")
    return common.run_into(parser, args.out, lambda: run_main(args, chosen))


def run_main(args, chosen: list[str]) -> int:
    common.set_threads(args.threads)
    load_before, probe_before = os.getloadavg()[0], probe_gbps()
    results = [run_model(m, args.repeat, chosen, args.optimizer, args.idle_ms) for m in args.models]
    load_after, probe_after = os.getloadavg()[0], probe_gbps()
    print(format_table(results))
    spreads = {f"{r.model} {row['name']}": row["median_ms"] / row["min_ms"] for r in results for row in r.rows}
    reasons = common.disturbance(load_before, load_after, args.threads, spreads, probe_before, probe_after)
    print(common.verdict(reasons))
    report = dict(machine=common.machine(), repeat=args.repeat, optimizer=args.optimizer, idle_ms=args.idle_ms,
                  results=[asdict(r) for r in results],
                  disturbance=dict(load=[load_before, load_after], probe_gbps=[probe_before, probe_after],
                                   spreads=spreads, reasons=reasons),
                  step=dict(lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM,
                            schedule=f"cosine over {TOTAL_STEPS} steps"))
    js, png = args.out / "bench.json", args.out / "bench.png"
    js.write_text(json.dumps(report, indent=2))
    hint = plot(results, png, common.verdict(reasons))
    print(f"wrote {js} and {png}" if hint is None else f"wrote {js}; {hint}")
    return 0
