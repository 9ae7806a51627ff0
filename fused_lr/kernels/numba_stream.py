"""Plain streaming passes that measure this machine's memory bandwidth for the benchmark.

A clipped step must read every gradient once for the global norm, then make its update's passes:
SGD with momentum reads param, grad and buffer and writes param and buffer; AdamW reads param,
grad and both moments and writes param and both moments. These kernels move exactly those bytes
with no arithmetic to speak of, parallel over the same cores, so their time is the bound a step
can approach.
"""

import numpy as np
from numba import prange

from fused_lr.kernels.numba_kernels import cached_jit, eight_slices


@cached_jit(parallel=True, fastmath={"reassoc"})
def read_pass(g, chunk):
    """Read ``g`` once (the norm pass's traffic), at its fastest here: ``chunk`` elements at a time
    (the fused kernels' work item, an argument so that cached machine code never holds a stale
    size), each chunk as eight slices read side by side (one sequential stream per core keeps too
    few loads in flight; see fused_lr/kernels/numba_kernels.py)."""
    n = g.shape[0]
    partial = np.zeros((n + chunk - 1) // chunk)
    for c in prange(partial.shape[0]):
        s0, s1, s2, s3, s4, s5, s6, s7, tail = eight_slices(g[c * chunk:min(n, (c + 1) * chunk)])
        acc = 0.0
        for i in range(s0.shape[0]):
            acc += ((s0[i] + s1[i]) + (s2[i] + s3[i])) + ((s4[i] + s5[i]) + (s6[i] + s7[i]))
        for i in range(tail.shape[0]):
            acc += tail[i]
        partial[c] = acc
    return partial.sum()


@cached_jit(parallel=True)
def update_pass(p, g, b):
    """Read p, g, b and write p, b (the update pass's traffic)."""
    for i in prange(p.shape[0]):
        m = b[i] + g[i]
        b[i] = m
        p[i] = p[i] - m


@cached_jit(parallel=True)
def adam_pass(p, g, m, v):
    """Read p, g, m, v and write p, m, v (AdamW's update traffic)."""
    for i in prange(p.shape[0]):
        mi = m[i] + g[i]
        vi = v[i] + g[i]
        m[i] = mi
        v[i] = vi
        p[i] = p[i] - mi * vi
