"""Plain streaming passes that measure this machine's memory bandwidth for the benchmark.

A clipped SGD step must read every gradient once for the global norm, then read param, grad
and buffer and write param and buffer. These two kernels move exactly those bytes with no
arithmetic to speak of, parallel over the same cores, so their time is the bound a step can
approach.
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
