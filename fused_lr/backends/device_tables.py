"""The device tables of the GPU backends (Triton and CUDA): uploads, the capture guard and the
buffers a captured CUDA graph reads.

A backend keeps device copies of its step plan's numpy tables (tensor table, chunk or block
table, hyper rows, schedule tables, lr addresses) and of its scratch. Uploads are versioned: a
backend uploads a table only when the version of what it mirrors moved (``Plan.grad_version`` and
``Plan.state_version``, ``Settings.version``), into the buffer it had when that buffer can take it.
An upload goes from a fresh pinned host tensor without blocking; torch's caching host allocator
keeps that tensor until its copy has run, so no in-flight copy's source is ever overwritten.

CUDA graphs. A captured step must not upload: the graph would replay a copy from a pinned host
buffer long gone by then. So ``upload`` raises while a graph is being captured, saying to run
eager steps first. Every buffer a captured step read is held (``hold``): kept for the life of the
``DeviceTables``, and no upload writes it again; a later change (new gradients, a new lr, a new
plan) is uploaded into a fresh buffer instead, so a graph never reads freed or rewritten tables.
(Scratch that every step writes before reading it, such as the per-step coefficients, is held
too and shared with eager steps, which the stream orders.)

What a replayed graph sees: a replay runs with the tables as they were at capture (the
hyper-parameters, the schedules, every address). The group clocks and the step counts live in
device memory and advance on replay; what a step reads at an address (a tensor lr, the
gradients' values, ``grad_scale`` and ``found_inf``) is read as it is at replay. A change made
after capture (a new lr or momentum, another schedule, new gradient tensors) takes effect for
eager steps only; re-capture to change a graph.

Only devices a CUDA graph can read (``graph_device``) are ever captured: CPU tensors, such as the
Triton interpreter's, never are. Tests make the CPU stand in for such a device by replacing
``graph_device`` on an instance.
"""

from __future__ import annotations

import numpy as np
import torch

# what made an upload necessary, as the capture error says it
NEW_PLAN = "the set of tensors to step changed (a new plan)"
NEW_ADDRESSES = "gradient or state addresses changed"
NEW_SETTINGS = "the hyper-parameters, schedules or lr tensors changed"


def graph_device(device: torch.device) -> bool:
    """Whether a CUDA graph can capture work on ``device``."""
    return device.type == "cuda"


class DeviceTables:
    """One backend's uploads and the buffers its captured steps read. ``backend`` names it in errors."""

    def __init__(self, backend: str):
        self.backend = backend
        self.graph_device = graph_device
        self._held: list[torch.Tensor] = []
        self._held_ids: set[int] = set()

    def capturing(self, device: torch.device) -> bool:
        """Whether work on ``device`` is being captured in a CUDA graph right now."""
        return self.graph_device(device) and torch.cuda.is_current_stream_capturing()

    def capture_error(self, why: str) -> RuntimeError:
        return RuntimeError(
            f"fused_lr {self.backend} backend: {why} while a CUDA graph is being captured, and the captured step "
            f"would replay a copy from host memory. Run two eager steps with the same tensors and settings before "
            f"capturing, and keep the gradients allocated across the capture (zero_grad(set_to_none=False), or "
            f"copy into static .grad tensors)")

    def upload(self, array: np.ndarray, device: torch.device, into: torch.Tensor | None = None, *,
               why: str) -> torch.Tensor:
        """A copy of ``array`` on ``device``: written into ``into`` when it fits (shape, dtype, device)
        and no captured graph reads it, so its address stays valid; into a new buffer otherwise.
        ``why`` says in the capture error what made the upload necessary."""
        # self.capturing, inlined: every step whose gradients moved uploads the tensor table
        if self.graph_device(device) and torch.cuda.is_current_stream_capturing():
            raise self.capture_error(why)
        host = torch.from_numpy(array)
        if into is None or id(into) in self._held_ids or into.shape != host.shape or into.dtype != host.dtype \
                or into.device != device:
            into = torch.empty(host.shape, dtype=host.dtype, device=device)
        if device.type == "cuda":
            host = host.pin_memory()
        return into.copy_(host, non_blocking=True)

    def hold(self, *buffers: torch.Tensor) -> None:
        """Keep ``buffers``, which a captured step read, for this object's life, and never upload into them."""
        for t in buffers:
            if id(t) not in self._held_ids:
                self._held.append(t)
                self._held_ids.add(id(t))

    def held(self, t: torch.Tensor) -> bool:
        return id(t) in self._held_ids


class LrTensors:
    """The groups' lr tensors as the prepare stages of both GPU backends read them: on the device,
    at their addresses (no launch or copy of their own). ``table``: int64 (2, G), per group the
    address of its float32 lr tensor, then per group that of its float64 one (0: none). An lr of
    another dtype or device is staged into a float64 slot each step (``refresh``), which a captured
    step cannot replay. Built anew when the settings change or an lr tensor's memory moves or
    changes dtype or device (``moved``: lr.set_(), lr.data = ..., even a view of another dtype at
    the same address); ``last``'s table is uploaded into where it can be."""

    def __init__(self, tables: DeviceTables, lr_tensors: dict, n_groups: int, device: torch.device,
                 last: LrTensors | None):
        self._backend = tables.backend
        staged = [gi for gi, t in lr_tensors.items() if t.device != device or t.dtype not in (torch.float32,
                                                                                             torch.float64)]
        self.stage = torch.empty(len(staged), dtype=torch.float64, device=device)
        self.staged = [(self.stage[j], lr_tensors[gi].reshape(())) for j, gi in enumerate(staged)]
        # read at its address as its dtype, or staged by dtype and device: all three must stay
        self.watched = [(t, t.data_ptr(), t.dtype, t.device) for t in lr_tensors.values()]
        rows = np.zeros((2, n_groups), dtype=np.int64)
        for gi, t in lr_tensors.items():
            if gi not in staged:
                rows[int(t.dtype == torch.float64), gi] = t.data_ptr()
        for j, gi in enumerate(staged):
            rows[1, gi] = self.stage[j].data_ptr()
        self.table = tables.upload(rows, device, last.table if last else None, why=NEW_SETTINGS)

    def moved(self) -> bool:
        return any(t.data_ptr() != ptr or t.dtype != dtype or t.device != device
                   for t, ptr, dtype, device in self.watched)

    def refresh(self, device: torch.device, capturing: bool) -> None:
        """This step's staged lrs."""
        if not self.staged:
            return
        if capturing:
            raise RuntimeError(f"fused_lr {self._backend} backend: an lr tensor that is not a float32 or float64 "
                               f"tensor on {device} cannot be read by a captured step; put it there")
        for slot, lr in self.staged:
            slot.copy_(lr, non_blocking=True)

    def buffers(self) -> tuple[torch.Tensor, ...]:
        return self.table, self.stage
