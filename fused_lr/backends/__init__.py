"""The one place backends register. Each entry names a module with a ``load()`` that returns
the backend class or raises :class:`BackendUnavailable` saying why it cannot run here; any other
exception from the module's import or its ``load()`` makes the backend unavailable too."""

from __future__ import annotations

import importlib
from functools import cache

import torch

from fused_lr.core.plan import Backend


class BackendUnavailable(RuntimeError):
    pass


# name -> module defining load(); order within each device's preference list below.
_MODULES = {
    "reference": "fused_lr.backends.reference",
    "numba": "fused_lr.backends.numba",
    "triton": "fused_lr.backends.triton",
    "cuda": "fused_lr.backends.cuda",
}
NAMES = tuple(_MODULES)
# what backend="auto" picks, best first, by the parameters' device type
_AUTO = {"cuda": ("cuda", "triton", "reference"), "cpu": ("numba", "reference")}


def _one_line(error: BaseException, limit: int = 400) -> str:
    """``error``'s message on one line (whitespace runs collapsed), at most ``limit`` characters."""
    text = " ".join(str(error).split()) or "(no message)"
    return text if len(text) <= limit else text[:limit - 3] + "..."


@cache
def _load(name: str):
    """The backend class, or the reason (a one-line string) it is unavailable. A backend degrades,
    never breaks: whatever its import or ``load()`` raises (a too-old dependency's AttributeError,
    a compiler's RuntimeError, ...) makes it unavailable, with the exception's type and message
    as the reason, and ``backend="auto"`` moves on to the next one."""
    module_name = _MODULES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        return f"cannot import {module_name}: {_one_line(e)}"
    except Exception as e:  # anything else a broken install raises on import
        return f"importing {module_name} failed: {type(e).__name__}: {_one_line(e)}"
    try:
        return module.load()
    except BackendUnavailable as e:
        return _one_line(e)
    except Exception as e:  # a too-old dependency, a failed compile, ...
        return f"{module_name}.load() failed: {type(e).__name__}: {_one_line(e)}"


def available_backends() -> dict[str, bool | str]:
    """``name -> True`` for each usable backend, ``name -> "reason"`` for each missing one."""
    return {name: True if not isinstance(r := _load(name), str) else r for name in NAMES}


def devices(name: str) -> frozenset[str]:
    """Device types an available backend runs on (empty when it is unavailable)."""
    cls = _load(name)
    return frozenset() if isinstance(cls, str) else cls.devices


def check_name(name: str) -> None:
    if name != "auto" and name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of {('auto', *NAMES)}")
    if name != "auto" and isinstance(reason := _load(name), str):
        raise RuntimeError(f"backend {name!r} is unavailable: {reason}")


def create(name: str, device: torch.device) -> Backend:
    """A fresh backend instance for parameters on ``device`` (one per optimizer: they cache)."""
    check_name(name)
    if name == "auto":
        for candidate in _AUTO.get(device.type, ("reference",)):
            cls = _load(candidate)
            if not isinstance(cls, str) and device.type in cls.devices:
                return cls()
        raise RuntimeError(f"no backend runs on {device.type} tensors here: {available_backends()}")
    cls = _load(name)
    if device.type not in cls.devices:
        raise RuntimeError(
            f"backend {name!r} runs on {sorted(cls.devices)} tensors, but the parameters are on {device}"
        )
    return cls()
