"""The Triton kernels of a step (docs/step.md; imported only once triton is known to be there).

Every kernel reaches the parameters through device tables of addresses instead of taking them
as arguments, so one launch covers any number of tensors. The tensor table, hyper rows,
schedule tables, group clocks and coefficient scratch are the plan's (fused_lr/core/layout.py);
beside them:

* chunk table, int64 ``(C, 3)``: ``(tensor row, first element, end element)`` of each chunk
  of at most ``CHUNK`` elements; a program handles ``ROWS`` consecutive chunks;
* the hyper table on the device has one more row, ``OPT_ROW`` columns: the optimizer-wide
  clipping settings (float64 on the device: Triton would pass Python floats as float32).

The host side (caching, launches) is fused_lr/backends/triton.py.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from fused_lr import schedules as S
from fused_lr.core import layout as L

# columns of the device hyper table's last (optimizer-wide) row
O_MAX_NORM, O_CLIP_VALUE, O_RATE_POWER, O_RATE_EPS = range(4)

_TENSOR_COLS, _HYPER_COLS = tl.constexpr(L.TENSOR_COLS), tl.constexpr(L.HYPER_COLS)
_COEF_COLS = tl.constexpr(L.COEF_COLS)
_T_PARAM, _T_GRAD, _T_STATE0, _T_STEP = (tl.constexpr(c) for c in (L.T_PARAM, L.T_GRAD, L.T_STATE0, L.T_STEP))
_T_GROUP = tl.constexpr(L.T_GROUP)
_H_LR, _H_WD, _H_FLAGS = tl.constexpr(L.H_LR), tl.constexpr(L.H_WEIGHT_DECAY), tl.constexpr(L.H_FLAGS)
_H_R0 = tl.constexpr(L.H_R0)  # the rule's first column
_F_MAXIMIZE, _F_DECOUPLED, _F_NESTEROV = (tl.constexpr(f) for f in (L.F_MAXIMIZE, L.F_DECOUPLED, L.F_NESTEROV))
_F_AMSGRAD, _F_CENTERED, _F_MOMENTUM = tl.constexpr(L.F_AMSGRAD), tl.constexpr(L.F_CENTERED), tl.constexpr(L.F_MOMENTUM)
_H_MAX_NORM, _H_CLIP_VALUE = tl.constexpr(O_MAX_NORM), tl.constexpr(O_CLIP_VALUE)
_H_RATE_POWER, _H_RATE_EPS = tl.constexpr(O_RATE_POWER), tl.constexpr(O_RATE_EPS)
_C_LR, _C_DECAY, _C_INIT = tl.constexpr(L.C_LR), tl.constexpr(L.C_DECAY), tl.constexpr(L.C_INIT)
_C_C0, _C_C1, _C_C2, _C_C3, _C_C4 = (tl.constexpr(c) for c in (L.C_C0, L.C_C1, L.C_C2, L.C_C3, L.C_C4))
_W_CLIP_COEF, _W_INV_SCALE, _W_GO = tl.constexpr(L.W_CLIP_COEF), tl.constexpr(L.W_INV_SCALE), tl.constexpr(L.W_GO)
_NORM_EPS = tl.constexpr(L.NORM_EPS)

_SEGS = tl.constexpr(S.MAX_SEGMENTS)
_ROW = tl.constexpr(S.ROW)
_CONST, _STEP, _EXP, _LINEAR, _POLY = (tl.constexpr(c) for c in (S.CONST, S.STEP, S.EXP, S.LINEAR, S.POLY))
_COSINE, _COSINE_RESTARTS, _CYCLIC = (tl.constexpr(c) for c in (S.COSINE, S.COSINE_RESTARTS, S.CYCLIC))
_ONECYCLE, _INVTIME, _INVSQRT, _POWERLAW = (tl.constexpr(c) for c in (S.ONECYCLE, S.INVTIME, S.INVSQRT,
                                                                         S.POWERLAW))
_PI = tl.constexpr(3.141592653589793)
# one bit per segment kind, for the KINDS set the host passes
_B_STEP, _B_EXP, _B_LINEAR, _B_POLY, _B_COSINE, _B_COSINE_RESTARTS, _B_CYCLIC, _B_ONECYCLE, _B_INVTIME, \
    _B_INVSQRT, _B_POWERLAW = (tl.constexpr(1 << c) for c in (S.STEP, S.EXP, S.LINEAR, S.POLY, S.COSINE,
                                                             S.COSINE_RESTARTS, S.CYCLIC, S.ONECYCLE, S.INVTIME,
                                                             S.INVSQRT, S.POWERLAW))
_POW_KINDS = tl.constexpr(sum(1 << c for c in (S.STEP, S.EXP, S.CYCLIC, S.POLY, S.INVTIME, S.POWERLAW)))
_INF = tl.constexpr(float("inf"))
# coefficient programs (fused_lr/core/layout.py, program)
_RULE_COLS = tl.constexpr(L.RULE_COLS)
# prepare_kernel decodes a program with literal 5-bit slots: the interpreter passes the program as
# a plain int, and an int cannot be shifted or masked by a constexpr
assert L.PROGRAM_BITS == 5, "prepare_kernel's slot literals (5, 31) follow layout.PROGRAM_BITS"
_LRK_PLAIN, _LRK_BIAS, _LRK_DECAY = (tl.constexpr(k) for k in (L.LRK_PLAIN, L.LRK_BIAS, L.LRK_DECAY))
_CK_ZERO, _CK_COPY, _CK_ONE_MINUS, _CK_SQRT_BIAS = (tl.constexpr(k) for k in (L.CK_ZERO, L.CK_COPY, L.CK_ONE_MINUS,
                                                                               L.CK_SQRT_BIAS))

# A note on spelling, for the interpreter's sake (it runs CI): reductions are written
# tl.reduce(x, 0, <triton's own combine function>), which is exactly what tl.sum / tl.max
# expand to, and constants tl.full(...) rather than tl.zeros(...): the interpreter maps those
# combine functions to numpy directly, while calling a @jit library function costs it a few ms
# of re-patching each time.


# ----------------------------------------------------------------------------- schedule
@triton.jit
def _vmax(x):
    return tl.reduce(x, 0, tl.standard._elementwise_max)


@triton.jit
def _pow(x, y, SIGNED: tl.constexpr):
    """Python's float ``x ** y`` for the schedules' operands, as exp(y log|x|), with x ** 0 == 1
    and, if SIGNED (a negative base is possible), the sign of a negative base under an odd
    exponent. Its error, ~(1 + |y log x|) ulp, is far below the float64 parity tolerance. (The
    interpreter has no libdevice pow, so compiled and interpreted kernels share this code.)"""
    r = tl.exp(y * tl.log(tl.abs(x)))
    if SIGNED:
        half = y * 0.5
        r = tl.where((x < 0) & (y == tl.floor(y)) & (half != tl.floor(half)), -r, r)
    return tl.where(y == 0, 1.0, r)


@triton.jit
def _cosine(m, t, period):
    return m + (1.0 - m) * (1.0 + tl.cos(t * _PI / period)) / 2.0


@triton.jit
def _eval_tables(tab, k, m, KINDS: tl.constexpr):
    """fused_lr.schedules.eval_table for a vector of lanes: ``tab`` points at each lane's
    (16, 8) float64 table, ``k`` its step, ``m`` which lanes are live. KINDS is the bit set of
    segment kinds present in any table (known on the host), so only their formulas are
    compiled. Each formula runs on every lane and a lane takes its own kind's result; other
    lanes feed the shared pow and loop neutral values, so nothing they compute can run away."""
    seg_idx = tl.arange(0, _SEGS)
    starts = tl.load(tab[:, None] + seg_idx[None, :] * _ROW, mask=m[:, None], other=_INF)
    row = tl.reduce(tl.where(starts <= k[:, None], seg_idx[None, :], 0), 1, tl.standard._elementwise_max)
    seg = tab + row * _ROW
    kind = tl.load(seg + 1, mask=m, other=0.0).to(tl.int32)
    p0 = tl.load(seg + 2, mask=m, other=1.0)
    p1 = tl.load(seg + 3, mask=m, other=1.0)
    p2 = tl.load(seg + 4, mask=m, other=1.0)
    t = k - tl.load(seg, mask=m, other=0.0)
    f = tl.where(kind == _CONST, p0, float("nan"))  # a kind without a formula here: NaN, never p0

    if _B_LINEAR & KINDS:
        f = tl.where(kind == _LINEAR, p0 + (p1 - p0) * tl.minimum(t, p2) / p2, f)
    if _B_INVSQRT & KINDS:
        f = tl.where(kind == _INVSQRT, tl.where(t < p0, t / p0, tl.sqrt(p0 / t)), f)

    if (_B_CYCLIC | _B_ONECYCLE) & KINDS:
        p3 = tl.load(seg + 5, mask=m, other=1.0)
        p4 = tl.load(seg + 6, mask=m, other=1.0)

    if _POW_KINDS & KINDS:
        # the one pow that each of these kinds needs (POWERLAW: the inner one)
        base = tl.full(t.shape, 1.0, tl.float64)
        expo = tl.full(t.shape, 0.0, tl.float64)
        if _B_STEP & KINDS:
            base = tl.where(kind == _STEP, p1, base)
            expo = tl.where(kind == _STEP, tl.floor(t / p0), expo)
        if _B_EXP & KINDS:
            base = tl.where(kind == _EXP, p0, base)
            expo = tl.where(kind == _EXP, t, expo)
        if _B_CYCLIC & KINDS:
            size = p1 + p2
            cycle = tl.floor(1.0 + t / size)
            mode = p3.to(tl.int32)
            base = tl.where((kind == _CYCLIC) & (mode == 1), 0.5, base)
            expo = tl.where((kind == _CYCLIC) & (mode == 1), cycle - 1.0, expo)
            base = tl.where((kind == _CYCLIC) & (mode == 2), p4, base)
            expo = tl.where((kind == _CYCLIC) & (mode == 2), t, expo)
        if _B_POLY & KINDS:
            base = tl.where(kind == _POLY, 1.0 - tl.minimum(t, p0) / p0, base)
            expo = tl.where(kind == _POLY, p1, expo)
        if _B_INVTIME & KINDS:
            base = tl.where(kind == _INVTIME, 1.0 + p0 * t / p1, base)
            expo = tl.where(kind == _INVTIME, -p2, expo)
        if _B_POWERLAW & KINDS:
            base = tl.where(kind == _POWERLAW, tl.minimum(t, p2) / p2, base)
            expo = tl.where(kind == _POWERLAW, p1, expo)
        # only Step's and Cyclic's gamma may be negative (Exponential's and the other bases are not)
        r = _pow(base, expo, (_B_STEP | _B_CYCLIC) & KINDS)
        f = tl.where((kind == _STEP) | (kind == _EXP) | (kind == _INVTIME), r, f)
        if _B_POLY & KINDS:
            f = tl.where(kind == _POLY, p2 + (1.0 - p2) * r, f)
        if _B_POWERLAW & KINDS:
            f = tl.where(kind == _POWERLAW, _pow(tl.where(kind == _POWERLAW, p0, 1.0), r, False), f)
        if _B_CYCLIC & KINDS:
            ratio = p1 / size
            x = 1.0 + t / size - cycle
            scale = tl.where(x <= ratio, x / ratio, (x - 1.0) / (ratio - 1.0))
            f = tl.where(kind == _CYCLIC, 1.0 + (p0 - 1.0) * scale * tl.where(mode == 0, 1.0, r), f)

    if _B_COSINE & KINDS:
        f = tl.where(kind == _COSINE, _cosine(p1, tl.minimum(t, p0), p0), f)
    if _B_COSINE_RESTARTS & KINDS:
        restarts = kind == _COSINE_RESTARTS
        t_cyc = tl.where(restarts & (p1 == 1.0), t % p0, t)  # float % is fmod, as math.fmod
        length = p0
        growing = restarts & (p1 != 1.0)
        while _vmax(tl.where(growing & (t_cyc >= length), 1, 0)) > 0:
            wrap = growing & (t_cyc >= length)
            t_cyc = tl.where(wrap, t_cyc - length, t_cyc)
            length = tl.where(wrap, length * p1, length)
        f = tl.where(restarts, _cosine(p2, t_cyc, length), f)

    if _B_ONECYCLE & KINDS:
        t_one = tl.minimum(t, p0 - 1.0)
        up_end = p1 * p0 - 1.0
        rising = t_one <= up_end
        pct = tl.where(rising, t_one / up_end, (t_one - up_end) / (p0 - 1.0 - up_end))
        a = tl.where(rising, 1.0 / p2, 1.0)
        b = tl.where(rising, 1.0, 1.0 / (p2 * p3))
        f = tl.where(kind == _ONECYCLE,
                     tl.where(p4 == 0.0, b + (a - b) / 2.0 * (tl.cos(pct * _PI) + 1.0), (b - a) * pct + a), f)
    return f


# ----------------------------------------------------------------------------- shared pieces
# A program handles ROWS chunks as the rows of a (ROWS, BLOCK) tile: per-chunk scalars are
# (ROWS, 1) columns. Compiled, ROWS is 1 and a program walks its chunk BLOCK by BLOCK; the
# interpreter, which pays per operation and not per element, takes many chunks per program.
@triton.jit
def _chunks(tensors, chunks, n_chunks, ROWS: tl.constexpr, CHUNK: tl.constexpr):
    """Chunk index, tensor index, tensor table row, first and end element of this program's
    chunks, as (ROWS,) vectors; rows past the last chunk are empty (end == start)."""
    c = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    valid = c < n_chunks
    entry = chunks + 3 * c
    tensor = tl.load(entry, mask=valid, other=0)
    start = tl.multiple_of(tl.load(entry + 1, mask=valid, other=0), CHUNK)
    end = tl.load(entry + 2, mask=valid, other=0)
    return c, tensor, tensors + tensor * _TENSOR_COLS, start, end


@triton.jit
def _address(row, col, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = tl.load(row + col).to(tl.pointer_type(DTYPE))
    if ALIGNED:  # the host checked every address is 16-byte aligned: lets loads vectorise
        ptr = tl.multiple_of(ptr, 16)
    return ptr[:, None]


@triton.jit
def _blocks(start, end, BLOCK: tl.constexpr):
    """How many leading blocks are full in every row, and how many blocks the longest row has."""
    n_full = tl.reduce((end - start) // BLOCK, 0, tl.standard._elementwise_min)
    n_all = tl.reduce((end - start + BLOCK - 1) // BLOCK, 0, tl.standard._elementwise_max)
    return n_full, n_all


@triton.jit
def _recip(x):
    """1 / x correctly rounded: float32 division may otherwise be approximate (float64 never is,
    and has no div_rn)."""
    if x.dtype.is_fp32():
        return tl.fdiv(1.0, x, ieee_rounding=True)
    else:
        return 1.0 / x


@triton.jit
def _div(a, b):
    """a / b correctly rounded, as torch and the CUDA kernels divide (float32 ``/`` compiles to
    div.full.f32, up to 2 ulp off)."""
    if a.dtype.is_fp32():
        return tl.fdiv(a, b, ieee_rounding=True)
    else:
        return a / b


@triton.jit
def _sqrt(x):
    """sqrt(x) correctly rounded (float32 tl.sqrt compiles to the approximate square root)."""
    if x.dtype.is_fp32():
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@triton.jit
def _narrow(x, DTYPE: tl.constexpr):
    """``x`` in the tensor dtype, rounded to nearest even as torch rounds: the interpreter's
    float32 -> bfloat16 cast truncates, so bfloat16 is rounded here, on the bits (a NaN stays a
    quiet NaN), identically compiled and interpreted."""
    if tl.bfloat16 == DTYPE:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _inv_scale(scale):
    """1 / grad_scale as torch.amp.GradScaler.unscale_ computes it: in float64, kept in float32."""
    return _recip(tl.load(scale).to(tl.float64)).to(tl.float32)


@triton.jit
def _clamp(g, clip_value):
    # torch.clamp keeps NaN; minimum/maximum need not
    return tl.where(g != g, g, tl.minimum(tl.maximum(g, -clip_value), clip_value))


# ----------------------------------------------------------------------------- norm
@triton.jit
def _store_sqrt(out, total):
    """sqrt(total) correctly rounded, stored to ``out`` and returned in its dtype."""
    root = _sqrt(total).to(out.dtype.element_ty)
    tl.store(out, root)
    return root


@triton.jit
def _sum_sqrt(partials, n, out, BLOCK: tl.constexpr):
    """sqrt(sum(partials[:n])) in a fixed order, stored to ``out`` and returned in its dtype."""
    acc = tl.full([BLOCK], 0.0, partials.dtype.element_ty)
    for s in range(0, n, BLOCK):
        idx = s + tl.arange(0, BLOCK)
        acc += tl.load(partials + idx, mask=idx < n, other=0.0)
    return _store_sqrt(out, tl.reduce(acc, 0, tl.standard._sum_combine))


@triton.jit
def _sumsq_block(G, offs, m, inv, clip_value, COMPUTE: tl.constexpr, ACC: tl.constexpr,
                 HAS_SCALE: tl.constexpr, HAS_CLIP_VALUE: tl.constexpr, MASKED: tl.constexpr):
    g = (tl.load(G + offs, mask=m, other=0.0) if MASKED else tl.load(G + offs)).to(COMPUTE)
    if HAS_SCALE:
        g = g * inv
    if HAS_CLIP_VALUE:
        g = _clamp(g, clip_value)
    g = g.to(ACC)
    return g * g


@triton.jit
def sumsq_kernel(tensors, chunks, n_chunks, partials, out, hyper, scale, n_groups,
                 DTYPE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_CLIP_VALUE: tl.constexpr, FINAL: tl.constexpr,
                 ALIGNED: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """partials[i] = sum of squares of the processed gradient (unscaled, value-clipped; the
    maximize sign does not matter) over chunk i. No atomics: prepare_kernel (or sqrt_sum_kernel,
    when the host reads the norm before the step) adds the partials in a fixed order, so the norm
    is deterministic. FINAL (this one program has every chunk): write the norm to ``out`` directly."""
    ACC: tl.constexpr = partials.dtype.element_ty
    COMPUTE: tl.constexpr = tl.float64 if DTYPE.is_fp64() else tl.float32
    c, _, row, start, end = _chunks(tensors, chunks, n_chunks, ROWS, CHUNK)
    G = _address(row, _T_GRAD, DTYPE, ALIGNED)
    inv = tl.full((), 1.0, COMPUTE)
    if HAS_SCALE:
        inv = _inv_scale(scale).to(COMPUTE)
    clip_value = tl.load(hyper + n_groups * _HYPER_COLS + _H_CLIP_VALUE).to(COMPUTE)
    acc = tl.full([ROWS, BLOCK], 0.0, ACC)
    lane = tl.arange(0, BLOCK)[None, :]
    n_full, n_all = _blocks(start, end, BLOCK)
    for i in range(n_full):
        offs = start[:, None] + i * BLOCK + lane
        acc += _sumsq_block(G, offs, True, inv, clip_value, COMPUTE, ACC, HAS_SCALE, HAS_CLIP_VALUE, False)
    for i in range(n_full, n_all):
        offs = start[:, None] + i * BLOCK + lane
        acc += _sumsq_block(G, offs, offs < end[:, None], inv, clip_value, COMPUTE, ACC, HAS_SCALE,
                            HAS_CLIP_VALUE, True)
    sums = tl.reduce(acc, 1, tl.standard._sum_combine)
    if FINAL:
        _store_sqrt(out, tl.reduce(sums, 0, tl.standard._sum_combine))
    else:
        tl.store(partials + c, sums, mask=c < n_chunks)


@triton.jit
def sqrt_sum_kernel(partials, n, out, BLOCK: tl.constexpr):
    """out = sqrt(sum(partials[:n])): one program, a fixed order."""
    _sum_sqrt(partials, n, out, BLOCK)


# ----------------------------------------------------------------------------- update
@triton.jit
def _step_size(lr, h, step64, t, m, CODE: tl.constexpr):
    """The rule's step size from the scheduled lr, by its program slot CODE = kind << 3 | j."""
    r = tl.load(h + _H_R0 + (CODE & 7), mask=m, other=0.0)
    if (CODE >> 3) == _LRK_PLAIN:
        return lr
    elif (CODE >> 3) == _LRK_BIAS:
        return lr / (1.0 - _pow(r, t, False))
    elif (CODE >> 3) == _LRK_DECAY:
        return lr / (1.0 + step64 * r)  # step64 = t - 1 earlier updates
    else:  # a kind without a formula here: a visible NaN step, never another kind's
        return lr * 0.0 + (_INF - _INF)  # NaN (a NaN constexpr global fails Triton's consistency check)


@triton.jit
def _coef(h, t, m, CODE: tl.constexpr):
    """One rule coefficient, by its program slot CODE = kind << 3 | j."""
    r = tl.load(h + _H_R0 + (CODE & 7), mask=m, other=0.0)
    if (CODE >> 3) == _CK_ZERO:
        return r * 0.0
    elif (CODE >> 3) == _CK_COPY:
        return r
    elif (CODE >> 3) == _CK_ONE_MINUS:
        return 1.0 - r
    elif (CODE >> 3) == _CK_SQRT_BIAS:
        return tl.sqrt(1.0 - _pow(r, t, False))
    else:
        return r * 0.0 + (_INF - _INF)


@triton.jit
def prepare_kernel(tensors, n_tensors, hyper, tables, clocks, n_groups, coefs, norm, partials, n_partials, scale,
                   found, lrs, HAS_LR_TENSORS: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_RATE: tl.constexpr,
                   HAS_SCALE: tl.constexpr, HAS_FOUND: tl.constexpr, FINISH: tl.constexpr, PROGRAM: tl.constexpr,
                   KINDS: tl.constexpr, BLOCK: tl.constexpr, SUM_BLOCK: tl.constexpr):
    """One program, before update_kernel: with FINISH the norm from sumsq_kernel's partials (into
    ``norm``: no launch of its own); the step-wide scalars (clip coefficient, 1/grad_scale, go = not
    skipped) and, per tensor, the lr = kernel lr x schedule(its group's clock), the decoupled decay
    factor and whether its state starts now (step count 0); then every step count and, once all
    are read, every group clock advance by go. ``lrs`` (HAS_LR_TENSORS): per group the address of
    its float32 lr tensor, then per group that of its float64 one (0: none), read here, times the
    LR column (the schedule's host scale for such a group). Everything stays on the device."""
    wide = hyper + n_groups * _HYPER_COLS
    if FINISH:
        nv = _sum_sqrt(partials, n_partials, norm, SUM_BLOCK)
    elif HAS_RATE or HAS_CLIP:
        nv = tl.load(norm)
    rate = tl.full((), 1.0, tl.float64)
    if HAS_RATE:  # the gradient-norm rate (N + eps) ** -power, on the norm before clipping
        n_eps = nv.to(tl.float64) + tl.load(wide + _H_RATE_EPS)
        rate = tl.exp(-tl.load(wide + _H_RATE_POWER) * tl.log(n_eps))
    go = tl.full((), 1.0, tl.float64)
    if HAS_FOUND:
        go = tl.where(tl.load(found) != 0, 0.0, go)
    coef = tl.full((), 1.0, tl.float64)
    if HAS_CLIP:
        # c = min(1, C / (N + eps)) as torch evaluates it: in N's dtype, C / x as reciprocal(x) * C
        c = _recip(nv + _NORM_EPS) * tl.load(hyper + n_groups * _HYPER_COLS + _H_MAX_NORM).to(nv.dtype)
        coef = tl.where(c > 1.0, 1.0, c).to(tl.float64)  # keeps a NaN norm NaN, as torch.clamp does
    inv = tl.full((), 1.0, tl.float64)
    if HAS_SCALE:
        inv = _inv_scale(scale).to(tl.float64)
    last = coefs + n_tensors * _COEF_COLS
    tl.store(last + _W_CLIP_COEF, coef)
    tl.store(last + _W_INV_SCALE, inv)
    tl.store(last + _W_GO, go)
    for s in range(0, n_tensors, BLOCK):
        idx = s + tl.arange(0, BLOCK).to(tl.int64)
        m = idx < n_tensors
        row = tensors + idx * _TENSOR_COLS
        steps = tl.load(row + _T_STEP, mask=m, other=0).to(tl.pointer_type(tl.float32))
        step = tl.load(steps, mask=m, other=0.0)
        group = tl.load(row + _T_GROUP, mask=m, other=0)
        h = hyper + group * _HYPER_COLS
        k = tl.load(clocks + group, mask=m, other=0.0).to(tl.float64)
        base = tl.load(h + _H_LR, mask=m, other=0.0)
        if HAS_LR_TENSORS:  # as CUDA's prepare_row: base x the float32 lr, then x the float64 one
            a32 = tl.load(lrs + group, mask=m, other=0)
            a64 = tl.load(lrs + n_groups + group, mask=m, other=0)
            base *= tl.load(a32.to(tl.pointer_type(tl.float32)), mask=m & (a32 != 0), other=1.0).to(tl.float64)
            base *= tl.load(a64.to(tl.pointer_type(tl.float64)), mask=m & (a64 != 0), other=1.0)
        lr = base * _eval_tables(tables + group * (_SEGS * _ROW), k, m, KINDS)
        lr = lr * rate
        flags = tl.load(h + _H_FLAGS, mask=m, other=0.0).to(tl.int32)
        decoupled_wd = tl.where((flags & _F_DECOUPLED) != 0, tl.load(h + _H_WD, mask=m, other=0.0), 0.0)
        out = coefs + idx * _COEF_COLS
        step64 = step.to(tl.float64)
        # the rule's coefficients by its PROGRAM (fused_lr/core/layout.py, program), so the update
        # only reads them; t: the step count after this update
        t = step64 + 1.0
        tl.store(out + _C_LR, _step_size(lr, h, step64, t, m, PROGRAM & 31), mask=m)
        for i in tl.static_range(_RULE_COLS):
            tl.store(out + _C_C0 + i, _coef(h, t, m, (PROGRAM >> (5 * (i + 1))) & 31), mask=m)
        tl.store(out + _C_DECAY, 1.0 - lr * decoupled_wd, mask=m)
        tl.store(out + _C_INIT, tl.where(step == 0, 1.0, 0.0), mask=m)
        # step + 0 rewrites the count unchanged when the step is skipped
        tl.store(steps, step + go.to(tl.float32), mask=m)
    tl.debug_barrier()  # every lane has read its group's clock
    for s in range(0, n_groups, BLOCK):
        idx = s + tl.arange(0, BLOCK)
        m = idx < n_groups
        tl.store(clocks + idx, tl.load(clocks + idx, mask=m, other=0.0) + go.to(tl.float32), mask=m)


@triton.jit
def _load2(P, G, offs, m, COMPUTE: tl.constexpr, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(G + offs, mask=m, other=0.0).to(COMPUTE), tl.load(P + offs, mask=m, other=0.0).to(COMPUTE)
    return tl.load(G + offs).to(COMPUTE), tl.load(P + offs).to(COMPUTE)


@triton.jit
def _load_state(S, offs, m, COMPUTE: tl.constexpr, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(S + offs, mask=m, other=0.0).to(COMPUTE)
    return tl.load(S + offs).to(COMPUTE)


@triton.jit
def _store(X, offs, x, m, DTYPE: tl.constexpr, MASKED: tl.constexpr):
    if MASKED:
        tl.store(X + offs, _narrow(x, DTYPE), mask=m)
    else:
        tl.store(X + offs, _narrow(x, DTYPE))


@triton.jit
def _common(g, p, sign, wd, decay, inv, clip_value, coef, HAS_SCALE: tl.constexpr, HAS_CLIP_VALUE: tl.constexpr,
            HAS_CLIP: tl.constexpr, MAXIMIZE: tl.constexpr, COUPLED_WD: tl.constexpr, DECOUPLED_WD: tl.constexpr):
    """docs/step.md steps 0-5 on a tile: the processed, clipped, (coupled) decayed gradient and the
    (decoupled) decayed parameter."""
    if HAS_SCALE:
        g = g * inv
    if MAXIMIZE:
        g = g * sign
    if HAS_CLIP_VALUE:
        g = _clamp(g, clip_value)
    if HAS_CLIP:
        g = g * coef
    if COUPLED_WD:
        g = tl.where(wd != 0, g + wd * p, g)  # not g + 0 * p, which is NaN for an infinite p
    if DECOUPLED_WD:
        p = p * decay  # the factor is exactly 1 without decay
    return g, p


@triton.jit
def _lerp(a, b, w):
    """torch.lerp's two formulas, chosen by the weight as torch chooses them."""
    return tl.where(w < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))


# The rules. update_kernel calls the one its RULE_FN constexpr names (the backend picks
# ``_<rule name>`` for the optimizer's RULES code), each with the same arguments: the processed
# gradient g and parameter p of a tile, the state pointers S0..S2 (the rule's, in declaration
# order), this row's step size and coefficients C0..C4 (prepare_kernel's, by the optimizer's
# coefficient program), whether its state starts now, its flag bits, and FEATURES, the flag bits
# any group of the step has: a variant no group uses is not compiled. The new parameter value.


@triton.jit
def _sgd(g, p, S0, S1, S2, offs, m, lr, c0, c1, c2, c3, c4, init, flags, DTYPE: tl.constexpr,
         COMPUTE: tl.constexpr, FEATURES: tl.constexpr, MASKED: tl.constexpr):
    """C0 momentum, C1 1 - dampening; S0 the momentum buffer."""
    d = g
    if _F_MOMENTUM & FEATURES:
        has_momentum = c0 != 0
        m_buf = m & has_momentum if MASKED else has_momentum
        # read only where the buffer holds momentum: never without one, nor on its first use
        b = tl.load(S0 + offs, mask=m_buf & (init == 0), other=0.0).to(COMPUTE)
        b = tl.where(init, g, c0 * b + c1 * g)
        tl.store(S0 + offs, _narrow(b, DTYPE), mask=m_buf)
        if _F_NESTEROV & FEATURES:
            b = tl.where((flags & _F_NESTEROV) != 0, g + c0 * b, b)
        d = tl.where(has_momentum, b, g)
    return p - lr * d


@triton.jit
def _adam(g, p, S0, S1, S2, offs, m, lr, c0, c1, c2, c3, c4, init, flags, DTYPE: tl.constexpr,
          COMPUTE: tl.constexpr, FEATURES: tl.constexpr, MASKED: tl.constexpr):
    """lr the bias-corrected step size; C0 1 - b1, C1 b2, C2 1 - b2, C3 sqrt(1 - b2^t), C4 eps;
    S0 exp_avg, S1 exp_avg_sq, S2 max_exp_avg_sq (amsgrad rows only)."""
    mv = _lerp(_load_state(S0, offs, m, COMPUTE, MASKED), g, c0)
    v = _load_state(S1, offs, m, COMPUTE, MASKED) * c1 + c2 * g * g
    _store(S0, offs, mv, m, DTYPE, MASKED)
    _store(S1, offs, v, m, DTYPE, MASKED)
    if _F_AMSGRAD & FEATURES:
        amsgrad = (flags & _F_AMSGRAD) != 0
        m_ams = m & amsgrad if MASKED else amsgrad
        # torch.maximum: NaN where either is (the default propagate_nan=NONE would keep the old
        # maximum for a NaN v, as fmax does)
        vmax = tl.maximum(tl.load(S2 + offs, mask=m_ams, other=0.0).to(COMPUTE), v, propagate_nan=tl.PropagateNan.ALL)
        tl.store(S2 + offs, _narrow(vmax, DTYPE), mask=m_ams)
        v = tl.where(amsgrad, vmax, v)
    return p - _div(lr * mv, _div(_sqrt(v), c3) + c4)


@triton.jit
def _rmsprop(g, p, S0, S1, S2, offs, m, lr, c0, c1, c2, c3, c4, init, flags, DTYPE: tl.constexpr,
             COMPUTE: tl.constexpr, FEATURES: tl.constexpr, MASKED: tl.constexpr):
    """C0 alpha, C1 1 - alpha, C2 eps, C3 momentum; S0 square_avg, then the momentum buffer if
    momentum, then grad_avg if centered."""
    s = _load_state(S0, offs, m, COMPUTE, MASKED) * c0 + c1 * g * g
    _store(S0, offs, s, m, DTYPE, MASKED)
    avg = _sqrt(s)
    if _F_CENTERED & FEATURES:
        centered = (flags & _F_CENTERED) != 0
        C = tl.where(c3 > 0, S2, S1)
        m_c = m & centered if MASKED else centered
        c = _lerp(tl.load(C + offs, mask=m_c, other=0.0).to(COMPUTE), g, c1)
        tl.store(C + offs, _narrow(c, DTYPE), mask=m_c)
        avg = tl.where(centered, _sqrt(s + -c * c), avg)
    avg = avg + c2
    d = _div(g, avg)
    if _F_MOMENTUM & FEATURES:
        has_momentum = c3 > 0
        m_b = m & has_momentum if MASKED else has_momentum
        b = tl.load(S1 + offs, mask=m_b, other=0.0).to(COMPUTE) * c3 + _div(g, avg)
        tl.store(S1 + offs, _narrow(b, DTYPE), mask=m_b)
        d = tl.where(has_momentum, b, d)
    return p - lr * d


@triton.jit
def _adagrad(g, p, S0, S1, S2, offs, m, lr, c0, c1, c2, c3, c4, init, flags, DTYPE: tl.constexpr,
             COMPUTE: tl.constexpr, FEATURES: tl.constexpr, MASKED: tl.constexpr):
    """lr the decayed step size, C0 eps; S0 the sum of squares."""
    s = _load_state(S0, offs, m, COMPUTE, MASKED) + g * g
    _store(S0, offs, s, m, DTYPE, MASKED)
    return p - _div(lr * g, _sqrt(s) + c0)


@triton.jit
def update_kernel(tensors, chunks, n_chunks, n_tensors, hyper, n_groups, coefs,
                  DTYPE: tl.constexpr, RULE_FN: tl.constexpr, FEATURES: tl.constexpr, HAS_CLIP: tl.constexpr,
                  HAS_CLIP_VALUE: tl.constexpr, HAS_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr,
                  COUPLED_WD: tl.constexpr, DECOUPLED_WD: tl.constexpr,
                  ALIGNED: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """docs/step.md steps 0-7 on ROWS chunks, the rule RULE_FN (one of the rule functions above),
    with the scalars prepare_kernel left in ``coefs``. Arithmetic in the parameter dtype (float32
    for 16-bit types); scalars are cast to it as torch casts a Python number. The constexpr feature
    flags (FEATURES: the rule's flag bits) say whether any group uses a feature; rows of groups that
    do not are left alone by its code."""
    COMPUTE: tl.constexpr = tl.float64 if DTYPE.is_fp64() else tl.float32
    _, tensor, row, start, end = _chunks(tensors, chunks, n_chunks, ROWS, CHUNK)
    last = coefs + n_tensors * _COEF_COLS
    end = start + (end - start) * tl.load(last + _W_GO).to(tl.int64)  # a skipped step touches nothing
    own = (coefs + tensor * _COEF_COLS)[:, None]
    h = (hyper + tl.load(row + _T_GROUP) * _HYPER_COLS)[:, None]
    # every per-row and step-wide scalar, loaded once per program
    coef = tl.load(last + _W_CLIP_COEF).to(COMPUTE)
    inv = tl.load(last + _W_INV_SCALE).to(COMPUTE)
    clip_value = tl.load(hyper + n_groups * _HYPER_COLS + _H_CLIP_VALUE).to(COMPUTE)
    lr = tl.load(own + _C_LR).to(COMPUTE)
    decay = tl.load(own + _C_DECAY).to(COMPUTE)
    init = tl.load(own + _C_INIT) != 0
    flags = tl.load(h + _H_FLAGS).to(tl.int32)
    sign = tl.where((flags & _F_MAXIMIZE) != 0, -1.0, 1.0).to(COMPUTE)
    wd = tl.where((flags & _F_DECOUPLED) != 0, 0.0, tl.load(h + _H_WD)).to(COMPUTE)
    c0 = tl.load(own + _C_C0).to(COMPUTE)  # the rule's coefficients, from prepare_kernel
    c1 = tl.load(own + _C_C1).to(COMPUTE)
    c2 = tl.load(own + _C_C2).to(COMPUTE)
    c3 = tl.load(own + _C_C3).to(COMPUTE)
    c4 = tl.load(own + _C_C4).to(COMPUTE)
    P = _address(row, _T_PARAM, DTYPE, ALIGNED)
    G = _address(row, _T_GRAD, DTYPE, ALIGNED)
    S0 = _address(row, _T_STATE0, DTYPE, ALIGNED)
    S1 = _address(row, _T_STATE0 + 1, DTYPE, ALIGNED)
    S2 = _address(row, _T_STATE0 + 2, DTYPE, ALIGNED)
    lane = tl.arange(0, BLOCK)[None, :]
    n_full, n_all = _blocks(start, end, BLOCK)
    args = (P, G, S0, S1, S2, lr, decay, init, flags, sign, wd, c0, c1, c2, c3, c4, inv, clip_value, coef)
    for i in range(n_full):  # whole blocks in every row: no masks
        _update_tile(start[:, None] + i * BLOCK + lane, True, *args, DTYPE, COMPUTE, RULE_FN, FEATURES, HAS_CLIP,
                     HAS_CLIP_VALUE, HAS_SCALE, MAXIMIZE, COUPLED_WD, DECOUPLED_WD, False)
    for i in range(n_full, n_all):
        offs = start[:, None] + i * BLOCK + lane
        _update_tile(offs, offs < end[:, None], *args, DTYPE, COMPUTE, RULE_FN, FEATURES, HAS_CLIP, HAS_CLIP_VALUE,
                     HAS_SCALE, MAXIMIZE, COUPLED_WD, DECOUPLED_WD, True)


@triton.jit
def _update_tile(offs, m, P, G, S0, S1, S2, lr, decay, init, flags, sign, wd, c0, c1, c2, c3, c4, inv, clip_value,
                 coef,
                 DTYPE: tl.constexpr, COMPUTE: tl.constexpr, RULE_FN: tl.constexpr, FEATURES: tl.constexpr,
                 HAS_CLIP: tl.constexpr, HAS_CLIP_VALUE: tl.constexpr, HAS_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr,
                 COUPLED_WD: tl.constexpr, DECOUPLED_WD: tl.constexpr, MASKED: tl.constexpr):
    """One (ROWS, BLOCK) tile: steps 0-5, then the rule, then the parameter stored."""
    g, p = _load2(P, G, offs, m, COMPUTE, MASKED)
    g, p = _common(g, p, sign, wd, decay, inv, clip_value, coef, HAS_SCALE, HAS_CLIP_VALUE, HAS_CLIP, MAXIMIZE,
                   COUPLED_WD, DECOUPLED_WD)
    p = RULE_FN(g, p, S0, S1, S2, offs, m, lr, c0, c1, c2, c3, c4, init, flags, DTYPE, COMPUTE, FEATURES, MASKED)
    _store(P, offs, p, m, DTYPE, MASKED)


def _call_helpers_directly() -> None:
    """Triton's interpreter re-patches ``triton.language`` on every call of a ``@jit`` helper
    (a few ms each: most of an interpreted step), although the launch has already patched it
    for this module and restores it afterwards. Under the interpreter, bind each helper's name
    to its rewritten Python function so calls skip that; compiled kernels are unaffected."""
    module = globals()
    for name, fn in list(module.items()):
        if name.startswith("_") and isinstance(fn, InterpretedFunction):
            module[name] = fn.rewrite()


if isinstance(update_kernel, InterpretedFunction):
    _call_helpers_directly()
