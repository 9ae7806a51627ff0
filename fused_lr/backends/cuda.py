"""The CUDA C++ backend: the kernels of csrc/ (module ``fused_lr._cuda``) driven from torch.

The extension knows nothing of torch: it takes raw device addresses and the current stream as
integers. A step is at most two calls into it, with no host synchronisation:

* ``norm`` (for global-norm clipping, the gradient-norm rate or ``error_if_nonfinite``): per
  dtype bucket, a block per chunk of ``CUDA_CHUNK`` elements writes the sum of squares of its
  processed gradients; when the host reads the norm before the update (``final``: the non-finite
  check, an all-reduce), one block then sums them, in a fixed order, into the norm;
* ``step``: ``prepare`` (one block) sums the partials into the norm when ``norm`` left that to it,
  writes this step's scalars to a scratch table (lr from the group's clock and schedule, times a
  tensor lr, read on the device, and the gradient-norm rate; the decoupled decay factor; the
  momentum buffer's first use; the rule's coefficients, Adam's bias corrections and Adagrad's lr
  decay from the tensor's step count; the step-wide clip coefficient, 1/grad_scale and
  found_inf), then advances every step count and group clock unless found_inf is set
  (docs/step.md, "Skipped steps"); ``update`` (per bucket, a block per chunk; one kernel per
  rule: SGD, Adam/AdamW, RMSprop, Adagrad) applies docs/step.md steps 0-7 with 16-byte loads
  where the row is aligned, reading only the scratch. One dtype bucket: three launches a step.

The device tables follow the plan (layout: fused_lr/core/layout.py). They are built once per plan
(``rebuilds`` counts it); the tensor table is re-uploaded, into the same buffer, only when the
plan's gradient or state addresses moved, and the group tables only when the settings changed.
Uploads, the capture guard and the buffers a captured CUDA graph reads are those of
fused_lr/backends/device_tables.py, shared with the Triton backend, whose docstring states what a
replayed graph sees.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from fused_lr.backends import BackendUnavailable
from fused_lr.backends.device_tables import NEW_ADDRESSES, NEW_PLAN, NEW_SETTINGS, DeviceTables, LrTensors
from fused_lr.core import layout as L
from fused_lr.core.plan import Plan, Settings, StepScalars

_UNBUILT = Path(__file__).parent.parent / "_cuda_unbuilt.txt"
_ext = None  # fused_lr._cuda once load() succeeded
_CONSTANT = re.compile(r"constexpr [\w ]+? (\w+) = ([^;]+);")


def layout_constants(header: str) -> dict[str, str]:
    """``name -> value`` of every constant of a layout header (fused_lr.core.layout.c_header)."""
    return dict(_CONSTANT.findall(header))


def layout_mismatch(module) -> str | None:
    """How the layout ``module`` was compiled with differs from fused_lr/core/layout.py, or None."""
    built = layout_constants(getattr(module, "LAYOUT_HEADER", ""))
    wanted = layout_constants(L.c_header())
    diffs = [f"{name} = {built.get(name, 'missing')} there, {value} in layout.py"
             for name, value in wanted.items() if built.get(name) != value]
    diffs += [f"{name} = {built[name]} there, absent from layout.py" for name in built.keys() - wanted.keys()]
    if not diffs:
        return None
    more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
    return "; ".join(diffs[:3]) + more


_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _stream(device: torch.device) -> int:
    """The device's current torch stream as the integer handle the kernels are launched on (0 off
    CUDA, for the host twin)."""
    if device.type != "cuda":
        return 0
    if _RAW_STREAM is not None:
        return _RAW_STREAM(device.index)
    return torch.cuda.current_stream(device).cuda_stream


def _f32_ptr(t: torch.Tensor | None, device: torch.device, keep: list) -> int:
    """The address of a float32 scalar on ``device`` (0 for None); conversions stay on the device."""
    if t is None:
        return 0
    if t.dtype != torch.float32 or t.device != device:
        t = t.to(device=device, dtype=torch.float32)
        keep.append(t)
    return t.data_ptr()


def check_rows(plan: Plan, codes: dict[torch.dtype, int]) -> None:
    """Every row's parameter, gradient and state tensors have the bucket's dtype, the plan's device
    and the parameter's shape and strides, and the tensor table holds their addresses: the kernel
    of a bucket reads every address of its rows as that bucket's element type."""
    table = plan.table
    for b in plan.buckets:
        if b.dtype not in codes:
            raise RuntimeError(f"fused_lr cuda backend: no kernel for dtype {b.dtype}")
        for i in range(b.start, b.stop):
            p = plan.params[i]
            named = [("parameter", p, L.T_PARAM), ("gradient", plan.grads[i], L.T_GRAD)]
            if plan.states is not None:
                named += [(f"state {name!r}", t, L.T_STATE0 + j) for j, (name, t) in enumerate(plan.states[i].items())]
            for what, t, col in named:
                if t.dtype != b.dtype or t.device != plan.device or t.shape != p.shape or t.stride() != p.stride():
                    raise RuntimeError(
                        f"fused_lr cuda backend: parameter {plan.positions[i]} (in the optimizer's order): its {what} "
                        f"is {t.dtype} {tuple(t.shape)} with strides {t.stride()} on {t.device}, but the kernel reads "
                        f"it as {b.dtype} laid out like the parameter ({tuple(p.shape)}, strides {p.stride()}, "
                        f"{plan.device}); the step was not run")
                if int(table[i, col]) != t.data_ptr():
                    raise RuntimeError(f"fused_lr cuda backend: the plan's table does not hold the address of the "
                                       f"{what} of parameter {plan.positions[i]}; the step was not run")
            if plan.steps is not None:
                s = plan.steps[i]
                if s.dtype != torch.float32 or s.device != plan.device or s.numel() != 1 \
                        or int(table[i, L.T_STEP]) != s.data_ptr():
                    raise RuntimeError(f"fused_lr cuda backend: the step count of parameter {plan.positions[i]} must "
                                       f"be a float32 scalar on {plan.device} at the table's address, got {s.dtype} "
                                       f"{tuple(s.shape)} on {s.device}")


class _Tables:
    """The device side of one plan: its tensor table, each block's row, the prepare stage's
    scratch and the norm's partial sums, with the launch description of its dtype buckets."""

    def __init__(self, plan: Plan, codes: dict[torch.dtype, int], chunk: int, tables: DeviceTables):
        numel = plan.table[:, L.T_NUMEL]
        per = (numel + chunk - 1) // chunk
        first = np.cumsum(per) - per
        plan.table[:, L.T_FIRST_CHUNK] = first  # the column the plan leaves to CUDA's grid numbering
        self.n_tensors = len(numel)
        self.n_blocks = int(per.sum())
        self.dtypes = tuple(codes[b.dtype] for b in plan.buckets)
        self.first_blocks = tuple(int(first[b.start]) for b in plan.buckets)
        self.block_counts = tuple(int(per[b.start:b.stop].sum()) for b in plan.buckets)
        dev = plan.device
        self.index = -1 if dev.type != "cuda" else dev.index  # the launches' device (-1: the host twin's)
        self.blocks = tables.upload(np.repeat(np.arange(self.n_tensors, dtype=np.int32), per), dev, why=NEW_PLAN)
        self.scratch = torch.empty((self.n_tensors + 1, L.COEF_COLS), dtype=torch.float64, device=dev)
        self.partials = torch.empty(max(self.n_blocks, 1), dtype=torch.float64, device=dev)
        self.scratch_ptr, self.partials_ptr = self.scratch.data_ptr(), self.partials.data_ptr()
        self.set_table(torch.empty((self.n_tensors, L.TENSOR_COLS), dtype=torch.int64, device=dev))

    def set_table(self, table: torch.Tensor) -> None:
        """Use ``table`` as the device tensor table (the launch arguments follow it)."""
        self.table = table
        # the leading arguments of fused_lr._cuda's norm and step (after step's rule)
        self.norm_head = (table.data_ptr(), self.blocks.data_ptr(), self.dtypes, self.first_blocks, self.block_counts,
                          self.n_blocks)
        self.step_head = (table.data_ptr(), self.blocks.data_ptr(), self.n_tensors, self.dtypes, self.first_blocks,
                          self.block_counts)

    def buffers(self) -> tuple[torch.Tensor, ...]:
        return self.table, self.blocks, self.scratch, self.partials


class _Groups:
    """The device side of the settings: hyper rows, schedule tables and the addresses of tensor lrs
    (float32 and float64 ones on the device as they are; any other staged into ``stage`` each step).
    ``last``: the groups these replace, whose buffers are uploaded into where they can be."""

    def __init__(self, plan: Plan, settings: Settings, tables: DeviceTables, last: _Groups | None):
        dev = plan.device
        n = len(settings.groups)
        self.version, self.device, self.n_groups = settings.version, dev, n
        self.hyper = tables.upload(settings.hyper, dev, last.hyper if last else None, why=NEW_SETTINGS)
        self.sched = tables.upload(settings.schedules, dev, last.sched if last else None, why=NEW_SETTINGS)
        self.lr = LrTensors(tables, settings.lr_tensors, n, dev, last.lr if last else None)
        lrs = self.lr.table.data_ptr()
        # step's arguments from hyper to n_groups: the addresses of float32 lrs, then of float64 ones
        self.head = (self.hyper.data_ptr(), self.sched.data_ptr(), lrs, lrs + 8 * n)

    def buffers(self) -> tuple[torch.Tensor, ...]:
        return self.hyper, self.sched, *self.lr.buffers()


class CudaBackend:
    name = "cuda"
    devices = frozenset({"cuda"})

    def __init__(self, ext=None):
        """``ext``: the kernels' module, fused_lr._cuda unless given (the host twin of the tests, or
        a stub whose launches do nothing for timing the host side)."""
        self._ext = ext = ext or _ext
        self._codes = {getattr(torch, name): code for name, code in ext.DTYPES.items()}
        # elements per block, as the kernels were compiled (load() holds it equal to layout.py's)
        self._chunk = int(layout_constants(ext.LAYOUT_HEADER)["CUDA_CHUNK"])
        self.rebuilds = 0  # device tables built for a new plan (not gradient-address refreshes)
        self._plan: Plan | None = None
        self._tables: _Tables | None = None
        self._versions: tuple[int, int] | None = None  # (grad, state) versions the table holds
        self._checked: int | None = None  # the state version whose rows check_rows passed
        self._settings: Settings | None = None
        self._groups: _Groups | None = None
        self._device_tables = DeviceTables(self.name)
        self._norm: torch.Tensor | None = None  # the last norm grad_norm returned (known good)
        self._pending: tuple | None = None  # (norm, tables) whose partials the next update sums
        self._clocks: torch.Tensor | None = None  # the last clocks that passed the checks

    def unsupported(self, plan: Plan) -> str | None:
        bad = [b.dtype for b in plan.buckets if b.dtype not in self._codes]
        return f"dtype {bad[0]} (the CUDA kernels take {sorted(map(str, self._codes))})" if bad else None

    # ------------------------------------------------------------------ device tables
    def _tables_for(self, plan: Plan, capturing: bool) -> _Tables:
        tabs = self._tables
        if plan is not self._plan:
            if capturing:
                raise self._device_tables.capture_error(NEW_PLAN)
            if (reason := self.unsupported(plan)) is not None:
                raise RuntimeError(f"fused_lr cuda backend: cannot run this plan: {reason}")
            tabs = self._tables = _Tables(plan, self._codes, self._chunk, self._device_tables)
            self._plan, self._versions, self._checked = plan, None, None
            self.rebuilds += 1
        versions = (plan.grad_version, plan.state_version)
        if versions != self._versions:
            if plan.state_version != self._checked:
                check_rows(plan, self._codes)
                self._checked = plan.state_version
            table = self._device_tables.upload(plan.table, plan.device, tabs.table, why=NEW_ADDRESSES)
            if table is not tabs.table:  # a captured graph reads the old one
                tabs.set_table(table)
            self._versions = versions
        return tabs

    def _groups_for(self, plan: Plan, settings: Settings, capturing: bool) -> _Groups:
        groups = self._groups
        if groups is None or settings is not self._settings or settings.version != groups.version \
                or groups.device != plan.device or groups.lr.moved():
            groups = self._groups = _Groups(plan, settings, self._device_tables, groups)
            self._settings = settings
        groups.lr.refresh(plan.device, capturing)
        return groups

    # ------------------------------------------------------------------ the step
    def grad_norm(self, plan: Plan, settings: Settings, scalars: StepScalars, final: bool = True) -> torch.Tensor:
        capturing = self._device_tables.capturing(plan.device)
        tabs = self._tables_for(plan, capturing)
        norm = self._norm = torch.empty((), dtype=plan.norm_dtype, device=plan.device)
        # not final: the step's prepare sums the partials into it (one launch less)
        self._pending = None if final else (norm, tabs)
        keep = []
        clip = settings.clip_value
        self._ext.norm(*tabs.norm_head, _f32_ptr(scalars.grad_scale, plan.device, keep), clip is not None, clip or 0.0,
                       tabs.partials_ptr, norm.data_ptr(), norm.dtype == torch.float64, final, tabs.index,
                       _stream(plan.device))
        if capturing:
            self._device_tables.hold(*tabs.buffers())
        return norm

    def update(self, plan: Plan, settings: Settings, clocks: torch.Tensor, scalars: StepScalars,
               norm: torch.Tensor | None) -> None:
        dev = plan.device
        if clocks is not self._clocks:
            if clocks.dtype != torch.float32 or clocks.device != dev or clocks.numel() != len(settings.groups):
                raise RuntimeError(f"fused_lr cuda backend: the group clocks must be {len(settings.groups)} float32 "
                                   f"values on {dev}, got {clocks.numel()} {clocks.dtype} on {clocks.device}")
            self._clocks = clocks
        if norm is not None and norm is not self._norm and (norm.dtype not in (torch.float32, torch.float64)
                                                            or norm.device != dev):
            raise RuntimeError(f"fused_lr cuda backend: the norm must be a float32/float64 tensor on {dev}, "
                               f"got {norm.dtype} on {norm.device}")
        capturing = self._device_tables.capturing(dev)
        tabs = self._tables_for(plan, capturing)
        groups = self._groups_for(plan, settings, capturing)
        finish = self._pending is not None and norm is self._pending[0] and tabs is self._pending[1]
        self._pending = None
        keep = []
        clip = settings.clip_value
        self._ext.step(plan.rule, plan.coefficients, *tabs.step_head, *groups.head, clocks.data_ptr(), groups.n_groups,
                       tabs.scratch_ptr,
                       0 if norm is None else norm.data_ptr(), norm is not None and norm.dtype == torch.float64,
                       tabs.partials_ptr if finish else 0, tabs.n_blocks, settings.max_grad_norm is not None,
                       settings.max_grad_norm or 0.0, settings.lr_norm_power, settings.lr_norm_eps,
                       _f32_ptr(scalars.grad_scale, dev, keep), _f32_ptr(scalars.found_inf, dev, keep),
                       clip is not None, clip or 0.0, tabs.index, _stream(dev))
        if capturing:
            self._device_tables.hold(*tabs.buffers(), *groups.buffers())


def load():
    global _ext
    try:
        from fused_lr import _cuda
    except ImportError as e:
        if _UNBUILT.is_file():
            raise BackendUnavailable(_UNBUILT.read_text().strip()) from None
        raise BackendUnavailable(f"the extension fused_lr._cuda is not built or does not load: {e}") from None
    except Exception as e:  # a broken build: say so, do not break fused_lr
        raise BackendUnavailable(f"the extension fused_lr._cuda does not load: {type(e).__name__}: {e}") from None
    if (stale := layout_mismatch(_cuda)) is not None:
        raise BackendUnavailable(f"fused_lr._cuda was built with another kernel layout than fused_lr/core/layout.py "
                                 f"({stale}); reinstall fused_lr to rebuild it")
    if not torch.cuda.is_available():
        raise BackendUnavailable("no CUDA device (torch.cuda.is_available() is False)")
    try:
        count, err = _cuda.probe()
    except Exception as e:
        count, err = 0, f"{type(e).__name__}: {e}"
    if err or count == 0:
        raise BackendUnavailable(f"fused_lr._cuda sees no usable CUDA device: {err or 'device count 0'}")
    _ext = _cuda
    return CudaBackend
