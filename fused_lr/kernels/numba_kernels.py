"""The Numba kernels of a step (docs/step.md): the global squared norm and the fused update, each
one ``prange`` over a flat work list of chunks cut from every tensor of one dtype, reaching the
tensors through the plan's tensor table of raw addresses (layout: fused_lr/core/layout.py).

Pure compute: the host side (fused_lr/backends/numba.py) checks that every address is plain
memory of the dtype the call assumes, which the ``scalars``/``consts`` argument's dtype selects.
"""

from __future__ import annotations

import zlib

import numpy as np
from numba import carray, njit, prange, types
from numba.extending import intrinsic

from fused_lr import schedules
from fused_lr.core import layout as L

# Module globals are compile-time constants to Numba, and cached machine code does not notice
# when layout.py changes: _LAYOUT_ID guards that (see the end of this module).
T_PARAM, T_GRAD, T_STATE0, T_STEP, T_NUMEL, T_GROUP = L.T_PARAM, L.T_GRAD, L.T_STATE0, L.T_STEP, L.T_NUMEL, L.T_GROUP
H_LR, H_WD, H_FLAGS, H_R0, H_R1 = L.H_LR, L.H_WEIGHT_DECAY, L.H_FLAGS, L.H_R0, L.H_R1
F_MAXIMIZE, F_DECOUPLED, F_NESTEROV = L.F_MAXIMIZE, L.F_DECOUPLED, L.F_NESTEROV
RULE_SGD = L.RULE_SGD
# columns of the per-tensor constants, stored in the tensor's own dtype so the arithmetic is the
# one torch does with a Python scalar (the scalar rounded to the tensor dtype first)
C_NEGLR, C_WD, C_KEEP, C_MU, C_GAIN, C_INV, C_CLIP, C_COEF, C_INIT = range(9)
CONST_COLS = 9
_LAYOUT_ID = zlib.crc32(repr((L.TENSOR, L.HYPER, L.FLAGS, L.RULES, L.SCHEDULE_KINDS, L.SIZES)).encode())


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
def sumsq(table, chunk_t, chunk_lo, chunk_hi, scalars):
    """Sum of squares of the processed gradients (unscaled, value-clipped), in float64.

    ``scalars`` (tensor dtype) = [1/grad_scale, clip value or inf]: its dtype selects the
    tensors' element type."""
    partial = np.zeros(chunk_t.shape[0])
    inv, clip = scalars[0], scalars[1]
    for c in prange(chunk_t.shape[0]):
        t = chunk_t[c]
        # a zero-based slice: indices provably >= 0 let LLVM drop the wraparound check and vectorise
        g = carray(_pointer(table[t, T_GRAD], scalars), table[t, T_NUMEL])[chunk_lo[c]:chunk_hi[c]]
        acc = 0.0
        for i in range(g.shape[0]):
            x = min(max(g[i] * inv, -clip), clip)
            acc += np.float64(x) * np.float64(x)
        partial[c] = acc
    return partial.sum()


@njit(cache=True)
def prepare(table, hyper, schedules_, clocks, scalars, consts):
    """Per tensor: lr = kernel lr x schedule(group clock), the first-use flag from the tensor's
    step count, and every scalar rounded to the tensor dtype. ``scalars`` (float64) =
    [1/grad_scale, clip value or inf, clip coefficient (1 when off)]."""
    k_like = np.zeros(1, np.float32)
    for t in range(table.shape[0]):
        gi = table[t, T_GROUP]
        h = hyper[gi]
        lr = h[H_LR] * eval_table(schedules_[gi], np.float64(clocks[gi]))
        step = carray(_pointer(table[t, T_STEP], k_like), 1)[0]
        consts[t, C_NEGLR] = -lr
        consts[t, C_WD] = h[H_WD]
        consts[t, C_KEEP] = 1.0 - lr * h[H_WD]
        consts[t, C_MU] = h[H_R0]
        consts[t, C_GAIN] = h[H_R1]
        consts[t, C_INV] = scalars[0]
        consts[t, C_CLIP] = scalars[1]
        consts[t, C_COEF] = scalars[2]
        consts[t, C_INIT] = 1.0 if step == 0 else 0.0


@njit(inline="always")
def _sgd_chunk(p, g, b, cs, flags, decay, momentum):
    """docs/step.md steps 0-7 with the SGD rule on one chunk (b is unused without momentum)."""
    neg_lr, wd, keep, mu, gain = cs[C_NEGLR], cs[C_WD], cs[C_KEEP], cs[C_MU], cs[C_GAIN]
    inv, clip, coef = cs[C_INV], cs[C_CLIP], cs[C_COEF]
    maximize, nesterov, decoupled = (flags & F_MAXIMIZE) != 0, (flags & F_NESTEROV) != 0, (flags & F_DECOUPLED) != 0
    first = cs[C_INIT] != 0
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


@njit(parallel=True, cache=True)
def update(table, chunk_t, chunk_lo, chunk_hi, hyper, consts, rule):
    """The update of every chunk, then every tensor's step count + 1 (the host advances the group
    clocks once every dtype's call has read them)."""
    for c in prange(chunk_t.shape[0]):
        t = chunk_t[c]
        h = hyper[table[t, T_GROUP]]
        flags = np.int64(h[H_FLAGS])
        n, lo, hi = table[t, T_NUMEL], chunk_lo[c], chunk_hi[c]
        p = carray(_pointer(table[t, T_PARAM], consts), n)[lo:hi]
        g = carray(_pointer(table[t, T_GRAD], consts), n)[lo:hi]
        if rule == RULE_SGD:
            momentum = h[H_R0] != 0
            b = carray(_pointer(table[t, T_STATE0 if momentum else T_PARAM], consts), n)[lo:hi]
            _sgd_chunk(p, g, b, consts[t], flags, h[H_WD] != 0, momentum)
    k_like = np.zeros(1, np.float32)
    for t in range(table.shape[0]):
        carray(_pointer(table[t, T_STEP], k_like), 1)[0] += 1


@njit(cache=True)
def _layout_id():
    return _LAYOUT_ID


if _layout_id() != _LAYOUT_ID:  # machine code cached against another layout: compile afresh
    for _kernel in (_layout_id, eval_table, sumsq, prepare, update):
        _kernel._cache.flush()
        _kernel.recompile()
