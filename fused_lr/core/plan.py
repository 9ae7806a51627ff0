"""The step contract between :class:`FusedSGD` and its backends.

``FusedSGD`` validates everything, allocates state, and hands a backend one :class:`StepPlan`
per step. A backend implements two calls (see :class:`Backend`): the global gradient norm and
the fused update. SPEC.md (shared/) defines what they compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from fused_lr.schedules import Schedule

# clip coefficient c = min(1, C / (N + NORM_EPS)), as torch.nn.utils.clip_grad_norm_.
NORM_EPS = 1e-6


@dataclass
class GroupPlan:
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    # One buffer per param when momentum != 0 (else empty). A buffer is initialised from the
    # gradient when its param's step count is 0 or when ``fresh`` says it was just created.
    bufs: list[torch.Tensor]
    fresh: list[bool]
    # 0-dim float32 tensors on the param's device: steps applied to that param so far (= k).
    steps: list[torch.Tensor]
    lr: float
    momentum: float
    dampening: float
    nesterov: bool
    weight_decay: float
    decoupled_weight_decay: bool
    maximize: bool
    schedule: Schedule

    @property
    def kernel_lr(self) -> float:
        """The lr a kernel multiplies with ``eval_table(table, k)``."""
        return self.lr * self.schedule.host_scale

    @property
    def table(self) -> np.ndarray:
        return self.schedule.table()


@dataclass
class StepPlan:
    groups: list[GroupPlan]
    device: torch.device
    max_grad_norm: float | None = None
    clip_value: float | None = None
    # From torch.amp.GradScaler: grads are multiplied by 1/grad_scale; found_inf != 0 skips.
    grad_scale: torch.Tensor | None = None
    found_inf: torch.Tensor | None = None

    @property
    def norm_dtype(self) -> torch.dtype:
        """float64 when any parameter is float64, else float32 (bf16/fp16 included)."""
        dts = {p.dtype for g in self.groups for p in g.params}
        return torch.float64 if torch.float64 in dts else torch.float32


class Backend(Protocol):
    name: str
    devices: frozenset[str]  # device types the backend runs on ("cpu", "cuda")

    def grad_norm(self, plan: StepPlan) -> torch.Tensor:
        """‖ all processed gradients ‖₂ (after unscale, maximize and value clipping), a 0-dim
        tensor of ``plan.norm_dtype`` on ``plan.device``. Changes nothing."""

    def update(self, plan: StepPlan, norm: torch.Tensor | None) -> None:
        """Apply SPEC.md steps 0-7 to every parameter and add 1 to every step count, unless
        ``plan.found_inf`` is set, in which case nothing changes. ``norm`` is None when
        global-norm clipping is off."""
