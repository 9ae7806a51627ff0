"""FusedAdam and FusedAdamW: ``torch.optim.Adam``/``AdamW`` + clipping + a fused lr schedule.

The rule (docs/step.md, "Beyond SGD"), with t the parameter's step count after this update:
``m <- m + (1 - b1)(g - m)``, ``v <- b2 v + (1 - b2) g^2``, with amsgrad ``vmax <- max(vmax, v)``
used in place of v; ``p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``. Weight
decay is L2 (added to g) for Adam and decoupled (``p <- p (1 - lr wd)``) for AdamW and for
``FusedAdam(decoupled_weight_decay=True)``, as torch's.
Kernels: the RULE_ADAM branches of fused_lr/kernels/ and csrc/.
"""

from __future__ import annotations

import torch

from fused_lr.core import layout as L
from fused_lr.core.hyper import Hyper, finite_number, flag, real
from fused_lr.core.optimizer import FusedOptimizer


def _betas(value) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2 and all(
        finite_number(b) and 0 <= b < 1 for b in value)


class FusedAdam(FusedOptimizer):
    """Adam with gradient clipping and an lr schedule, fused. Arguments follow ``torch.optim.Adam``;
    everything after ``amsgrad`` is keyword-only. ``decoupled_weight_decay=True`` makes it AdamW (with
    Adam's default weight decay, 0), as it makes ``torch.optim.Adam`` torch's AdamW. The keywords
    every fused optimizer shares: :class:`~fused_lr.core.optimizer.FusedOptimizer`."""

    rule = L.RULE_ADAM
    # lr / (1 - b1^t); 1 - b1, b2, 1 - b2, sqrt(1 - b2^t), eps (rule_row: b1, b2, eps)
    coefficients = L.program(("BIAS", 0), ("ONE_MINUS", 0), ("COPY", 1), ("ONE_MINUS", 1), ("SQRT_BIAS", 1),
                             ("COPY", 2))
    hypers = (
        Hyper("betas", (0.9, 0.999), (_betas, "a pair of numbers in [0, 1)")),
        Hyper("eps", 1e-8, real(0.0, low_open=True)),
        Hyper("amsgrad", False, flag()),
    )

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *, maximize: bool = False,
                 decoupled_weight_decay: bool = False, **shared):
        betas = tuple(betas) if isinstance(betas, list) else betas
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults, **shared)

    def state_names(self, group: dict) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq")

    def rule_row(self, group: dict) -> tuple[int, tuple[float, ...]]:
        b1, b2 = group["betas"]
        return (L.F_AMSGRAD if group["amsgrad"] else 0), (b1, b2, group["eps"])

    @staticmethod
    def reference_rule(p, g, states, step, lr, group) -> None:
        b1, b2 = group["betas"]
        exp_avg, exp_avg_sq = states["exp_avg"], states["exp_avg_sq"]
        exp_avg.lerp_(g, 1 - b1)
        exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
        t = step + 1
        step_size = lr / (1 - b1 ** t)
        bias_correction2_sqrt = (1 - b2 ** t) ** 0.5
        v = exp_avg_sq
        if group["amsgrad"]:
            torch.maximum(states["max_exp_avg_sq"], exp_avg_sq, out=states["max_exp_avg_sq"])
            v = states["max_exp_avg_sq"]
        denom = (v.sqrt() / bias_correction2_sqrt).add_(group["eps"])
        p.addcdiv_(exp_avg, denom, value=-step_size)


class FusedAdamW(FusedAdam):
    """AdamW (decoupled weight decay, default 1e-2), as ``torch.optim.AdamW``; see :class:`FusedAdam`.
    Like ``torch.optim.AdamW`` it takes no ``decoupled_weight_decay`` argument (its decay is always
    decoupled; ``FusedAdam`` takes the argument)."""

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, **kwargs):
        if "decoupled_weight_decay" in kwargs:
            raise TypeError("FusedAdamW got an unexpected keyword argument 'decoupled_weight_decay' (as "
                            "torch.optim.AdamW: its weight decay is always decoupled; FusedAdam takes the argument)")
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, decoupled_weight_decay=True, **kwargs)


__all__ = ["FusedAdam", "FusedAdamW"]
