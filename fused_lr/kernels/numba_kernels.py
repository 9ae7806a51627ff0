"""The Numba kernels of a step (docs/step.md): the global squared norm and the fused update, each
one ``prange`` over a flat work list of chunks cut from every tensor of one dtype, reaching the
tensors through the plan's tensor table of raw addresses (layout: fused_lr/core/layout.py).

Pure compute: the host side (fused_lr/backends/numba.py) checks that every address is plain
memory of the dtype the call assumes, which the ``scalars``/``consts`` argument's dtype selects.
"""

from __future__ import annotations

import zlib
from types import FunctionType

import numpy as np
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from fused_lr import schedules
from fused_lr.core import layout as L
from fused_lr.core.layout import (
    CK_COPY,
    CK_ONE_MINUS,
    CK_SQRT_BIAS,
    CK_ZERO,
    F_AMSGRAD,
    F_CENTERED,
    F_DECOUPLED,
    F_MAXIMIZE,
    F_NESTEROV,
    H_FLAGS,
    H_LR,
    H_R0,
    H_R2,
    H_WEIGHT_DECAY,
    LRK_BIAS,
    LRK_DECAY,
    LRK_PLAIN,
    PROGRAM_BITS,
    RULE_ADAGRAD,
    RULE_ADAM,
    RULE_COLS,
    RULE_RMSPROP,
    RULE_SGD,
    T_GRAD,
    T_GROUP,
    T_NUMEL,
    T_PARAM,
    T_STATE0,
    T_STATE1,
    T_STATE2,
    T_STEP,
)

# Module globals are compile-time constants to Numba, and cached machine code does not notice
# when layout.py changes: _LAYOUT_ID guards that (see the end of this module).
# Columns of the per-tensor constants ``consts`` (Numba's own prepare stage, below), stored in the
# tensor's own dtype so the arithmetic is the one torch does with a Python scalar (the scalar
# rounded to the tensor dtype first): -lr, weight decay, the decoupled-decay factor 1 - lr·wd,
# 1/grad_scale, the clip value, the clip coefficient, 1 on a state's first use, the rule's C0..C4
# (the layout's, fused_lr/core/layout.py), and 1 - C0 and 1 - C1 as torch.lerp computes 1 - its
# weight, in the tensor dtype (the kernels cannot write a literal 1 in that dtype: a literal would
# promote float32 arithmetic to float64).
(CONST_NEG_LR, CONST_WD, CONST_KEEP, CONST_INV_SCALE, CONST_CLIP, CONST_CLIP_COEF, CONST_FIRST, CONST_C0, CONST_C1,
 CONST_C2, CONST_C3, CONST_C4, CONST_ONE_MINUS_C0, CONST_ONE_MINUS_C1) = range(14)
CONST_COLS = 14
_LAYOUT_ID = zlib.crc32(repr((L.TENSOR, L.HYPER, L.FLAGS, L.RULES, L.SCHEDULE_KINDS, L.SIZES, L.LR_KINDS,
                              L.COEF_KINDS, L.PROGRAM_BITS)).encode())


@intrinsic
def _pointer(typingctx, address, like):
    """A raw ``int64`` address as a pointer to ``like``'s element type, for ``carray``."""
    ptr_type = types.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr_type))

    return ptr_type(address, like), codegen


@intrinsic
def _prefetch(typingctx, arr, index):
    """Ask for the cache line holding ``arr[index]`` (a hint: it never faults, past the end included)."""

    def codegen(context, builder, signature, args):
        ptr = builder.gep(context.make_array(signature.args[0])(context, builder, args[0]).data, [args[1]])
        if getattr(ptr.type, "is_opaque", False):
            name = "llvm.prefetch.p0"
        else:  # llvmlite before opaque pointers
            ptr, name = builder.bitcast(ptr, ir.IntType(8).as_pointer()), "llvm.prefetch.p0i8"
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32]),
                                            name)
        builder.call(fn, [ptr, i32(0), i32(3), i32(1)])  # read, keep in every cache level, data
        return context.get_dummy_value()

    return types.void(arr, index), codegen


# Why the kernels compile without Numba's on-disk cache in this process (None: they use it).
NO_CACHE: str | None = None


def cached_jit(**options):
    """``njit(cache=True, **options)``, or ``njit(**options)`` where Numba has nowhere to cache.

    Numba picks a kernel's cache directory when the decorator runs (numba/core/caching.py,
    ``CacheImpl``): NUMBA_CACHE_DIR, then the source's ``__pycache__``, then the user-wide
    ``~/.cache/numba`` (XDG_CACHE_HOME), each only if it can create the directory and a file in
    it; when none can, the decorator raises ``RuntimeError: cannot cache function ...: no locator
    available`` (a read-only install with a read-only home, as in locked-down containers). The
    locator for a module inside a zip archive takes its directory untried, and then the first
    compile fails instead (OSError), so that directory is tried here, at decoration. Either way
    the kernel compiles afresh in each process instead, which changes its speed, not its numbers."""

    def decorate(function):
        global NO_CACHE
        try:
            kernel = njit(cache=True, **options)(function)
            locator = getattr(getattr(getattr(kernel, "_cache", None), "_impl", None), "locator", None)
            if locator is not None:
                locator.ensure_cache_path()
            return kernel
        except (RuntimeError, OSError) as e:  # retried uncached: an error that is not the cache's recurs
            NO_CACHE = f"{type(e).__name__}: {e}"
        return njit(**options)(function)

    return decorate


# the Python evaluator itself, compiled: one definition of the schedule maths for host and CPU kernel
eval_table = cached_jit()(schedules.eval_table)


# The norm reads each chunk as eight equal slices side by side: on one core, loads in flight, not
# instructions, bound a read-only pass, and eight streams keep enough of them in flight for the
# hardware prefetchers (benchmarks/README.md, "Kernel design measurements"). The slicing is fixed
# by the chunk list, so the sum is the same on every run and thread count; reassoc vectorises the
# float64 accumulation within that order, contract fuses each square into its sum (a float32
# square is exact in float64; a float64 one then rounds once instead of twice).


@njit(inline="always")
def eight_slices(x):
    """``x`` cut into eight equal slices, read side by side by the caller, and the tail after them."""
    q = x.shape[0] // 8
    return (x[:q], x[q:2 * q], x[2 * q:3 * q], x[3 * q:4 * q], x[4 * q:5 * q], x[5 * q:6 * q], x[6 * q:7 * q],
            x[7 * q:8 * q], x[8 * q:])


@njit(inline="always")
def _sq(x, inv, clip, plain):
    """One processed gradient element, squared in float64."""
    if not plain:
        x = min(max(x * inv, -clip), clip)
    return np.float64(x) * np.float64(x)


@njit(inline="always", fastmath={"reassoc", "contract"})
def _sumsq_chunk(g, inv, clip, plain):
    """Sum of squares of one chunk, its eight slices read side by side, then the tail."""
    s0, s1, s2, s3, s4, s5, s6, s7, tail = eight_slices(g)
    acc = 0.0
    for i in range(s0.shape[0]):
        acc += ((_sq(s0[i], inv, clip, plain) + _sq(s1[i], inv, clip, plain))
                + (_sq(s2[i], inv, clip, plain) + _sq(s3[i], inv, clip, plain))) \
            + ((_sq(s4[i], inv, clip, plain) + _sq(s5[i], inv, clip, plain))
               + (_sq(s6[i], inv, clip, plain) + _sq(s7[i], inv, clip, plain)))
    for i in range(tail.shape[0]):
        acc += _sq(tail[i], inv, clip, plain)
    return acc


@cached_jit(parallel=True, fastmath={"reassoc", "contract"})
def sumsq(table, chunk_t, chunk_lo, chunk_hi, scalars):
    """Sum of squares of the processed gradients (unscaled, value-clipped), in float64.

    ``scalars`` (tensor dtype) = [1/grad_scale, clip value or inf]: its dtype selects the
    tensors' element type."""
    partial = np.zeros(chunk_t.shape[0])
    inv, clip = scalars[0], scalars[1]
    # No scaler and no value clip (the usual step): x is g exactly (g·1 = g, and the clamp to ±inf
    # keeps every value, NaN included), so a loop without the multiply and the clamp sums the same
    # values with fewer instructions per cache line.
    plain = inv == 1 and clip == np.inf
    for c in prange(chunk_t.shape[0]):
        t = chunk_t[c]
        # a zero-based slice: indices provably >= 0 let LLVM drop the wraparound check and vectorise
        g = carray(_pointer(table[t, T_GRAD], scalars), table[t, T_NUMEL])[chunk_lo[c]:chunk_hi[c]]
        partial[c] = _sumsq_chunk(g, inv, clip, True) if plain else _sumsq_chunk(g, inv, clip, False)
    return partial.sum()


@njit(inline="always")
def _slot(program, i):
    """(kind, column) of slot i of a coefficient program (fused_lr/core/layout.py, program)."""
    code = (program >> (PROGRAM_BITS * i)) & ((1 << PROGRAM_BITS) - 1)
    return code >> 3, code & 7


@cached_jit(error_model="numpy")
def prepare(table, hyper, schedules_, clocks, scalars, consts, program):
    """Per tensor: lr = kernel lr x schedule(group clock) x the gradient-norm rate, the rule's
    coefficients by its ``program`` from its hyper columns and the tensor's step count (bias
    corrections, Adagrad's decay), and every scalar rounded to the tensor dtype. ``scalars``
    (float64) = [1/grad_scale, clip value or inf, clip coefficient (1 when off), gradient-norm rate
    (1 when off)]."""
    k_like = np.zeros(1, np.float32)
    group_lr = np.empty(hyper.shape[0])  # the schedule is the group's: evaluated once per group
    for gi in range(hyper.shape[0]):
        group_lr[gi] = hyper[gi, H_LR] * eval_table(schedules_[gi], np.float64(clocks[gi])) * scalars[3]
    for t in range(table.shape[0]):
        gi = table[t, T_GROUP]
        h = hyper[gi]
        lr = group_lr[gi]
        step = np.float64(carray(_pointer(table[t, T_STEP], k_like), 1)[0])
        t_ = step + 1.0  # the step count after this update
        c = consts[t]
        c[CONST_WD] = h[H_WEIGHT_DECAY]
        c[CONST_KEEP] = 1.0 - lr * h[H_WEIGHT_DECAY]
        c[CONST_INV_SCALE] = scalars[0]
        c[CONST_CLIP] = scalars[1]
        c[CONST_CLIP_COEF] = scalars[2]
        c[CONST_FIRST] = 1.0 if step == 0 else 0.0
        kind, j = _slot(program, 0)
        r = h[H_R0 + j]
        if kind == LRK_PLAIN:
            c[CONST_NEG_LR] = -lr
        elif kind == LRK_BIAS:
            c[CONST_NEG_LR] = -(lr / (1.0 - r ** t_))
        elif kind == LRK_DECAY:
            c[CONST_NEG_LR] = -(lr / (1.0 + step * r))  # step = t - 1 earlier updates
        else:  # a kind without a formula here: a visible NaN step, never another kind's
            c[CONST_NEG_LR] = np.nan
        for i in range(RULE_COLS):
            kind, j = _slot(program, i + 1)
            r = h[H_R0 + j]
            if kind == CK_ZERO:
                c[CONST_C0 + i] = 0.0
            elif kind == CK_COPY:
                c[CONST_C0 + i] = r
            elif kind == CK_ONE_MINUS:
                c[CONST_C0 + i] = 1.0 - r
            elif kind == CK_SQRT_BIAS:
                c[CONST_C0 + i] = (1.0 - r ** t_) ** 0.5
            else:
                c[CONST_C0 + i] = np.nan
        # read back in the tensor dtype: float32's 1 - w rounded once from the exact float64
        # difference is the float32 subtraction's result
        c[CONST_ONE_MINUS_C0] = 1.0 - c[CONST_C0]
        c[CONST_ONE_MINUS_C1] = 1.0 - c[CONST_C1]


@njit(inline="always", error_model="numpy")
def _common(g, w, k, decay, decoupled):
    """docs/step.md steps 0-5 on one element: the processed, clipped and (coupled) decayed
    gradient, and the (decoupled) decayed parameter. ``k`` = (±1/scale, clip, coef, wd, keep) from
    :func:`_commons`, held in locals by the caller: loads from the constants array inside the loop
    could alias the tensors' stores, so LLVM would reload them every element and not vectorise."""
    inv, clip, coef, wd, keep = k
    x = min(max(g * inv, -clip), clip) * coef
    if decay:
        if decoupled:
            w = w * keep
        else:
            x = x + wd * w
    return x, w


@njit(inline="always")
def _commons(cs, flags):
    """The constants of :func:`_common`; maximize is folded into 1/scale (g·(-s) is -(g·s) exactly,
    round to nearest being symmetric), so the loop has no branch for it."""
    inv = -cs[CONST_INV_SCALE] if (flags & F_MAXIMIZE) != 0 else cs[CONST_INV_SCALE]
    return inv, cs[CONST_CLIP], cs[CONST_CLIP_COEF], cs[CONST_WD], cs[CONST_KEEP]


# The update loops, software-prefetched, BLOCK elements at a time with hints a block ahead by
# PREFETCH_BYTES: Adam's square root and divisions keep too few loads in flight for the hardware
# prefetchers alone to reach streaming bandwidth. The norm takes eight streams instead of hints, and
# the hint loops stay written out in each rule (benchmarks/README.md, "Kernel design measurements").
PREFETCH_BYTES, BLOCK = 4096, 64


@njit(inline="always", error_model="numpy")
def _sgd_chunk(p, g, b, cs, flags, decay, momentum):
    """The SGD rule on one chunk (b is unused without momentum)."""
    k = _commons(cs, flags)
    neg_lr, mu, gain = cs[CONST_NEG_LR], cs[CONST_C0], cs[CONST_C1]
    nesterov, decoupled = (flags & F_NESTEROV) != 0, (flags & F_DECOUPLED) != 0
    first = cs[CONST_FIRST] != 0
    n, ahead, line = p.shape[0], PREFETCH_BYTES // p.itemsize, 64 // p.itemsize
    for blk in range(0, n, BLOCK):
        for q in range(blk + ahead, blk + ahead + BLOCK, line):
            _prefetch(p, q)
            _prefetch(g, q)
            if momentum:
                _prefetch(b, q)
        e = min(blk + BLOCK, n)
        pb, gb, bb = p[blk:e], g[blk:e], b[blk:e]
        for i in range(pb.shape[0]):
            x, w = _common(gb[i], pb[i], k, decay, decoupled)
            if momentum:
                m = x if first else bb[i] * mu + gain * x
                bb[i] = m
                x = x + mu * m if nesterov else m
            pb[i] = w + neg_lr * x


@njit(inline="always")
def _lerp_coef(w, omw):
    """torch.lerp(a, b, w) as ``(a if low else b) + coef * (b - a)``, the form of torch's vectorised
    lerp: ``a + w·(b − a)`` for w < 0.5, else ``b − (b − a)·(1 − w)``, written with the negated
    coefficient (exact). Both in the tensor dtype: ``1 - w`` with a literal 1 would compute the
    second formula, and everything downstream of it, in float64 for float32 tensors."""
    low = w < 0.5
    return low, w if low else -omw


@njit(inline="always", error_model="numpy")
def _adam_chunk(p, g, m, v, vmax, cs, flags, decay, amsgrad):
    """The Adam rule on one chunk, BLOCK elements at a time; vmax is read and written only with
    amsgrad."""
    k = _commons(cs, flags)
    neg_step, b2, w2, bc2, eps = cs[CONST_NEG_LR], cs[CONST_C1], cs[CONST_C2], cs[CONST_C3], cs[CONST_C4]
    low, cm = _lerp_coef(cs[CONST_C0], cs[CONST_ONE_MINUS_C0])
    decoupled = (flags & F_DECOUPLED) != 0
    n, ahead, line = p.shape[0], PREFETCH_BYTES // p.itemsize, 64 // p.itemsize
    for b in range(0, n, BLOCK):
        for q in range(b + ahead, b + ahead + BLOCK, line):
            _prefetch(p, q)
            _prefetch(g, q)
            _prefetch(m, q)
            _prefetch(v, q)
            if amsgrad:
                _prefetch(vmax, q)
        e = min(b + BLOCK, n)
        pb, gb, mb, vb, xb = p[b:e], g[b:e], m[b:e], v[b:e], vmax[b:e]
        for i in range(pb.shape[0]):
            x, w = _common(gb[i], pb[i], k, decay, decoupled)
            mo = mb[i]
            mi = (mo if low else x) + cm * (x - mo)
            vi = vb[i] * b2 + w2 * x * x
            mb[i] = mi
            vb[i] = vi
            if amsgrad:
                xo = xb[i]
                vi = xo if xo > vi or xo != xo else vi  # torch.maximum: NaN from either side
                xb[i] = vi
            pb[i] = w + neg_step * mi / (np.sqrt(vi) / bc2 + eps)


@njit(inline="always", error_model="numpy")
def _rmsprop_chunk(p, g, s, b, c, cs, flags, decay, momentum, centered):
    """The RMSprop rule on one chunk; b (momentum) and c (centered) are used only when enabled."""
    k = _commons(cs, flags)
    neg_lr, alpha, w1, eps, mu = cs[CONST_NEG_LR], cs[CONST_C0], cs[CONST_C1], cs[CONST_C2], cs[CONST_C3]
    low, cc = _lerp_coef(w1, cs[CONST_ONE_MINUS_C1])
    for i in range(p.shape[0]):
        x, w = _common(g[i], p[i], k, decay, False)
        si = s[i] * alpha + w1 * x * x
        s[i] = si
        if centered:
            co = c[i]
            ci = (co if low else x) + cc * (x - co)
            c[i] = ci
            avg = np.sqrt(si + -ci * ci) + eps
        else:
            avg = np.sqrt(si) + eps
        if momentum:
            bi = b[i] * mu + x / avg
            b[i] = bi
            p[i] = w + neg_lr * bi
        else:
            p[i] = w + neg_lr * x / avg


@njit(inline="always", error_model="numpy")
def _adagrad_chunk(p, g, s, cs, flags, decay):
    """The Adagrad rule on one chunk."""
    k = _commons(cs, flags)
    neg_clr, eps = cs[CONST_NEG_LR], cs[CONST_C0]
    for i in range(p.shape[0]):
        x, w = _common(g[i], p[i], k, decay, False)
        si = s[i] + x * x
        s[i] = si
        p[i] = w + neg_clr * x / (np.sqrt(si) + eps)


# error_model="numpy": a float division by zero gives inf/nan as in torch, instead of Python's
# ZeroDivisionError check on every element (which also stops LLVM from vectorising the loop)
@cached_jit(parallel=True, error_model="numpy")
def update(table, chunk_t, chunk_lo, chunk_hi, hyper, schedules_, clocks, scalars, consts, rule, program):
    """:func:`prepare`'s per-tensor constants (in the same call: one dispatch less per step), the
    update of every chunk, then every tensor's step count + 1 (the host advances the group clocks
    once every dtype's call has read them)."""
    prepare(table, hyper, schedules_, clocks, scalars, consts, program)
    for c in prange(chunk_t.shape[0]):
        t = chunk_t[c]
        h = hyper[table[t, T_GROUP]]
        flags = np.int64(h[H_FLAGS])
        n, lo, hi = table[t, T_NUMEL], chunk_lo[c], chunk_hi[c]
        p = carray(_pointer(table[t, T_PARAM], consts), n)[lo:hi]
        g = carray(_pointer(table[t, T_GRAD], consts), n)[lo:hi]
        decay = h[H_WEIGHT_DECAY] != 0
        # Each optional state gets its own call with the flag as a constant, so the inlined loop of
        # each variant never touches the stand-in array of an absent state: a stand-in aliasing a
        # real one would make LLVM's run-time overlap test fail and run the loop unvectorised.
        if rule == RULE_SGD:
            if h[H_R0] != 0:
                b = carray(_pointer(table[t, T_STATE0], consts), n)[lo:hi]
                _sgd_chunk(p, g, b, consts[t], flags, decay, True)
            else:
                _sgd_chunk(p, g, p, consts[t], flags, decay, False)
        elif rule == RULE_ADAM:
            m = carray(_pointer(table[t, T_STATE0], consts), n)[lo:hi]
            v = carray(_pointer(table[t, T_STATE1], consts), n)[lo:hi]
            if (flags & F_AMSGRAD) != 0:
                vmax = carray(_pointer(table[t, T_STATE2], consts), n)[lo:hi]
                _adam_chunk(p, g, m, v, vmax, consts[t], flags, decay, True)
            else:
                _adam_chunk(p, g, m, v, v, consts[t], flags, decay, False)
        elif rule == RULE_RMSPROP:
            s = carray(_pointer(table[t, T_STATE0], consts), n)[lo:hi]
            # state order: square_avg, then momentum_buffer if momentum, then grad_avg if centered
            b = carray(_pointer(table[t, T_STATE1], consts), n)[lo:hi]
            c = carray(_pointer(table[t, T_STATE2], consts), n)[lo:hi]
            momentum, centered = h[H_R2] > 0, (flags & F_CENTERED) != 0
            if momentum and centered:
                _rmsprop_chunk(p, g, s, b, c, consts[t], flags, decay, True, True)
            elif momentum:
                _rmsprop_chunk(p, g, s, b, s, consts[t], flags, decay, True, False)
            elif centered:
                _rmsprop_chunk(p, g, s, s, b, consts[t], flags, decay, False, True)
            else:
                _rmsprop_chunk(p, g, s, s, s, consts[t], flags, decay, False, False)
        elif rule == RULE_ADAGRAD:
            s = carray(_pointer(table[t, T_STATE0], consts), n)[lo:hi]
            _adagrad_chunk(p, g, s, consts[t], flags, decay)
        else:  # a rule without an update here: a visible result, never another rule's (the host refuses it first)
            p[:] = np.nan
    k_like = np.zeros(1, np.float32)
    for t in range(table.shape[0]):
        carray(_pointer(table[t, T_STEP], k_like), 1)[0] += 1


def _serial(kernel, **options):
    """``kernel`` compiled for one thread, as a function of its own name: Numba's on-disk cache
    files a function under its qualified name and line, whatever the compile options, so a serial
    twin of the same function object would load the parallel machine code or hand its own to the
    parallel kernel, whichever was cached first."""
    f = kernel.py_func
    twin = FunctionType(f.__code__, f.__globals__, f.__name__ + "_serial", f.__defaults__, f.__closure__)
    twin.__qualname__ = f.__qualname__ + "_serial"
    return cached_jit(**options)(twin)


# The same passes on one thread, for work too small to pay for waking the thread pool (a few
# hundred thousand elements take less than the pool's start-up).
sumsq_serial = _serial(sumsq, fastmath={"reassoc", "contract"})
update_serial = _serial(update, error_model="numpy")


@cached_jit()
def _layout_id():
    return _LAYOUT_ID


# Uncached (NO_CACHE), _layout_id compiles here from this layout and the test always passes; a kernel
# without a cache flushes nothing (Numba's NullCache) and recompiles from the current source.
if _layout_id() != _LAYOUT_ID:  # machine code cached against another layout: compile afresh
    for _kernel in (_layout_id, eval_table, sumsq, prepare, update, sumsq_serial, update_serial):
        _kernel._cache.flush()
        _kernel.recompile()
