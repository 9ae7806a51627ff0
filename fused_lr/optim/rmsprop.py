"""FusedRMSprop: ``torch.optim.RMSprop`` + clipping + a fused lr schedule.

The rule (docs/step.md, "Beyond SGD"): ``s <- a s + (1 - a) g^2``; centered: ``c <- c + (1 - a)(g - c)``
and ``avg = sqrt(s - c^2) + eps``, else ``avg = sqrt(s) + eps``; with momentum ``b <- mu b + g / avg``
and ``p <- p - lr b``, else ``p <- p - lr g / avg``: the average-gradient rate lr / sqrt(E[g^2]).
Kernels: the RULE_RMSPROP branches of fused_lr/kernels/ and csrc/.
"""

from __future__ import annotations

import torch

from fused_lr.core import layout as L
from fused_lr.core.hyper import Hyper, flag, real
from fused_lr.core.optimizer import FusedOptimizer


class FusedRMSprop(FusedOptimizer):
    """RMSprop with gradient clipping and an lr schedule, fused; arguments follow
    ``torch.optim.RMSprop`` (everything after ``centered`` keyword-only)."""

    rule = L.RULE_RMSPROP
    # lr; alpha, 1 - alpha, eps, momentum (rule_row: alpha, eps, momentum)
    coefficients = L.program(("PLAIN", 0), ("COPY", 0), ("ONE_MINUS", 0), ("COPY", 1), ("COPY", 2))
    hypers = (
        Hyper("alpha", 0.99, real(0.0, 1.0)),
        Hyper("eps", 1e-8, real(0.0, low_open=True)),
        Hyper("momentum", 0.0, real(0.0, 1.0, high_open=True)),
        Hyper("centered", False, flag()),
    )

    def __init__(self, params, lr: float | torch.Tensor = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False, *, maximize: bool = False,
                 **shared):
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                        centered=centered, maximize=maximize, decoupled_weight_decay=False)
        super().__init__(params, defaults, **shared)

    def state_names(self, group: dict) -> tuple[str, ...]:
        return ("square_avg",) + (("momentum_buffer",) if group["momentum"] > 0 else ()) \
            + (("grad_avg",) if group["centered"] else ())

    def rule_row(self, group: dict) -> tuple[int, tuple[float, ...]]:
        return (L.F_CENTERED if group["centered"] else 0), (group["alpha"], group["eps"], group["momentum"])

    @staticmethod
    def reference_rule(p, g, states, step, lr, group) -> None:
        alpha, eps, momentum = group["alpha"], group["eps"], group["momentum"]
        square_avg = states["square_avg"]
        square_avg.mul_(alpha).addcmul_(g, g, value=1 - alpha)
        if group["centered"]:
            grad_avg = states["grad_avg"]
            grad_avg.lerp_(g, 1 - alpha)
            avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
        else:
            avg = square_avg.sqrt()
        avg = avg.add_(eps)
        if momentum > 0:
            buf = states["momentum_buffer"]
            buf.mul_(momentum).addcdiv_(g, avg)
            p.add_(buf, alpha=-lr)
        else:
            p.addcdiv_(g, avg, value=-lr)


__all__ = ["FusedRMSprop"]
