"""FusedAdagrad: ``torch.optim.Adagrad`` + clipping + a fused lr schedule.

The rule (docs/step.md, "Beyond SGD"), with t the parameter's step count after this update:
``s <- s + g^2``, ``p <- p - lr / (1 + (t - 1) lr_decay) * g / (sqrt(s) + eps)``; the sum starts at
``initial_accumulator_value``. Kernels: the RULE_ADAGRAD branches of fused_lr/kernels/ and csrc/.
"""

from __future__ import annotations

import torch

from fused_lr.core import layout as L
from fused_lr.core.hyper import Hyper, real
from fused_lr.core.optimizer import FusedOptimizer
from fused_lr.schedules import Schedule


class FusedAdagrad(FusedOptimizer):
    """Adagrad with gradient clipping and an lr schedule, fused; arguments follow
    ``torch.optim.Adagrad`` (everything after ``eps`` keyword-only)."""

    rule = L.RULE_ADAGRAD
    hypers = (
        Hyper("lr_decay", 0.0, real(0.0)),
        Hyper("initial_accumulator_value", 0.0, real(0.0)),
        Hyper("eps", 1e-10, real(0.0, low_open=True)),
    )

    def __init__(self, params, lr: float | torch.Tensor = 1e-2, lr_decay: float = 0.0, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, eps: float = 1e-10, *, maximize: bool = False,
                 max_grad_norm: float | None = None, clip_value: float | None = None,
                 error_if_nonfinite: bool = False, schedule: Schedule | None = None, lr_norm_power: float = 0.0,
                 lr_norm_eps: float = 1e-6, backend: str = "auto", process_group=None):
        defaults = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, eps=eps, maximize=maximize,
                        decoupled_weight_decay=False, schedule=schedule)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, clip_value=clip_value,
                         error_if_nonfinite=error_if_nonfinite, lr_norm_power=lr_norm_power,
                         lr_norm_eps=lr_norm_eps, backend=backend, process_group=process_group)

    def state_names(self, group: dict) -> tuple[str, ...]:
        return ("sum",)

    def initial_state(self, name: str, group: dict) -> float:
        return group["initial_accumulator_value"]

    def rule_row(self, group: dict) -> tuple[int, tuple[float, ...]]:
        return 0, (group["lr_decay"], group["eps"])

    @staticmethod
    def reference_rule(p, g, states, step, lr, group) -> None:
        clr = lr / (1 + step * group["lr_decay"])  # step counts the earlier updates: t - 1
        state_sum = states["sum"]
        state_sum.addcmul_(g, g, value=1)
        std = state_sum.sqrt().add_(group["eps"])
        p.addcdiv_(g, std, value=-clr)


__all__ = ["FusedAdagrad"]
