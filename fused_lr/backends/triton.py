"""Triton backend: a step is a few launches over all parameters, with no host sync.

Per step: ``sumsq_kernel`` (a program per chunk, when the norm is wanted) and ``sqrt_sum_kernel``
(one program) compute the global norm deterministically; ``prepare_kernel`` (one program)
evaluates every param's lr on the device from its step count, the clip coefficient and the
AMP skip, and advances the step counts; ``update_kernel`` (a program per chunk) applies SPEC
steps 0-7. Parameters of different dtypes take one norm and one update launch per dtype; when
one program covers all chunks, ``sumsq_kernel`` writes the norm itself.

The kernels find the tensors through device tables of addresses (see ``triton_kernels``). The
tables are built once and reused while no tensor moves: the cache key is every address, size,
dtype and flag the tables hold, so anything that reallocates a parameter, gradient or buffer
(``model.to(float64)``, ``zero_grad(set_to_none=True)`` with a new allocation, a new momentum
buffer) rebuilds them. Hyper-parameters live in a float64 device table rebuilt only when one
changes. Uploads go through pinned memory without blocking, so even a rebuild does not wait
for the device; in steady state a step only launches kernels, so it can be captured in a CUDA
graph.

Under ``TRITON_INTERPRET=1`` the same kernels run in Triton's interpreter on CPU tensors, which
is how CI tests them without a GPU; chunks are then as large as the tensors allow, because the
interpreter pays per program, not per element.
"""

from __future__ import annotations

import numpy as np
import torch

from fused_lr.backends import BackendUnavailable
from fused_lr.core.plan import StepPlan

# Compiled: 1024 elements per block (8 per thread at 4 warps), 4 blocks per program, so a
# ResNet-50 step runs thousands of programs. Interpreted: one block per program, of up to
# _INTERP_MAX_CHUNK elements.
_BLOCK, _CHUNK = 1024, 4096
_INTERP_MAX_CHUNK = 1 << 16
_INTERP_TILE = 1 << 18
_PREPARE_BLOCK = 128
_SUM_BLOCK = 1024
_ALIGN = 16  # bytes; lets the compiler vectorise loads

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dense_layout(tensors: list[torch.Tensor]) -> bool:
    """True when the tensors (same shape) are laid out densely in one and the same element
    order, so a kernel can walk their memory with one flat index."""
    for fmt in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d):
        if all(t.is_contiguous(memory_format=fmt) for t in tensors):
            return True
    return False


class _Tables:
    """Device address/chunk tables for one set of tensors; valid while none of them moves."""

    def __init__(self, key, rows: list[list[int]], dtypes: list[torch.dtype], ptr_cols: tuple[int, ...],
                 device: torch.device, interpreted: bool, K):
        self.key = key
        numels = [r[K.COL_NUMEL] for r in rows]
        if interpreted:
            biggest = max(numels, default=1)
            self.block = self.chunk = min(_INTERP_MAX_CHUNK, max(16, 1 << (biggest - 1).bit_length()))
        else:
            self.block, self.chunk = _BLOCK, _CHUNK
        chunks, self.spans = [], []
        for dtype in dict.fromkeys(dtypes):  # first-seen order
            c0 = len(chunks)
            members = [i for i, d in enumerate(dtypes) if d == dtype]
            chunks += [(i, off, min(off + self.chunk, numels[i])) for i in members
                       for off in range(0, numels[i], self.chunk)]
            aligned = all(rows[i][c] % _ALIGN == 0 for i in members for c in ptr_cols)
            if len(chunks) > c0:
                self.spans.append((dtype, c0, len(chunks), aligned))
        table = np.zeros((len(rows), K.TENSOR_COLS), dtype=np.int64)
        table[:, : len(rows[0])] = rows
        self.tensors = _upload(table, device)
        self.chunks = _upload(np.array(chunks, dtype=np.int64).reshape(-1, 3), device)
        self.n_tensors = len(rows)
        self.n_chunks = len(chunks)
        self._interpreted = interpreted
        self.state: torch.Tensor | None = None  # update's per-step scratch

    def rows(self, n_chunks: int) -> int:
        """Chunks per program: 1 compiled; interpreted, as many as fit a tile of _INTERP_TILE."""
        if not self._interpreted:
            return 1
        return min(1 << (n_chunks - 1).bit_length(), max(1, _INTERP_TILE // self.block))


def _upload(array: np.ndarray, device: torch.device) -> torch.Tensor:
    host = torch.from_numpy(np.ascontiguousarray(array))
    if device.type != "cuda":
        return host
    if torch.cuda.is_current_stream_capturing():
        # a host->device copy captured in a graph would re-read a pinned buffer that is long
        # gone at replay time
        raise RuntimeError(
            "FusedSGD(backend='triton'): the parameters, gradients, buffers or hyper-parameters changed "
            "during CUDA graph capture, so the device tables would have to be rebuilt inside the graph. "
            "Run two eager steps with the same tensors and settings before capturing.")
    return host.pin_memory().to(device, non_blocking=True)


def _device(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    # the interpreter evaluates both sides of every tl.where in numpy; the discarded side may
    # divide by zero (another schedule kind's formula), which must not warn
    return np.errstate(all="ignore")


def _check_dtypes(plan: StepPlan) -> None:
    for gi, group in enumerate(plan.groups):
        for i, p in enumerate(group.params):
            if p.dtype not in _SUPPORTED:
                raise TypeError(f"param group {gi}, parameter {i}: the triton backend updates "
                                f"{[str(d) for d in _SUPPORTED]} parameters, not {p.dtype}")


class TritonBackend:
    name = "triton"
    devices: frozenset[str] = frozenset()  # set by load()

    def __init__(self):
        from fused_lr.kernels import triton_kernels

        self._k = triton_kernels
        self._interpreted = _is_interpreted(triton_kernels)
        self._tl = {torch.float16: triton_kernels.tl.float16, torch.bfloat16: triton_kernels.tl.bfloat16,
                    torch.float32: triton_kernels.tl.float32, torch.float64: triton_kernels.tl.float64}
        self._norm_tables: _Tables | None = None
        self._update_tables: _Tables | None = None
        self._hyper_key = None
        self._hyper: torch.Tensor | None = None
        self._schedules: torch.Tensor | None = None
        self._flags: dict = {}
        self._partials: torch.Tensor | None = None
        self.rebuilds = 0  # how many times tables were (re)built: the cache's observable behaviour

    # ------------------------------------------------------------------ tables
    def _tables(self, cached: _Tables | None, key, rows, dtypes, ptr_cols, device) -> _Tables:
        if cached is not None and cached.key == key:
            return cached
        self.rebuilds += 1
        return _Tables(key, rows, dtypes, ptr_cols, device, self._interpreted, self._k)

    def _hyper_tables(self, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """The hyper and schedule tables on the device, and the constexpr feature flags: which
        features any group uses and which schedule kinds occur, so kernels compile only those."""
        rows = []
        for group in plan.groups:
            wd = group.weight_decay
            rows.append((group.kernel_lr, group.momentum, 1.0 - group.dampening, float(group.nesterov),
                         0.0 if group.decoupled_weight_decay else wd, wd if group.decoupled_weight_decay else 0.0,
                         -1.0 if group.maximize else 1.0, 0.0))
        rows.append((plan.max_grad_norm or 0.0, plan.clip_value or 0.0) + (0.0,) * (self._k.HYPER_COLS - 2))
        tables = np.stack([group.table for group in plan.groups])
        key = (tuple(rows), tables.tobytes(), plan.device)
        if key != self._hyper_key:
            self._hyper = _upload(np.array(rows, dtype=np.float64), plan.device)
            self._schedules = _upload(tables, plan.device)
            used = np.isfinite(tables[:, :, 0])
            K = self._k
            self._flags = dict(
                MOMENTUM=any(r[K.H_MOMENTUM] != 0 for r in rows[:-1]),
                NESTEROV=any(r[K.H_NESTEROV] != 0 for r in rows[:-1]),
                COUPLED_WD=any(r[K.H_COUPLED_WD] != 0 for r in rows[:-1]),
                DECOUPLED_WD=any(r[K.H_DECOUPLED_WD] != 0 for r in rows[:-1]),
                MAXIMIZE=any(r[K.H_SIGN] < 0 for r in rows[:-1]),
                KINDS=int(sum(1 << k for k in set(tables[:, :, 1][used].astype(int).tolist()))),
            )
            self._hyper_key = key
        return self._hyper, self._schedules, self._flags

    # ------------------------------------------------------------------ norm
    def grad_norm(self, plan: StepPlan) -> torch.Tensor:
        _check_dtypes(plan)
        K = self._k
        grads, rows, dtypes = [], [], []
        for gi, group in enumerate(plan.groups):
            for g in group.grads:
                if not _dense_layout([g]):
                    g = g.contiguous()
                grads.append(g)  # keeps a contiguous copy alive until the launch
                rows.append([0, g.data_ptr(), 0, 0, g.numel(), gi])
                dtypes.append(g.dtype)
        norm_dtype = plan.norm_dtype
        key = (tuple(map(tuple, rows)), tuple(dtypes), norm_dtype, plan.device)
        tab = self._norm_tables = self._tables(self._norm_tables, key, rows, dtypes, (K.COL_GRAD,), plan.device)
        hyper, _, _ = self._hyper_tables(plan)
        size = max(tab.n_chunks, 1)
        if self._partials is None or self._partials.numel() < size or self._partials.dtype != norm_dtype \
                or self._partials.device != plan.device:
            self._partials = torch.empty(size, dtype=norm_dtype, device=plan.device)
        partials = self._partials
        out = torch.empty((), dtype=norm_dtype, device=plan.device)
        scale = plan.grad_scale if plan.grad_scale is not None else hyper
        with _device(plan.device):
            # one program over every chunk writes the norm itself; otherwise partials + a final sum
            final = len(tab.spans) == 1 and tab.rows(tab.n_chunks) >= tab.n_chunks
            for dtype, c0, c1, aligned in tab.spans:
                rows = tab.rows(c1 - c0)
                K.sumsq_kernel[(-(-(c1 - c0) // rows),)](
                    tab.tensors, tab.chunks[c0:c1], c1 - c0, partials[c0:c1], out, hyper, scale, len(plan.groups),
                    DTYPE=self._tl[dtype], HAS_SCALE=plan.grad_scale is not None,
                    HAS_CLIP_VALUE=plan.clip_value is not None, FINAL=final, ALIGNED=aligned, ROWS=rows,
                    BLOCK=tab.block, CHUNK=tab.chunk)
            if not final:
                K.sqrt_sum_kernel[(1,)](partials, tab.n_chunks, out, BLOCK=_SUM_BLOCK)
        return out

    # ------------------------------------------------------------------ update
    def update(self, plan: StepPlan, norm: torch.Tensor | None) -> None:
        _check_dtypes(plan)
        if norm is not None and (norm.numel() != 1 or norm.device != plan.device):
            raise ValueError(f"norm must be a 0-dim tensor on {plan.device}, got {tuple(norm.shape)} on {norm.device}")
        K = self._k
        rows, dtypes, keep, write_back = [], [], [], []
        for gi, group in enumerate(plan.groups):
            for i, (p, g, step) in enumerate(zip(group.params, group.grads, group.steps, strict=True)):
                b = group.bufs[i] if group.bufs else None
                if step.dtype != torch.float32 or step.device != p.device or step.numel() != 1:
                    raise TypeError(f"param group {gi}, parameter {i}: the step count must be a float32 scalar on "
                                    f"{p.device}, got {step.dtype} {tuple(step.shape)} on {step.device}")
                tensors = [p, g] if b is None else [p, g, b]
                if not _dense_layout(tensors) or (b is not None and b.dtype != p.dtype):
                    # rare (a hand-set grad in another memory format, a strided view, a buffer
                    # left in float32 by model.to(float64)): work on contiguous copies in the
                    # param's dtype and copy the results back, as the reference's in-place ops would
                    staged = [p.contiguous(), g.contiguous(), None if b is None else b.to(p.dtype).contiguous()]
                    write_back += [(dst, src) for dst, src in ((p, staged[0]), (b, staged[2])) if src is not dst]
                    keep += staged
                    p, g, b = staged
                fresh = bool(group.fresh[i]) if group.fresh else False
                rows.append([p.data_ptr(), g.data_ptr(), 0 if b is None else b.data_ptr(), step.data_ptr(),
                             p.numel(), gi, int(fresh)])
                dtypes.append(p.dtype)
        key = (tuple(map(tuple, rows)), tuple(dtypes), plan.device)
        tab = self._update_tables = self._tables(self._update_tables, key, rows, dtypes,
                                                 (K.COL_PARAM, K.COL_GRAD, K.COL_BUF), plan.device)
        hyper, schedules, flags = self._hyper_tables(plan)
        if tab.state is None:
            tab.state = torch.empty((tab.n_tensors + 1, K.STATE_COLS), dtype=torch.float64, device=plan.device)
        found = plan.found_inf if plan.found_inf is not None else hyper
        scale = plan.grad_scale if plan.grad_scale is not None else hyper
        with _device(plan.device):
            K.prepare_kernel[(1,)](
                tab.tensors, tab.n_tensors, hyper, schedules, len(plan.groups), tab.state,
                norm if norm is not None else hyper, scale, found,
                HAS_CLIP=norm is not None, HAS_SCALE=plan.grad_scale is not None, HAS_FOUND=plan.found_inf is not None,
                KINDS=flags["KINDS"], BLOCK=_PREPARE_BLOCK)
            for dtype, c0, c1, aligned in tab.spans:
                rows = tab.rows(c1 - c0)
                K.update_kernel[(-(-(c1 - c0) // rows),)](
                    tab.tensors, tab.chunks[c0:c1], c1 - c0, tab.n_tensors, hyper, len(plan.groups), tab.state,
                    DTYPE=self._tl[dtype], HAS_CLIP=norm is not None, HAS_CLIP_VALUE=plan.clip_value is not None,
                    HAS_SCALE=plan.grad_scale is not None, MAXIMIZE=flags["MAXIMIZE"], COUPLED_WD=flags["COUPLED_WD"],
                    DECOUPLED_WD=flags["DECOUPLED_WD"], MOMENTUM=flags["MOMENTUM"], NESTEROV=flags["NESTEROV"],
                    ALIGNED=aligned, ROWS=rows, BLOCK=tab.block, CHUNK=tab.chunk)
        for dst, src in write_back:
            dst.copy_(src)


def _is_interpreted(kernels) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernels.update_kernel, InterpretedFunction)


def load():
    try:
        import triton
    except ImportError as e:
        raise BackendUnavailable(f"triton is not installed ({e}); pip install triton") from e
    interpret = bool(triton.knobs.runtime.interpret)
    if not interpret and not torch.cuda.is_available():
        raise BackendUnavailable("no CUDA device, and TRITON_INTERPRET=1 is not set (with it, the Triton kernels "
                                 "run in Triton's interpreter on CPU tensors)")
    from fused_lr.kernels import triton_kernels

    if _is_interpreted(triton_kernels) != interpret:
        raise BackendUnavailable("TRITON_INTERPRET changed after the Triton kernels were imported; set it before "
                                 "importing fused_lr")
    # the interpreter dereferences table addresses on the host, so it can only run on CPU tensors
    TritonBackend.devices = frozenset({"cpu"} if interpret else {"cuda"})
    return TritonBackend
