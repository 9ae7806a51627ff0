"""The Python reference backend: docs/step.md's step in plain torch, one tensor at a time.

It is the oracle every kernel is tested against, so it favours being obviously right over
being fast: it reads the clocks, step counts and ``found_inf`` on the host, and it takes any
tensor torch can compute with (tensor subclasses and layouts the kernels cannot address run here).
"""

from __future__ import annotations

import torch

from fused_lr.core.layout import NORM_EPS
from fused_lr.core.plan import Plan, Settings, StepScalars
from fused_lr.schedules import Constant

_CONSTANT = Constant()


def processed_grad(g: torch.Tensor, scalars: StepScalars, settings: Settings, group: dict) -> torch.Tensor:
    """docs/step.md steps 0-2: unscale, maximize, value clipping. Never writes into ``g``."""
    if scalars.grad_scale is not None:
        # the reciprocal as torch.amp.GradScaler.unscale_ computes it
        g = g * scalars.grad_scale.double().reciprocal().float().to(g.device)
    if group["maximize"]:
        g = -g
    if settings.clip_value is not None:
        g = g.clamp(-settings.clip_value, settings.clip_value)
    return g


def clip_coef(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    return (max_norm / (norm + NORM_EPS)).clamp(max=1.0)


class ReferenceBackend:
    name = "reference"
    devices = frozenset({"cpu", "cuda"})

    def unsupported(self, plan: Plan) -> str | None:
        return None

    def grad_norm(self, plan: Plan, settings: Settings, scalars: StepScalars, final: bool = True) -> torch.Tensor:
        # per-tensor norms, then the norm of the norms: the order clip_grad_norm_ uses
        norms = [
            torch.linalg.vector_norm(processed_grad(g, scalars, settings, settings.groups[gi]), dtype=plan.norm_dtype)
            for g, gi in zip(plan.grads, plan.group_of.tolist(), strict=True)
        ]
        if not norms:
            return torch.zeros((), dtype=plan.norm_dtype, device=plan.device)
        return torch.linalg.vector_norm(torch.stack(norms))

    def update(self, plan: Plan, settings: Settings, clocks: torch.Tensor, scalars: StepScalars,
               norm: torch.Tensor | None) -> None:
        if scalars.found_inf is not None and scalars.found_inf.item():
            return
        coef = None if norm is None or settings.max_grad_norm is None else clip_coef(norm, settings.max_grad_norm)
        rate = 1.0 if settings.lr_norm_power == 0 else (float(norm) + settings.lr_norm_eps) ** -settings.lr_norm_power
        ks = clocks.tolist()
        for p, g, states, step, gi in zip(plan.params, plan.grads, plan.states, plan.steps, plan.group_of.tolist(),
                                          strict=True):
            group = settings.groups[gi]
            g = processed_grad(g, scalars, settings, group)
            if coef is not None:
                g = g * coef.to(g.dtype)
            lr = float(group["lr"]) * (group["schedule"] or _CONSTANT)(int(ks[gi])) * rate
            wd = group["weight_decay"]
            if wd != 0:
                if group["decoupled_weight_decay"]:
                    p.mul_(1 - lr * wd)
                else:
                    g = g.add(p, alpha=wd)
            settings.reference_rule(p, g, states, int(step.item()), lr, group)
            step.add_(1)
        clocks.add_(1)


def load():
    return ReferenceBackend
