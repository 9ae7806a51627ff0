"""The optimizer step every benchmark times, on the CPU and the GPU alike.

Global-norm clipping at 1.0, weight decay on conv and linear weights only (``fused_lr.param_groups``),
SGD with momentum 0.9 (or AdamW) and a cosine schedule. torch does it as ``clip_grad_norm_`` + the
optimizer's ``step()`` + ``CosineAnnealingLR.step()``, in any of its three implementations;
fused_lr as one ``FusedSGD``/``FusedAdamW`` step. Each contender gets its own copy of a ResNet's
parameters with random gradients (the same seed, so the same numbers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import fused_lr
from fused_lr.tools import models

MODELS = {"resnet18": models.resnet18, "resnet50": models.resnet50, "resnet152": models.resnet152}
LR, MOMENTUM, WEIGHT_DECAY, MAX_GRAD_NORM = 0.1, 0.9, 5e-4, 1.0
TOTAL_STEPS = 10_000  # the cosine period; long enough that the lr never reaches 0 in a benchmark
TORCH_IMPLS = ("for-loop", "foreach", "fused")
BASELINE = "torch fused"  # what the speed-ups are measured against

# Per optimizer: torch's class, fused_lr's class, their shared keyword arguments, the fp32 passes
# the update must make over the parameters (besides the norm pass over the gradients), and the
# streaming kernel (fused_lr/kernels/numba_stream.py) that makes exactly those passes.
OPTIMIZERS = {
    "sgd": ("SGD", "FusedSGD", dict(lr=LR, momentum=MOMENTUM), 5, "update_pass"),  # read p,g,b write p,b
    "adamw": ("AdamW", "FusedAdamW", dict(lr=1e-3, weight_decay=1e-2), 7, "adam_pass"),  # read p,g,m,v write p,m,v
}


@dataclass
class Step:
    name: str
    step: Callable[[], None]  # one eager step, the torch scheduler's host side included
    device_step: Callable[[], None]  # what a CUDA graph captures: the step without torch's scheduler


def model_with_grads(model: str, seed: int = 0, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The ResNet ``model`` in ``dtype`` on ``device``, every parameter with a random gradient."""
    torch.manual_seed(seed)
    net = MODELS[model]().to(device=device, dtype=dtype)
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    return net


def parameter_groups(model: str, seed: int = 0, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> list[dict]:
    """:func:`model_with_grads`'s parameters in the decay / no-decay groups."""
    return fused_lr.param_groups(model_with_grads(model, seed, device, dtype), WEIGHT_DECAY)


def torch_step(groups: list[dict], impl: str = "fused", optimizer: str = "sgd") -> Step:
    """clip_grad_norm_ + the torch optimizer + CosineAnnealingLR, with the optimizer's ``impl``."""
    if impl not in TORCH_IMPLS:
        raise ValueError(f"unknown torch implementation {impl!r}; choose one of {TORCH_IMPLS}")
    name, _, kw, _, _ = OPTIMIZERS[optimizer]
    params = [p for g in groups for p in g["params"]]
    opt = getattr(torch.optim, name)(groups, foreach=impl == "foreach", fused=impl == "fused", **kw)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, TOTAL_STEPS)
    clip_foreach = impl != "for-loop"  # the for-loop contender clips tensor by tensor too

    def device_step():
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM, foreach=clip_foreach)
        opt.step()

    def step():
        device_step()
        sched.step()

    return Step(f"torch {impl}", step, device_step)


def fused_optimizer(groups: list[dict], backend: str, optimizer: str = "sgd") -> torch.optim.Optimizer:
    """The fused optimizer doing the same step in one call."""
    _, name, kw, _, _ = OPTIMIZERS[optimizer]
    return getattr(fused_lr, name)(groups, max_grad_norm=MAX_GRAD_NORM, schedule=fused_lr.schedules.Cosine(TOTAL_STEPS),
                                   backend=backend, **kw)


def fused_step(groups: list[dict], backend: str, optimizer: str = "sgd") -> Step:
    opt = fused_optimizer(groups, backend, optimizer)
    return Step(f"fused_lr {backend}", opt.step, opt.step)
