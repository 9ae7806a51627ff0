"""The CPU backend: docs/step.md's step as two Numba passes over every parameter of the optimizer.

One call computes the global squared gradient norm, one applies the whole update and advances
the step counts. Both run ``prange`` over a flat work list of fixed-size chunks cut from all
tensors of a dtype (fused_lr/kernels/numba_kernels.py), so a model's hundreds of small tensors
cost one call, not one each. The kernels read the plan's tensor table in place, so a gradient
the plan re-addressed is seen without any rebuild; the work lists are built once per plan.

float32 and float64 tensors run here (a mixed model makes one call per dtype); for anything else
the optimizer runs the step on the reference, saying why once.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fused_lr.core import layout as L
from fused_lr.core.plan import Plan, Settings, StepScalars
from fused_lr.kernels import numba_kernels as K

CHUNK = L.SIZES["NUMBA_CHUNK"]
SERIAL_BELOW = 1 << 16  # elements in a dtype bucket under which one thread beats waking the pool
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


class _Work:
    """The chunk list of one dtype bucket (its rows ``table`` of the plan's tensor table) and its
    per-tensor constants' scratch."""

    def __init__(self, table: np.ndarray, np_dtype):
        self.table = table
        self.np_dtype = np_dtype
        numel = table[:, L.T_NUMEL]
        per = (numel + CHUNK - 1) // CHUNK
        chunk_t = np.repeat(np.arange(len(numel), dtype=np.int64), per)
        first = np.repeat(np.cumsum(per) - per, per)
        chunk_lo = (np.arange(len(chunk_t), dtype=np.int64) - first) * CHUNK
        chunk_hi = np.minimum(chunk_lo + CHUNK, numel[chunk_t])
        # prange hands each thread one contiguous block of work items, so spread the element
        # mass evenly along the list: largest first, dealt out in golden-ratio order. In model
        # order, ResNet-50's big late-layer tensors would give one of two threads 62 % of the work.
        by_size = np.argsort(-(chunk_hi - chunk_lo), kind="stable")
        order = by_size[np.argsort(np.arange(len(by_size)) * _GOLDEN % 1.0, kind="stable")]
        self.chunk_t, self.chunk_lo, self.chunk_hi = chunk_t[order], chunk_lo[order], chunk_hi[order]
        self.consts = np.zeros((len(numel), K.CONST_COLS), dtype=np_dtype)
        self.norm_key = (1.0, math.inf)  # sumsq's [1/grad_scale, clip value], held in norm_scalars
        self.norm_scalars = np.array(self.norm_key, dtype=np_dtype)
        small = int(numel.sum()) < SERIAL_BELOW
        self.sumsq = K.sumsq_serial if small else K.sumsq
        self.update = K.update_serial if small else K.update


class NumbaBackend:
    name = "numba"
    devices = frozenset({"cpu"})

    def __init__(self):
        self._plan: Plan | None = None
        self._work: list[_Work] = []
        self.rebuilds = 0  # work lists built: once per plan (the cache's observable behaviour)
        self._norm: tuple[torch.Tensor | None, float] = (None, 0.0)  # the last norm returned, and its value
        self._clocks: tuple[torch.Tensor | None, np.ndarray | None] = (None, None)  # clocks and their numpy view

    def unsupported(self, plan: Plan) -> str | None:
        bad = [b.dtype for b in plan.buckets if b.dtype not in _DTYPES]
        return f"dtype {bad[0]} (the Numba kernels take float32 and float64)" if bad else None

    def _work_for(self, plan: Plan) -> list[_Work]:
        if plan is not self._plan:
            self._work = [_Work(plan.table[b.start:b.stop], _DTYPES[b.dtype]) for b in plan.buckets]
            self._plan = plan
            self.rebuilds += 1
        return self._work

    @staticmethod
    def _inv_scale(scalars: StepScalars) -> float:
        if scalars.grad_scale is None:
            return 1.0
        # the float32 reciprocal, as torch.amp.GradScaler.unscale_ (and the reference) use
        return float(np.float32(1.0 / float(scalars.grad_scale)))

    def grad_norm(self, plan: Plan, settings: Settings, scalars: StepScalars, final: bool = True) -> torch.Tensor:
        wide = (self._inv_scale(scalars), math.inf if settings.clip_value is None else settings.clip_value)
        total = 0.0
        for w in self._work_for(plan):
            if w.norm_key != wide:
                w.norm_scalars[:] = w.norm_key = wide
            total += w.sumsq(w.table, w.chunk_t, w.chunk_lo, w.chunk_hi, w.norm_scalars)
        norm = np.array(math.sqrt(total), dtype=_DTYPES[plan.norm_dtype])
        out = torch.from_numpy(norm)  # a quarter of torch.tensor's cost for a 0-dim result
        self._norm = (out, float(norm))
        return out

    def update(self, plan: Plan, settings: Settings, clocks: torch.Tensor, scalars: StepScalars,
               norm: torch.Tensor | None) -> None:
        if scalars.found_inf is not None and float(scalars.found_inf) != 0:
            return
        coef = rate = 1.0
        if norm is not None:
            # the value grad_norm returned, without reading the tensor back (it may be another one:
            # under process_group the all-reduced norm)
            value = self._norm[1] if norm is self._norm[0] else float(norm)
            if settings.max_grad_norm is not None:
                # in the norm's dtype, as clip_grad_norm_ computes it: C / x as reciprocal(x) * C
                # (torch's scalar / tensor), then clamp(max=1), which keeps a NaN norm's NaN
                # (Python's min(1, nan) is 1: a full unclipped step); an inf norm gives 0
                nt = np.float64 if norm.dtype == torch.float64 else np.float32
                c = nt(1.0) / (nt(value) + nt(L.NORM_EPS)) * nt(settings.max_grad_norm)
                coef = 1.0 if c > 1.0 else float(c)
            if settings.lr_norm_power != 0:
                rate = (value + settings.lr_norm_eps) ** -settings.lr_norm_power
        clip = math.inf if settings.clip_value is None else settings.clip_value
        s = np.array([self._inv_scale(scalars), clip, coef, rate])
        hyper = settings.hyper
        if settings.lr_tensors:
            hyper = hyper.copy()
            for gi, lr in settings.lr_tensors.items():
                hyper[gi, L.H_LR] *= float(lr)
        if clocks is not self._clocks[0]:
            self._clocks = (clocks, clocks.numpy())  # the same memory: the kernels' += 1 lands in the tensor
        ks = self._clocks[1]
        for w in self._work_for(plan):
            w.update(w.table, w.chunk_t, w.chunk_lo, w.chunk_hi, hyper, settings.schedules, ks, s, w.consts, plan.rule,
                     plan.coefficients)
        ks += 1  # after every dtype's call read them


def load():
    return NumbaBackend
