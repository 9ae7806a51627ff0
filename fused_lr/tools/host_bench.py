"""Host-cost benchmark: the Python a step adds around its kernels, on ResNet-50's 161 tensors.

Every tensor of ResNet-50 is shrunk to 1-8 elements, so memory traffic vanishes and what is timed
is the host work of a step: torch ``SGD(fused=True)`` + ``clip_grad_norm_(foreach=True)`` +
``CosineAnnealingLR`` against one ``FusedSGD.step()`` on each backend (clipping at 1.0, momentum
0.9, weight decay on conv/linear weights, a cosine schedule), with new gradient tensors every step
as ``zero_grad(set_to_none=True)`` gives them. The GPU backends cannot launch here, so their
kernels are replaced by no-ops: their figure is the Python they add per step. Contenders are
timed interleaved: per round, in a shuffled order, a burst of steps each, the first timed cold
(the others' steps have evicted its data, as a training step's forward and backward do), the rest
warm.

``fused-lr bench --host`` runs it (see :func:`main` in fused_lr/tools/bench.py).
"""

from __future__ import annotations

import os
import random
import statistics
import time
import types
from collections.abc import Callable

import torch

from fused_lr import FusedSGD, backends, param_groups
from fused_lr.core import layout
from fused_lr.schedules import Cosine
from fused_lr.tools import models

LR, MOMENTUM, WEIGHT_DECAY, MAX_GRAD_NORM, TOTAL = 0.1, 0.9, 5e-4, 1.0, 10_000


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


def _with_new_grads(params: list[torch.Tensor], step: Callable[[], None]) -> Contender:
    grads = [torch.randn_like(p) for p in params]

    def new_grads():
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()  # a new tensor each step, as a backward after set_to_none gives

    return new_grads, step


def torch_contender() -> Contender:
    groups = tiny_resnet50_groups()
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.SGD(groups, lr=LR, momentum=MOMENTUM, fused=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, TOTAL)

    def step():
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM, foreach=True)
        opt.step()
        sched.step()

    return _with_new_grads(params, step)


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
        backend.devices = frozenset({"cpu"})
        return backend
    if name == "triton":
        backend = backends.create("triton", torch.device("cpu"))
        k = backend._k
        backend._k = types.SimpleNamespace(**{n: getattr(k, n) for n in dir(k) if not n.endswith("_kernel")},
                                           **{n: _NoLaunch() for n in dir(k) if n.endswith("_kernel")})
        return backend
    raise ValueError(name)


def fused_contender(name: str) -> Contender:
    groups = tiny_resnet50_groups()
    params = [p for g in groups for p in g["params"]]
    opt = FusedSGD(groups, lr=LR, momentum=MOMENTUM, max_grad_norm=MAX_GRAD_NORM, schedule=Cosine(TOTAL),
                   backend="reference" if name in STUBBED else name)
    if name in STUBBED:
        opt._backend = _stubbed(name)
    return _with_new_grads(params, opt.step)


STUBBED = ("triton", "cuda")


def contenders() -> dict[str, Contender]:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the stubbed Triton backend's host path on CPU tensors
    out = {"torch fused + clip_grad_norm_(foreach) + CosineAnnealingLR": torch_contender()}
    ready = backends.available_backends()
    for name in ("reference", "numba", "triton", "cuda"):
        # the CUDA backend's host side runs wherever the package imports (its launches are stubbed)
        if name == "cuda" or (ready[name] is True and "cpu" in backends.devices(name)):
            label = f"fused_lr {name}" + (" (launches stubbed)" if name in STUBBED else "")
            out[label] = fused_contender(name)
    return out


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
