"""FusedSGD: torch.optim.SGD + clipping + a fused lr schedule (see docs/step.md)."""

from fused_lr.core.optimizer import FusedSGD

__all__ = ["FusedSGD"]
