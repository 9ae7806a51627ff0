"""Where new optimizer state lives (docs/step.md, "State and checkpoints").

A step streams every parameter, gradient and state tensor once. State made one allocation per
tensor lies scattered over the address space; laid out back to back in one mapping on 2 MiB pages
(a TLB entry then covers 512 times the memory), the SGD update over ResNet-50's parameters ran ~7 %
faster on this project's CPU machine (~4 % from the contiguity alone). So on a Linux CPU the state
a plan binds is one private anonymous mapping that asks for transparent huge pages (granted where
the system allows them on request), each state tensor laid out like its parameter on a cache line
of its own. Each tensor keeps a storage of its own over its stretch of the mapping: a checkpoint
or a pickle of a state tensor holds its own bytes only (a view of one shared storage would carry
the whole block into every pickle). Elsewhere (another OS, a GPU, state under a huge page in all)
each tensor is its own allocation.
"""

from __future__ import annotations

import mmap

import torch

from fused_lr.core.plan import addressable_problem

LINE = 64  # bytes: every tensor starts on a cache line (so 16-byte vector access stays aligned)
HUGE_PAGE = 2 << 20


def states_like(likes: list[torch.Tensor], fills: list[float]) -> list[torch.Tensor]:
    """Per ``likes[i]`` (tensors on one device), a tensor laid out like it holding ``fills[i]``: over
    one mapping when they are plain, dense CPU tensors of a huge page or more in all."""
    offsets, nbytes = [], 0
    for t in likes:
        offsets.append(nbytes)
        nbytes += -(-t.numel() * t.element_size() // LINE) * LINE
    if nbytes < HUGE_PAGE or likes[0].device.type != "cpu" or not hasattr(mmap, "MADV_HUGEPAGE") \
            or any(addressable_problem(t) for t in likes):
        return [torch.full_like(t, v, memory_format=torch.preserve_format) for t, v in zip(likes, fills, strict=True)]
    # An anonymous mapping reads as zeros, and every tensor over it keeps it alive. Its length a
    # whole number of huge pages, so that Linux (6.7 and later) starts it on one.
    buf = mmap.mmap(-1, -(-nbytes // HUGE_PAGE) * HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_HUGEPAGE)
    out = []
    for t, off, fill in zip(likes, offsets, fills, strict=True):
        flat = torch.frombuffer(buf, dtype=t.dtype, count=t.numel(), offset=off) if t.numel() else \
            torch.empty(0, dtype=t.dtype)
        s = flat.as_strided(t.shape, t.stride())  # dense: the same span of numel elements
        if fill != 0:
            s.fill_(fill)
        out.append(s)
    return out
