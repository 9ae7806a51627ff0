"""fused_lr: clipping, weight decay, momentum and a scheduled lr in one fused optimizer step."""

from . import schedules
from .backends import BackendUnavailable, available_backends
from .optimizer import FusedSGD

__version__ = "0.1.0"
__all__ = ["FusedSGD", "schedules", "available_backends", "BackendUnavailable", "__version__"]
