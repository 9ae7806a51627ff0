"""The CUDA backend's per-element math, checked on the host (CI has no GPU).

csrc/fused_lr_math.h holds everything the kernels compute per element or per block as
``__host__ __device__`` functions. This test compiles them into a small host program
(csrc/tests/host_math.cpp) with the system C++ compiler and holds its answers to the Python
oracles: ``fused_lr.schedules.eval_table`` for the schedule tables, ``fused_lr.backends.reference`` for
the update and the gradient norm, and ``fused_lr.backends.cuda.chunk_layout`` for the chunk indexing.
It also builds the CUDA backend's device tables on CPU tensors and checks their rows, and drives
FusedSGD on CudaBackend end to end through a host twin of the launches
(csrc/tests/host_launch.cpp: the kernels' chunk walk over the same tables, run on the CPU).
What none of this runs is kernels.cu itself (the launches, the block reductions, the device
loads and stores); tests/test_parity.py and tests/test_gpu_step.py do that where a GPU exists.
"""

import ctypes
import itertools
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from fused_lr import FusedSGD
from fused_lr import schedules as S
from fused_lr.backends import cuda as cb
from fused_lr.backends.cuda import chunk_layout, group_row
from fused_lr.backends.reference import ReferenceBackend
from fused_lr.core.plan import GroupPlan, StepPlan

CSRC = Path(__file__).resolve().parent.parent / "csrc"


def _compiler():
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _compile(source: str, out, *flags: str) -> None:
    """Build one of csrc/tests/ with the host C++ compiler, or skip when there is none."""
    cxx = _compiler()
    if cxx is None:
        pytest.skip(f"no C++ compiler (g++, c++, clang++ or $CXX) to build {source}")
    subprocess.run([cxx, "-std=c++17", "-O2", *flags, "-Wall", "-Wextra", "-o", str(out),
                    str(CSRC / "tests" / source)], check=True)


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """Run the host program on a list of command lines; returns one list of floats per line."""
    exe = tmp_path_factory.mktemp("host_math") / "host_math"
    # -ffp-contract=off: the host must round every operation as the Python oracle does, so a
    # one-ulp difference means a formula differs (the device build fuses a*b+c; its ulps are
    # the parity tests' business).
    _compile("host_math.cpp", exe, "-ffp-contract=off")

    def run(lines):
        out = subprocess.run([str(exe)], input="\n".join(lines) + "\n", capture_output=True, text=True, check=True)
        rows = out.stdout.splitlines()
        assert len(rows) == len(lines)
        return [[float(x) for x in row.split()] for row in rows]

    return run


def _fmt(values) -> str:
    return " ".join(repr(float(v)) for v in values)


# ---------------------------------------------------------------------------- schedule tables
SCHEDULES = [
    S.Constant(0.5),
    S.Step(7, 0.5),
    S.MultiStep([3, 10, 25], 0.3),
    S.Exponential(0.97),
    S.Linear(0.1, 1.0, 20),
    S.Polynomial(30, 2.0, 0.1),
    S.Polynomial(25),
    S.Cosine(40, 0.05),
    S.CosineRestarts(10),
    S.CosineRestarts(5, 2, 0.1),
    S.Cyclic(3.0, 5),
    S.Cyclic(4.0, 4, 6, mode="triangular2"),
    S.Cyclic(2.0, 3, mode="exp_range", gamma=0.99),
    S.OneCycle(50),
    S.OneCycle(60, pct_start=0.25, div=10.0, final_div=100.0, anneal="linear"),
    S.InverseTime(0.5, 10),
    S.InverseTime(0.1, 1, 0.5),
    S.InverseSqrt(8),
    S.PowerLaw(0.01, 1.5, 40),
    S.Warmup(5, S.Cosine(30), start_factor=0.1),
    S.Warmup(3, S.MultiStep([4, 8], 0.5)),
    S.Join([(S.Linear(0.1, 1.0, 5), 5), (S.Step(3, 0.5), 10), (S.OneCycle(20), 20), S.Exponential(0.9)]),
    S.Join([(S.Warmup(4, S.CosineRestarts(6, 2)), 30), (S.MultiStep([2, 5]), 8), S.InverseSqrt(3)]),
]
STEPS_K = [*range(0, 130), 255, 1000, 4097, 123456]


def test_every_kind_is_covered():
    kinds = {int(row[1]) for s in SCHEDULES for row in s.table() if math.isfinite(row[0])}
    assert kinds == set(range(12))  # CONST .. POWERLAW


def test_eval_table_matches_python(host):
    tables = [s.table() for s in SCHEDULES]
    lines = [f"table {_fmt(t.ravel())} {len(STEPS_K)} {_fmt(STEPS_K)}" for t in tables]
    for schedule, table, got in zip(SCHEDULES, tables, host(lines), strict=True):
        want = [S.eval_table(table, k) for k in STEPS_K]
        # Same libm, same operation order: equal up to the last bit, bar pow/cos rounding that
        # a libm may do differently from one call form to another (1e-15 relative).
        for k, g, w in zip(STEPS_K, got, want, strict=True):
            assert math.isclose(g, w, rel_tol=1e-15, abs_tol=1e-300), (schedule, k, g, w)


# ---------------------------------------------------------------------------- the update
MOMENTA = [  # (momentum, dampening, nesterov)
    (0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.0, True), (0.9, 0.3, False)]
DECAYS = [(0.0, False), (0.05, False), (0.05, True)]  # (weight_decay, decoupled)
NORMS = [None, 2.5, 0.1]  # with max_grad_norm 0.5: off, clipping (c = 0.2), inactive (c = 1)
MAX_NORM = 0.5
LR_SCHEDULES = [S.Constant(), S.Warmup(5, S.Cosine(20), start_factor=0.1), S.Step(3, 0.5)]
N = 16

# Per dtype: the reference and the host do the same IEEE operations, but torch's vectorised
# CPU kernels may fuse a*b+c (one rounding fewer), so allow a few ulps of the O(1) values
# involved: float64 ~ 1e-16/ulp, float32 ~ 1.2e-7/ulp. Formula errors are >= 1e-3 here, and a
# wrongly rounded unscale factor (float64 instead of GradScaler's float32) is ~1e-8 relative.
TOL = {torch.float64: dict(rtol=1e-14, atol=1e-14), torch.float32: dict(rtol=1e-6, atol=1e-6)}


def _update_cases():
    combos = itertools.product([torch.float64, torch.float32], MOMENTA, DECAYS, [False, True], [None, 0.3],
                               NORMS, [None, 3.0], [(0, False), (7, False), (7, True), (0, True)])
    for i, (dtype, mom, decay, maximize, clip, norm, scale, (k, fresh)) in enumerate(combos):
        yield dict(dtype=dtype, momentum=mom, decay=decay, maximize=maximize, clip_value=clip, norm=norm,
                   grad_scale=scale, k=k, fresh=fresh, schedule=LR_SCHEDULES[i % len(LR_SCHEDULES)], seed=i)


def _tensors(case):
    gen = torch.Generator().manual_seed(case["seed"])
    p, g, b = (torch.randn(N, generator=gen, dtype=torch.float64).to(case["dtype"]) for _ in range(3))
    if case["grad_scale"]:
        g = (g * case["grad_scale"]).to(case["dtype"])
    return p, g, b


def _reference(case, p, g, b):
    (mom, damp, nesterov), (wd, decoupled) = case["momentum"], case["decay"]
    p, b = p.clone(), b.clone()
    group = GroupPlan(params=[p], grads=[g], bufs=[b] if mom else [], fresh=[case["fresh"]] if mom else [],
                      steps=[torch.tensor(float(case["k"]))], lr=0.1, momentum=mom, dampening=damp,
                      nesterov=nesterov, weight_decay=wd, decoupled_weight_decay=decoupled,
                      maximize=case["maximize"], schedule=case["schedule"])
    scale = None if case["grad_scale"] is None else torch.tensor([case["grad_scale"]])
    plan = StepPlan(groups=[group], device=torch.device("cpu"), max_grad_norm=MAX_NORM,
                    clip_value=case["clip_value"], grad_scale=scale, found_inf=torch.tensor([0.0]))
    norm = None if case["norm"] is None else torch.tensor(case["norm"], dtype=plan.norm_dtype)
    ReferenceBackend().update(plan, norm)
    return p, b, group


def _update_line(case, group, p, g, b):
    dtype = "f64" if case["dtype"] == torch.float64 else "f32"
    norm, clip, scale = case["norm"], case["clip_value"], case["grad_scale"]
    head = [case["k"], int(case["fresh"]), int(scale is not None), scale or 0.0, int(norm is not None), norm or 0.0,
            int(case["dtype"] == torch.float64), MAX_NORM, int(clip is not None), clip or 0.0, N]
    elems = torch.stack([p, g, b], dim=1).ravel().tolist()
    return f"update {dtype} {_fmt(group_row(group))} {_fmt(group.table.ravel())} {_fmt(head)} {_fmt(elems)}"


def test_update_matches_reference(host):
    cases = list(_update_cases())
    inputs = [_tensors(c) for c in cases]
    refs = [_reference(c, *t) for c, t in zip(cases, inputs, strict=True)]
    lines = [_update_line(c, ref[2], *t) for c, t, ref in zip(cases, inputs, refs, strict=True)]
    for case, (p0, _, _), (p_ref, b_ref, group), out in zip(cases, inputs, refs, host(lines), strict=True):
        got = torch.tensor(out, dtype=torch.float64).view(N, 2)
        tol = TOL[case["dtype"]]
        assert not torch.equal(p_ref, p0)  # every case moves the parameter
        torch.testing.assert_close(got[:, 0], p_ref.double(), **tol, msg=lambda m, c=case: f"param: {m}\n{c}")
        if group.momentum:
            torch.testing.assert_close(got[:, 1], b_ref.double(), **tol, msg=lambda m, c=case: f"buf: {m}\n{c}")


def test_grad_norm_matches_reference(host):
    lines, want, dtypes = [], [], []
    for i, (dtype, maximize, clip, scale) in enumerate(itertools.product(
            [torch.float64, torch.float32], [False, True], [None, 0.3], [None, 3.0])):
        g = torch.randn(1000, generator=torch.Generator().manual_seed(i), dtype=torch.float64).to(dtype)
        group = GroupPlan(params=[torch.zeros_like(g)], grads=[g], bufs=[], fresh=[], steps=[], lr=0.1, momentum=0.0,
                          dampening=0.0, nesterov=False, weight_decay=0.0, decoupled_weight_decay=False,
                          maximize=maximize, schedule=S.Constant())
        plan = StepPlan(groups=[group], device=torch.device("cpu"), clip_value=clip,
                        grad_scale=None if scale is None else torch.tensor([scale]))
        want.append(float(ReferenceBackend().grad_norm(plan)))
        dtypes.append(dtype)
        head = [int(scale is not None), scale or 0.0, int(maximize), int(clip is not None), clip or 0.0, g.numel()]
        lines.append(f"norm {'f64' if dtype == torch.float64 else 'f32'} {_fmt(head)} {_fmt(g.tolist())}")
    for dtype, w, (got,) in zip(dtypes, want, host(lines), strict=True):
        # The kernel sums squares in float64; the reference sums in the norm's dtype, in another
        # order: float64 agrees to rounding (1e-13), float32 to its accumulated error (1e-5).
        assert math.isclose(got, w, rel_tol=1e-13 if dtype == torch.float64 else 1e-5), (dtype, got, w)


# ---------------------------------------------------------------------------- chunks
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_chunks_cover_every_element_once(host, chunk_size):
    numels = [0, 1, 999, 1000, 1001, 0, 0, 5000, 3, 0, 2048]
    first, total = chunk_layout(numels, chunk_size)
    pairs = [x for n, f in zip(numels, first, strict=True) for x in (n, f)]
    (out,) = host([f"chunks {chunk_size} {len(numels)} {_fmt(pairs)} {total}"])
    triples = np.array(out, dtype=np.int64).reshape(-1, 3)
    assert len(triples) == total == sum(-(-n // chunk_size) for n in numels)
    seen = [np.zeros(n, dtype=np.int64) for n in numels]
    for t, begin, end in triples:
        assert 0 < end - begin <= chunk_size
        seen[t][begin:end] += 1
    assert all((s == 1).all() for s in seen)
    # chunks run through the tensors in table order, so a block's tensor is found by search
    assert (np.diff(triples[:, 0]) >= 0).all()


# ---------------------------------------------------------------------------- the device table
def _layout_plan():
    """Two groups mixing dtypes, an empty tensor, and momentum on one group only."""
    gen = torch.Generator().manual_seed(0)

    def param(n, dtype):
        p = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
        return p, torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)

    specs = [[(70_000, torch.float32), (0, torch.float64), (5, torch.bfloat16), (200_000, torch.float64)],
             [(65_536, torch.float32), (3, torch.float64)]]
    groups = []
    for gi, spec in enumerate(specs):
        params, grads = zip(*(param(n, dt) for n, dt in spec), strict=True)
        mom = 0.9 if gi == 0 else 0.0
        groups.append(GroupPlan(
            params=list(params), grads=list(grads), bufs=[torch.zeros_like(p) for p in params] if mom else [],
            fresh=[True] * len(params) if mom else [], steps=[torch.zeros(()) for _ in params], lr=0.1,
            momentum=mom, dampening=0.0, nesterov=False, weight_decay=0.0, decoupled_weight_decay=False,
            maximize=False, schedule=S.Constant()))
    return StepPlan(groups=groups, device=torch.device("cpu"))


@pytest.mark.parametrize("with_state", [False, True], ids=["norm", "update"])
def test_layout_rows_and_buckets(with_state):
    plan = _layout_plan()
    lay = cb._Layout(plan, with_state)
    rows = lay.table.numpy()
    tensors = [(gi, i, p) for gi, g in enumerate(plan.groups) for i, p in enumerate(g.params)]
    assert lay.n_tensors == len(rows) == len(tensors)
    # one bucket per dtype, in dtype-code order, together covering every row once
    assert [b.dtype for b in lay.buckets] == sorted({cb.DTYPES[p.dtype] for _, _, p in tensors})
    assert [b.first_row for b in lay.buckets] == list(np.cumsum([0] + [b.n_tensors for b in lay.buckets])[:-1])
    assert sum(b.n_tensors for b in lay.buckets) == len(rows)
    # each bucket is chunked on its own; the partial sums of the buckets follow one another
    assert [b.first_partial for b in lay.buckets] == list(np.cumsum([0] + [b.n_chunks for b in lay.buckets])[:-1])
    assert lay.n_chunks == sum(-(-p.numel() // cb.CHUNK_SIZE) for _, _, p in tensors)
    dtype_of = {p.data_ptr(): cb.DTYPES[p.dtype] for _, _, p in tensors}
    for b in lay.buckets:
        sub = rows[b.first_row:b.first_row + b.n_tensors]
        assert all(dtype_of[int(r[cb.PARAM])] == b.dtype for r in sub)
        first, total = chunk_layout(sub[:, cb.NUMEL].tolist(), cb.CHUNK_SIZE)
        assert sub[:, cb.FIRST_CHUNK].tolist() == first and b.n_chunks == total
    by_param = {int(r[cb.PARAM]): r for r in rows}
    for gi, i, p in tensors:
        group, r = plan.groups[gi], by_param[p.data_ptr()]
        assert (r[cb.GRAD], r[cb.NUMEL], r[cb.GROUP]) == (group.grads[i].data_ptr(), p.numel(), gi)
        has_buf = with_state and group.momentum != 0
        assert r[cb.STEP] == (group.steps[i].data_ptr() if with_state else 0)
        assert r[cb.BUF] == (group.bufs[i].data_ptr() if has_buf else 0)
        assert r[cb.FRESH] == (1 if has_buf else 0)
    assert (lay.partials is None) == with_state
    if not with_state:
        assert lay.partials_ptr(lay.buckets[-1]) == lay.partials.data_ptr() + 8 * lay.buckets[-1].first_partial


def test_layout_rejects_strided_tensors():
    plan = _layout_plan()
    p = torch.randn(6, 4, dtype=torch.float32)
    plan.groups[1].params[0] = p.t()  # a transposed view is dense, but the gradient is not laid out alike
    plan.groups[1].grads[0] = torch.randn(4, 6, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="dense with equal strides"):
        cb._Layout(plan, with_state=False)
    plan.groups[1].params[0] = torch.randn(8, 6)[::2]  # not dense
    plan.groups[1].grads[0] = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match="dense with equal strides"):
        cb._Layout(plan, with_state=False)


# ---------------------------------------------------------------------------- the backend, end to end
class _HostTwin:
    """csrc/tests/host_launch.cpp behind fused_lr._cuda's interface. Every launch takes the same
    arguments as the module's, minus the stream (the last one), which the host has no use for."""

    def __init__(self, lib):
        c = ctypes
        sig = {
            "flr_norm_partials": [c.c_int, c.c_void_p, c.c_int, c.c_int64, c.c_int64, c.c_void_p, c.c_int, c.c_double,
                                  c.c_void_p],
            "flr_norm_finish": [c.c_void_p, c.c_int64, c.c_void_p, c.c_int],
            "flr_update": [c.c_int, c.c_void_p, c.c_int, c.c_int64, c.c_int64, c.c_void_p, c.c_void_p, c.c_void_p,
                           c.c_int, c.c_double, c.c_int, c.c_double, c.c_void_p, c.c_void_p],
            "flr_increment_steps": [c.c_void_p, c.c_int, c.c_void_p],
        }
        for name, argtypes in sig.items():
            getattr(lib, name).argtypes = argtypes
        self.lib = lib

    @staticmethod
    def _ok(rc):
        assert rc == 0, "the host twin does not handle this dtype"

    def set_device(self, device):
        pass

    def norm_partials(self, *args):
        self._ok(self.lib.flr_norm_partials(*args[:-1]))

    def norm_finish(self, *args):
        self._ok(self.lib.flr_norm_finish(*args[:-1]))

    def update(self, *args):
        self._ok(self.lib.flr_update(*args[:-1]))

    def increment_steps(self, *args):
        self._ok(self.lib.flr_increment_steps(*args[:-1]))


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    lib = tmp_path_factory.mktemp("host_launch") / "host_launch.so"
    _compile("host_launch.cpp", lib, "-shared", "-fPIC")
    return _HostTwin(ctypes.CDLL(str(lib)))


# sizes around the (patched) chunk size, an empty tensor, two dtypes in one optimizer
TWIN_CHUNK = 5
TWIN_SHAPES = [((3, 4), torch.float64), ((0,), torch.float64), ((7,), torch.float32), ((5,), torch.float64),
               ((2, 3, 5), torch.float32), ((1,), torch.float32)]
TWIN_CASES = {
    "nesterov-clip": dict(momentum=0.9, nesterov=True, weight_decay=5e-2, max_grad_norm=0.5, clip_value=0.8,
                          schedule=S.Warmup(2, S.Cosine(6), start_factor=0.1)),
    "dampening-decoupled": dict(momentum=0.8, dampening=0.3, weight_decay=5e-2, decoupled_weight_decay=True,
                                maximize=True, schedule=S.Step(2, 0.5)),
    "plain": dict(schedule=S.MultiStep([1, 3], 0.3)),
}


def _twin_params(dtypes_from):
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtypes_from(dt)) for shape, dt in TWIN_SHAPES]


@pytest.mark.parametrize("mixed", [True, False], ids=["f64+f32", "f32"])
@pytest.mark.parametrize("case", list(TWIN_CASES))
def test_backend_end_to_end_on_the_host_twin(twin, monkeypatch, case, mixed):
    """FusedSGD on CudaBackend (host twin) vs FusedSGD on the reference: 6 steps, the first one
    skipped by found_inf (its buffers then start at k = 0), GradScaler-style scaled gradients,
    two groups with their own lr, schedule and momentum."""
    monkeypatch.setattr(cb, "_ext", twin)
    monkeypatch.setattr(cb, "_stream", lambda device: 0)
    monkeypatch.setattr(cb, "CHUNK_SIZE", TWIN_CHUNK)
    monkeypatch.setattr(cb.CudaBackend, "devices", frozenset({"cpu"}))
    dtypes_from = (lambda dt: dt) if mixed else (lambda dt: torch.float32)
    runs = {}
    for name in ("reference", "twin"):
        params = [p.requires_grad_() for p in _twin_params(dtypes_from)]
        # the second group starts without momentum and gets it at step 3: fresh buffers at k = 2
        second = dict(params=params[4:], lr=0.05, schedule=S.Exponential(0.9), momentum=0.0, nesterov=False)
        opt = FusedSGD([dict(params=params[:4]), second], lr=0.1, backend="reference", **TWIN_CASES[case])
        if name == "twin":
            opt._backend = cb.CudaBackend()
        gen = torch.Generator().manual_seed(4)
        norms = []
        for step in range(6):
            if step == 3:
                opt.param_groups[1]["momentum"] = 0.7
            scale = 4.0
            for p in params:
                p.grad = (torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale).to(p.dtype)
            opt.grad_scale = torch.tensor([scale])
            opt.found_inf = torch.tensor([1.0 if step == 0 else 0.0])
            opt.step()
            if opt.last_grad_norm is not None:
                norms.append(opt.last_grad_norm.clone())
        assert opt.backend == ("cuda" if name == "twin" else "reference")
        runs[name] = (params, opt, norms)
    (ref_params, ref_opt, ref_norms), (got_params, got_opt, got_norms) = runs["reference"], runs["twin"]
    # float64 agrees to rounding; float32 to a few ulps per step, the norm being summed in
    # float64 by the kernels and in float32 by the reference
    for pr, pg in zip(ref_params, got_params, strict=True):
        tol = dict(rtol=1e-12, atol=1e-12) if pr.dtype == torch.float64 else dict(rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(pg.detach(), pr.detach(), **tol)
        sr, sg = ref_opt.state[pr], got_opt.state[pg]
        assert float(sg["step"]) == float(sr["step"]) == 5.0  # the skipped step counted nowhere
        if "momentum_buffer" in sr:
            torch.testing.assert_close(sg["momentum_buffer"], sr["momentum_buffer"], **tol)
    assert len(got_norms) == len(ref_norms)
    for nr, ng in zip(ref_norms, got_norms, strict=True):
        assert ng.dtype == nr.dtype == (torch.float64 if mixed else torch.float32)
        torch.testing.assert_close(ng, nr, rtol=1e-12 if mixed else 1e-6, atol=0)
