"""FSDP2 step benchmark (``fused-lr bench fsdp``, ``make bench-fsdp``): the Numba step on each
rank's local shards against the same step on a plain model of the shard's size.

Spawns gloo ranks on the CPU (torch.multiprocessing), each building the same stack of
``nn.Linear`` layers, ``fully_shard``-ing every layer and the root (as tests/test_fsdp.py does) and
running one backward so every parameter holds a sharded gradient. Each rank then builds a plain
``nn.Module`` whose parameters are copies of its local shards (same shapes, dtype, values and
gradients), so the only difference between the two models is the DTensor/FSDP2 path through
the optimizer. Both get the same ``FusedSGD``/``FusedAdamW`` (``backend="numba"``, weight decay,
a cosine schedule) and their steps are timed interleaved: one step of each per repetition, in an
order shuffled every repetition (seeded alike on every rank, so no contender always follows the
same one and finds its data in the cache), with a barrier before every step so all ranks time the
same contender at the same moment (they share the machine's memory bandwidth).

``--views`` adds a third contender: a plain optimizer over the FSDP2 local tensors themselves
(``nn.Parameter`` views of the very shards and gradients the sharded step updates, not copies),
which takes the sharded step's memory through the plain path: sharded against views is the
DTensor host path alone, views against unsharded is where the memory lies.

The timed steps do not clip (``max_grad_norm=None``), so no all-reduce runs inside them: the
figure compares the host path and the kernels alone. ``--clip`` times a clipped pair as well
(``max_grad_norm=1.0``; the sharded one all-reduces the squared norm over the mesh, the plain one
has nothing to reduce), reported apart and left out of the verdict.

Threads: every rank gets ``--threads`` torch and Numba workers (default: the cores divided by the
ranks, at least one; so one each for 2 ranks on a 2-core machine), set through
``NUMBA_NUM_THREADS`` and ``OMP_NUM_THREADS`` for the ranks' start only (the calling process's
environment is put back), so ranks never oversubscribe the cores and fight at OpenMP/Numba barriers.

A step that leaves the Numba backend for the reference (the optimizer warns once and
``opt.backend`` says "reference") stops the run with an error: the figure would not be the
Numba step's.

Memory-bound: the default size (64 M parameters, 32 M a rank) makes one round of steps touch
~1.5 GiB, beyond the last-level cache of the machine it was measured on (480 MiB); a
smaller ``--mparams`` lets a step find data the previous one left in the cache, and the run then
prints a note saying so (the caches are read from /sys).

Disturbance (as every benchmark judges it, common.py): the 1-minute load average at
the start and the end beyond the ranks' own threads, and each contender's median step more than
25 % above its fastest. The step's semantics are docs/step.md's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import statistics
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from fused_lr.tools.bench import common

LIMIT = 1.10  # the target: the sharded step within 10 % of the unsharded one
WIDTH_MULTIPLE = 8  # layer widths rounded to whole 32-byte rows
LR, WEIGHT_DECAY, MAX_GRAD_NORM, T_MAX = 1e-3, 1e-2, 1.0, 10_000


def parse(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = common.parser("fused-lr bench fsdp", __doc__.split("\n\n")[0],
                           "Example: fused-lr bench fsdp --optimizer adamw --clip")
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                        help="FusedSGD(momentum=0.9) or FusedAdamW (default sgd)")
    parser.add_argument("--mparams", type=float, default=64.0,
                        help="whole-model parameters in millions, before sharding (default 64: each of 2 ranks "
                             "holds 32 M, 128 MB of float32 per tensor kind)")
    parser.add_argument("--layers", type=int, default=8, help="nn.Linear layers the parameters are split into "
                                                              "(default 8)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY)
    parser.add_argument("--world", type=int, default=2, help="gloo ranks (default 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch and Numba threads per rank (default: cores // ranks, at least 1)")
    parser.add_argument("--repeat", type=int, default=40, help="timed steps per contender (default 40)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per contender first (default 3)")
    parser.add_argument("--clip", action="store_true",
                        help="also time both models with max_grad_norm=1.0 (the sharded step then all-reduces)")
    parser.add_argument("--views", action="store_true",
                        help="also time a plain optimizer over the FSDP2 local tensors themselves (the sharded "
                             "step's memory, the plain path)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // args.world)
    for name in ("world", "threads", "repeat", "layers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup < 0 or args.mparams <= 0:
        parser.error("--warmup must be >= 0 and --mparams > 0")
    return parser, args


def width_for(mparams: float, layers: int, world: int) -> int:
    """The layer width giving ~``mparams`` M weights over ``layers`` square layers; at least one row
    per rank."""
    w = round(math.sqrt(mparams * 1e6 / layers) / WIDTH_MULTIPLE) * WIDTH_MULTIPLE
    return max(w, world)


# ------------------------------------------------------------------------------ one rank
def build(cfg: dict):
    """The sharded model with gradients, and the plain twin of this rank's shards."""
    import torch
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    dtype = getattr(torch, cfg["dtype"])
    width = cfg["width"]
    torch.manual_seed(0)
    net = nn.Sequential(*(nn.Linear(width, width) for _ in range(cfg["layers"]))).to(dtype)
    for layer in net:
        fully_shard(layer)
    fully_shard(net)
    x = torch.randn(4, width, dtype=dtype, generator=torch.Generator().manual_seed(1 + cfg["rank"]))
    net(x).square().mean().backward()

    twin = nn.Module()
    twin.shards = nn.ParameterList()
    for p in net.parameters():
        if type(p.grad).__name__ != "DTensor":
            raise RuntimeError(f"expected a sharded (DTensor) gradient, got {type(p.grad).__name__}")
        q = nn.Parameter(p.to_local().detach().clone())
        q.grad = p.grad.to_local().detach().clone()
        twin.shards.append(q)
    return net, twin


def local_views(net):
    """Plain parameters that are the FSDP2 local shards (and gradients) themselves, not copies."""
    from torch import nn

    views = nn.Module()
    views.shards = nn.ParameterList()
    for p in net.parameters():
        q = nn.Parameter(p.to_local())
        q.grad = p.grad.to_local()
        views.shards.append(q)
    return views


def optimizer(params, cfg: dict, clip: bool):
    from fused_lr import FusedAdamW, FusedSGD
    from fused_lr.schedules import Cosine

    cls, kw = (FusedSGD, dict(momentum=0.9)) if cfg["optimizer"] == "sgd" else (FusedAdamW, {})
    return cls(params, lr=LR, weight_decay=cfg["weight_decay"], max_grad_norm=MAX_GRAD_NORM if clip else None,
               schedule=Cosine(T_MAX), backend="numba", **kw)


def checked_step(opt, name: str):
    def step():
        opt.step()
        if opt.backend != "numba":
            raise RuntimeError(f"{name}: the step ran on the {opt.backend!r} backend, not numba")

    return step


def measure(cfg: dict) -> dict:
    import torch
    import torch.distributed as dist

    # the optimizer's one-time warning when a step falls back to the reference: an error here
    warnings.filterwarnings("error", message=r"fused_lr numba backend: running this step on the reference",
                            category=RuntimeWarning)
    t0 = time.perf_counter()
    net, twin = build(cfg)
    pairs = [("sharded", net, False), ("unsharded", twin, False)]
    if cfg["views"]:
        pairs.append(("views", local_views(net), False))
    if cfg["clip"]:
        pairs += [("sharded clip", net, True), ("unsharded clip", twin, True)]
    opts = {name: optimizer(model.parameters(), cfg, clip) for name, model, clip in pairs}
    # the opt.backend check runs inside the timed call: a property read, the same for every contender
    steps = {name: checked_step(opt, name) for name, opt in opts.items()}
    for step in steps.values():
        for _ in range(cfg["warmup"]):
            step()
    setup_s = time.perf_counter() - t0

    names = list(steps)
    times = {name: [] for name in names}
    order = random.Random(0)  # the same sequence on every rank: the clipped steps' all-reduces pair up
    for _ in range(cfg["repeat"]):
        order.shuffle(names)
        for name in names:
            dist.barrier()  # every rank times the same contender at once
            t = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t)

    local = [p.to_local() for p in net.parameters()]
    # what one step reads or writes: the parameters, their gradients and the rule's state tensors
    state = [t for st in opts["sharded"].state.values() for t in st.values()
             if isinstance(t, torch.Tensor) and t.dim() > 0]
    step_bytes = sum(t.numel() * t.element_size() * 2 for t in local) + sum(
        t.to_local().numel() * t.element_size() for t in state)
    return dict(rank=cfg["rank"], numel=sum(t.numel() for t in local), tensors=len(local), step_bytes=step_bytes,
                total_numel=sum(p.numel() for p in net.parameters()),
                backends={name: opt.backend for name, opt in opts.items()}, threads=torch.get_num_threads(),
                setup_s=setup_s, times_ms={name: [1e3 * t for t in ts] for name, ts in times.items()})


def worker(rank: int, cfg: dict, tmp: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=cfg["world"],
                            timeout=datetime.timedelta(seconds=300))
    try:
        common.set_threads(cfg["threads"])
        result = measure({**cfg, "rank": rank})
        Path(tmp, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------ report
def summarise(result: dict) -> dict:
    ms = result["times_ms"]
    rows = {name: dict(median=statistics.median(ts), min=min(ts)) for name, ts in ms.items()}
    out = dict(rows=rows)
    for key, (a, b) in dict(ratio=("sharded", "unsharded"), ratio_views=("sharded", "views"),
                            ratio_clip=("sharded clip", "unsharded clip")).items():
        if a in rows and b in rows:
            out[key] = (rows[a]["median"] / rows[b]["median"], rows[a]["min"] / rows[b]["min"])
    return out


def report(results: list[dict], cfg: dict, load: tuple[float, float]) -> tuple[list[str], bool, list[str]]:
    lines, ratios, spreads = [], [], {}
    for res in results:
        s = res["summary"] = summarise(res)
        lines.append(f"rank {res['rank']}: {res['numel'] / 1e6:.2f} M of {res['total_numel'] / 1e6:.2f} M parameters "
                     f"in {res['tensors']} local shards ({cfg['dtype']}), {res['threads']} thread(s), "
                     f"backends {sorted(set(res['backends'].values()))}, setup {res['setup_s']:.1f} s")
        lines.append(f"  {'step':<22} {'median ms':>10} {'min ms':>8} {'median/min':>11}")
        for name, row in s["rows"].items():
            spreads[f"rank {res['rank']} {name}"] = row["median"] / row["min"]
            label = name.replace("sharded", "sharded (FSDP2)", 1) if name.startswith("sharded") else name
            lines.append(f"  {label:<22} {row['median']:>10.2f} {row['min']:>8.2f} {row['median'] / row['min']:>11.2f}")
        for key, what in (("ratio", "sharded/unsharded"), ("ratio_views", "sharded/views (same memory)"),
                          ("ratio_clip", "sharded/unsharded with clipping (the all-reduce inside)")):
            if key in s:
                lines.append(f"  {what}: {s[key][0]:.3f} by medians ({s[key][1]:.3f} by minima)")
        ratio = s["ratio"][0]
        ratios.append(ratio)
        lines.append(f"  rank {res['rank']}: {'within' if ratio <= LIMIT else 'NOT within'} 10% "
                     f"(sharded/unsharded {ratio:.3f} by medians, limit {LIMIT:.2f})")
        if ratio > LIMIT and "ratio_views" in s and s["ratio_views"][0] <= LIMIT:
            lines.append("  the gap follows the memory, not the DTensor path: the plain step over the same shards "
                         "(views) is as slow")
    worst = max(range(len(ratios)), key=ratios.__getitem__)
    met = ratios[worst] <= LIMIT
    lines.append(f"verdict: the FSDP2 numba step is {'within' if met else 'NOT within'} 10% of the unsharded step of "
                 f"the shard's size on every rank (worst: rank {worst}, {ratios[worst]:.3f} by medians)")
    cache = common.last_level_cache_bytes()
    # between two steps of one contender every contender steps once on every rank
    touched = sum(r["step_bytes"] for r in results) * len({n.removesuffix(" clip") for n in results[0]["times_ms"]})
    if cache is not None and touched < 2 * cache:
        lines.append(f"note: a round of steps touches {touched / 2**20:.0f} MiB, under twice the "
                     f"{cache / 2**20:.0f} MiB last-level cache: steps may find data the previous one left there "
                     f"(not memory-bound); raise --mparams")
    reasons = common.disturbance(load[0], load[1], cfg["world"] * cfg["threads"], spreads, 1.0, 1.0)
    lines.append(common.verdict(reasons) if reasons else "undisturbed: load average and median/fastest within limits")
    return lines, met, reasons


@contextmanager
def environ(values: dict[str, str]):
    """``values`` in os.environ for the block (what child processes started in it inherit), then
    the variables as they were."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv: list[str] | None = None) -> int:
    parser, args = parse(argv)
    if args.json is None:
        return run(args)
    return common.run_into(parser, args.json.parent, lambda: run(args), "--json's folder")


def run(args: argparse.Namespace) -> int:
    import torch.multiprocessing as mp

    width = width_for(args.mparams, args.layers, args.world)
    cfg = dict(optimizer=args.optimizer, layers=args.layers, width=width, dtype=args.dtype,
               weight_decay=args.weight_decay, world=args.world, threads=args.threads, repeat=args.repeat,
               warmup=args.warmup, clip=args.clip, views=args.views)
    print(f"fused-lr bench fsdp: {args.optimizer}, {args.layers} x nn.Linear({width}, {width}), {args.world} gloo "
          f"ranks x {args.threads} thread(s), {args.repeat} timed steps per contender, max_grad_norm=None"
          f"{' (and 1.0 with --clip)' if args.clip else ''}", flush=True)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    # read by Numba and OpenMP when a rank starts: each rank's pools hold --threads workers
    threads = dict(NUMBA_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    with tempfile.TemporaryDirectory(prefix="fsdp_bench") as tmp, environ(threads):
        mp.spawn(worker, args=(cfg, tmp), nprocs=args.world, join=True)
        results = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(args.world)]
    load_after = os.getloadavg()[0]
    lines, met, reasons = report(results, cfg, (load_before, load_after))
    print("\n".join(lines))
    print(f"(load average {load_before:.2f} -> {load_after:.2f}, {time.perf_counter() - t0:.0f} s)")
    if args.json is not None:
        args.json.write_text(json.dumps(dict(config=cfg, load=[load_before, load_after], within_10pct=met,
                                             disturbed=reasons, ranks=results), indent=2))
    return 0

