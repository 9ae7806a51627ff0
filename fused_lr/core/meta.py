"""The per-step check that a plan still describes the tensors: one bulk read of their metadata.

A plan (fused_lr/core/plan.py) caches raw addresses and extents; before each step the optimizer
asks two questions and trusts the plan only when both say nothing moved (docs/step.md, "Memory
safety"):

- :func:`structure` fingerprints every parameter of every group (identity, address, dtype, device,
  sizes, strides) and every entry of ``optimizer.state`` (its keys, its dicts, each state tensor's
  identity and extent). The optimizer keeps the last fingerprint; any difference, whatever the
  user did (``p.data = ...``, an edited param list, a deleted or replaced state entry), sends the
  step through the full checks and a new plan.
- :func:`grads` reads every parameter's gradient and its address, and says whether each present
  one is plain and laid out exactly like its parameter (dtype, device, sizes, strides): only then
  may a kernel walk it with the parameter's extent. Anything else goes through the slow path that
  stages or rejects it.

Two implementations with identical results: the optional compiled helper ``fused_lr._meta``
(libtorch-linked, built by ``pip install`` when torch and a compiler are present; csrc/meta/)
reads the metadata in C++ at ~50 ns a tensor, and this module's pure-Python twin does the same
with Python attribute reads (~1-3 us a tensor). ``IMPL`` names the one in use and ``WHY_PYTHON``
why the twin runs, where it does; ``FUSED_LR_META=python`` forces the twin.
"""

from __future__ import annotations

import os
from array import array

import torch

_PLAIN = (torch.Tensor, torch.nn.Parameter)
# the record's kinds, shared with csrc/meta/meta.cpp
DENSE, OPAQUE, OTHER = 1, 2, 3
_DEVICE = {"cpu": 0, "cuda": 1}


def _tensor(out: list, t: torch.Tensor) -> None:
    """A tensor's record: identity and type; for plain strided memory also its address, dtype
    (the dtype object's identity), device, and every size and stride."""
    out += (id(t), id(type(t)))
    if type(t) not in _PLAIN or t.layout != torch.strided or t.device.type == "meta":
        out.append(OPAQUE)
        return
    device = t.device
    out += (DENSE, t.data_ptr(), id(t.dtype), _DEVICE.get(device.type, 2),
            -1 if device.index is None else device.index, t.dim(), *t.shape, *t.stride())


def _value(out: list, v) -> None:
    if isinstance(v, torch.Tensor):
        _tensor(out, v)
    else:
        out += (OTHER, id(v))


def structure_py(param_lists: list[list], state: dict, expected: bytes | None = None) -> bytes | None:
    """The fingerprint of the parameters and the state, or None when it equals ``expected``."""
    out: list[int] = [len(param_lists)]
    for params in param_lists:
        out.append(len(params))
        for p in params:
            _value(out, p)
    out.append(len(state))
    for key, entry in state.items():
        out += (id(key), id(entry))
        if type(entry) is dict:
            out.append(len(entry))
            for name, v in entry.items():
                out.append(id(name))
                _value(out, v)
        else:
            out.append(OTHER)
    sig = array("q", out).tobytes()
    return None if sig == expected else sig


def grads_py(params: list) -> tuple[list, list[int] | None]:
    """Every parameter's ``.grad``, and their addresses (0 for a missing gradient) when each present
    one is a plain tensor laid out like its parameter (same dtype, device, sizes and strides); None
    instead of the addresses otherwise (another layout or type: the caller's slow path)."""
    grads = [p.grad for p in params]
    ptrs = []
    for p, g in zip(params, grads, strict=True):
        if g is None:
            ptrs.append(0)
            continue
        if type(g) not in _PLAIN or type(p) not in _PLAIN or g.layout != torch.strided \
                or g.device.type == "meta" or g.dtype != p.dtype or g.device != p.device or g.shape != p.shape \
                or g.stride() != p.stride():
            return grads, None
        ptrs.append(g.data_ptr())
    return grads, ptrs


def _compiled():
    """The compiled helper, or None and the reason it is not used."""
    if os.environ.get("FUSED_LR_META", "") == "python":
        return None, "FUSED_LR_META=python"
    try:
        from fused_lr import _meta
    except ImportError as e:
        return None, f"fused_lr._meta does not import: {e}"
    return _meta, None


_C, WHY_PYTHON = _compiled()
IMPL = "python" if _C is None else "compiled"
structure = structure_py if _C is None else _C.structure
grads = grads_py if _C is None else _C.grads
