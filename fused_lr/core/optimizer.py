"""FusedSGD: clipping, weight decay, momentum and a scheduled lr in one pass over all params."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from fused_lr import backends
from fused_lr.core.plan import GroupPlan, StepPlan
from fused_lr.schedules import Constant, Schedule

_CONSTANT = Constant()


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_hyper(group: dict[str, Any], where: str) -> None:
    """Raise a ValueError naming the first bad hyper-parameter of a param group."""
    lr, mom, damp, wd = group["lr"], group["momentum"], group["dampening"], group["weight_decay"]
    if not _finite_number(lr) or lr < 0:
        raise ValueError(f"{where}: lr must be a finite number >= 0, got {lr!r}")
    if not _finite_number(mom) or not 0 <= mom < 1:
        raise ValueError(f"{where}: momentum must be in [0, 1), got {mom!r}")
    if not _finite_number(damp) or not 0 <= damp <= 1:
        raise ValueError(f"{where}: dampening must be in [0, 1], got {damp!r}")
    if not _finite_number(wd) or wd < 0:
        raise ValueError(f"{where}: weight_decay must be a finite number >= 0, got {wd!r}")
    if group["nesterov"] and (mom <= 0 or damp != 0):
        raise ValueError(f"{where}: nesterov momentum requires momentum > 0 and zero dampening "
                         f"(got momentum={mom}, dampening={damp})")
    sched = group["schedule"]
    if sched is not None and not isinstance(sched, Schedule):
        raise TypeError(f"{where}: schedule must be a fused_lr.schedules schedule or None, "
                        f"got {type(sched).__name__}")
    if sched is not None:
        sched.table()  # raises if the schedule does not fit a kernel table


class FusedSGD(Optimizer):
    """SGD with gradient clipping, weight decay, momentum and an lr schedule, fused.

    Replaces ``clip_grad_value_`` + ``clip_grad_norm_`` + ``torch.optim.SGD`` + an lr scheduler
    with one optimizer step; the semantics are SPEC.md's and equal torch's. Positional
    arguments follow ``torch.optim.SGD``; everything after ``nesterov`` is keyword-only.

    ``process_group``: when each rank holds only a shard of the parameters (ZeRO/FSDP style),
    the ranks of this group all-reduce the squared gradient norm, so clipping (and
    ``error_if_nonfinite``) sees the norm of the whole model. Every rank must then call
    ``step()`` together. Leave it None under DDP, where every rank holds every parameter.
    """

    _step_supports_amp_scaling = True  # GradScaler hands us grad_scale / found_inf

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *,
                 decoupled_weight_decay: bool = False, maximize: bool = False,
                 max_grad_norm: float | None = None, clip_value: float | None = None,
                 error_if_nonfinite: bool = False, schedule: Schedule | None = None,
                 backend: str = "auto", process_group=None):
        if max_grad_norm is not None and (not _finite_number(max_grad_norm) or max_grad_norm <= 0):
            raise ValueError(f"max_grad_norm must be a finite number > 0 or None, got {max_grad_norm!r}")
        if clip_value is not None and (not _finite_number(clip_value) or clip_value <= 0):
            raise ValueError(f"clip_value must be a finite number > 0 or None, got {clip_value!r}")
        if process_group is not None and not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
            raise TypeError(f"process_group must be a torch.distributed ProcessGroup or None, "
                            f"got {type(process_group).__name__}")
        backends.check_name(backend)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, decoupled_weight_decay=decoupled_weight_decay,
                        maximize=maximize, schedule=schedule)
        _check_hyper(defaults, "FusedSGD")
        self.max_grad_norm = max_grad_norm
        self.clip_value = clip_value
        self.error_if_nonfinite = error_if_nonfinite
        self.backend_name = backend
        self.process_group = process_group
        self.last_grad_norm: torch.Tensor | None = None
        self._backend = None
        super().__init__(params, defaults)

    # ---------------------------------------------------------------- param groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        param_group = {**param_group, "params": params}
        where = f"param group {len(self.param_groups)}"
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        tensors = [p[1] if isinstance(p, tuple) else p for p in params]  # named_parameters() pairs
        for i, p in enumerate(tensors):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{where}: parameter {i} is a {type(p).__name__}, not a tensor")
            if not p.is_floating_point():
                raise TypeError(f"{where}: parameter {i} has dtype {p.dtype}; FusedSGD updates floating-point "
                                f"parameters only")
            if id(p) in seen:
                raise ValueError(f"{where}: parameter {i} (shape {tuple(p.shape)}) is given twice; "
                                 f"each parameter may appear once across all groups")
            seen.add(id(p))
        devices = {p.device for g in self.param_groups for p in g["params"]} | {p.device for p in tensors}
        if len(devices) > 1:
            raise ValueError(f"{where}: FusedSGD fuses all parameters into one launch, so they must share "
                             f"one device; got {sorted(map(str, devices))}")
        merged = {**self.defaults, **param_group}
        _check_hyper(merged, where)
        super().add_param_group(param_group)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self):
        # Schedules are configuration, like the optimizer class itself: they stay out of the
        # checkpoint (torch.load(weights_only=True) could not read them). Their position is
        # the per-parameter "step" count, which is saved.
        sd = super().state_dict()
        for g in sd["param_groups"]:
            g.pop("schedule", None)
        # A GradScaler-skipped first step leaves a buffer that holds no momentum yet (allocated
        # before the kernel saw found_inf; step count 0 marks it). torch.optim.SGD would take any
        # saved buffer for real momentum, so such buffers stay out, as torch's do before a first step.
        with_buf = [(i, st) for i, st in sd["state"].items() if "momentum_buffer" in st and "step" in st]
        if with_buf:
            taken = torch.stack([st["step"] for _, st in with_buf]).tolist()  # one host read
            for (i, st), k in zip(with_buf, taken, strict=True):
                if k == 0:
                    sd["state"][i] = {key: v for key, v in st.items() if key != "momentum_buffer"}
        return sd

    def load_state_dict(self, state_dict):
        schedules = [g["schedule"] for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, schedule in zip(self.param_groups, schedules):
            group["schedule"] = schedule
            for p in group["params"]:
                st = self.state.get(p)
                if not st:
                    continue
                if "step" in st:
                    st["step"] = torch.as_tensor(st["step"], dtype=torch.float32).to(p.device).reshape(())
                elif "momentum_buffer" in st and st["momentum_buffer"] is not None:
                    # a torch.optim.SGD checkpoint: a buffer exists, so at least one step was
                    # taken, but the count was not saved
                    st["step"] = torch.ones((), dtype=torch.float32, device=p.device)
                    if schedule is not None and not schedule.is_constant:
                        warnings.warn("FusedSGD.load_state_dict: the checkpoint has no step counts "
                                      "(a torch.optim.SGD checkpoint?); the schedule resumes at k=1",
                                      stacklevel=2)

    # ---------------------------------------------------------------- stepping
    def _plan(self) -> StepPlan | None:
        """Validate everything and gather the step; allocates nothing and changes nothing."""
        groups, devices = [], set()
        for gi, group in enumerate(self.param_groups):
            _check_hyper(group, f"param group {gi}")
            params, grads = [], []
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise RuntimeError(f"param group {gi}, parameter {i}: FusedSGD does not support sparse "
                                       f"gradients")
                devices.add(p.device)
                params.append(p)
                grads.append(g)
            if not params:
                continue
            momentum = group["momentum"]
            groups.append(GroupPlan(
                params=params, grads=grads, bufs=[], fresh=[], steps=[], lr=float(group["lr"]),
                momentum=momentum, dampening=group["dampening"], nesterov=group["nesterov"],
                weight_decay=group["weight_decay"], decoupled_weight_decay=group["decoupled_weight_decay"],
                maximize=group["maximize"], schedule=group["schedule"] or _CONSTANT,
            ))
        if not groups:
            return None
        if len(devices) > 1:
            raise RuntimeError(f"FusedSGD fuses all parameters into one launch, so they must share one device; "
                               f"got {sorted(map(str, devices))}")
        return StepPlan(groups=groups, device=devices.pop(), max_grad_norm=self.max_grad_norm,
                        clip_value=self.clip_value, grad_scale=getattr(self, "grad_scale", None),
                        found_inf=getattr(self, "found_inf", None))

    def _materialise_state(self, plan: StepPlan) -> None:
        """Create missing step counts and momentum buffers (only after every check passed)."""
        for group in plan.groups:
            for p in group.params:
                st = self.state[p]
                if "step" not in st:
                    st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                group.steps.append(st["step"])
                if group.momentum != 0:
                    fresh = st.get("momentum_buffer") is None
                    if fresh:
                        st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    group.bufs.append(st["momentum_buffer"])
                    group.fresh.append(fresh)

    def _backend_for(self, device: torch.device):
        if self._backend is None or device.type not in self._backend.devices:
            self._backend = backends.create(self.backend_name, device)
        return self._backend

    @property
    def backend(self) -> str | None:
        """The name of the backend the last step ran on (None before the first step)."""
        return None if self._backend is None else self._backend.name

    # torch.compile: a compiled training step graph-breaks here and runs the step eagerly. The
    # step is a few fused launches planned in Python; tracing it would gain nothing and would
    # guard on every group's hyper-parameters (a recompile whenever a scheduler moves the lr).
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plan = self._plan()
        needs_norm = self.max_grad_norm is not None or self.error_if_nonfinite
        if plan is None:
            if needs_norm and self.process_group is not None:
                # the other ranks block in the all-reduce until this rank adds its (empty) share
                params = [p for g in self.param_groups for p in g["params"]]
                dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
                self._global_norm(torch.zeros((), dtype=dtype, device=params[0].device))
            return loss
        backend = self._backend_for(plan.device)
        norm = None
        if needs_norm:
            norm = backend.grad_norm(plan)
            if self.process_group is not None:
                norm = self._global_norm(norm)
            if self.error_if_nonfinite and not bool(torch.isfinite(norm)):
                skipped = plan.found_inf is not None and bool(plan.found_inf)
                if not skipped:
                    raise RuntimeError(
                        f"FusedSGD: the global gradient norm is non-finite ({norm.item()}); nothing was "
                        f"changed. Pass error_if_nonfinite=False to skip this check.")
        self._materialise_state(plan)
        backend.update(plan, norm if self.max_grad_norm is not None else None)
        self.last_grad_norm = norm
        return loss

    def _global_norm(self, norm: torch.Tensor) -> torch.Tensor:
        """The gradient norm over every rank's shard: sqrt of the all-reduced squared local norms.
        Stays on the device (a collective enqueued like any kernel, no host round trip)."""
        squared = norm * norm
        dist.all_reduce(squared, op=dist.ReduceOp.SUM, group=self.process_group)
        return squared.sqrt()

    # ---------------------------------------------------------------- introspection
    def current_lr(self) -> list[float]:
        """Each group's lr for its next step: base lr x schedule(k). Reads k from the device."""
        out = []
        for group in self.param_groups:
            steps = [self.state[p]["step"] for p in group["params"] if "step" in self.state.get(p, {})]
            k = int(max(s.item() for s in steps)) if steps else 0
            out.append(group["lr"] * (group["schedule"] or _CONSTANT)(k))
        return out
