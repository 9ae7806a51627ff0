"""fused_lr: clipping, weight decay, momentum (or an adaptive rule) and a scheduled lr in one fused
optimizer step.

The names below load on first use, so ``import fused_lr`` (and the ``fused-lr`` CLI's start-up)
does not pay for torch until something needs it.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "FusedSGD": "fused_lr.optim.sgd",
    "FusedAdam": "fused_lr.optim.adam",
    "FusedAdamW": "fused_lr.optim.adam",
    "FusedRMSprop": "fused_lr.optim.rmsprop",
    "FusedAdagrad": "fused_lr.optim.adagrad",
    "available_backends": "fused_lr.backends",
    "BackendUnavailable": "fused_lr.backends",
    "param_groups": "fused_lr.groups",
}
_MODULES = ("schedules", "backends", "core", "optim", "kernels", "groups")
__all__ = ["FusedSGD", "FusedAdam", "FusedAdamW", "FusedRMSprop", "FusedAdagrad", "schedules", "available_backends",
           "BackendUnavailable", "param_groups", "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
    elif name in _MODULES:
        value = import_module(f"fused_lr.{name}")
    else:
        raise AttributeError(f"module 'fused_lr' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__) | set(_MODULES))
