"""Plain streaming passes that measure this machine's memory bandwidth for the benchmark.

A clipped step must read every gradient once for the global norm, then make its update's passes:
SGD with momentum reads param, grad and buffer and writes param and buffer; AdamW reads param,
grad and both moments and writes param and both moments. These kernels move exactly those bytes
with no arithmetic to speak of, parallel over the same cores, so their time is the bound a step
can approach.
"""

from numba import njit, prange


@njit(parallel=True, cache=True, fastmath={"reassoc"})
def read_pass(g):
    """Read ``g`` once (the norm pass's traffic)."""
    acc = 0.0
    for i in prange(g.shape[0]):
        acc += g[i]
    return acc


@njit(parallel=True, cache=True)
def update_pass(p, g, b):
    """Read p, g, b and write p, b (the update pass's traffic)."""
    for i in prange(p.shape[0]):
        m = b[i] + g[i]
        b[i] = m
        p[i] = p[i] - m


@njit(parallel=True, cache=True)
def adam_pass(p, g, m, v):
    """Read p, g, m, v and write p, m, v (AdamW's update traffic)."""
    for i in prange(p.shape[0]):
        mi = m[i] + g[i]
        vi = v[i] + g[i]
        m[i] = mi
        v[i] = vi
        p[i] = p[i] - mi * vi
