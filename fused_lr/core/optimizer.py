"""FusedOptimizer: what every fused optimizer shares (docs/step.md).

A subclass is a declaration: its hyper-parameters with their checks (:class:`~fused_lr.core.hyper.Hyper`),
its state names, its rule code and kernel row, and its per-tensor rule in torch for the reference.
This class owns the rest: parameter and hyper-parameter validation, state creation, the step plan
and its cache, AMP (``grad_scale``/``found_inf``), global-norm and value clipping, ``process_group``,
the schedules and their per-group clocks, ``current_lr()``, checkpoints, copies and pickling.

The step is planned once (fused_lr/core/plan.py): per step the host checks, with C-level
``map``s over the parameters, that nothing structural moved, refreshes the gradient addresses
and the hyper-parameter rows that changed, and launches the backend.
"""

from __future__ import annotations

import functools
import math
import operator
import os
import sys
import warnings
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
from torch.optim import Optimizer
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from fused_lr import backends
from fused_lr.core import layout as L
from fused_lr.core import meta
from fused_lr.core.arena import states_like
from fused_lr.core.hyper import Hyper, clip_problem, flag, lr_problem, real
from fused_lr.core.plan import Plan, Settings, StepScalars, addressable_problem
from fused_lr.schedules import Constant, Schedule

_CONSTANT = Constant()
_GRAD = operator.attrgetter("grad")
_IS_NONE = functools.partial(operator.is_, None)
_DATA_PTR = torch.Tensor.data_ptr
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_GLOBAL_HOOKS = (_global_optimizer_pre_hooks, _global_optimizer_post_hooks)

# declared by every optimizer (docs/step.md steps 1, 4, 5)
COMMON = (
    Hyper("weight_decay", 0.0, real(0.0)),
    Hyper("decoupled_weight_decay", False, flag()),
    Hyper("maximize", False, flag()),
)


def _HOOKS_OR_PROFILER(opt) -> bool:
    """Whether torch's step wrapper has anything to do: a step hook (this optimizer's or global)
    or a running autograd profiler."""
    return bool(opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks or _GLOBAL_HOOKS[0]
                or _GLOBAL_HOOKS[1]) or torch.autograd._profiler_enabled()


def _rate_problems(power, eps) -> tuple[str | None, str | None]:
    check_power, check_eps = real(0.0), real(0.0, low_open=True)
    return (None if check_power[0](power) else f"lr_norm_power must be {check_power[1]}, got {power!r}",
            None if check_eps[0](eps) else f"lr_norm_eps must be {check_eps[1]}, got {eps!r}")


def _shard_group(params: list) -> object | None:
    """The process group of the mesh when every tensor-subclass parameter is a DTensor sharded on
    one 1-D mesh (FSDP2's placement): each element then lives on exactly one rank, and the step
    runs on the local shards. None otherwise (the subclass tensors then run on the reference)."""
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor, Shard

    meshes = set()
    for p in params:
        if type(p) in _PLAIN:
            continue
        sharded = isinstance(p, DTensor) and p.device_mesh.ndim == 1 and isinstance(p.placements[0], Shard)
        if not sharded:
            return None
        meshes.add(p.device_mesh)
    return meshes.pop().get_group() if len(meshes) == 1 else None


def _as_dtensor(local: torch.Tensor, like) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride())


def _same(a: tuple, b: tuple | None) -> bool:
    """Tuple equality that compares tensors by identity (== on a CUDA tensor would sync). Values
    nobody touched are the very same objects: one C-level pass settles the common case."""
    if b is None or len(a) != len(b):
        return False
    return all(map(operator.is_, a, b)) or all(
        x is y or (type(x) is not torch.Tensor and type(y) is not torch.Tensor and x == y) for x, y in zip(a, b))


def _check_param(p, where: str, seen: set, name: str) -> None:
    """Raise naming ``where`` unless ``p`` is a floating-point or complex tensor not yet in ``seen``
    (ids of the parameters met so far, across all groups); then add it."""
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{where} is a {type(p).__name__}, not a tensor")
    if not (p.is_floating_point() or p.is_complex()):
        raise TypeError(f"{where} has dtype {p.dtype}; {name} updates floating-point and complex parameters only")
    if id(p) in seen:
        raise ValueError(f"{where} (shape {tuple(p.shape)}) is listed twice; each parameter may appear once across "
                         f"all groups")
    seen.add(id(p))


def _scalar_count(v) -> bool:
    """Whether ``v`` can be a step count: a real number, or a real tensor of one element."""
    if isinstance(v, torch.Tensor):
        return v.numel() == 1 and not v.is_complex() and v.dtype != torch.bool
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_step_count(v) -> bool:
    """A step count as a checkpoint may hold one: a finite real number >= 0, or a tensor of one."""
    return _scalar_count(v) and math.isfinite(float(v)) and float(v) >= 0


def _state_problem(key: str, t, p: torch.Tensor) -> str | None:
    """Why ``t`` cannot be parameter ``p``'s state ``key`` (None: it can, cast if need be)."""
    if not isinstance(t, torch.Tensor):
        return f"its {key!r} state is {_describe(t)}, not a tensor"
    if t.shape != p.shape:
        return (f"its {key!r} state has shape {tuple(t.shape)} but the parameter has shape {tuple(p.shape)} (a "
                f"checkpoint of another model, or the parameter was replaced?)")
    return None


def _describe(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"a {v.dtype} tensor of shape {tuple(v.shape)}"
    return f"a {type(v).__name__} ({v!r:.40})"


@functools.cache
def _hyper_names(cls) -> tuple[str, ...]:
    """The keys of a param group the kernels read, in a fixed order."""
    return ("lr", "schedule", *(h.name for h in COMMON), *(h.name for h in cls.hypers))


# torch.compile: a compiled training step graph-breaks at step() and runs it eagerly. The step is
# a few fused launches planned in Python; tracing it would gain nothing and would guard on every
# group's hyper-parameters (a recompile whenever a scheduler moves the lr). torch's lazy form of
# torch.compiler.disable: torch._dynamo (a second of imports) loads only when something compiles.
_untraced_step = torch._disable_dynamo(lambda opt, closure: opt._eager_step(closure))


def _caller_stacklevel() -> int:
    """The stacklevel of the first frame outside fused_lr and torch, so a warning names the
    user's line that called ``step()``."""
    skip = (os.path.dirname(os.path.dirname(__file__)), os.path.dirname(torch.__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


class FusedOptimizer(Optimizer):
    """The shared core. Subclasses set the class attributes below and implement the four hooks."""

    rule: ClassVar[int]  # fused_lr.core.layout RULES code
    coefficients: ClassVar[int]  # how the kernels' prepare stage derives the rule's scalars (layout.program)
    hypers: ClassVar[tuple[Hyper, ...]]  # the rule's own hyper-parameters (lr and COMMON come from here)
    new_state_restarts_step: ClassVar[bool] = False  # SGD: a new momentum buffer starts from the gradient

    def check_group(self, group: dict) -> str | None:
        """Cross-checks between a group's hyper-parameters (each passed its own check)."""
        return None

    def state_names(self, group: dict) -> tuple[str, ...]:
        """The per-parameter state tensors the rule keeps for this group (at most MAX_STATES)."""
        raise NotImplementedError

    def initial_state(self, name: str, group: dict) -> float:
        """The value every element of a new state tensor starts at."""
        return 0.0

    def rule_row(self, group: dict) -> tuple[int, tuple[float, ...]]:
        """The rule's flag bits and its RULE_COLS hyper columns for the kernels."""
        raise NotImplementedError

    @staticmethod
    def reference_rule(p: torch.Tensor, g: torch.Tensor, states: dict, step: int, lr: float, group: dict) -> None:
        """docs/step.md steps 6-7 on one tensor in torch: ``g`` is processed, clipped and (coupled)
        decayed; ``states`` maps state names to tensors; ``step`` counts earlier updates."""
        raise NotImplementedError

    _step_supports_amp_scaling = True  # GradScaler hands us grad_scale / found_inf

    def __init__(self, params, defaults: dict[str, Any], *, schedule: Schedule | None = None,
                 max_grad_norm: float | None = None, clip_value: float | None = None, error_if_nonfinite: bool = False,
                 lr_norm_power: float = 0.0, lr_norm_eps: float = 1e-6, backend: str = "auto", process_group=None):
        """``params`` and ``defaults`` (the rule's torch arguments) as for ``torch.optim.Optimizer``.
        The keywords every fused optimizer takes beside its torch counterpart's arguments:

        - ``schedule``: a :mod:`fused_lr.schedules` schedule s(k); the lr of a step is ``lr · s(k)``
          with k the group's clock, evaluated on the device (a group may set its own). None: the lr
          is ``group["lr"]`` as any ``torch.optim.lr_scheduler`` leaves it.
        - ``max_grad_norm``: clip the global gradient norm to this, as ``clip_grad_norm_`` (None: off).
        - ``clip_value``: clamp every gradient element to ±this first, as ``clip_grad_value_`` (None: off).
        - ``error_if_nonfinite``: raise, changing nothing, when the global norm is NaN or inf (the
          one check that reads the device).
        - ``lr_norm_power`` (γ) and ``lr_norm_eps`` (ε): the gradient-norm rate, every lr multiplied by
          ``(‖g‖ + ε)^-γ`` with ‖g‖ the step's global norm (after unscaling and value clipping, before
          the clip coefficient); 0 (the default) turns it off.
        - ``backend``: ``"auto"``, ``"reference"``, ``"numba"``, ``"triton"`` or ``"cuda"``
          (:func:`fused_lr.available_backends` says which run here).
        - ``process_group``: when each rank holds only a shard of plain parameters (ZeRO style), the
          ranks of this group all-reduce the squared norm so clipping sees the whole model; every rank
          must then call ``step()``. None under DDP, and under FSDP2 (the DTensors' mesh is used).
        """
        defaults = {**defaults, "schedule": schedule}
        name = type(self).__name__
        for problem in (clip_problem("max_grad_norm", max_grad_norm), clip_problem("clip_value", clip_value),
                        *_rate_problems(lr_norm_power, lr_norm_eps)):
            if problem:
                raise ValueError(f"{name}: {problem}")
        if not isinstance(error_if_nonfinite, bool):
            raise TypeError(f"{name}: error_if_nonfinite must be True or False, got {error_if_nonfinite!r}")
        if process_group is not None and not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
            raise TypeError(f"{name}: process_group must be a torch.distributed ProcessGroup or None, "
                            f"got {type(process_group).__name__}")
        backends.check_name(backend)
        self._check_group(defaults, name)
        self.max_grad_norm = max_grad_norm
        self.clip_value = clip_value
        self.error_if_nonfinite = error_if_nonfinite
        # the gradient-norm rate: every lr is multiplied by (N + lr_norm_eps) ** -lr_norm_power, with N
        # the global gradient norm of the step (docs/step.md, "The gradient-norm rate")
        self.lr_norm_power = lr_norm_power
        self.lr_norm_eps = lr_norm_eps
        self.backend_name = backend
        self.process_group = process_group
        self.last_grad_norm: torch.Tensor | None = None
        self._clocks: torch.Tensor | None = None
        self._reset_caches()
        super().__init__(params, defaults)

    # ---------------------------------------------------------------- declarations, validated
    @property
    def _hyper_names(self) -> tuple[str, ...]:
        return _hyper_names(type(self))

    def _check_group(self, group: dict, where: str) -> None:
        """Raise naming the first bad hyper-parameter of a param group."""
        if problem := lr_problem(group["lr"]):
            raise ValueError(f"{where}: {problem}")
        for h in (*COMMON, *self.hypers):
            if problem := h.problem(group[h.name]):
                raise ValueError(f"{where}: {problem}")
        sched = group["schedule"]
        if sched is not None and not isinstance(sched, Schedule):
            raise TypeError(f"{where}: schedule must be a fused_lr.schedules schedule or None, got "
                            f"{type(sched).__name__}")
        if sched is not None:
            sched.table()  # raises if the schedule does not fit a kernel table
        if problem := self.check_group(group):
            raise ValueError(f"{where}: {problem}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        param_group = {**param_group, "params": params}
        where = f"param group {len(self.param_groups)}"
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        tensors = [p[1] if isinstance(p, tuple) else p for p in params]  # named_parameters() pairs
        name = type(self).__name__
        for i, p in enumerate(tensors):
            _check_param(p, f"{where}, parameter {i}", seen, name)
        devices = {p.device for g in self.param_groups for p in g["params"]} | {p.device for p in tensors}
        if len(devices) > 1:
            raise ValueError(f"{where}: {name} fuses all parameters into one launch, so they must share one "
                             f"device; got {sorted(map(str, devices))}")
        self._check_group({**self.defaults, **param_group}, where)
        super().add_param_group(param_group)
        self._reset_caches()

    # ---------------------------------------------------------------- copies, pickling, checkpoints
    def _reset_caches(self) -> None:
        self._plans: dict = {}
        self._mesh_group = None
        self._structure: bytes | None = None  # the fingerprint the plans were built under (core/meta.py)
        self._settings: Settings | None = None
        self._group_keys: list = []
        self._backend = None
        self._last_runner: tuple | None = None  # (plan, chosen backend, what runs it)
        self._ran: str | None = None
        self._warned: set[str] = set()

    def __getstate__(self):
        state = super().__getstate__()
        state["fused_config"] = dict(max_grad_norm=self.max_grad_norm, clip_value=self.clip_value,
                                     error_if_nonfinite=self.error_if_nonfinite, lr_norm_power=self.lr_norm_power,
                                     lr_norm_eps=self.lr_norm_eps, backend_name=self.backend_name,
                                     process_group=self.process_group, clocks=self._clocks)
        return state

    def __setstate__(self, state):
        config = state.pop("fused_config", None)
        if config is None and "param_groups" in self.__dict__:
            # torch's load_state_dict hands over the new state and groups here, its last step before
            # committing them: every check runs first, so a rejected checkpoint changes nothing
            config = {"clocks": self._adopt(state["state"], state["param_groups"])}
        super().__setstate__(state)
        if config is not None:  # a copy, an unpickled optimizer or a loaded checkpoint
            clocks = config.pop("clocks")
            self.__dict__.update(config)
            self._clocks = clocks
            self.last_grad_norm = None
        self._reset_caches()

    def state_dict(self):
        # Schedules are configuration, like the optimizer class itself: they stay out of the
        # checkpoint (torch.load(weights_only=True) could not read them). Their position is each
        # group's clock, saved as "schedule_step".
        sd = super().state_dict()
        clocks = self._clocks.clone() if self._clocks is not None and self._clocks.numel() == len(self.param_groups) \
            else torch.zeros(len(self.param_groups))
        for gi, g in enumerate(sd["param_groups"]):
            g.pop("schedule", None)
            g["schedule_step"] = clocks[gi]
        # A GradScaler-skipped first step leaves state that holds nothing yet (created before the
        # kernel saw found_inf; step 0 marks it). torch's optimizers would take such buffers for real
        # ones, so such entries stay out, as torch keeps nothing before a first step.
        entries = [(i, st) for i, st in sd["state"].items() if isinstance(st, dict) and "step" in st]
        if entries:
            taken = torch.stack([torch.as_tensor(st["step"]).float().cpu() for _, st in entries]).tolist()
            for (i, _), k in zip(entries, taken, strict=True):
                if k == 0:
                    del sd["state"][i]
        return sd

    def _adopt(self, state: dict, groups: list[dict]) -> torch.Tensor:
        """Check a checkpoint that torch's ``load_state_dict`` has mapped onto our parameters (``state``
        and ``groups`` are its new objects, not yet ours) and complete it in place: our schedules, step
        counts as float32 tensors, the groups' clocks (returned). Raises naming the first problem."""
        name = type(self).__name__
        clocks = []
        for gi, (group, old) in enumerate(zip(groups, self.param_groups, strict=True)):
            where = f"{name}.load_state_dict: param group {gi}"
            schedule = group["schedule"] = old["schedule"]
            saved = group.pop("schedule_step", None)
            if saved is not None and not _is_step_count(saved):
                raise ValueError(f"{where}: schedule_step is {_describe(saved)}, not a step count")
            if schedule is not None and "initial_lr" in group:
                # a checkpoint of a torch lr_scheduler run: its "lr" is the scheduled value, the base
                # lr our schedule multiplies is its "initial_lr"
                group["lr"] = group["initial_lr"]
            self._check_group({**self.defaults, **group}, where)
            names = self.state_names({**self.defaults, **group})
            steps = []
            for i, p in enumerate(group["params"]):
                st = state.get(p)
                if st is None:
                    continue
                if not isinstance(st, dict):
                    raise ValueError(f"{where}, parameter {i}: its state is {_describe(st)}, not a dict")
                for key in names:
                    if st.get(key) is not None and (problem := _state_problem(key, st[key], p)):
                        raise ValueError(f"{where}, parameter {i}: {problem}")
                if "step" in st:
                    if not _is_step_count(st["step"]):
                        raise ValueError(f"{where}, parameter {i}: its 'step' is {_describe(st['step'])}, not a step "
                                         f"count")
                elif any(isinstance(v, torch.Tensor) for v in st.values()):
                    # a torch optimizer's checkpoint without step counts (torch.optim.SGD): state exists,
                    # so at least one step was taken
                    st["step"] = torch.ones(())
                if "step" in st:
                    st["step"] = torch.as_tensor(st["step"], dtype=torch.float32).to(p.device).reshape(())
                    steps.append(st["step"])
            if saved is not None:
                clocks.append(float(saved))
            else:  # an older checkpoint, or torch's: the group's most advanced parameter
                clocks.append(max((float(s) for s in steps), default=0.0))
                if steps and schedule is not None and not schedule.is_constant:
                    warnings.warn(f"{name}.load_state_dict: the checkpoint has no schedule clock for param group "
                                  f"{gi}; the schedule resumes at k={clocks[-1]:.0f}, the most steps any of its "
                                  f"parameters took", stacklevel=_caller_stacklevel())
        device = next((p.device for g in groups for p in g["params"]), None)
        return torch.tensor(clocks, dtype=torch.float32, device=device or "cpu")

    def _fill_group_defaults(self) -> None:
        """Groups of an older pickle or a torch checkpoint get the defaults of the hyper-parameters
        they lack (and nothing else: torch's own keys such as "differentiable" stay out)."""
        for group in self.param_groups:
            for h in self._hyper_names:
                group.setdefault(h, self.defaults[h])

    # ---------------------------------------------------------------- per-step preparation
    def _clock_tensor(self, device: torch.device) -> torch.Tensor:
        """The groups' clocks (float32, one per group) on the parameters' device."""
        n = len(self.param_groups)
        clocks = self._clocks
        if clocks is None or clocks.numel() != n or clocks.device != device:
            fresh = torch.zeros(n, dtype=torch.float32, device=device)
            if clocks is not None:
                m = min(n, clocks.numel())
                fresh[:m] = clocks[:m].to(device)
            self._clocks = clocks = fresh
        return clocks

    def _refresh_settings(self) -> Settings:
        """The kernels' hyper rows, refreshing (and validating) only the groups whose values changed."""
        groups = self.param_groups
        settings = self._settings
        if settings is None or settings.groups is not groups or len(settings.groups) != len(groups):
            self._fill_group_defaults()
            g = len(groups)
            settings = self._settings = Settings(
                groups=groups, hyper=np.zeros((g, L.HYPER_COLS)),
                schedules=np.zeros((g, L.MAX_SEGMENTS, L.SEGMENT_COLS)), lr_tensors={},
                max_grad_norm=None, clip_value=None, lr_norm_power=0.0, lr_norm_eps=0.0,
                reference_rule=self.reference_rule)
            self._group_keys = [None] * g
            self._state_names_of = [()] * g
        names = self._hyper_names
        for gi, group in enumerate(groups):
            sched = group["schedule"]
            key = (*map(group.__getitem__, names), 1.0 if sched is None else sched.host_scale)
            if _same(key, self._group_keys[gi]):
                continue
            self._check_group(group, f"param group {gi}")
            self._write_row(settings, gi, group)
            state_names = self.state_names(group)
            if self._group_keys[gi] is not None and state_names != self._state_names_of[gi]:
                self._plans.clear()  # the rule keeps other state now (momentum switched on, ...)
            self._group_keys[gi], self._state_names_of[gi] = key, state_names
            settings.version += 1
        wide = (self.max_grad_norm, self.clip_value, self.lr_norm_power, self.lr_norm_eps)
        if wide != (settings.max_grad_norm, settings.clip_value, settings.lr_norm_power, settings.lr_norm_eps):
            for problem in (clip_problem("max_grad_norm", self.max_grad_norm),
                            clip_problem("clip_value", self.clip_value),
                            *_rate_problems(self.lr_norm_power, self.lr_norm_eps)):
                if problem:
                    raise ValueError(f"{type(self).__name__}: {problem}")
            settings.max_grad_norm, settings.clip_value, settings.lr_norm_power, settings.lr_norm_eps = wide
            settings.version += 1
        return settings

    def _write_row(self, settings: Settings, gi: int, group: dict) -> None:
        sched = group["schedule"] or _CONSTANT
        lr = group["lr"]
        row = settings.hyper[gi]
        flags, rule_cols = self.rule_row(group)
        flags |= (L.F_MAXIMIZE if group["maximize"] else 0) | (L.F_DECOUPLED if group["decoupled_weight_decay"] else 0)
        # a group whose rule keeps a momentum buffer: derived from the state it declares
        flags |= L.F_MOMENTUM if "momentum_buffer" in self.state_names(group) else 0
        row[:] = 0.0
        if isinstance(lr, torch.Tensor):
            settings.lr_tensors[gi] = lr
            row[L.H_LR] = sched.host_scale  # times the tensor, on the device
        else:
            settings.lr_tensors.pop(gi, None)
            row[L.H_LR] = lr * sched.host_scale
        row[L.H_WEIGHT_DECAY] = group["weight_decay"]
        row[L.H_FLAGS] = flags
        row[L.H_R0:L.H_R0 + len(rule_cols)] = rule_cols
        settings.schedules[gi] = sched.table()

    def _current_plan(self) -> tuple[Plan | None, list]:
        """The plan for this step's set of gradients. Trusted only when the fingerprint of every
        parameter and state entry (fused_lr/core/meta.py) is the one it was built under; any change
        the user made goes through the full checks and a new plan."""
        groups = self.param_groups
        sig = meta.structure([g["params"] for g in groups], self.state, self._structure)
        if sig is not None:
            self._restructure(groups)
            self._structure = sig
        if self._complex and self.clip_value is not None:  # checked every step: clip_value may be set at any time
            raise RuntimeError(f"{type(self).__name__}: clip_value does not apply to complex parameters (torch's "
                               f"clip_grad_value_ refuses them); use max_grad_norm")
        params = self._flat
        if self._mesh_group is not None:  # FSDP2: the local shards may move under the same DTensors
            # fingerprinted as they are: a complex shard's real view is a new object every time
            shards = [self._local(p) for p in params]
            if (vsig := meta.structure([shards], {}, self._views_sig)) is not None:
                self._views, self._views_sig = [self._view(p) for p in params], vsig
                self._plans.clear()
        ptrs = None
        if self._direct:  # the kernels address the parameters themselves: one bulk read checks every gradient
            grads, ptrs = meta.grads(params)
        else:
            grads = [g if g is None else self._grad_view(g) for g in map(_GRAD, params)]
        absent = list(map(_IS_NONE, grads))  # identity tests: list.count(None) would call Tensor.__eq__
        if all(absent):
            return None, params
        mask = tuple(absent) if any(absent) else None
        plan = self._plans.get(mask)
        if plan is None:
            plan = self._plans[mask] = self._build_plan(grads)
        if not plan.in_order or len(plan.positions) != len(grads):
            grads = plan.pick(grads)
            ptrs = None if ptrs is None else plan.pick(ptrs)
        plan.set_grads(grads, self._where(plan), ptrs)
        return plan, params

    def _restructure(self, groups) -> None:
        """What the user may have changed since the last step, checked in full before anything is
        used: every parameter of every group (edited lists included), then the flat row order the
        plans index. Raises naming the parameter; nothing changes before."""
        name = type(self).__name__
        seen, devices = set(), set()
        for gi, group in enumerate(groups):
            for i, p in enumerate(group["params"]):
                _check_param(p, f"param group {gi}, parameter {i}", seen, name)
                devices.add(p.device)
        if len(devices) > 1:
            raise RuntimeError(f"{name} fuses all parameters into one launch, so they must share one device; got "
                               f"{sorted(map(str, devices))}")
        flat = [p for g in groups for p in g["params"]]
        self._complex = any(p.is_complex() for p in flat)
        plain = all(type(p) in _PLAIN for p in flat)
        self._flat = flat
        self._group_index = [gi for gi, g in enumerate(groups) for _ in g["params"]]
        self._index_in_group = [i for g in groups for i in range(len(g["params"]))]
        self._mesh_group = None if plain else _shard_group(flat)
        self._direct = plain and not self._complex
        self._views = flat if self._direct else [self._view(p) for p in flat]
        self._views_sig = None
        self._plans.clear()

    def _local(self, t: torch.Tensor) -> torch.Tensor:
        """A sharded DTensor's local shard, else ``t`` itself."""
        return t._local_tensor if self._mesh_group is not None and type(t) not in _PLAIN else t

    def _view(self, p: torch.Tensor) -> torch.Tensor:
        """What the step addresses for ``p``: its local shard (``_local``); a complex tensor as its
        real view (torch's optimizers step complex parameters as ``view_as_real``)."""
        p = self._local(p)
        return torch.view_as_real(p) if p.is_complex() else p

    def _grad_view(self, g: torch.Tensor) -> torch.Tensor:
        g = self._local(g)
        return torch.view_as_real(g) if g.is_complex() and g.layout == torch.strided else g

    def _name(self, pos: int) -> str:
        return f"param group {self._group_index[pos]}, parameter {self._index_in_group[pos]}"

    def _where(self, plan: Plan):
        return lambda row: self._name(plan.positions[row])

    def _build_plan(self, grads: list) -> Plan:
        rows = []
        for pos, (v, g) in enumerate(zip(self._views, grads, strict=True)):
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError(f"{self._name(pos)}: {type(self).__name__} does not support sparse gradients")
            if v.device.type == "meta":
                raise RuntimeError(f"{self._name(pos)} is a meta tensor (it has no data): materialise the model "
                                   f"(for example model.to_empty(device=...) and initialise it) before stepping")
            problem = addressable_problem(v)
            rows.append((pos, self._group_index[pos], v, problem and f"{self._name(pos)} being {problem}"))
        devices = {r[2].device for r in rows}
        if len(devices) > 1:
            raise RuntimeError(f"{type(self).__name__} fuses all parameters into one launch, so they must share one "
                               f"device; got {sorted(map(str, devices))}")
        return Plan.build(devices.pop(), self.rule, self.coefficients, rows)

    def _bind(self, plan: Plan, params: list) -> None:
        """Check every row's state against its parameter (raising, naming both, before anything
        changes), then create the missing state (back to back in one mapping, fused_lr/core/arena.py),
        lay the rest out like its parameter, and hand the addresses to the plan."""
        rows = []  # (row, parameter, what its state is laid out like, sharded?, [(name, state or None)])
        for row, pos in enumerate(plan.positions):
            p = params[pos]
            sharded = self._mesh_group is not None and type(p) not in _PLAIN
            base = p._local_tensor if sharded else p  # what the state is laid out like (complex stays complex)
            st = self.state.get(p)
            step = None if st is None else st.get("step")
            if step is not None and not _scalar_count(step):
                raise RuntimeError(f"{self._name(pos)}: its 'step' state is {_describe(step)}, not a step count")
            entries = []
            for name in self.state_names(self.param_groups[self._group_index[pos]]):
                t = None if st is None else st.get(name)
                if t is not None:
                    if problem := _state_problem(name, t, p):
                        raise RuntimeError(f"{self._name(pos)}: {problem}")
                    if sharded and type(t) in _PLAIN:
                        raise RuntimeError(f"{self._name(pos)}: its {name!r} state is a plain tensor, but the "
                                           f"parameter is a DTensor; load sharded checkpoints with "
                                           f"torch.distributed.checkpoint")
                entries.append((name, t))
            rows.append((row, p, base, sharded, entries))
        # every check passed: from here on nothing raises
        states, steps, new = [], [], []  # new: (row, name, group, state dict, parameter, its base) of missing state
        for row, p, base, sharded, entries in rows:
            group = self.param_groups[self._group_index[plan.positions[row]]]
            st = self.state[p]
            step = st.get("step")
            if not isinstance(step, torch.Tensor) or step.dtype != torch.float32 or step.device != base.device \
                    or step.dim() != 0:
                st["step"] = step = torch.as_tensor(0.0 if step is None else float(step), dtype=torch.float32).to(
                    base.device)
            sts = {}
            for name, t in entries:
                if t is None:
                    new.append((row, name, group, st, p if sharded else None, base))
                    if self.new_state_restarts_step:
                        step.zero_()
                    sts[name] = None  # filled below, keeping the declaration order
                    continue
                local = t._local_tensor if sharded else t
                if type(local) not in _PLAIN or local.dtype != base.dtype or local.device != base.device \
                        or local.stride() != base.stride():
                    # a checkpoint loaded into another dtype or layout: state of the parameter's kind
                    # (torch.optim.Optimizer.load_state_dict casts it likewise); never a raw read
                    # through the wrong type
                    local = torch.empty_like(base).copy_(local)
                    st[name] = _as_dtensor(local, p) if sharded else local
                sts[name] = torch.view_as_real(local) if local.is_complex() else local
            states.append(sts)
            steps.append(step)
        if new:
            made = states_like([plan.params[n[0]] for n in new], [self.initial_state(n[1], n[2]) for n in new])
            for (row, name, _, st, dtensor, base), local in zip(new, made, strict=True):
                states[row][name] = local
                kept = torch.view_as_complex(local) if base.is_complex() else local
                st[name] = kept if dtensor is None else _as_dtensor(kept, dtensor)
        plan.bind(states, steps)

    # ---------------------------------------------------------------- stepping
    def _backend_for(self, device: torch.device):
        if self._backend is None or device.type not in self._backend.devices:
            self._backend = backends.create(self.backend_name, device)
        return self._backend

    @property
    def backend(self) -> str | None:
        """The backend the last step ran on (None before the first step): the reference when the
        chosen backend handed it a step it cannot run (it warns once saying why)."""
        return self._ran

    def _runner(self, plan: Plan):
        """The backend that runs ``plan``: the chosen one, or the reference (once per plan and backend)."""
        last = self._last_runner
        if last is not None and last[0] is plan and last[1] is self._backend:
            return last[2]
        backend = self._backend_for(plan.device)
        runner = self._pick_runner(plan, backend)
        self._last_runner = (plan, backend, runner)
        return runner

    def _pick_runner(self, plan: Plan, backend):
        reason = plan.problem or backend.unsupported(plan)
        if reason is None or backend.name == "reference":  # the reference takes any tensor torch computes with
            return backend
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"fused_lr {backend.name} backend: running this step on the reference implementation "
                          f"because of {reason}", RuntimeWarning, stacklevel=_caller_stacklevel())
        return backends.create("reference", plan.device)

    def step(self, closure=None):
        """One fused step (docs/step.md). ``closure`` re-evaluates the loss, as for torch's optimizers."""
        if torch.compiler.is_compiling():
            return _untraced_step(self, closure)
        return self._eager_step(closure)

    def _eager_step(self, closure):
        if _HOOKS_OR_PROFILER(self):
            return self._hooked_step(closure)
        return self._step(closure)

    # torch.optim.Optimizer wraps an unmarked step() in its own wrapper (a profiler range and the
    # step hooks), which costs tens of microseconds a step; this step calls that wrapper only when a
    # hook is registered or the profiler runs.
    step.hooked = True

    def _hooked_step(self, closure):
        return Optimizer.profile_hook_step(type(self)._step)(self, closure)

    def _step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # torch.no_grad() without its per-call context object (a microsecond a step)
        grad_was = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            self._fused_step()
        finally:
            torch._C._set_grad_enabled(grad_was)
        return loss

    def _fused_step(self) -> None:
        settings = self._refresh_settings()
        plan, params = self._current_plan()
        scalars = StepScalars(getattr(self, "grad_scale", None), getattr(self, "found_inf", None))
        needs_norm = self.max_grad_norm is not None or self.error_if_nonfinite or self.lr_norm_power != 0
        if plan is None:
            self._step_without_gradients(params, scalars, needs_norm)
            return
        try:
            runner = self._runner(plan)
            norm = None
            if needs_norm:
                # read before update only for the non-finite check and the all-reduce
                final = self.error_if_nonfinite or self._norm_group is not None
                norm = runner.grad_norm(plan, settings, scalars, final)
                if self._norm_group is not None:
                    norm = self._global_norm(norm)
                # the one host read a step may make (docs/step.md): only when asked to check the norm
                if self.error_if_nonfinite and not bool(torch.isfinite(norm)) and not (
                        scalars.found_inf is not None and bool(scalars.found_inf)):
                    raise RuntimeError(
                        f"{type(self).__name__}: the global gradient norm is non-finite ({norm.item()}); nothing was "
                        f"changed. Pass error_if_nonfinite=False to skip this check.")
            if not plan.bound:
                self._bind(plan, params)
                # the state the plans now hold is part of what the next step checks
                self._structure = meta.structure([g["params"] for g in self.param_groups], self.state)
            clocks = self._clock_tensor(plan.device)
            runner.update(plan, settings, clocks, scalars, norm)
        finally:
            # the plan must not keep this step's gradients alive: zero_grad(set_to_none=True) frees
            # them before the next forward, as with torch's optimizers (set_grads brings the next ones)
            plan.grads = None
        self._ran = runner.name
        self.last_grad_norm = norm

    def _step_without_gradients(self, params: list, scalars: StepScalars, needs_norm: bool) -> None:
        """No parameter has a gradient: the groups' clocks still advance (as torch's schedulers do),
        and under process_group this rank still joins the norm's all-reduce."""
        if not params:
            return
        device = params[0].device
        if needs_norm and self._norm_group is not None:
            wide = any(p.dtype in (torch.float64, torch.complex128) for p in params)
            dtype = torch.float64 if wide else torch.float32
            self._global_norm(torch.zeros((), dtype=dtype, device=device))
        clocks = self._clock_tensor(device)
        if scalars.found_inf is None:
            clocks.add_(1.0)
        else:
            clocks.add_((scalars.found_inf.to(device) == 0).float())

    def _global_norm(self, norm: torch.Tensor) -> torch.Tensor:
        """The gradient norm over every rank's shard: sqrt of the all-reduced squared local norms.
        Stays on the device (a collective enqueued like any kernel, no host round trip)."""
        squared = norm * norm
        dist.all_reduce(squared, op=dist.ReduceOp.SUM, group=self._norm_group)
        return squared.sqrt()

    @property
    def _norm_group(self):
        """Whose shards make up the model: ``process_group``, else the mesh of sharded DTensor
        parameters (FSDP2), else None (every rank holds every parameter)."""
        return self.process_group if self.process_group is not None else self._mesh_group

    # ---------------------------------------------------------------- introspection
    def current_lr(self) -> list[float]:
        """Each group's lr for its next step: base lr x schedule(k), k the group's clock (read from
        the device)."""
        n = len(self.param_groups)
        ks = [0.0] * n if self._clocks is None or self._clocks.numel() != n else self._clocks.tolist()
        return [float(group["lr"]) * (group["schedule"] or _CONSTANT)(int(k))
                for group, k in zip(self.param_groups, ks, strict=True)]
