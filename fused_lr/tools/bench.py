"""CPU step benchmark: torch's SGD paths against the fused_lr backends on ResNet parameter sets.

Every contender performs the same training step on the exact parameter set of a ResNet (fp32,
random gradients): global-norm clipping at 1.0, weight decay 5e-4 on conv/linear weights,
momentum 0.9, and a cosine schedule. torch does it as ``clip_grad_norm_`` + ``SGD.step()`` +
``CosineAnnealingLR.step()`` (for-loop, foreach and fused implementations); fused_lr as one
``FusedSGD.step()``. In the same run a plain streaming pass moves the bytes the step must move
(the gradients once for the norm, then param, grad, buffer in and param, buffer out), which
gives the machine's bound for the step. Contenders are timed interleaved, one step each per
round, so a change in machine load hits all of them alike, and each from cold caches (a read
pass over twice the last-level cache runs untimed before every timed step).

A shared 2-core machine distorts such timings badly (torch's and Numba's OpenMP workers spin at
barriers when another process holds a core), so every run also measures its own disturbance:
the load average before and after, the spread between each contender's median and fastest step,
and the bandwidth probe repeated at the end. A run past the limits says so plainly
(:func:`disturbance`). Both libraries run with the same thread count (``--threads``).

``--host`` times the host side alone instead (fused_lr/tools/host_bench.py).

Used by ``fused-lr bench`` (:func:`main`) and by the pytest-benchmark suite in benchmarks/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from fused_lr import backends, param_groups
from fused_lr.core.layout import SIZES
from fused_lr.schedules import Cosine
from fused_lr.tools import models

MODELS = {"resnet18": models.resnet18, "resnet50": models.resnet50, "resnet152": models.resnet152}
LR, MOMENTUM, WEIGHT_DECAY, MAX_GRAD_NORM = 0.1, 0.9, 5e-4, 1.0
TOTAL_STEPS = 10_000  # the cosine period; long enough that the lr never reaches 0 in a benchmark
TORCH_IMPLS = ("for-loop", "foreach", "fused")
BASELINE = "torch fused"
CHUNK = SIZES["NUMBA_CHUNK"]  # the plain read pass works in the fused kernels' chunks


def parameter_groups(model: str, seed: int = 0) -> list[dict]:
    """The ResNet's parameters (fp32, random gradients) in the decay / no-decay groups."""
    torch.manual_seed(seed)
    net = MODELS[model]()
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    return param_groups(net, WEIGHT_DECAY)


# Per optimizer: torch's class, fused_lr's class, their shared keyword arguments, the fp32 passes
# the update must make over the parameters (besides the norm pass over the gradients), and the
# streaming kernel that makes exactly those passes.
OPTIMIZERS = {
    "sgd": ("SGD", "FusedSGD", dict(lr=LR, momentum=MOMENTUM), 5, "update_pass"),  # read p,g,b write p,b
    "adamw": ("AdamW", "FusedAdamW", dict(lr=1e-3, weight_decay=1e-2), 7, "adam_pass"),  # read p,g,m,v write p,m,v
}


def torch_step(groups: list[dict], impl: str, optimizer: str = "sgd") -> Callable[[], None]:
    """clip_grad_norm_ + the torch optimizer + CosineAnnealingLR, with the optimizer's ``impl``."""
    if impl not in TORCH_IMPLS:
        raise ValueError(f"unknown torch implementation {impl!r}; choose one of {TORCH_IMPLS}")
    name, _, kw, _, _ = OPTIMIZERS[optimizer]
    params = [p for g in groups for p in g["params"]]
    opt = getattr(torch.optim, name)(groups, foreach=impl == "foreach", fused=impl == "fused", **kw)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, TOTAL_STEPS)
    clip_foreach = impl != "for-loop"  # the for-loop contender clips tensor by tensor too

    def step():
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM, foreach=clip_foreach)
        opt.step()
        sched.step()

    return step


def fused_step(groups: list[dict], backend: str, optimizer: str = "sgd") -> Callable[[], None]:
    import fused_lr

    _, name, kw, _, _ = OPTIMIZERS[optimizer]
    opt = getattr(fused_lr, name)(groups, max_grad_norm=MAX_GRAD_NORM, schedule=Cosine(TOTAL_STEPS), backend=backend,
                                  **kw)
    return opt.step


def cpu_backends() -> list[str]:
    """fused_lr backends that are available here and run on CPU tensors."""
    return [n for n, ok in backends.available_backends().items() if ok is True and "cpu" in backends.devices(n)]


def contenders(model: str, fused_backends: list[str], optimizer: str = "sgd") -> dict[str, Callable[[], None]]:
    """name -> step function, each on its own copy of the model's parameters."""
    out = {f"torch {impl}": torch_step(parameter_groups(model), impl, optimizer) for impl in TORCH_IMPLS}
    out.update({f"fused_lr {b}": fused_step(parameter_groups(model), b, optimizer) for b in fused_backends})
    return out


STREAM = "streaming bound"


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


def last_level_cache_bytes() -> int | None:
    """Bytes of the largest CPU cache this machine lists in Linux sysfs (None where it lists none)."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=None)


def cache_evictor() -> Callable[[], None]:
    """A read pass over twice the last-level cache: run before each timed step, so that every
    contender starts from cold caches, as an optimizer step does after a forward and backward,
    whatever contender ran before it (on a machine whose cache holds most of a step's working set,
    the previous contender's leftovers would otherwise decide several percent)."""
    from fused_lr.kernels import numba_stream

    buf = np.ones(2 * (last_level_cache_bytes() or 64 << 20) // 8)  # 64 MiB where none is listed
    return lambda: numba_stream.read_pass(buf, CHUNK)


def time_interleaved(fns: dict[str, Callable[[], None]], repeat: int, warmup: int = 3,
                     before: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function, one call of each per round (``before`` runs untimed
    ahead of each call)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            if before is not None:
                before()
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


# A run is flagged when another process held the machine: the 1-minute load average beyond what
# the benchmark's own threads make, a contender's median more than 25 % above its fastest step,
# or the streaming probe's bandwidth moving by more than 15 % between the start and the end.
SPREAD_LIMIT, PROBE_DRIFT_LIMIT = 1.25, 0.15


def probe_gbps(numel: int = 1 << 24, repeat: int = 5) -> float:
    """The update pass's bandwidth on ``numel`` fp32 elements (5 fp32 passes), best of ``repeat``."""
    from fused_lr.kernels import numba_stream

    p, g, b = (torch.rand(numel).numpy() for _ in range(3))
    numba_stream.update_pass(p, g, b)
    best = min(_timed(lambda: numba_stream.update_pass(p, g, b)) for _ in range(repeat))
    return 5 * 4 * numel / best / 1e9


def _timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def disturbance(load_before: float, load_after: float, threads: int, spreads: dict[str, float],
                probe_before: float, probe_after: float) -> list[str]:
    """Why a run cannot be trusted (empty when it can)."""
    reasons = []
    own = threads + 0.5
    if max(load_before, load_after) > own:
        reasons.append(f"load average {load_before:.1f} -> {load_after:.1f} with {threads} benchmark threads: "
                       f"other processes held cores")
    wide = {name: s for name, s in spreads.items() if s > SPREAD_LIMIT}
    if wide:
        worst = max(wide, key=wide.get)
        reasons.append(f"{len(wide)} contender(s) with median/fastest above {SPREAD_LIMIT} "
                       f"(worst {worst}: {wide[worst]:.2f})")
    drift = abs(probe_after - probe_before) / max(probe_before, 1e-9)
    if drift > PROBE_DRIFT_LIMIT:
        reasons.append(f"bandwidth probe moved {100 * drift:.0f}% ({probe_before:.0f} -> {probe_after:.0f} GB/s)")
    return reasons


def set_threads(threads: int) -> None:
    """The same worker count for torch and Numba, so neither contender gets more cores."""
    import numba

    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


def run_model(model: str, repeat: int, fused_backends: list[str], optimizer: str = "sgd") -> ModelResult:
    groups = parameter_groups(model)
    params = [p for g in groups for p in g["params"]]
    numel = sum(p.numel() for p in params)
    fns = contenders(model, fused_backends, optimizer)
    fns.update(stream_steps(numel, optimizer))
    times = time_interleaved(fns, repeat, before=cache_evictor())
    med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    low = {name: min(ts) * 1e3 for name, ts in times.items()}
    passes = 1 + OPTIMIZERS[optimizer][3]
    result = ModelResult(model, len(params), numel, passes * 4 * numel, med.pop(STREAM), low.pop(STREAM))
    for name, ms in med.items():
        result.rows.append(dict(name=name, median_ms=ms, min_ms=low[name], speedup=med[BASELINE] / ms,
                                speedup_min=low[BASELINE] / low[name], stream_fraction=result.stream_ms / ms,
                                stream_fraction_min=result.stream_min_ms / low[name]))
    return result


def machine() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "")
    except OSError:
        model = ""
    import numba

    return dict(cpu=model or platform.processor(), cores=torch.get_num_threads(), numba_threads=numba.get_num_threads(),
                threading_layer=_threading_layer(), torch=torch.__version__, numba=numba.__version__,
                python=platform.python_version(),
                # thread wait policies change how torch and numba threads share busy cores
                env={k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "NUMBA_NUM_THREADS",
                                                     "NUMBA_THREADING_LAYER")})


def _threading_layer() -> str:
    import numba

    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        return "unset"


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


def plot(results: list[ModelResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        names = [row["name"] for row in r.rows]
        ms = [row["median_ms"] for row in r.rows]
        colors = ["tab:gray" if n.startswith("torch") else "tab:blue" for n in names]
        ax.barh(names, ms, color=colors)
        ax.axvline(r.stream_ms, color="tab:red", linestyle="--", label=f"streaming bound {r.stream_ms:.1f} ms")
        for y, v in enumerate(ms):
            ax.text(v, y, f" {v:.1f}", va="center", fontsize=8)
        ax.set_xlabel("ms per step (median)")
        ax.set_title(f"{r.model} ({r.numel / 1e6:.1f} M params, {r.tensors} tensors)")
        ax.invert_yaxis()
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("CPU optimizer step: clip_grad_norm + weight decay + momentum + cosine schedule")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fused-lr bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["resnet18", "resnet50"])
    parser.add_argument("--repeat", type=int, default=20, help="timed steps per contender (default 20)")
    parser.add_argument("--backends", nargs="+", default=None,
                        help="fused_lr backends to time (default: every available CPU backend)")
    parser.add_argument("--out", type=Path, default=Path("out/bench"), help="folder for bench.json and bench.png")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="worker threads for torch and Numba alike (default: every core)")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="sgd",
                        help="the step to time: clip + SGD momentum or clip + AdamW, with a cosine schedule")
    parser.add_argument("--host", action="store_true",
                        help="time the host side only: ResNet-50's 161 tensors at 1-8 elements, GPU launches stubbed")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    set_threads(args.threads)
    if args.host:
        return host_main(args)
    available = cpu_backends()
    chosen = available if args.backends is None else args.backends
    if missing := [b for b in chosen if b not in available]:
        parser.error(f"backend(s) {missing} cannot run on CPU here; available: {available}")
    load_before, probe_before = os.getloadavg()[0], probe_gbps()
    results = [run_model(m, args.repeat, chosen, args.optimizer) for m in args.models]
    load_after, probe_after = os.getloadavg()[0], probe_gbps()
    print(format_table(results))
    spreads = {f"{r.model} {row['name']}": row["median_ms"] / row["min_ms"] for r in results for row in r.rows}
    reasons = disturbance(load_before, load_after, args.threads, spreads, probe_before, probe_after)
    print(verdict(reasons))
    args.out.mkdir(parents=True, exist_ok=True)
    report = dict(machine=machine(), repeat=args.repeat, optimizer=args.optimizer, results=[asdict(r) for r in results],
                  disturbance=dict(load=[load_before, load_after], probe_gbps=[probe_before, probe_after],
                                   spreads=spreads, reasons=reasons),
                  step=dict(lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM,
                            schedule=f"cosine over {TOTAL_STEPS} steps"))
    (args.out / "bench.json").write_text(json.dumps(report, indent=2))
    plot(results, args.out / "bench.png")
    print(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")
    return 0


def verdict(reasons: list[str]) -> str:
    if not reasons:
        return "undisturbed: load, spread and the bandwidth probe stayed within limits"
    return "DISTURBED, do not trust these figures (rerun on a quiet machine): " + "; ".join(reasons)


def host_main(args) -> int:
    from fused_lr.tools import host_bench

    load_before = os.getloadavg()[0]
    rows = host_bench.run(repeat=max(args.repeat, 100))
    load_after = os.getloadavg()[0]
    print(f"{'host cost per step (161 tensors, 1-8 elements)':<62} {'regime':>6} {'median us':>10} {'min us':>8} "
          f"{'x torch':>8}")
    for r in rows:
        print(f"{r['contender']:<62} {r['regime']:>6} {r['median_us']:>10.0f} {r['min_us']:>8.0f} "
              f"{r['vs_torch']:>8.2f}")
    reasons = disturbance(load_before, load_after, args.threads,
                          {f"{r['contender']} ({r['regime']})": r["median_us"] / r["min_us"] for r in rows}, 1.0, 1.0)
    print(verdict(reasons))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "host.json").write_text(json.dumps(dict(machine=machine(), rows=rows, reasons=reasons), indent=2))
    print(f"wrote {args.out / 'host.json'}")
    return 0


__all__ = ["main", "parameter_groups", "torch_step", "fused_step", "stream_steps", "contenders", "cpu_backends",
           "run_model", "time_interleaved"]
