"""The CUDA C++ backend: the kernels of csrc/ (module ``fused_lr._cuda``) driven from torch.

The extension knows nothing of torch: it takes raw device addresses and the current stream as
integers. This side lays the tensors out in device tables (int64 rows, see ``csrc/fused_lr_math.h``)
once and reuses them while no tensor moves, so a step is a handful of launches with no host
synchronisation: the norm, grad_scale, found_inf and every step count are read on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fused_lr.backends import BackendUnavailable
from fused_lr.core.plan import GroupPlan, StepPlan

# Elements per thread block. 64 Ki elements of 512 threads: ResNet-50's 25.6 M parameters
# make ~500 blocks, about one resident wave on an A100/H100.
CHUNK_SIZE = 1 << 16

# Mirrors of csrc/fused_lr_math.h and csrc/launch.h.
TABLE_COLS = 8
PARAM, GRAD, BUF, STEP, NUMEL, FIRST_CHUNK, GROUP, FRESH = range(TABLE_COLS)
HYPER_COLS = 8
KERNEL_LR, MOMENTUM, DAMPENING, WEIGHT_DECAY, FLAGS = range(5)
NESTEROV, DECOUPLED, MAXIMIZE = 1, 2, 4
DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}

_UNBUILT = Path(__file__).parent.parent / "_cuda_unbuilt.txt"
_ext = None  # fused_lr._cuda once load() succeeded


def chunk_layout(numels: list[int], chunk_size: int) -> tuple[list[int], int]:
    """Each tensor's first chunk (block) and the number of chunks: tensor i owns the chunks
    ``first[i] .. first[i] + ceil(numels[i] / chunk_size) - 1``."""
    first, total = [], 0
    for n in numels:
        first.append(total)
        total += -(-n // chunk_size)
    return first, total


def group_row(group: GroupPlan) -> list[float]:
    """A group's hyper-parameter row (HYPER_COLS float64 values)."""
    row = [0.0] * HYPER_COLS
    row[KERNEL_LR], row[MOMENTUM], row[DAMPENING] = group.kernel_lr, group.momentum, group.dampening
    row[WEIGHT_DECAY] = group.weight_decay
    row[FLAGS] = float((NESTEROV if group.nesterov else 0) | (DECOUPLED if group.decoupled_weight_decay else 0)
                       | (MAXIMIZE if group.maximize else 0))
    return row


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the kernels address element i at data_ptr + i."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape, strict=True) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _upload(array: np.ndarray, device: torch.device, into: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(device copy, pinned source): an asynchronous copy, so no host sync. The source is kept
    by the caller, since a copy captured in a CUDA graph reads it again at every replay. With
    ``into`` of the same shape the copy goes there, so addresses that kernels (or a captured
    graph) use stay valid. (On a CPU device, where the host tests run, no pinning.)"""
    host = torch.from_numpy(array)
    if device.type == "cuda":
        host = host.pin_memory()
    if into is not None and into.shape == host.shape:
        return into.copy_(host, non_blocking=True), host
    return host.to(device, non_blocking=True), host


@dataclass
class _Bucket:
    """The tensors of one dtype: a slice of the table, one launch."""

    dtype: int
    first_row: int
    n_tensors: int
    n_chunks: int
    first_partial: int  # where its blocks write their partial sums


class _Layout:
    """The device table of one step's tensors, grouped by dtype."""

    def __init__(self, plan: StepPlan, with_state: bool):
        entries = []  # (dtype, group index, i, param, grad) in table order
        for gi, group in enumerate(plan.groups):
            for i, (p, g) in enumerate(zip(group.params, group.grads, strict=True)):
                if p.dtype not in DTYPES:
                    raise RuntimeError(f"cuda backend: param group {gi}, parameter {i} has dtype {p.dtype}; "
                                       f"supported are {sorted(map(str, DTYPES))}")
                entries.append((DTYPES[p.dtype], gi, i, p, g))
        entries.sort(key=lambda e: e[0])  # stable: table order within a dtype is plan order
        rows = np.zeros((len(entries), TABLE_COLS), dtype=np.int64)
        self.buckets: list[_Bucket] = []
        for r, (dtype, gi, i, p, g) in enumerate(entries):
            group = plan.groups[gi]
            tensors = [p, g]
            rows[r, PARAM], rows[r, GRAD], rows[r, NUMEL], rows[r, GROUP] = p.data_ptr(), g.data_ptr(), p.numel(), gi
            if with_state:
                rows[r, STEP] = group.steps[i].data_ptr()
                if group.momentum != 0:
                    tensors.append(group.bufs[i])
                    rows[r, BUF], rows[r, FRESH] = group.bufs[i].data_ptr(), group.fresh[i]
            if not _dense(p) or any(t.stride() != p.stride() for t in tensors):
                raise RuntimeError(
                    f"cuda backend: param group {gi}, parameter {i} (shape {tuple(p.shape)}): the parameter, its "
                    f"gradient and momentum buffer must be dense with equal strides; got strides "
                    f"{[t.stride() for t in tensors]}")
            if not self.buckets or self.buckets[-1].dtype != dtype:
                self.buckets.append(_Bucket(dtype, r, 0, 0, 0))
            self.buckets[-1].n_tensors += 1
        self.chunk_size = CHUNK_SIZE
        self.n_chunks = 0
        for b in self.buckets:
            first, b.n_chunks = chunk_layout(rows[b.first_row:b.first_row + b.n_tensors, NUMEL].tolist(),
                                             self.chunk_size)
            rows[b.first_row:b.first_row + b.n_tensors, FIRST_CHUNK] = first
            if b.n_chunks >= 1 << 31:
                raise RuntimeError("cuda backend: too many parameters for one launch grid")
            b.first_partial = self.n_chunks
            self.n_chunks += b.n_chunks
        self.n_tensors = len(entries)
        self.table, self._pinned = _upload(rows, plan.device)
        # the norm pass's per-block partial sums, one per chunk of every bucket
        self.partials = None if with_state else torch.empty(max(self.n_chunks, 1), dtype=torch.float64,
                                                            device=plan.device)

    def row_ptr(self, bucket: _Bucket) -> int:
        return self.table.data_ptr() + bucket.first_row * TABLE_COLS * self.table.element_size()

    def partials_ptr(self, bucket: _Bucket) -> int:
        return self.partials.data_ptr() + bucket.first_partial * self.partials.element_size()


def _layout_key(plan: StepPlan, with_state: bool) -> tuple:
    key = [plan.device]
    for group in plan.groups:
        key.append(len(group.params))
        pairs = zip(group.params, group.grads, strict=True)
        key += [(p.data_ptr(), g.data_ptr(), p.dtype, p.numel()) for p, g in pairs]
        if with_state:
            key += [s.data_ptr() for s in group.steps]
            key += [b.data_ptr() for b in group.bufs]
            key.append(tuple(group.fresh))
    return tuple(key)


def _float_ptr(t: torch.Tensor | None, device: torch.device, keep: list) -> int:
    """The address of a float32 scalar on ``device`` (0 for None); conversions stay on the device."""
    if t is None:
        return 0
    if t.dtype != torch.float32 or t.device != device:
        t = t.to(device=device, dtype=torch.float32)
        keep.append(t)
    return t.data_ptr()


def _stream(device: torch.device) -> int:
    """The device's current torch stream as the integer handle the kernels are launched on. (The
    extension selects the device itself, in its own CUDA runtime, from ``device.index``.)"""
    return torch.cuda.current_stream(device).cuda_stream


class CudaBackend:
    name = "cuda"
    devices = frozenset({"cuda"})

    def __init__(self):
        self._layouts: dict[bool, tuple[tuple, _Layout]] = {}
        self._groups: tuple | None = None  # (key, sched, hyper, pinned sources)

    def _layout(self, plan: StepPlan, with_state: bool) -> _Layout:
        key = _layout_key(plan, with_state)
        cached = self._layouts.get(with_state)
        if cached is None or cached[0] != key:
            cached = (key, _Layout(plan, with_state))
            self._layouts[with_state] = cached
        return cached[1]

    def _group_tables(self, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """(schedule tables (G, 16, 8), hyper rows (G, 8)) on the device, uploaded when they change
        (a new lr from a torch lr_scheduler, ReduceOnPlateau's factor)."""
        key = (plan.device, *((id(g.schedule), *group_row(g)) for g in plan.groups))
        if self._groups is None or self._groups[0] != key:
            sched = np.stack([g.table for g in plan.groups])
            hyper = np.array([group_row(g) for g in plan.groups], dtype=np.float64)
            same_device = self._groups is not None and self._groups[0][0] == plan.device
            old_sched, old_hyper = self._groups[1:3] if same_device else (None, None)
            sched_dev, sched_host = _upload(sched, plan.device, into=old_sched)
            hyper_dev, hyper_host = _upload(hyper, plan.device, into=old_hyper)
            # the schedules are held so their ids in the key stay theirs
            self._groups = (key, sched_dev, hyper_dev, (sched_host, hyper_host, [g.schedule for g in plan.groups]))
        return self._groups[1], self._groups[2]

    def grad_norm(self, plan: StepPlan) -> torch.Tensor:
        lay = self._layout(plan, with_state=False)
        norm = torch.empty((), dtype=plan.norm_dtype, device=plan.device)
        keep = []
        grad_scale = _float_ptr(plan.grad_scale, plan.device, keep)
        clip = plan.clip_value
        stream = _stream(plan.device)
        _ext.set_device(plan.device.index)
        for b in lay.buckets:
            _ext.norm_partials(b.dtype, lay.row_ptr(b), b.n_tensors, b.n_chunks, lay.chunk_size, grad_scale,
                               clip is not None, clip or 0.0, lay.partials_ptr(b), stream)
        _ext.norm_finish(lay.partials.data_ptr(), lay.n_chunks, norm.data_ptr(), norm.dtype == torch.float64, stream)
        return norm

    def update(self, plan: StepPlan, norm: torch.Tensor | None) -> None:
        lay = self._layout(plan, with_state=True)
        sched, hyper = self._group_tables(plan)
        if norm is not None and (norm.dtype not in (torch.float32, torch.float64) or norm.device != plan.device):
            raise RuntimeError(f"cuda backend: the norm must be a float32/float64 tensor on {plan.device}, "
                               f"got {norm.dtype} on {norm.device}")
        keep = []
        grad_scale = _float_ptr(plan.grad_scale, plan.device, keep)
        found_inf = _float_ptr(plan.found_inf, plan.device, keep)
        clip = plan.clip_value
        stream = _stream(plan.device)
        _ext.set_device(plan.device.index)
        for b in lay.buckets:
            _ext.update(b.dtype, lay.row_ptr(b), b.n_tensors, b.n_chunks, lay.chunk_size, sched.data_ptr(),
                        hyper.data_ptr(), 0 if norm is None else norm.data_ptr(),
                        norm is not None and norm.dtype == torch.float64, plan.max_grad_norm or 0.0,
                        clip is not None, clip or 0.0, grad_scale, found_inf, stream)
        # after every block of the update has read the old counts (stream order)
        _ext.increment_steps(lay.table.data_ptr(), lay.n_tensors, found_inf, stream)


def load():
    global _ext
    try:
        from fused_lr import _cuda
    except ImportError as e:
        if _UNBUILT.is_file():
            raise BackendUnavailable(_UNBUILT.read_text().strip()) from None
        raise BackendUnavailable(f"the extension fused_lr._cuda is not built or does not load: {e}") from None
    if (_cuda.TABLE_COLS, _cuda.HYPER_COLS) != (TABLE_COLS, HYPER_COLS):
        raise BackendUnavailable("fused_lr._cuda is stale (table layout differs); reinstall fused_lr")
    if not torch.cuda.is_available():
        raise BackendUnavailable("no CUDA device (torch.cuda.is_available() is False)")
    count, err = _cuda.probe()
    if err or count == 0:
        raise BackendUnavailable(f"fused_lr._cuda sees no usable CUDA device: {err or 'device count 0'}")
    _ext = _cuda
    return CudaBackend
