"""The Python reference backend: SPEC.md's step in plain torch, one tensor at a time.

It is the oracle every kernel is tested against, so it favours being obviously right over
being fast: it reads the step counts and ``found_inf`` on the host.
"""

from __future__ import annotations

import torch

from fused_lr.core.plan import NORM_EPS, GroupPlan, StepPlan


def processed_grad(g: torch.Tensor, plan: StepPlan, group: GroupPlan) -> torch.Tensor:
    """SPEC steps 0-2: unscale, maximize, value clipping. Never writes into ``g``."""
    if plan.grad_scale is not None:
        # the reciprocal as torch.amp.GradScaler.unscale_ computes it
        g = g * plan.grad_scale.double().reciprocal().float().to(g.device)
    if group.maximize:
        g = -g
    if plan.clip_value is not None:
        g = g.clamp(-plan.clip_value, plan.clip_value)
    return g


def clip_coef(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    return (max_norm / (norm + NORM_EPS)).clamp(max=1.0)


class ReferenceBackend:
    name = "reference"
    devices = frozenset({"cpu", "cuda"})

    def grad_norm(self, plan: StepPlan) -> torch.Tensor:
        # per-tensor norms, then the norm of the norms: the order clip_grad_norm_ uses
        norms = [
            torch.linalg.vector_norm(processed_grad(g, plan, group), dtype=plan.norm_dtype)
            for group in plan.groups
            for g in group.grads
        ]
        if not norms:
            return torch.zeros((), dtype=plan.norm_dtype, device=plan.device)
        return torch.linalg.vector_norm(torch.stack(norms))

    def update(self, plan: StepPlan, norm: torch.Tensor | None) -> None:
        if plan.found_inf is not None and plan.found_inf.item():
            return
        coef = None if norm is None else clip_coef(norm, plan.max_grad_norm)
        for group in plan.groups:
            for i, (p, g, step) in enumerate(zip(group.params, group.grads, group.steps)):
                g = processed_grad(g, plan, group)
                if coef is not None:
                    g = g * coef.to(g.dtype)
                k = int(step.item())
                lr = group.lr * group.schedule(k)
                if group.weight_decay != 0:
                    if group.decoupled_weight_decay:
                        p.mul_(1 - lr * group.weight_decay)
                    else:
                        g = g.add(p, alpha=group.weight_decay)
                if group.momentum != 0:
                    buf = group.bufs[i]
                    if k == 0 or group.fresh[i]:
                        buf.copy_(g)
                    else:
                        buf.mul_(group.momentum).add_(g, alpha=1 - group.dampening)
                    g = g.add(buf, alpha=group.momentum) if group.nesterov else buf
                p.add_(g, alpha=-lr)
                step.add_(1)


def load():
    return ReferenceBackend
