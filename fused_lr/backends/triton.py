"""Triton backend: a step is a few launches over all parameters, with no host sync.

Per step: ``sumsq_kernel`` (a program per chunk, when the norm is wanted) writes the norm's
partial sums; ``prepare_kernel`` (one program) adds them in a fixed order into the norm,
evaluates every tensor's lr on the device from its group's clock, the clip coefficient and the
AMP skip, and advances the step counts and clocks; ``update_kernel`` (a program per chunk)
applies the rest (docs/step.md): three launches for one span. Chunks are launched in spans of
one dtype and one alignment (a tensor with a misaligned address does not turn off vector loads
for the others); when one program covers all chunks, ``sumsq_kernel`` writes the norm itself,
and when the host reads the norm before the update (``final``: the non-finite check, an
all-reduce), ``sqrt_sum_kernel`` (one program) sums it then.

The kernels read the plan's tables (fused_lr/core/layout.py) from device copies made once per
plan; a step re-uploads the tensor table into the same device buffer only when the plan
re-addressed gradients, and the hyper rows only when the settings changed. Uploads do not block,
so a step never waits for the device and, once two eager steps have run, can be captured in a
CUDA graph. The uploads, the capture guard and the buffers a captured graph reads are those of
fused_lr/backends/device_tables.py, shared with the CUDA backend; its docstring states what a
replayed graph sees.

Under ``TRITON_INTERPRET=1`` the same kernels run in Triton's interpreter on CPU tensors, which
is how CI tests them without a GPU; the tensor table is then the plan's own array, and chunks
are as large as the tensors allow, because the interpreter pays per program, not per element.
"""

from __future__ import annotations

import numpy as np
import torch

from fused_lr.backends import BackendUnavailable
from fused_lr.backends.device_tables import NEW_ADDRESSES, NEW_PLAN, NEW_SETTINGS, DeviceTables, LrTensors
from fused_lr.core import layout as L
from fused_lr.core.plan import Plan, Settings, StepScalars

_BLOCK, _CHUNK = L.SIZES["TRITON_BLOCK"], L.SIZES["TRITON_CHUNK"]
# Interpreted: one block per program, of up to _INTERP_MAX_CHUNK elements, many chunks per program.
_INTERP_MAX_CHUNK = 1 << 16
_INTERP_TILE = 1 << 18
_PREPARE_BLOCK = 128
_SUM_BLOCK = 1024
_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _aligned_rows(plan: Plan) -> np.ndarray:
    """Per row, whether every address, the gradient's included, is 16-byte aligned."""
    return (plan.table[:, L.T_ALIGNED] != 0) & (plan.table[:, L.T_GRAD] % 16 == 0)


def _misaligned_grads(plan: Plan) -> bool:
    """Whether any gradient is off a 16-byte boundary (one pass over the addresses)."""
    return bool(np.bitwise_or.reduce(plan.table[:, L.T_GRAD]) & 15)


def _spans_may_move(tab, plan: Plan) -> bool:
    """Whether this step's addresses may put a row in another span than the tables have: only
    when the state moved, or a gradient is (or was) off a 16-byte boundary. Allocators hand out
    16-byte aligned blocks, so a step usually settles this with one pass over the addresses."""
    if tab.versions == (plan.grad_version, plan.state_version):
        return False
    return tab.versions[1] != plan.state_version or tab.misaligned_grads or _misaligned_grads(plan)


def _device(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    # the interpreter evaluates both sides of every tl.where in numpy; the discarded side may
    # divide by zero (another schedule kind's formula), which must not warn
    return np.errstate(all="ignore")


class _Tables:
    """The device copies of one plan's tensor table, its chunk spans and scratch."""

    def __init__(self, plan: Plan, interpreted: bool, tables: DeviceTables, why: str):
        self.plan = plan
        numels = plan.table[:, L.T_NUMEL]
        if interpreted:
            biggest = int(numels.max(initial=1))
            self.block = self.chunk = min(_INTERP_MAX_CHUNK, max(16, 1 << (max(biggest, 1) - 1).bit_length()))
        else:
            self.block, self.chunk = _BLOCK, _CHUNK
        self.aligned = _aligned_rows(plan)
        self.misaligned_grads = _misaligned_grads(plan)
        chunks, self.spans = [], []
        for b in plan.buckets:
            for aligned in (True, False):
                c0 = len(chunks)
                chunks += [(i, off, min(off + self.chunk, int(numels[i]))) for i in range(b.start, b.stop)
                           if bool(self.aligned[i]) == aligned for off in range(0, int(numels[i]), self.chunk)]
                if len(chunks) > c0:
                    self.spans.append((b.dtype, c0, len(chunks), aligned))
        self.n_tensors, self.n_chunks = len(numels), len(chunks)
        # on a device no graph reads (the interpreter's CPU), the plan's own array, refreshed in place
        self.copied = tables.graph_device(plan.device)
        self.tensors = tables.upload(plan.table, plan.device, why=why) if self.copied else \
            torch.from_numpy(plan.table)
        self.chunks = tables.upload(np.array(chunks, dtype=np.int64).reshape(-1, 3), plan.device, why=why)
        self.versions = (plan.grad_version, plan.state_version)
        self.coefs = torch.empty((self.n_tensors + 1, L.COEF_COLS), dtype=torch.float64, device=plan.device)
        # float64 partial sums, as Numba and CUDA keep them (float32 ones drop small squares beside large)
        self.partials = torch.empty(max(self.n_chunks, 1), dtype=torch.float64, device=plan.device)
        self.interpreted = interpreted
        # per span, what its launches take, sliced once: (dtype, chunks, n, partials, aligned, rows, grid)
        self.launches = []
        for dtype, c0, c1, aligned in self.spans:
            rows = self.rows(c1 - c0)
            self.launches.append((dtype, self.chunks[c0:c1], c1 - c0, self.partials[c0:c1], aligned, rows,
                                  (-(-(c1 - c0) // rows),)))
        # one program over every chunk writes the norm itself; otherwise partials + a final sum
        self.final = len(self.spans) == 1 and self.rows(self.n_chunks) >= self.n_chunks

    def buffers(self) -> tuple[torch.Tensor, ...]:
        return self.tensors, self.chunks, self.coefs, self.partials

    def rows(self, n_chunks: int) -> int:
        """Chunks per program: 1 compiled; interpreted, as many as fit a tile of _INTERP_TILE."""
        if not self.interpreted:
            return 1
        return min(1 << (n_chunks - 1).bit_length(), max(1, _INTERP_TILE // self.block))


class TritonBackend:
    name = "triton"
    devices: frozenset[str] = frozenset()  # set by load()

    def __init__(self):
        from fused_lr.kernels import triton_kernels

        self._k = triton_kernels
        self._interpreted = _is_interpreted(triton_kernels)
        self._tl = {torch.float16: triton_kernels.tl.float16, torch.bfloat16: triton_kernels.tl.bfloat16,
                    torch.float32: triton_kernels.tl.float32, torch.float64: triton_kernels.tl.float64}
        self._tables: _Tables | None = None
        self._device_tables = DeviceTables(self.name)
        self._settings_key = None
        self._hyper: torch.Tensor | None = None
        self._schedules: torch.Tensor | None = None
        self._lr: LrTensors | None = None  # the groups' lr tensors, when any
        self._lr_key = None  # the settings key they were built for
        self._flags: dict = {}
        self._update_key = None
        self._update_flags: dict = {}
        self._pending: tuple | None = None  # (norm, tables) whose partials the next prepare_kernel sums
        self.rebuilds = 0  # tables built from a new plan (not gradient refreshes): the cache's observable behaviour

    def unsupported(self, plan: Plan) -> str | None:
        bad = [b.dtype for b in plan.buckets if b.dtype not in _SUPPORTED]
        return f"dtype {bad[0]} (the Triton kernels take {[str(d) for d in _SUPPORTED]})" if bad else None

    # ------------------------------------------------------------------ device copies
    def _tables_for(self, plan: Plan) -> _Tables:
        tab = self._tables
        if tab is None or tab.plan is not plan:
            tab = self._tables = _Tables(plan, self._interpreted, self._device_tables, NEW_PLAN)
            self.rebuilds += 1
        elif _spans_may_move(tab, plan) and (tab.aligned != _aligned_rows(plan)).any():
            tab = self._tables = _Tables(plan, self._interpreted, self._device_tables,
                                         "a gradient moved to an address of another alignment")
            self.rebuilds += 1
        elif tab.versions != (plan.grad_version, plan.state_version):
            if tab.copied:
                tab.tensors = self._device_tables.upload(plan.table, plan.device, tab.tensors, why=NEW_ADDRESSES)
            tab.versions = (plan.grad_version, plan.state_version)
        return tab

    def _settings_for(self, settings: Settings, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """The hyper rows (plus the optimizer-wide row) and schedule tables on the device, and the
        constexpr feature flags: which features any group uses and which schedule kinds occur, so
        kernels compile only those."""
        key = (id(settings), settings.version, device)
        if key != self._settings_key:
            K = self._k
            wide = np.zeros((1, L.HYPER_COLS))
            wide[0, K.O_MAX_NORM] = settings.max_grad_norm or 0.0
            wide[0, K.O_CLIP_VALUE] = settings.clip_value or 0.0
            wide[0, K.O_RATE_POWER] = settings.lr_norm_power
            wide[0, K.O_RATE_EPS] = settings.lr_norm_eps
            hyper = np.concatenate([settings.hyper, wide])
            self._hyper = self._device_tables.upload(hyper, device, self._hyper, why=NEW_SETTINGS)
            self._schedules = self._device_tables.upload(settings.schedules, device, self._schedules,
                                                         why=NEW_SETTINGS)
            flags = settings.hyper[:, L.H_FLAGS].astype(np.int64)
            wd = settings.hyper[:, L.H_WEIGHT_DECAY] != 0
            decoupled = (flags & L.F_DECOUPLED) != 0
            used = np.isfinite(settings.schedules[:, :, 0])
            self._flags = dict(
                FEATURES=int(np.bitwise_or.reduce(flags)) if len(flags) else 0,  # the rule's variants in use
                COUPLED_WD=bool((wd & ~decoupled).any()),
                DECOUPLED_WD=bool((wd & decoupled).any()),
                MAXIMIZE=bool(((flags & L.F_MAXIMIZE) != 0).any()),
                KINDS=int(sum(1 << k for k in set(settings.schedules[:, :, 1][used].astype(int).tolist()))),
            )
            self._settings_key = key
        return self._hyper, self._schedules, self._flags

    def _lr_tensors(self, settings: Settings, device: torch.device, capturing: bool) -> LrTensors:
        """The groups' lr tensors, read at their addresses by prepare_kernel (device_tables.py)."""
        lr = self._lr
        if lr is None or self._lr_key != self._settings_key or lr.moved():
            lr = self._lr = LrTensors(self._device_tables, settings.lr_tensors, len(settings.groups), device, lr)
            self._lr_key = self._settings_key
        lr.refresh(device, capturing)
        return lr

    def _rule_function(self, rule: int):
        """The update of RULES code ``rule``: the kernels' ``_<rule name>``."""
        name = next((n for n, code in L.RULES.items() if code == rule), None)
        if name is None:
            raise RuntimeError(f"fused_lr triton backend: no update for rule code {rule}: it is not in "
                               f"fused_lr.core.layout.RULES {L.RULES}")
        fn = getattr(self._k, "_" + name.lower(), None)
        if fn is None:
            raise RuntimeError(f"fused_lr triton backend: no update for rule code {rule} ({name}): "
                               f"fused_lr/kernels/triton_kernels.py has no _{name.lower()}")
        return fn

    # ------------------------------------------------------------------ the contract
    def grad_norm(self, plan: Plan, settings: Settings, scalars: StepScalars, final: bool = True) -> torch.Tensor:
        K = self._k
        capturing = self._device_tables.capturing(plan.device)
        tab = self._tables_for(plan)
        hyper, _, _ = self._settings_for(settings, plan.device)
        out = torch.empty((), dtype=plan.norm_dtype, device=plan.device)
        scale = scalars.grad_scale if scalars.grad_scale is not None else hyper
        n_groups = len(settings.groups)
        with _device(plan.device):
            for dtype, chunks, n, partials, aligned, rows, grid in tab.launches:
                K.sumsq_kernel[grid](
                    tab.tensors, chunks, n, partials, out, hyper, scale, n_groups,
                    DTYPE=self._tl[dtype], HAS_SCALE=scalars.grad_scale is not None,
                    HAS_CLIP_VALUE=settings.clip_value is not None, FINAL=tab.final, ALIGNED=aligned, ROWS=rows,
                    BLOCK=tab.block, CHUNK=tab.chunk)
            if not tab.final and final:
                K.sqrt_sum_kernel[(1,)](tab.partials, tab.n_chunks, out, BLOCK=_SUM_BLOCK)
        # not final: prepare_kernel sums the partials into it (one launch less)
        self._pending = None if tab.final or final else (out, tab)
        if capturing:
            self._device_tables.hold(*tab.buffers(), hyper)
        return out

    def update(self, plan: Plan, settings: Settings, clocks: torch.Tensor, scalars: StepScalars,
               norm: torch.Tensor | None) -> None:
        K = self._k
        capturing = self._device_tables.capturing(plan.device)
        tab = self._tables_for(plan)
        hyper, schedules, flags = self._settings_for(settings, plan.device)
        found = scalars.found_inf if scalars.found_inf is not None else hyper
        scale = scalars.grad_scale if scalars.grad_scale is not None else hyper
        n_groups = len(settings.groups)
        clip = norm is not None and settings.max_grad_norm is not None
        has_scale = scalars.grad_scale is not None
        # the update's constexprs, built once per combination (a dict of 14 keys costs a few us)
        key = (self._settings_key, tab, plan.rule, clip, settings.clip_value is not None, has_scale)
        if key != self._update_key:
            self._update_key = key
            self._update_flags = dict(
                RULE_FN=self._rule_function(plan.rule), FEATURES=flags["FEATURES"], HAS_CLIP=clip,
                HAS_CLIP_VALUE=settings.clip_value is not None, HAS_SCALE=has_scale, MAXIMIZE=flags["MAXIMIZE"],
                COUPLED_WD=flags["COUPLED_WD"], DECOUPLED_WD=flags["DECOUPLED_WD"], BLOCK=tab.block, CHUNK=tab.chunk)
        update_flags = self._update_flags
        lr = self._lr_tensors(settings, plan.device, capturing) if settings.lr_tensors else None
        finish = self._pending is not None and norm is self._pending[0] and tab is self._pending[1]
        self._pending = None
        with _device(plan.device):
            K.prepare_kernel[(1,)](
                tab.tensors, tab.n_tensors, hyper, schedules, clocks, n_groups, tab.coefs,
                norm if norm is not None else hyper, tab.partials, tab.n_chunks, scale, found,
                tab.tensors if lr is None else lr.table, HAS_LR_TENSORS=lr is not None,
                HAS_CLIP=clip, HAS_RATE=settings.lr_norm_power != 0, HAS_SCALE=has_scale,
                HAS_FOUND=scalars.found_inf is not None, FINISH=finish, PROGRAM=plan.coefficients, KINDS=flags["KINDS"],
                BLOCK=_PREPARE_BLOCK, SUM_BLOCK=_SUM_BLOCK)
            for dtype, chunks, n, _, aligned, rows, grid in tab.launches:
                K.update_kernel[grid](tab.tensors, chunks, n, tab.n_tensors, hyper, n_groups, tab.coefs,
                                      DTYPE=self._tl[dtype], ALIGNED=aligned, ROWS=rows, **update_flags)
        if capturing:
            self._device_tables.hold(*tab.buffers(), hyper, schedules, *(lr.buffers() if lr else ()))


def _is_interpreted(kernels) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernels.update_kernel, InterpretedFunction)


def load():
    # The oldest triton this backend runs on (pyproject.toml's floor): triton.knobs, which this
    # reads TRITON_INTERPRET from, first shipped in triton 3.4.0 (3.3.1 has no triton/knobs.py).
    need = "3.4"
    try:
        import triton
    except ImportError as e:
        raise BackendUnavailable(f"triton is not installed ({e}); pip install 'triton>={need}'") from e
    except Exception as e:  # a broken install: say so, do not let it break fused_lr
        raise BackendUnavailable(f"import triton failed: {type(e).__name__}: {e}") from e
    try:
        from triton import knobs
        from triton.runtime.interpreter import InterpretedFunction  # noqa: F401 (the kernels' interpreter check)

        interpret = bool(knobs.runtime.interpret)
    except (ImportError, AttributeError) as e:
        version = str(getattr(triton, "__version__", "(version unknown)"))
        try:
            old = tuple(int(v) for v in version.split(".")[:2]) < tuple(int(v) for v in need.split("."))
        except ValueError:
            old = True
        what = "is too old" if old else "is broken or incompatible"
        raise BackendUnavailable(f"triton {version} {what}: fused_lr's Triton backend needs triton >= {need} "
                                 f"with triton.knobs ({type(e).__name__}: {e}); pip install 'triton>={need}'") from e
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
