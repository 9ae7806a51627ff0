"""The step plan: what a step touches, built once per structure and refreshed in place.

:class:`~fused_lr.core.optimizer.FusedOptimizer` builds a :class:`Plan` when the structure
changes (which parameters have gradients, the groups, dtypes, layouts, devices, state tensors)
and reuses it otherwise. Per step it only refreshes what moves: the gradient addresses (a
backward after ``zero_grad(set_to_none=True)`` allocates new gradients) and the hyper-parameter
rows that changed. Backends read the plan's numpy tables (layout: fused_lr/core/layout.py) and
key their own device copies on its version counters, so they too rebuild nothing in between.

A kernel reads raw addresses, so the plan admits only plain strided memory (docs/step.md,
"Memory safety"): gradients whose layout differs from their parameter's are staged into a copy
that matches; state tensors are cast and laid out like their parameter when bound; anything else
(tensor subclasses, meta or non-strided tensors) is recorded in :attr:`Plan.problem`, and the
kernel backends then leave the step to the reference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import NamedTuple, Protocol

import numpy as np
import torch

from fused_lr.core import layout as L

_DATA_PTR = torch.Tensor.data_ptr
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: element i of the flat walk is at ``data_ptr + i`` in some order of
    dimensions, so a kernel may treat the tensor as a flat array."""
    if t.numel() == 0:  # nothing to walk, whatever the strides say
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape, strict=True) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def addressable_problem(t: torch.Tensor) -> str | None:
    """Why a kernel must not read ``t`` through its address, or None when it may."""
    if type(t) not in _PLAIN:
        return f"a {type(t).__name__} (a tensor subclass, not plain memory)"
    if t.layout != torch.strided:
        return f"a {t.layout} tensor"
    if t.device.type == "meta":
        return "a meta tensor (it has no data)"
    if not dense(t):
        return f"a tensor that is not dense in memory (strides {t.stride()} for shape {tuple(t.shape)})"
    return None


class Bucket(NamedTuple):
    """The tensors of one dtype: rows ``start:stop`` of the tensor table."""

    dtype: torch.dtype
    start: int
    stop: int


class StepScalars(NamedTuple):
    """The per-step values that are not part of the plan (from torch.amp.GradScaler)."""

    grad_scale: torch.Tensor | None  # grads are multiplied by 1/grad_scale
    found_inf: torch.Tensor | None  # non-zero: the step changes nothing


@dataclass
class Plan:
    """One step's tensors in table order (dtype buckets, plan order within each) and their tables."""

    device: torch.device
    rule: int
    coefficients: int  # the rule's coefficient program (fused_lr/core/layout.py, program)
    positions: list[int]  # each row's index in the optimizer's flat parameter list
    in_order: bool  # positions are 0..T-1: every parameter, in the optimizer's order
    pick: Callable[[Sequence], Sequence]  # the rows' items of a per-parameter sequence, in C (itemgetter)
    params: list[torch.Tensor]  # what the kernels address (a DTensor's local shard), row order
    group_of: np.ndarray  # int64 (T,)
    buckets: list[Bucket]
    table: np.ndarray  # int64 (T, TENSOR_COLS)
    problem: str | None  # why the kernels cannot address this plan (then the reference runs it)
    norm_dtype: torch.dtype  # float64 when any parameter is float64, else float32
    # filled by bind(): per row, the rule's state tensors and the per-parameter step count
    states: list[dict[str, torch.Tensor]] | None = None  # the rule's, by name, in declaration order
    steps: list[torch.Tensor] | None = None
    grads: list[torch.Tensor] | None = None  # this step's, row order (staged where needed)
    grad_version: int = 0
    state_version: int = 0
    _grad_ptrs: list[int] | None = None

    @classmethod
    def build(cls, device: torch.device, rule: int, coefficients: int,
              rows: list[tuple[int, int, torch.Tensor, str | None]]) -> Plan:
        """``rule``: its RULES code; ``coefficients``: its coefficient program (layout.program);
        ``rows``: (flat position, group index, addressable view, problem) of each parameter with a
        gradient, in the optimizer's order."""
        if rule not in L.RULES.values():
            raise ValueError(f"unknown rule code {rule!r}: fused_lr.core.layout.RULES has {L.RULES}")
        if (problem := L.program_problem(coefficients)) is not None:
            raise ValueError(f"bad coefficient program: {problem}")
        order = sorted(range(len(rows)), key=lambda i: _dtype_rank(rows[i][2].dtype))  # stable
        rows = [rows[i] for i in order]
        params = [r[2] for r in rows]
        problem = next((r[3] for r in rows if r[3] is not None), None)
        table = np.zeros((len(rows), L.TENSOR_COLS), dtype=np.int64)
        buckets: list[Bucket] = []
        for i, p in enumerate(params):
            if not buckets or buckets[-1].dtype != p.dtype:
                buckets.append(Bucket(p.dtype, i, i))
            buckets[-1] = buckets[-1]._replace(stop=i + 1)
        if problem is None:
            table[:, L.T_PARAM] = list(map(_DATA_PTR, params))
        table[:, L.T_NUMEL] = [p.numel() for p in params]
        table[:, L.T_GROUP] = [r[1] for r in rows]
        norm_dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        positions = [r[0] for r in rows]
        pick = itemgetter(*positions) if len(positions) > 1 else lambda seq, i=positions[0]: (seq[i],)
        plan = cls(device=device, rule=rule, coefficients=coefficients, positions=positions,
                   in_order=positions == list(range(len(rows))), pick=pick,
                   params=params,
                   group_of=table[:, L.T_GROUP].copy(), buckets=buckets, table=table, problem=problem,
                   norm_dtype=norm_dtype)
        if problem is None:
            table[:, L.T_ALIGNED] = table[:, L.T_PARAM] % 16 == 0  # the state's joins it in bind()
        return plan

    # ------------------------------------------------------------------ per step
    def set_grads(self, grads: list[torch.Tensor], where, ptrs: list[int] | None = None) -> None:
        """This step's gradients (row order). ``ptrs``: their addresses, given only when every
        gradient was checked to be laid out exactly like its parameter this step (core/meta.py's
        ``grads``); without them each gradient is checked here (``where(row)`` names it in errors)
        and one laid out otherwise is staged into a copy that matches. Addresses that moved are
        written into the table in place."""
        if self.problem is not None:
            self.grads = grads
            return
        if ptrs is None:
            grads = [self._conforming(i, g, where) for i, g in enumerate(grads)]
            ptrs = list(map(_DATA_PTR, grads))
        if ptrs != self._grad_ptrs:
            self.table[:, L.T_GRAD] = ptrs  # (the kernels test a gradient's alignment themselves)
            self._grad_ptrs = ptrs
            self.grad_version += 1
        self.grads = grads

    def _conforming(self, i: int, g: torch.Tensor, where) -> torch.Tensor:
        p = self.params[i]
        if g.is_sparse or g.layout != torch.strided:
            raise RuntimeError(f"{where(i)}: its gradient is a {g.layout} tensor; fused optimizers take dense "
                               f"gradients")
        if type(g) not in _PLAIN:
            raise RuntimeError(f"{where(i)}: its gradient is a {type(g).__name__}, not plain memory like the "
                               f"parameter; fused_lr cannot address it")
        if g.dtype != p.dtype or g.device != p.device or g.shape != p.shape:
            raise RuntimeError(f"{where(i)}: its gradient ({g.dtype}, {tuple(g.shape)}, {g.device}) does not match "
                               f"the parameter ({p.dtype}, {tuple(p.shape)}, {p.device})")
        if g.stride() == p.stride():  # the parameter's strides: as dense as it is
            return g
        return torch.empty_like(p).copy_(g)  # the parameter's layout: a correct, slower path

    # ------------------------------------------------------------------ state
    def bind(self, states: list[dict[str, torch.Tensor]], steps: list[torch.Tensor]) -> None:
        """The rule's state tensors and step counts of every row (laid out like the parameter by the
        optimizer); they are held here, so their addresses stay valid while the plan lives."""
        self.states, self.steps = states, steps
        if self.problem is None:
            for i, sts in enumerate(states):
                self.table[i, L.T_STATE0:L.T_STATE0 + len(sts)] = list(map(_DATA_PTR, sts.values()))
            self.table[:, L.T_STEP] = list(map(_DATA_PTR, steps))
            state_cols = [L.T_PARAM, L.T_STATE0, L.T_STATE1, L.T_STATE2]
            self.table[:, L.T_ALIGNED] = np.all(self.table[:, state_cols] % 16 == 0, axis=1)
        self.state_version += 1

    @property
    def bound(self) -> bool:
        return self.states is not None



def _dtype_rank(dtype: torch.dtype) -> int:
    return (torch.float32, torch.float64, torch.bfloat16, torch.float16).index(dtype) \
        if dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16) else 4


@dataclass
class Settings:
    """What the step applies beyond the tensors, for every group of the optimizer: hyper rows,
    schedule tables and the clipping settings, with a version counter that moves whenever any of
    them changes (a new lr from a scheduler or by hand, a new schedule, ...)."""

    groups: list[dict]  # the optimizer's param groups, as the reference reads them
    hyper: np.ndarray  # float64 (G, HYPER_COLS)
    schedules: np.ndarray  # float64 (G, MAX_SEGMENTS, SEGMENT_COLS)
    lr_tensors: dict[int, torch.Tensor]  # groups whose lr is a tensor: it multiplies their LR column
    max_grad_norm: float | None
    clip_value: float | None
    lr_norm_power: float  # the gradient-norm rate: lr x (N + lr_norm_eps) ** -lr_norm_power
    lr_norm_eps: float
    reference_rule: object  # the optimizer's per-tensor rule in torch (docs/step.md step 6)
    version: int = 0


class Backend(Protocol):
    name: str
    devices: frozenset[str]  # device types the backend runs on ("cpu", "cuda")

    def grad_norm(self, plan: Plan, settings: Settings, scalars: StepScalars, final: bool = True) -> torch.Tensor:
        """The global norm of the processed gradients (docs/step.md steps 0-2), a 0-dim tensor of
        ``plan.norm_dtype`` on ``plan.device``. Changes nothing. With ``final`` False nothing reads
        the tensor before ``update``, which it must then be handed to: a GPU backend may leave its
        last summation to update's first launch (one launch less a step)."""

    def update(self, plan: Plan, settings: Settings, clocks: torch.Tensor, scalars: StepScalars,
               norm: torch.Tensor | None) -> None:
        """docs/step.md steps 0-7 on every row, then every row's step count and every group's clock
        advance by one, unless ``scalars.found_inf`` is set: then nothing changes. ``norm`` is the
        step's global norm when it was computed (for clipping, the gradient-norm rate or the
        non-finite check), else None; it clips only when ``settings.max_grad_norm`` is set."""
