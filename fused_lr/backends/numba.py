"""The CPU backend: SPEC.md's step as two Numba passes over every parameter of the optimizer.

One call computes the global squared gradient norm, one call applies the whole update (steps
0-7 of SPEC.md) and advances the step counts. Both run ``prange`` over a flat work list of
fixed-size chunks cut from all tensors, so a model's hundreds of small tensors cost one launch,
not one each. The kernels reach the tensors through a table of raw addresses (no copy into an
arena): nothing is ever stale because the table is rebuilt whenever a parameter, buffer or
step-count address, or any size or layout it was built from changes, and the gradient addresses,
which a training loop reallocates every step, are rewritten into it before every pass.

float32 and float64 tensors run here (a mixed model runs one table per dtype); anything else
(bf16, fp16, layouts whose gradient does not line up with the parameter in memory) falls back
to the reference backend with a one-time warning saying why.
"""

from __future__ import annotations

import math
import operator
import warnings

import numpy as np
import torch
from numba import carray, njit, prange, types
from numba.extending import intrinsic

from fused_lr import schedules
from fused_lr.backends.reference import ReferenceBackend
from fused_lr.core.plan import NORM_EPS, StepPlan

# Elements per work item: large enough that the per-chunk overhead vanishes, small enough that
# ResNet-sized models give each core dozens of chunks to balance.
CHUNK = 1 << 16
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
_DTYPE_OF = operator.attrgetter("dtype")

# columns of the per-group hyper-parameter table (float64)
LR, MU, DAMP, WD = range(4)
# columns of the per-group flag table (uint8)
F_MAXIMIZE, F_NESTEROV, F_DECOUPLED, F_MOMENTUM, F_DECAY = range(5)
# columns of the per-tensor constants, stored in the tensor's own dtype so the arithmetic is
# the one torch does with a Python scalar (scalar rounded to the tensor dtype first)
C_NEGLR, C_WD, C_KEEP, C_MU, C_GAIN, C_INV, C_CLIP, C_COEF = range(8)


@intrinsic
def _pointer(typingctx, address, like):
    """A raw ``int64`` address as a pointer to ``like``'s element type, for ``carray``."""
    ptr_type = types.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr_type))

    return ptr_type(address, like), codegen


# the Python evaluator itself, compiled: one definition of the schedule maths for host and CPU kernel
eval_table = njit(cache=True)(schedules.eval_table)


# reassoc lets LLVM vectorise the float64 accumulation; the chunking is fixed, so the result
# is still the same on every run and for every thread count.
@njit(parallel=True, cache=True, fastmath={"reassoc"})
def _sumsq(grads, numel, chunk_t, chunk_lo, chunk_hi, scalars):
    """Sum of squares of the processed gradients (unscaled, value-clipped), in float64.

    ``scalars`` (tensor dtype) = [1/grad_scale, clip value or inf]: its dtype selects the
    tensors' element type."""
    partial = np.zeros(chunk_t.shape[0])
    inv, clip = scalars[0], scalars[1]
    for c in prange(chunk_t.shape[0]):
        t = chunk_t[c]
        # a zero-based slice: indices provably >= 0 let LLVM drop the wraparound check and vectorise
        g = carray(_pointer(grads[t], scalars), numel[t])[chunk_lo[c]:chunk_hi[c]]
        acc = 0.0
        for i in range(g.shape[0]):
            x = min(max(g[i] * inv, -clip), clip)
            acc += np.float64(x) * np.float64(x)
        partial[c] = acc
    return partial.sum()


@njit(cache=True)
def _prepare(steps, group, fresh, hyper, tables, scalars, consts, init):
    """Per tensor: read k, evaluate the schedule, and round every scalar to the tensor dtype."""
    k_like = np.zeros(1, np.float32)
    for t in range(steps.shape[0]):
        k = np.float64(carray(_pointer(steps[t], k_like), 1)[0])
        gi = group[t]
        lr = hyper[gi, LR] * eval_table(tables[gi], k)
        init[t] = k == 0.0 or fresh[t] != 0
        consts[t, C_NEGLR] = -lr
        consts[t, C_WD] = hyper[gi, WD]
        consts[t, C_KEEP] = 1.0 - lr * hyper[gi, WD]
        consts[t, C_MU] = hyper[gi, MU]
        consts[t, C_GAIN] = 1.0 - hyper[gi, DAMP]
        consts[t, C_INV] = scalars[0]
        consts[t, C_CLIP] = scalars[1]
        consts[t, C_COEF] = scalars[2]


@njit(parallel=True, cache=True)
def _update(addr, numel, group, fresh, chunk_t, chunk_lo, chunk_hi, hyper, flags, tables, scalars, consts):
    """SPEC steps 0-7 over every chunk, then k += 1 for every tensor.

    ``addr`` rows: param, grad, buffer (0 without momentum), step count. ``scalars`` (float64)
    = [1/grad_scale, clip value or inf, clip coefficient (1 when off)]; ``consts`` (n, 8) is
    scratch of the tensors' dtype."""
    n = addr.shape[0]
    init = np.zeros(n, np.bool_)
    _prepare(addr[:, 3], group, fresh, hyper, tables, scalars, consts, init)
    for c in prange(chunk_t.shape[0]):
        t = chunk_t[c]
        f = flags[group[t]]
        cs = consts[t]
        neg_lr, wd, keep, mu, gain = cs[C_NEGLR], cs[C_WD], cs[C_KEEP], cs[C_MU], cs[C_GAIN]
        inv, clip, coef = cs[C_INV], cs[C_CLIP], cs[C_COEF]
        maximize, nesterov, decoupled = f[F_MAXIMIZE] != 0, f[F_NESTEROV] != 0, f[F_DECOUPLED] != 0
        momentum, decay, first = f[F_MOMENTUM] != 0, f[F_DECAY] != 0, init[t]
        lo, hi = chunk_lo[c], chunk_hi[c]
        p = carray(_pointer(addr[t, 0], consts), numel[t])[lo:hi]
        g = carray(_pointer(addr[t, 1], consts), numel[t])[lo:hi]
        b = carray(_pointer(addr[t, 2 if momentum else 0], consts), numel[t])[lo:hi]
        for i in range(p.shape[0]):
            x = g[i] * inv
            if maximize:
                x = -x
            x = min(max(x, -clip), clip) * coef
            w = p[i]
            if decay:
                if decoupled:
                    w = w * keep
                else:
                    x = x + wd * w
            if momentum:
                m = x if first else b[i] * mu + gain * x
                b[i] = m
                x = x + mu * m if nesterov else m
            p[i] = w + neg_lr * x
    k_like = np.zeros(1, np.float32)
    for t in range(n):
        carray(_pointer(addr[t, 3], k_like), 1)[0] += 1


class _Table:
    """The work list for the tensors of one dtype: addresses, sizes and chunk bounds."""

    def __init__(self, rows, numel, group, index, np_dtype):
        self.np_dtype = np_dtype
        self.addr = np.array(rows, dtype=np.int64).reshape(-1, 4)
        self.numel = np.array(numel, dtype=np.int64)
        self.group = np.array(group, dtype=np.int64)
        per = (self.numel + CHUNK - 1) // CHUNK
        self.chunk_t = np.repeat(np.arange(len(numel), dtype=np.int64), per)
        first = np.repeat(np.cumsum(per) - per, per)
        self.chunk_lo = (np.arange(len(self.chunk_t), dtype=np.int64) - first) * CHUNK
        self.chunk_hi = np.minimum(self.chunk_lo + CHUNK, self.numel[self.chunk_t])
        # prange hands each thread one contiguous block of work items, so spread the element
        # mass evenly along the list: largest first, dealt out in golden-ratio order. In model
        # order, ResNet-50's big late-layer tensors would give one of two threads 62 % of the work.
        by_size = np.argsort(-(self.chunk_hi - self.chunk_lo), kind="stable")
        order = by_size[np.argsort(np.arange(len(by_size)) * _GOLDEN % 1.0, kind="stable")]
        self.chunk_t, self.chunk_lo, self.chunk_hi = self.chunk_t[order], self.chunk_lo[order], self.chunk_hi[order]
        self.consts = np.zeros((len(numel), 8), dtype=np_dtype)
        # positions of these tensors in the plan's flat order (a mixed-dtype model has two tables)
        self.index = np.array(index, dtype=np.int64)
        self.everything = bool(np.array_equal(self.index, np.arange(len(index))))
        self.grads = np.ascontiguousarray(self.addr[:, 1])

    def set_grads(self, addresses: np.ndarray) -> None:
        """This step's gradient addresses (they move whenever a backward allocates new ones)."""
        self.addr[:, 1] = addresses
        self.grads[:] = addresses


def _layout(t: torch.Tensor) -> tuple | None:
    """The strides that matter (dims of size > 1), or None when ``t`` is not dense in memory."""
    strides = tuple(st for n, st in zip(t.shape, t.stride(), strict=True) if n > 1)
    expected = 1
    for st, n in sorted((st, n) for n, st in zip(t.shape, t.stride(), strict=True) if n > 1):
        if st != expected:
            return None
        expected *= n
    return strides


def _layout_problem(p: torch.Tensor, tensors) -> str | None:
    """Why the kernels cannot treat these same-shaped tensors as flat arrays in step, or None."""
    if p.dtype not in _DTYPES:
        return f"dtype {p.dtype} (the Numba kernels take float32 and float64)"
    layout = _layout(p)
    if layout is None:
        return "a tensor that is not dense in memory"
    if any(_layout(t) != layout for t in tensors):
        return "a gradient or momentum buffer whose memory layout differs from its parameter's"
    return None


def _pointers(tensors) -> tuple:
    return tuple(map(torch.Tensor.data_ptr, tensors))


class _Cache:
    """Tables for one kind of pass, rebuilt only when their key changes."""

    def __init__(self):
        self.key = None
        self.tables: list[_Table] = []
        self.reason: str | None = None


class NumbaBackend:
    name = "numba"
    devices = frozenset({"cpu"})

    def __init__(self):
        # grad_norm runs before FusedSGD materialises buffers and step counts, so the norm pass
        # (gradients only) and the update pass (everything) keep separate tables.
        self._norm_cache, self._update_cache = _Cache(), _Cache()
        self._warned: set[str] = set()
        self._reference = ReferenceBackend()
        self._schedule_tables: dict[int, tuple] = {}
        self._no_fresh: dict[int, np.ndarray] = {}
        self._norm_plan: tuple | None = None

    # ------------------------------------------------------------ the cached tables
    @staticmethod
    def _grads_key(plan: StepPlan) -> tuple:
        # The size, dtype and layout of every gradient, but not its address: a backward after
        # zero_grad(set_to_none=True) allocates new gradients every step, and rebuilding the
        # tables for that would cost more than the step. Addresses are refreshed per step instead.
        key = []
        for g in plan.groups:
            key += (tuple(map(torch.Tensor.numel, g.params)), tuple(map(_DTYPE_OF, g.grads)),
                    tuple(map(torch.Tensor.stride, g.grads)))
        return tuple(key)

    def _key_of(self, plan: StepPlan, with_state: bool) -> tuple:
        if not with_state:
            key = self._grads_key(plan)
            self._norm_plan = (plan, key)  # update() of the same plan reuses it
            return key
        seen, self._norm_plan = self._norm_plan, None
        key = [seen[1] if seen is not None and seen[0] is plan else self._grads_key(plan)]
        for g in plan.groups:  # and every parameter, buffer and step count address (load_state_dict)
            key += (_pointers(g.params), _pointers(g.bufs), _pointers(g.steps))
        return tuple(key)

    @staticmethod
    def _build(plan: StepPlan, with_state: bool, cache: _Cache) -> None:
        cache.tables, cache.reason = [], None
        rows, sizes, groups, index = {}, {}, {}, {}
        flat = 0
        for gi, g in enumerate(plan.groups):
            for i, (p, grad) in enumerate(zip(g.params, g.grads, strict=True)):
                buf = g.bufs[i] if with_state and g.bufs else None
                others = [grad] if buf is None else [grad, buf]
                if (problem := _layout_problem(p, others)) or (problem := _layout_problem(grad, [])):
                    cache.reason = problem
                    return
                if buf is not None and buf.dtype != p.dtype:
                    cache.reason = "a momentum buffer whose dtype differs from its parameter's"
                    return
                addresses = (p.data_ptr(), grad.data_ptr(), 0 if buf is None else buf.data_ptr(),
                             g.steps[i].data_ptr() if with_state else 0)
                rows.setdefault(p.dtype, []).extend(addresses)
                sizes.setdefault(p.dtype, []).append(p.numel())
                groups.setdefault(p.dtype, []).append(gi)
                index.setdefault(p.dtype, []).append(flat)
                flat += 1
        for dt, r in rows.items():
            cache.tables.append(_Table(r, sizes[dt], groups[dt], index[dt], _DTYPES[dt]))

    def _tables(self, plan: StepPlan, with_state: bool) -> list[_Table] | None:
        """The up-to-date tables, or None when this plan must run on the reference."""
        cache = self._update_cache if with_state else self._norm_cache
        key = self._key_of(plan, with_state)
        if key != cache.key:
            self._build(plan, with_state, cache)
            cache.key = key
        if cache.reason is not None:
            if cache.reason not in self._warned:
                self._warned.add(cache.reason)
                warnings.warn(f"fused_lr numba backend: falling back to the reference implementation for "
                              f"{cache.reason}", RuntimeWarning, stacklevel=4)
            return None
        grads = np.array([p for g in plan.groups for p in _pointers(g.grads)], dtype=np.int64)
        for t in cache.tables:
            t.set_grads(grads[t.index])
        return cache.tables

    def _schedule_table(self, schedule) -> np.ndarray:
        hit = self._schedule_tables.get(id(schedule))
        if hit is None or hit[0] is not schedule:
            hit = (schedule, schedule.table())
            self._schedule_tables[id(schedule)] = hit
        return hit[1]

    @staticmethod
    def _inv_scale(plan: StepPlan) -> float:
        if plan.grad_scale is None:
            return 1.0
        # the float32 reciprocal, as torch.amp.GradScaler.unscale_ (and the reference) use
        return float(np.float32(1.0 / float(plan.grad_scale)))

    # ------------------------------------------------------------ the contract
    def grad_norm(self, plan: StepPlan) -> torch.Tensor:
        tables = self._tables(plan, with_state=False)
        if tables is None:
            return self._reference.grad_norm(plan)
        clip = math.inf if plan.clip_value is None else plan.clip_value
        total = 0.0
        for t in tables:
            scalars = np.array([self._inv_scale(plan), clip], dtype=t.np_dtype)
            total += _sumsq(t.grads, t.numel, t.chunk_t, t.chunk_lo, t.chunk_hi, scalars)
        return torch.tensor(math.sqrt(total), dtype=plan.norm_dtype)

    def update(self, plan: StepPlan, norm: torch.Tensor | None) -> None:
        if plan.found_inf is not None and float(plan.found_inf) != 0:
            return
        tables = self._tables(plan, with_state=True)
        if tables is None:
            return self._reference.update(plan, norm)
        coef = 1.0
        if norm is not None:
            # in the norm's dtype, as clip_grad_norm_ computes it
            nt = np.float64 if norm.dtype == torch.float64 else np.float32
            coef = float(min(nt(1.0), nt(plan.max_grad_norm) / (nt(float(norm)) + nt(NORM_EPS))))
        clip = math.inf if plan.clip_value is None else plan.clip_value
        scalars = np.array([self._inv_scale(plan), clip, coef])
        hyper = np.array([[g.kernel_lr, g.momentum, g.dampening, g.weight_decay] for g in plan.groups])
        flags = np.array([[g.maximize, g.nesterov, g.decoupled_weight_decay, g.momentum != 0, g.weight_decay != 0]
                          for g in plan.groups], dtype=np.uint8)
        schedules = np.stack([self._schedule_table(g.schedule) for g in plan.groups])
        fresh = self._fresh(plan)
        for t in tables:
            _update(t.addr, t.numel, t.group, fresh if t.everything else fresh[t.index], t.chunk_t, t.chunk_lo,
                    t.chunk_hi, hyper, flags, schedules, scalars, t.consts)

    def _fresh(self, plan: StepPlan) -> np.ndarray:
        n = sum(len(g.params) for g in plan.groups)
        if any(any(g.fresh) for g in plan.groups):
            out = np.zeros(n, dtype=np.uint8)
            pos = 0
            for g in plan.groups:
                if g.fresh:
                    out[pos:pos + len(g.fresh)] = g.fresh
                pos += len(g.params)
            return out
        if n not in self._no_fresh:
            self._no_fresh[n] = np.zeros(n, dtype=np.uint8)
        return self._no_fresh[n]


def load():
    return NumbaBackend
