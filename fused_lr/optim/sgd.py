"""FusedSGD: ``torch.optim.SGD`` + clipping + a fused lr schedule, as a declaration on the core.

Its rule (docs/step.md step 6): momentum ``b <- g`` on the buffer's first use, else
``b <- mu*b + (1 - dampening)*g``; direction ``g + mu*b`` with nesterov, else ``b``; without
momentum the direction is ``g``. The kernels' versions of the same rule are the RULE_SGD
branches of fused_lr/kernels/ and csrc/.
"""

from __future__ import annotations

import torch

from fused_lr.core import layout as L
from fused_lr.core.hyper import Hyper, flag, real
from fused_lr.core.optimizer import FusedOptimizer


class FusedSGD(FusedOptimizer):
    """SGD with gradient clipping, weight decay, momentum and an lr schedule, fused.

    Replaces ``clip_grad_value_`` + ``clip_grad_norm_`` + ``torch.optim.SGD`` + an lr scheduler
    with one optimizer step; the semantics are docs/step.md's and equal torch's. Positional
    arguments follow ``torch.optim.SGD``; everything after ``nesterov`` is keyword-only, the
    keywords every fused optimizer shares (``schedule``, ``max_grad_norm``, ...) among them: see
    :class:`~fused_lr.core.optimizer.FusedOptimizer`.
    """

    rule = L.RULE_SGD
    coefficients = L.program(("PLAIN", 0), ("COPY", 0), ("COPY", 1))  # lr; momentum, 1 - dampening
    new_state_restarts_step = True  # a buffer made now (momentum switched on) starts from the gradient
    hypers = (
        Hyper("momentum", 0.0, real(0.0, 1.0, high_open=True)),
        Hyper("dampening", 0.0, real(0.0, 1.0)),
        Hyper("nesterov", False, flag()),
    )

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, decoupled_weight_decay: bool = False,
                 maximize: bool = False, **shared):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)
        super().__init__(params, defaults, **shared)

    def check_group(self, group: dict) -> str | None:
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            return (f"nesterov momentum requires momentum > 0 and zero dampening (got momentum={group['momentum']}, "
                    f"dampening={group['dampening']})")
        return None

    def state_names(self, group: dict) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def rule_row(self, group: dict) -> tuple[int, tuple[float, ...]]:
        return (L.F_NESTEROV if group["nesterov"] else 0), (group["momentum"], 1.0 - group["dampening"])

    @staticmethod
    def reference_rule(p, g, states, step, lr, group) -> None:
        momentum = group["momentum"]
        if momentum != 0:
            buf = states["momentum_buffer"]
            if step == 0:
                buf.copy_(g)
            else:
                buf.mul_(momentum).add_(g, alpha=1 - group["dampening"])
            g = g.add(buf, alpha=momentum) if group["nesterov"] else buf
        p.add_(g, alpha=-lr)


__all__ = ["FusedSGD"]
