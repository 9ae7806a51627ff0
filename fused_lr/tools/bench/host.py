"""Host-cost benchmark (``fused-lr bench --host``): the Python a step adds around its kernels, on
ResNet-50's 161 tensors.

Every tensor of ResNet-50 is shrunk to 1-8 elements, so memory traffic vanishes and what is timed
is the host work of a step (recipe.py's SGD step): torch ``SGD(fused=True)`` +
``clip_grad_norm_(foreach=True)`` + ``CosineAnnealingLR`` against one ``FusedSGD.step()`` on each
backend, with new gradient tensors every step as ``zero_grad(set_to_none=True)`` gives them. The
GPU backends cannot launch here, so their kernels are replaced by no-ops: their figure is the
Python they add per step. The stubs are built directly, so nothing here sets TRITON_INTERPRET or
any other variable of the process. Contenders are timed interleaved: per round, in a shuffled
order, a burst of steps each, the first timed cold (the others' steps have evicted its data, as a
training step's forward and backward do), the rest warm.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import statistics
import time
import types
from collections.abc import Callable
from functools import partial

import torch

from fused_lr import backends, param_groups
from fused_lr.core import layout
from fused_lr.tools import models
from fused_lr.tools.bench import common
from fused_lr.tools.bench.recipe import WEIGHT_DECAY, fused_optimizer, torch_step

TORCH = "torch fused + clip_grad_norm_(foreach) + CosineAnnealingLR"
STUBBED = ("triton", "cuda")


def tiny_resnet50_groups(seed: int = 0) -> list[dict]:
    """ResNet-50's 161 parameters as tensors of 1-8 elements, in the decay / no-decay groups."""
    torch.manual_seed(seed)
    net = models.resnet50()
    with torch.no_grad():
        for i, p in enumerate(net.parameters()):
            shape = (1 + i % 8,) if p.ndim <= 1 else (1 + i % 8, 1, 1, 1)[: p.ndim]
            p.data = torch.randn(shape)
    return param_groups(net, WEIGHT_DECAY)


Contender = tuple[Callable[[], None], Callable[[], None]]  # (untimed: new gradients, timed: the step)


def _with_new_grads(groups: list[dict], step: Callable[[], None]) -> Contender:
    params = [p for g in groups for p in g["params"]]
    grads = [torch.randn_like(p) for p in params]

    def new_grads():
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()  # a new tensor each step, as a backward after set_to_none gives

    return new_grads, step


def torch_contender() -> Contender:
    groups = tiny_resnet50_groups()
    return _with_new_grads(groups, torch_step(groups, "fused").step)


class _NoLaunch:
    """A kernel whose launches do nothing: ``kernel[grid](...)`` or ``kernel(...)``."""

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **kwargs):
        return None


class _NoCudaLaunches:
    """fused_lr._cuda's interface with launches that do nothing."""

    LAYOUT_HEADER = layout.c_header()
    DTYPES = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 3}

    def norm(self, *args):
        return None

    def step(self, *args):
        return None


def _stubbed(name: str):
    """The backend ``name`` for CPU tensors, its kernel launches replaced by no-ops."""
    if name == "cuda":
        from fused_lr.backends.cuda import CudaBackend

        backend = CudaBackend(ext=_NoCudaLaunches())
    elif name == "triton":
        from fused_lr.backends.triton import TritonBackend

        backend = TritonBackend()  # imports the kernels (compiled or interpreted alike: none is launched)
        k = backend._k
        backend._k = types.SimpleNamespace(**{n: getattr(k, n) for n in dir(k) if not n.endswith("_kernel")},
                                           **{n: _NoLaunch() for n in dir(k) if n.endswith("_kernel")})
        # the tables as this benchmark has always built them (the interpreter's chunking), whatever
        # TRITON_INTERPRET says: the figure does not depend on the environment
        backend._interpreted = True
    else:
        raise ValueError(name)
    backend.devices = frozenset({"cpu"})
    return backend


def fused_contender(name: str) -> Contender:
    groups = tiny_resnet50_groups()
    opt = fused_optimizer(groups, "reference" if name in STUBBED else name)
    if name in STUBBED:
        opt._backend = _stubbed(name)
    return _with_new_grads(groups, opt.step)


def available() -> dict[str, Callable[[], Contender]]:
    """label -> the builder of each contender that runs here, in the table's order (nothing is built)."""
    out = {TORCH: torch_contender}
    ready = backends.available_backends()
    for name in ("reference", "numba"):
        if ready[name] is True and "cpu" in backends.devices(name):
            out[f"fused_lr {name}"] = partial(fused_contender, name)
    # the GPU backends' host sides run wherever their Python imports (their launches are stubbed)
    if _imports("fused_lr.kernels.triton_kernels"):
        out["fused_lr triton (launches stubbed)"] = partial(fused_contender, "triton")
    out["fused_lr cuda (launches stubbed)"] = partial(fused_contender, "cuda")
    return out


def _imports(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # not installed, or a broken install: that contender is left out
        return False
    return True


def contenders() -> dict[str, Contender]:
    return {label: build() for label, build in available().items()}


def run(repeat: int = 300, warmup: int = 20, burst: int = 4) -> list[dict]:
    """Per round, each contender takes ``burst`` steps in a row. The first is timed "cold": the
    other contenders ran since its last step and evicted its data from the caches, as a forward
    and backward do in training. The others are timed "warm", back to back. The order of the
    contenders is shuffled every round (seeded): a cold step's cost depends on who ran just before
    it (the stubbed CUDA step took ~125 us right after the numba steps, ~110 us after Triton's)."""
    fns = contenders()
    for new_grads, step in fns.values():
        for _ in range(warmup):
            new_grads()
            step()
    cold = {name: [] for name in fns}
    warm = {name: [] for name in fns}
    order, shuffle = list(fns), random.Random(0).shuffle
    for _ in range(repeat):
        last = order[-1]
        while order[0] == last:  # a contender that ran last must not open the next round (a warm "cold" step)
            shuffle(order)
        for name in order:
            new_grads, step = fns[name]
            for i in range(burst):
                new_grads()
                t0 = time.perf_counter()
                step()
                (warm if i else cold)[name].append(time.perf_counter() - t0)
    base = {regime: statistics.median(next(iter(times.values()))) for regime, times in (("cold", cold), ("warm", warm))}
    return [dict(contender=name, regime=regime, median_us=statistics.median(t) * 1e6, min_us=min(t) * 1e6,
                 vs_torch=statistics.median(t) / base[regime])
            for regime, times in (("cold", cold), ("warm", warm)) for name, t in times.items()]


def run_main(args) -> int:
    """``fused-lr bench --host``: the table, the verdict and host.json in ``args.out``."""
    common.set_threads(args.threads)
    load_before = os.getloadavg()[0]
    rows = run(repeat=max(args.repeat, 100))
    load_after = os.getloadavg()[0]
    print(f"{'host cost per step (161 tensors, 1-8 elements)':<62} {'regime':>6} {'median us':>10} {'min us':>8} "
          f"{'x torch':>8}")
    for r in rows:
        print(f"{r['contender']:<62} {r['regime']:>6} {r['median_us']:>10.0f} {r['min_us']:>8.0f} "
              f"{r['vs_torch']:>8.2f}")
    reasons = common.disturbance(load_before, load_after, args.threads,
                                 {f"{r['contender']} ({r['regime']})": r["median_us"] / r["min_us"] for r in rows},
                                 1.0, 1.0)
    print(common.verdict(reasons))
    (args.out / "host.json").write_text(json.dumps(dict(machine=common.machine(), rows=rows, reasons=reasons),
                                                   indent=2))
    print(f"wrote {args.out / 'host.json'}")
    return 0
