"""The CUDA backend checked on the host (CI has no GPU).

csrc/fused_lr_math.h holds everything the kernels compute, per element and per thread, as
``__host__ __device__`` functions, and csrc/fused_lr_layout.h (its table layout) is generated from
fused_lr/core/layout.py, here into a temporary directory as the CMake build does. This test
compiles two host programs against them with the system C++ compiler:

* csrc/tests/host_math.cpp answers single cases: ``eval_table`` against
  ``fused_lr.schedules.eval_table``, one tensor's prepare + update (every rule and variant:
  SGD, Adam/AdamW, RMSprop, Adagrad) and the norm of one block against the reference backend,
  and ``block_range`` against the backend's block numbering;
* csrc/tests/host_launch.cpp is a twin of the launches (prepare, update, increment and the norm,
  every block and thread in turn on CPU memory) behind fused_lr._cuda's interface, so every
  optimizer runs on CudaBackend end to end: tables, buckets, blocks, uploads, alignment paths,
  dtype checks, rebuilds, capture guards.

What none of this runs is kernels.cu itself (the launches, warp shuffles, device loads and
stores); tests/test_parity.py and tests/test_gpu_step.py do that where a GPU exists.
"""

import ctypes
import itertools
import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fused_lr
from fused_lr import FusedAdagrad, FusedAdam, FusedAdamW, FusedRMSprop, FusedSGD
from fused_lr import schedules as S
from fused_lr.backends import BackendUnavailable
from fused_lr.backends import cuda as cb
from fused_lr.backends.device_tables import DeviceTables
from fused_lr.backends.reference import ReferenceBackend
from fused_lr.core import layout as L
from fused_lr.core.plan import Plan, Settings, StepScalars

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"


def _compiler():
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """The layout header, generated from fused_lr/core/layout.py as the CMake build does."""
    out = tmp_path_factory.mktemp("generated")
    subprocess.run([sys.executable, str(ROOT / "fused_lr" / "core" / "layout.py"), str(out / "fused_lr_layout.h")],
                   check=True)
    return out


def _compile(source: str, out, include, *flags: str) -> None:
    """Build one of csrc/tests/ with the host C++ compiler, or skip when there is none.
    -ffp-contract=off: the host must round every operation as the Python oracle does, so a one-ulp
    difference means a formula differs (the device build fuses a*b+c; its ulps are the parity
    tests' business)."""
    cxx = _compiler()
    if cxx is None:
        pytest.skip(f"no C++ compiler (g++, c++, clang++ or $CXX) to build {source}")
    subprocess.run([cxx, "-std=c++17", "-O2", "-ffp-contract=off", *flags, "-Wall", "-Wextra", "-Werror",
                    f"-I{include}", "-o", str(out), str(CSRC / "tests" / source)], check=True)


@pytest.fixture(scope="module")
def host(tmp_path_factory, generated):
    """Run the host program on a list of command lines; returns one list of floats per line."""
    exe = tmp_path_factory.mktemp("host_math") / "host_math"
    _compile("host_math.cpp", exe, generated)

    def run(lines):
        out = subprocess.run([str(exe)], input="\n".join(lines) + "\n", capture_output=True, text=True, check=True)
        rows = out.stdout.splitlines()
        assert len(rows) == len(lines)
        return [[float(x) for x in row.split()] for row in rows]

    return run


def _fmt(values) -> str:
    return " ".join(repr(float(v)) for v in values)


# ---------------------------------------------------------------------------- one layout
def test_csrc_and_the_host_side_restate_no_layout_constant():
    """Every column, flag, code and size reaches csrc/ through the generated header and cuda.py
    through fused_lr.core.layout: neither defines one of those names itself."""
    names = cb.layout_constants(L.c_header())
    assert {"T_PARAM", "H_FLAGS", "C_INIT", "W_GO", "F_NESTEROV", "K_COSINE", "NORM_EPS", "CUDA_CHUNK"} <= set(names)
    sources = [p for p in CSRC.rglob("*") if p.suffix in (".h", ".cu", ".cpp")] + [ROOT / "fused_lr/backends/cuda.py"]
    for path in sources:
        text = path.read_text()
        for name in names:
            assert not re.search(rf"\b{name}\s*=[^=]", text), f"{path.name} defines {name}"
        assert "1e-6" not in text and "1e-06" not in text, f"{path.name} restates NORM_EPS"


class _FakeModule:
    DTYPES = {"float32": 0}

    def __init__(self, header):
        self.LAYOUT_HEADER = header

    @staticmethod
    def probe():
        return 1, ""


def test_a_stale_build_is_unavailable_saying_reinstall(monkeypatch):
    stale = L.c_header().replace(f"T_GRAD = {L.T_GRAD};", f"T_GRAD = {L.T_GRAD + 7};")
    assert cb.layout_mismatch(_FakeModule(L.c_header())) is None
    assert cb.layout_mismatch(_FakeModule(stale)) == f"T_GRAD = {L.T_GRAD + 7} there, {L.T_GRAD} in layout.py"
    assert "missing" in cb.layout_mismatch(_FakeModule(""))
    monkeypatch.setitem(sys.modules, "fused_lr._cuda", _FakeModule(stale))
    monkeypatch.setattr(fused_lr, "_cuda", sys.modules["fused_lr._cuda"], raising=False)
    with pytest.raises(BackendUnavailable, match=r"T_GRAD = .*reinstall fused_lr"):
        cb.load()


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
    assert kinds == set(L.SCHEDULE_KINDS.values())


def test_eval_table_matches_python(host):
    tables = [s.table() for s in SCHEDULES]
    lines = [f"table {_fmt(t.ravel())} {len(STEPS_K)} {_fmt(STEPS_K)}" for t in tables]
    for schedule, table, got in zip(SCHEDULES, tables, host(lines), strict=True):
        want = [S.eval_table(table, k) for k in STEPS_K]
        # Same libm, same operation order: equal up to the last bit, bar pow/cos rounding that
        # a libm may do differently from one call form to another (1e-15 relative).
        for k, g, w in zip(STEPS_K, got, want, strict=True):
            assert math.isclose(g, w, rel_tol=1e-15, abs_tol=1e-300), (schedule, k, g, w)


# ---------------------------------------------------------------------------- one tensor's update
OPTIMIZERS = {L.RULE_SGD: FusedSGD, L.RULE_ADAM: FusedAdam, L.RULE_RMSPROP: FusedRMSprop, L.RULE_ADAGRAD: FusedAdagrad}
# Each rule's own hyper-parameters, one dict per variant: every flag on and off, momentum with and
# without, and lerp weights (1 - beta1, 1 - alpha) on both sides of 0.5, where torch.lerp switches
# formulas.
VARIANTS = {
    L.RULE_SGD: [dict(momentum=0.0, dampening=0.0, nesterov=False), dict(momentum=0.9, dampening=0.0, nesterov=False),
                 dict(momentum=0.9, dampening=0.0, nesterov=True), dict(momentum=0.9, dampening=0.3, nesterov=False)],
    L.RULE_ADAM: [dict(betas=(0.9, 0.999), eps=1e-8, amsgrad=False), dict(betas=(0.9, 0.999), eps=1e-8, amsgrad=True),
                  dict(betas=(0.3, 0.9), eps=1e-3, amsgrad=True)],
    L.RULE_RMSPROP: [dict(alpha=0.99, eps=1e-8, momentum=0.0, centered=False),
                     dict(alpha=0.99, eps=1e-8, momentum=0.0, centered=True),
                     dict(alpha=0.99, eps=1e-8, momentum=0.9, centered=False),
                     dict(alpha=0.9, eps=1e-3, momentum=0.9, centered=True),
                     dict(alpha=0.3, eps=1e-3, momentum=0.5, centered=True)],
    L.RULE_ADAGRAD: [dict(lr_decay=0.0, eps=1e-10), dict(lr_decay=0.05, eps=1e-3)],
}
DECAYS = [(0.0, False), (0.05, False), (0.05, True)]  # (weight_decay, decoupled)
# (norm, clip by it, gradient-norm rate power): no norm; with max_grad_norm 0.5 clipping (c = 0.2) or
# inactive (c = 1); the norm feeding only the rate; both
NORMS = [(None, False, 0.0), (2.5, True, 0.0), (0.1, True, 0.0), (2.5, False, 0.5), (0.1, True, 0.5)]
MAX_NORM = 0.5
RATE_EPS = 1e-3
LR_SCHEDULES = [S.Constant(), S.Warmup(5, S.Cosine(20), start_factor=0.1), S.Step(3, 0.5)]
LR_KINDS = ["float", "float32 tensor", "float64 tensor"]
SCALES = [None, 3.0]
CLOCK_STEPS = [(0, 0), (7, 0), (7, 3), (0, 5)]  # (group clock, the tensor's step count)
FOUND_INF = [None, 0.0, 1.0]  # no found_inf; one that is clear; one that skips the step
N = 19  # four 16-byte packs of float32 and a tail; nine of float64 and a tail

# Per dtype: the reference and the host do the same IEEE operations, but torch's vectorised
# CPU kernels may fuse a*b+c (one rounding fewer), so allow a few ulps of the O(1) values
# involved: float64 ~ 1e-16/ulp, float32 ~ 1.2e-7/ulp. Formula errors are >= 1e-3 here, and a
# wrongly rounded unscale factor (float64 instead of GradScaler's float32) is ~1e-8 relative.
TOL = {torch.float64: dict(rtol=1e-14, atol=1e-14), torch.float32: dict(rtol=1e-6, atol=1e-6)}


# Axes drawn per case from a fixed seed, beside the variants, decays, maximize, value clipping and
# norm uses that every rule crosses in full; _assert_covered holds that each variant meets each value
# of each (SGD's first use of a buffer and Adam's bias corrections depend on the step count).
DRAWN = {"grad_scale": SCALES, "clock_step": CLOCK_STEPS, "schedule": LR_SCHEDULES, "lr_kind": LR_KINDS,
         "found_inf": FOUND_INF}


def _update_cases(rule):
    combos = itertools.product([torch.float64, torch.float32], range(len(VARIANTS[rule])), DECAYS, [False, True],
                               [None, 0.3], NORMS)
    for i, (dtype, variant, decay, maximize, clip, (norm, clip_by_norm, power)) in enumerate(combos):
        rng = random.Random(i)
        yield dict(rule=rule, dtype=dtype, variant=variant, decay=decay, maximize=maximize, clip_value=clip,
                   norm=norm, clip_by_norm=clip_by_norm, rate_power=power, seed=i,
                   **{axis: rng.choice(choices) for axis, choices in DRAWN.items()})


def _assert_covered(cases):
    for axis, values in DRAWN.items():
        for variant in range(len(VARIANTS[cases[0]["rule"]])):
            met = [c[axis] for c in cases if c["variant"] == variant]
            assert all(v in met for v in values), (axis, variant)


def _group(case):
    wd, decoupled = case["decay"]
    lr = {"float": 0.1, "float32 tensor": torch.tensor(0.1), "float64 tensor": torch.tensor(0.1, dtype=torch.float64)}
    return dict(lr=lr[case["lr_kind"]], weight_decay=wd, decoupled_weight_decay=decoupled, maximize=case["maximize"],
                schedule=case["schedule"], **VARIANTS[case["rule"]][case["variant"]])


def _hyper_row(group, cls=FusedSGD) -> np.ndarray:
    """A group's kernel row, from the optimizer's own declaration of its flags and rule columns."""
    flags, rule_cols = cls.rule_row(None, group)
    flags |= (L.F_MAXIMIZE if group["maximize"] else 0) | (L.F_DECOUPLED if group["decoupled_weight_decay"] else 0)
    row = np.zeros(L.HYPER_COLS)
    row[L.H_LR] = 1.0 if isinstance(group["lr"], torch.Tensor) else group["lr"]  # a tensor lr multiplies it
    row[L.H_WEIGHT_DECAY] = group["weight_decay"]
    row[L.H_FLAGS] = flags
    row[L.H_R0:L.H_R0 + len(rule_cols)] = rule_cols
    return row


def _tensors(case):
    """Parameter, gradient and the rule's states (by name, in declaration order) for a case. States
    hold values a run could leave: second moments and sums >= 0, and RMSprop's square_avg above
    grad_avg^2, so that a centered variance stays positive (torch would take sqrt of a negative)."""
    gen = torch.Generator().manual_seed(case["seed"])

    def randn():
        return torch.randn(N, generator=gen, dtype=torch.float64)

    p, g = randn(), randn()
    if case["grad_scale"]:
        g = g * case["grad_scale"]
    names = OPTIMIZERS[case["rule"]].state_names(None, _group(case))
    made = {name: randn() for name in ("momentum_buffer", "exp_avg", "grad_avg")}
    made |= {name: randn().abs() for name in ("exp_avg_sq", "max_exp_avg_sq", "sum")}
    made["square_avg"] = (made["grad_avg"] ** 2 if "grad_avg" in names else 0) + 0.5 + randn().abs()
    return p.to(case["dtype"]), g.to(case["dtype"]), {name: made[name].to(case["dtype"]) for name in names}


def _one_tensor_plan(p, g, states, step, rule=L.RULE_SGD):
    plan = Plan.build(torch.device("cpu"), rule, OPTIMIZERS[rule].coefficients, [(0, 0, p, None)])
    plan.bind([states], [torch.tensor(float(step))])
    plan.set_grads([g], lambda row: "the parameter")
    return plan


def _reference(case, p, g, states):
    group, cls = _group(case), OPTIMIZERS[case["rule"]]
    p, states = p.clone(), {name: t.clone() for name, t in states.items()}
    clock, step = case["clock_step"]
    plan = _one_tensor_plan(p, g, states, step, case["rule"])
    settings = Settings(groups=[group], hyper=_hyper_row(group, cls)[None], schedules=case["schedule"].table()[None],
                        lr_tensors={}, max_grad_norm=MAX_NORM if case["clip_by_norm"] else None,
                        clip_value=case["clip_value"], lr_norm_power=case["rate_power"], lr_norm_eps=RATE_EPS,
                        reference_rule=cls.reference_rule)
    scale = None if case["grad_scale"] is None else torch.tensor([case["grad_scale"]])
    found = None if case["found_inf"] is None else torch.tensor([case["found_inf"]])
    norm = None if case["norm"] is None else torch.tensor(case["norm"], dtype=plan.norm_dtype)
    ReferenceBackend().update(plan, settings, torch.tensor([float(clock)]), StepScalars(scale, found), norm)
    return p, states


def _update_line(case, p, g, states):
    group = _group(case)
    dtype = "f64" if case["dtype"] == torch.float64 else "f32"
    norm, clip, scale, found = case["norm"], case["clip_value"], case["grad_scale"], case["found_inf"]
    clock, step = case["clock_step"]
    head = [clock, step, LR_KINDS.index(case["lr_kind"]), float(group["lr"]), int(scale is not None),
            scale or 0.0, int(norm is not None), norm or 0.0, int(case["dtype"] == torch.float64),
            int(case["clip_by_norm"]), MAX_NORM, case["rate_power"], RATE_EPS, int(clip is not None), clip or 0.0,
            int(found is not None), found or 0.0, len(states), N]
    elems = torch.stack([p, g, *states.values()], dim=1).ravel().tolist()
    cls = OPTIMIZERS[case["rule"]]
    return f"update {dtype} {case['rule']} {cls.coefficients} {_fmt(_hyper_row(group, cls))} " \
           f"{_fmt(case['schedule'].table().ravel())} {_fmt(head)} {_fmt(elems)}"


@pytest.mark.parametrize("rule", list(L.RULES.values()), ids=list(L.RULES))
def test_update_matches_reference(host, rule):
    """One tensor of each rule through prepare_row and update_block against the reference backend
    (ReferenceBackend.update with the optimizer's reference_rule): parameter and every state."""
    cases = list(_update_cases(rule))
    _assert_covered(cases)
    inputs = [_tensors(c) for c in cases]
    lines = [_update_line(c, *t) for c, t in zip(cases, inputs, strict=True)]
    for case, (p0, g, s0), out in zip(cases, inputs, host(lines), strict=True):
        p_ref, s_ref = _reference(case, p0, g, s0)
        got = torch.tensor(out, dtype=torch.float64).view(N, 1 + len(s0))
        tol = TOL[case["dtype"]]
        skipped = case["found_inf"] == 1.0
        assert torch.equal(p_ref, p0) == skipped  # every case but a skipped one moves the parameter
        torch.testing.assert_close(got[:, 0], p_ref.double(), **tol, msg=lambda m, c=case: f"param: {m}\n{c}")
        for j, name in enumerate(s0, start=1):
            torch.testing.assert_close(got[:, j], s_ref[name].double(), **tol,
                                       msg=lambda m, c=case, n=name: f"{n}: {m}\n{c}")


@pytest.mark.parametrize("rule", list(L.RULES.values()), ids=list(L.RULES))
def test_update_carries_non_finite_gradients_as_torch_does(host, rule):
    """NaN and +-inf gradients in packs and in the tail, in a step found_inf does not skip: each
    reaches the parameter and states as torch's ops carry it (NaN through clamp and maximum; inf
    through lerp, sqrt and division, where inf - inf and inf / inf make NaN)."""
    base = dict(rule=rule, decay=(0.05, False), norm=None, clip_by_norm=False, rate_power=0.0, grad_scale=None,
                clock_step=(7, 3), schedule=LR_SCHEDULES[0], lr_kind="float", found_inf=None)
    cases = [dict(base, dtype=dtype, variant=variant, maximize=maximize, clip_value=clip, seed=i)
             for i, (dtype, variant, maximize, clip) in enumerate(itertools.product(
                 [torch.float64, torch.float32], range(len(VARIANTS[rule])), [False, True], [None, 0.3]))]
    inputs = []
    for case in cases:
        p, g, states = _tensors(case)
        g[[2, 9, 16, 18]] = torch.tensor([math.nan, math.inf, -math.inf, math.nan], dtype=g.dtype)  # 18: the tail
        inputs.append((p, g, states))
    lines = [_update_line(c, *t) for c, t in zip(cases, inputs, strict=True)]
    for case, (p0, g, s0), out in zip(cases, inputs, host(lines), strict=True):
        p_ref, s_ref = _reference(case, p0, g, s0)
        got = torch.tensor(out, dtype=torch.float64).view(N, 1 + len(s0))
        assert not p_ref.isfinite().all()
        for j, (name, want) in enumerate([("param", p_ref), *s_ref.items()]):
            torch.testing.assert_close(got[:, j], want.double(), **TOL[case["dtype"]], equal_nan=True,
                                       msg=lambda m, c=case, n=name: f"{n}: {m}\n{c}")


def test_grad_norm_matches_reference(host):
    lines, want, dtypes = [], [], []
    for i, (dtype, clip, scale) in enumerate(itertools.product([torch.float64, torch.float32], [None, 0.3],
                                                               [None, 3.0])):
        g = torch.randn(1001, generator=torch.Generator().manual_seed(i), dtype=torch.float64).to(dtype)
        plan = _one_tensor_plan(torch.zeros_like(g), g, {}, 0)
        group = dict(maximize=False)
        settings = Settings(groups=[group], hyper=np.zeros((1, L.HYPER_COLS)),
                            schedules=np.zeros((1, L.MAX_SEGMENTS, L.SEGMENT_COLS)), lr_tensors={},
                            max_grad_norm=None, clip_value=clip, lr_norm_power=0.0, lr_norm_eps=1e-6,
                            reference_rule=FusedSGD.reference_rule)
        scalars = StepScalars(None if scale is None else torch.tensor([scale]), None)
        want.append(float(ReferenceBackend().grad_norm(plan, settings, scalars)))
        dtypes.append(dtype)
        head = [int(scale is not None), scale or 0.0, int(clip is not None), clip or 0.0, g.numel()]
        lines.append(f"norm {'f64' if dtype == torch.float64 else 'f32'} {_fmt(head)} {_fmt(g.tolist())}")
    for dtype, w, (got,) in zip(dtypes, want, host(lines), strict=True):
        # The kernel sums squares in float64; the reference sums in the norm's dtype, in another
        # order: float64 agrees to rounding (1e-13), float32 to its accumulated error (1e-5).
        assert math.isclose(got, w, rel_tol=1e-13 if dtype == torch.float64 else 1e-5), (dtype, got, w)


def test_clip_coef_keeps_a_nan_norm_and_zeroes_an_inf_one(host):
    """clip_coef against clip_grad_norm_'s formula (fused_lr.backends.reference.clip_coef, torch ops)
    in the norm's dtype, bit for bit (the same two correctly rounded operations): a NaN norm gives
    NaN, as torch.clamp keeps it (fminf(1, nan) would give 1: a full unclipped step); an inf norm
    gives 0; a zero norm, one under and one over max_norm, and one past float32's range."""
    from fused_lr.backends.reference import clip_coef

    norms = [math.nan, math.inf, 0.0, 0.1, 2.5, 1e30, 1e300]
    lines, want = [], []
    for dtype in (torch.float64, torch.float32):
        lines.append(f"coef {'f64' if dtype == torch.float64 else 'f32'} {_fmt([MAX_NORM, len(norms)])} {_fmt(norms)}")
        want.append(torch.stack([clip_coef(torch.tensor(n, dtype=dtype), MAX_NORM) for n in norms]).double())
    for w, got in zip(want, host(lines), strict=True):
        got = torch.tensor(got, dtype=torch.float64)
        assert got[0].isnan() and got[1] == 0.0 and got[2] == 1.0
        torch.testing.assert_close(got, w, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("rule", list(L.RULES.values()), ids=list(L.RULES))
def test_update_with_a_nonfinite_norm_matches_reference(host, rule):
    """prepare_row and update_block handed a NaN or inf norm (clipping by it, the gradient-norm rate
    from it, or both), against the reference backend: a NaN norm makes the clip coefficient and the
    rate NaN, so every parameter turns NaN; an inf norm makes the coefficient 0 and the rate 0. A
    step that found_inf skips changes nothing whatever the norm."""
    base = dict(rule=rule, decay=(0.05, False), maximize=False, clip_value=None, grad_scale=None, clock_step=(7, 3),
                schedule=LR_SCHEDULES[0], lr_kind="float")
    cases = [dict(base, dtype=dtype, variant=variant, norm=norm, clip_by_norm=clip_by_norm, rate_power=power,
                  found_inf=found, seed=i)
             for i, (dtype, variant, norm, (clip_by_norm, power), found) in enumerate(itertools.product(
                 [torch.float64, torch.float32], range(len(VARIANTS[rule])), [math.nan, math.inf],
                 [(True, 0.0), (False, 0.5), (True, 0.5)], [None, 1.0]))]
    inputs = [_tensors(c) for c in cases]
    lines = [_update_line(c, *t) for c, t in zip(cases, inputs, strict=True)]
    for case, (p0, g, s0), out in zip(cases, inputs, host(lines), strict=True):
        p_ref, s_ref = _reference(case, p0, g, s0)
        got = torch.tensor(out, dtype=torch.float64).view(N, 1 + len(s0))
        if case["found_inf"]:
            assert torch.equal(p_ref, p0)
        elif math.isnan(case["norm"]):
            assert p_ref.isnan().all()
        else:
            assert p_ref.isfinite().all()
        for j, (name, want) in enumerate([("param", p_ref), *s_ref.items()]):
            torch.testing.assert_close(got[:, j], want.double(), **TOL[case["dtype"]], equal_nan=True,
                                       msg=lambda m, c=case, n=name: f"{n}: {m}\n{c}")


# ---------------------------------------------------------------------------- blocks
@pytest.mark.parametrize("chunk", [8, 1000])
def test_blocks_cover_every_element_once(host, chunk):
    """The backend's block numbering (first chunk per row, row per block) through the kernels'
    block_range: every element of every tensor in exactly one block of at most CHUNK elements."""
    numels = [0, 1, 999, 1000, 1001, 0, 0, 5000, 3, 0, 2048]
    dtypes = [torch.float32] * 6 + [torch.float64] * 5
    plan = Plan.build(torch.device("cpu"), L.RULE_SGD, FusedSGD.coefficients,
                      [(i, 0, torch.zeros(n, dtype=dt), None) for i, (n, dt) in enumerate(zip(numels, dtypes))])
    tabs = cb._Tables(plan, {torch.float32: 0, torch.float64: 1}, chunk, DeviceTables("cuda"))
    assert tabs.block_counts == (sum(-(-n // chunk) for n in numels[:6]), sum(-(-n // chunk) for n in numels[6:]))
    assert tabs.first_blocks == (0, tabs.block_counts[0]) and tabs.n_blocks == sum(tabs.block_counts)
    pairs = [x for n, f in zip(numels, plan.table[:, L.T_FIRST_CHUNK].tolist(), strict=True) for x in (n, f)]
    (out,) = host([f"blocks {chunk} {len(numels)} {_fmt(pairs)} {tabs.n_blocks} {_fmt(tabs.blocks.tolist())}"])
    triples = np.array(out, dtype=np.int64).reshape(-1, 3)
    seen = [np.zeros(n, dtype=np.int64) for n in numels]
    for row, begin, end in triples:
        assert 0 < end - begin <= chunk
        seen[row][begin:end] += 1
    assert all((s == 1).all() for s in seen)


# ---------------------------------------------------------------------------- the backend, end to end
def _ints(values, ctype):
    return (ctype * len(values))(*values)


def _header_with_chunk(chunk):
    """The layout header as an extension built with ``chunk`` elements per block would report it."""
    return L.c_header().replace(f"CUDA_CHUNK = {L.SIZES['CUDA_CHUNK']};", f"CUDA_CHUNK = {chunk};")


class _HostTwin:
    """csrc/tests/host_launch.cpp behind fused_lr._cuda's interface, with ``chunk`` elements and
    ``threads`` threads per block (its LAYOUT_HEADER says that chunk, so the backend numbers its
    blocks alike). Calls take the module's arguments; device and stream (the last two) must say
    "no device"."""

    def __init__(self, lib, chunk, threads):
        self.lib, self.chunk, self.threads = lib, chunk, threads
        self.LAYOUT_HEADER = _header_with_chunk(chunk)
        self.DTYPES = {}
        while (name := lib.flr_dtype_name(len(self.DTYPES))) is not None:
            self.DTYPES[name.decode()] = len(self.DTYPES)

    def norm(self, table, blocks, dtypes, first_blocks, n_blocks, *rest):
        *args, device, stream = rest
        assert (device, stream) == (-1, 0)
        rc = self.lib.flr_norm(table, blocks, _ints(dtypes, ctypes.c_int), _ints(first_blocks, ctypes.c_int64),
                               _ints(n_blocks, ctypes.c_int64), len(dtypes), *args, self.chunk, self.threads)
        assert rc == 0, "the host twin does not handle this dtype"

    def step(self, rule, program, table, blocks, n_tensors, dtypes, first_blocks, n_blocks, *rest):
        *args, device, stream = rest
        assert (device, stream) == (-1, 0)
        rc = self.lib.flr_step(rule, program, table, blocks, n_tensors, _ints(dtypes, ctypes.c_int),
                               _ints(first_blocks, ctypes.c_int64), _ints(n_blocks, ctypes.c_int64), len(dtypes),
                               *args, self.chunk, self.threads)
        assert rc == 0, "the host twin does not handle this dtype or rule"


@pytest.fixture(scope="module")
def twin_lib(tmp_path_factory, generated):
    path = tmp_path_factory.mktemp("host_launch") / "host_launch.so"
    _compile("host_launch.cpp", path, generated, "-shared", "-fPIC")
    lib = ctypes.CDLL(str(path))
    c = ctypes
    lib.flr_dtype_name.restype = c.c_char_p
    lib.flr_dtype_name.argtypes = [c.c_int]
    lib.flr_norm.argtypes = [c.c_void_p, c.c_void_p, c.c_void_p, c.c_void_p, c.c_void_p, c.c_int, c.c_int64,
                             c.c_void_p, c.c_int, c.c_double, c.c_void_p, c.c_void_p, c.c_int, c.c_int, c.c_int64,
                             c.c_int]
    lib.flr_step.argtypes = [c.c_int, c.c_int64, c.c_void_p, c.c_void_p, c.c_int64, c.c_void_p, c.c_void_p,
                             c.c_void_p, c.c_int,
                             c.c_void_p, c.c_void_p, c.c_void_p, c.c_void_p, c.c_void_p, c.c_int64, c.c_void_p,
                             c.c_void_p, c.c_int, c.c_void_p, c.c_int64, c.c_int, c.c_double, c.c_double, c.c_double,
                             c.c_void_p, c.c_void_p, c.c_int, c.c_double, c.c_int64, c.c_int]
    lib.flr_launches.restype = c.c_int64
    lib.flr_launches.argtypes = []
    return lib


@pytest.fixture
def on_twin(monkeypatch, twin_lib):
    """``on_twin(chunk, threads)`` -> the extension module CudaBackend() will use: the host twin with
    that many elements and threads per block (or ``ext``), on CPU tensors."""

    def use(chunk=8, threads=3, ext=None):
        ext = ext or _HostTwin(twin_lib, chunk, threads)
        monkeypatch.setattr(cb, "_ext", ext)
        monkeypatch.setattr(cb.CudaBackend, "devices", frozenset({"cpu"}))
        return ext

    return use


def _on_cuda_backend(opt):
    """Route opt's steps to a CudaBackend (the core would otherwise pick the reference here)."""
    opt._backend = cb.CudaBackend()
    return opt._backend


# sizes around the twin's 8-element chunk, an empty tensor, two dtypes in one optimizer, and a
# parameter at an odd address (row not 16-byte aligned: the scalar path)
TWIN_SHAPES = [((3, 4), torch.float64), ((0,), torch.float64), ((7,), torch.float32), ((5,), torch.float64),
               ((2, 3, 5), torch.float32), ((1,), torch.float32), ("odd", torch.float32)]
_SECOND_LR = dict(lr=torch.tensor(0.05), schedule=S.Exponential(0.9))  # a float32 tensor lr, its own schedule
# name -> (optimizer, its arguments, the second group's own settings, what changes in the second
# group at step 3). Most changes switch a state on (momentum, amsgrad, centered): a new plan, the
# new state created then; RMSprop's momentum moves grad_avg from STATE1 to STATE2.
TWIN_CASES = {
    "nesterov-clip": (FusedSGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-2, max_grad_norm=0.5,
                                     clip_value=0.8, schedule=S.Warmup(2, S.Cosine(6), start_factor=0.1)),
                      dict(_SECOND_LR, momentum=0.0, nesterov=False), dict(momentum=0.7)),
    "dampening-decoupled": (FusedSGD, dict(lr=0.1, momentum=0.8, dampening=0.3, weight_decay=5e-2,
                                           decoupled_weight_decay=True, maximize=True, schedule=S.Step(2, 0.5)),
                            dict(_SECOND_LR, momentum=0.0), dict(momentum=0.7)),
    "plain-tensor-lr-rate": (FusedSGD, dict(lr=torch.tensor(0.1, dtype=torch.float64), lr_norm_power=0.5,
                                            lr_norm_eps=1e-3, schedule=S.MultiStep([1, 3], 0.3)),
                             dict(_SECOND_LR), dict(momentum=0.7)),
    "adamw-amsgrad-clip": (FusedAdamW, dict(lr=0.01, betas=(0.9, 0.99), weight_decay=5e-2, amsgrad=True,
                                            max_grad_norm=0.5, clip_value=0.8,
                                            schedule=S.Warmup(2, S.Cosine(6), start_factor=0.1)),
                           dict(_SECOND_LR, betas=(0.3, 0.9), amsgrad=False), dict(amsgrad=True)),
    "adam-coupled-maximize-rate": (FusedAdam, dict(lr=torch.tensor(0.01, dtype=torch.float64), eps=1e-3,
                                                   weight_decay=5e-2, maximize=True, lr_norm_power=0.5,
                                                   lr_norm_eps=1e-3, schedule=S.MultiStep([1, 3], 0.3)),
                                   dict(_SECOND_LR, betas=(0.8, 0.9)), dict(amsgrad=True)),
    # no coupled decay in a case of the large-tensor run: among 80k elements some gradient nearly
    # cancels against wd x p, and RMSprop's g / sqrt(E[g^2]), blind to g's scale, turns the norm's
    # summation-order difference (1e-14 relative between the kernels and the reference) into ~1e-10
    "rmsprop-centered-momentum-clip": (FusedRMSprop, dict(lr=0.01, alpha=0.9, momentum=0.9, centered=True,
                                                          max_grad_norm=0.5, clip_value=0.8, schedule=S.Step(2, 0.5)),
                                       dict(_SECOND_LR, alpha=0.3, eps=1e-3), dict(centered=True)),
    "rmsprop-momentum-decay-maximize-rate": (FusedRMSprop, dict(lr=0.01, momentum=0.8, weight_decay=1e-2,
                                                                maximize=True, lr_norm_power=0.5, lr_norm_eps=1e-3,
                                                                schedule=S.Cosine(6)),
                                       dict(_SECOND_LR, momentum=0.0, centered=True), dict(momentum=0.5)),
    "adagrad-decay-clip": (FusedAdagrad, dict(lr=0.1, lr_decay=0.05, initial_accumulator_value=0.1,
                                              weight_decay=1e-2, max_grad_norm=0.5, clip_value=0.8,
                                              schedule=S.Step(2, 0.5)),
                           dict(_SECOND_LR, lr_decay=0.0, eps=1e-3), dict(lr_decay=0.1, maximize=True)),
}


def _twin_params(dtypes_from, big=False):
    gen = torch.Generator().manual_seed(3)
    params = []
    for shape, dt in TWIN_SHAPES:
        if shape == "odd":
            params.append(torch.randn(14, generator=gen, dtype=torch.float64).to(dtypes_from(dt))[1:])
        else:
            shape = (shape[0] * 1500, *shape[1:]) if big and shape[0] > 1 else shape
            params.append(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtypes_from(dt)))
    return params


def _run(name, case, dtypes_from, big, steps=6):
    """``steps`` steps of the case's optimizer on the reference or the twin: the first skipped by
    found_inf, GradScaler-style scaled gradients, two groups with their own lr (the second's a
    tensor) and schedule, the second group's change at step 3. Returns the parameters, the
    optimizer, the norms, the backend (twin only) and whether the change made new state."""
    cls, kwargs, second, change = TWIN_CASES[case]
    params = [p.requires_grad_() for p in _twin_params(dtypes_from, big)]
    opt = cls([dict(params=params[:4]), dict(params=params[4:], **second)], backend="reference", **kwargs)
    backend = _on_cuda_backend(opt) if name == "twin" else None
    gen = torch.Generator().manual_seed(4)
    norms = []
    states_before = opt.state_names(opt.param_groups[1])
    for step in range(steps):
        if step == 3:
            opt.param_groups[1].update(change)
        scale = 4.0
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale).to(p.dtype)
        opt.grad_scale = torch.tensor([scale])
        opt.found_inf = torch.tensor([1.0 if step == 0 else 0.0])
        opt.step()
        if opt.last_grad_norm is not None:
            norms.append(opt.last_grad_norm.clone())
    assert opt.backend == ("cuda" if name == "twin" else "reference")
    return params, opt, norms, backend, opt.state_names(opt.param_groups[1]) != states_before


# As max |got - ref| / (1 + |ref|) over every parameter and state of these runs (measured at most
# 3.5e-15 in float64, 2.9e-7 for SGD and 2.1e-6 for the adaptive rules in float32): float64 agrees
# to rounding, 1e-12. float32: when every parameter is float32 the kernels sum the norm in float64
# and the reference in float32, so the clip coefficient and the rate may differ by an ulp; SGD
# carries that ulp on linearly (2e-6), while RMSprop divides by a root of (s - c^2) when centered,
# or of a gradient that coupled decay nearly cancels, which turns it into tens of ulps (1e-5).
TWIN_TOL32 = {FusedSGD: dict(rtol=2e-6, atol=2e-6)}


def _assert_same_run(ref, got, steps):
    (ref_params, ref_opt, ref_norms, _, _), (got_params, got_opt, got_norms, backend, new_state) = ref, got
    for pr, pg in zip(ref_params, got_params, strict=True):
        tol = dict(rtol=1e-12, atol=1e-12) if pr.dtype == torch.float64 else \
            TWIN_TOL32.get(type(ref_opt), dict(rtol=1e-5, atol=1e-5))
        torch.testing.assert_close(pg.detach(), pr.detach(), **tol)
        sr, sg = ref_opt.state[pr], got_opt.state[pg]
        assert sr.keys() == sg.keys()
        assert float(sg["step"]) == float(sr["step"])
        for name in sr.keys() - {"step"}:
            assert sg[name].dtype == pr.dtype
            torch.testing.assert_close(sg[name], sr[name], **tol, msg=lambda m, n=name: f"{n}: {m}")
    clocks = [[float(g["schedule_step"]) for g in o.state_dict()["param_groups"]] for o in (ref_opt, got_opt)]
    assert clocks[0] == clocks[1] == [steps - 1] * 2  # the skipped first step counted nowhere
    assert len(got_norms) == len(ref_norms)
    for nr, ng in zip(ref_norms, got_norms, strict=True):
        assert ng.dtype == nr.dtype
        torch.testing.assert_close(ng, nr, rtol=1e-12 if nr.dtype == torch.float64 else 1e-6, atol=0)
    assert backend.rebuilds == 1 + new_state  # the first plan, and one more if the change made new state


@pytest.mark.parametrize("mixed", [True, False], ids=["f64+f32", "f32"])
@pytest.mark.parametrize("case", list(TWIN_CASES))
def test_backend_end_to_end_on_the_host_twin(on_twin, case, mixed):
    """Each optimizer on CudaBackend (host twin: 8-element chunks, 3 threads per block) vs the
    same optimizer on the reference, 6 steps (_run)."""
    on_twin(chunk=8, threads=3)
    dtypes_from = (lambda dt: dt) if mixed else (lambda dt: torch.float32)
    ref = _run("reference", case, dtypes_from, big=False)
    got = _run("twin", case, dtypes_from, big=False)
    _assert_same_run(ref, got, steps=6)


@pytest.mark.parametrize("case", ["nesterov-clip", "adamw-amsgrad-clip", "rmsprop-centered-momentum-clip",
                                  "adagrad-decay-clip"])
def test_backend_end_to_end_with_the_kernels_block_sizes(on_twin, case):
    """The same with the kernels' own chunk and block sizes, on tensors of several chunks: every
    thread's loop runs more than once, packs and tails included."""
    on_twin(chunk=L.SIZES["CUDA_CHUNK"], threads=L.SIZES["CUDA_BLOCK"])
    ref = _run("reference", case, lambda dt: dt, big=True)
    got = _run("twin", case, lambda dt: dt, big=True)
    assert max(p.numel() for p in got[0]) > 2 * L.SIZES["CUDA_CHUNK"]
    _assert_same_run(ref, got, steps=6)


NONFINITE_TWIN = {
    "sgd": (FusedSGD, dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2)),
    "adamw-amsgrad": (FusedAdamW, dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-2, amsgrad=True)),
    "rmsprop": (FusedRMSprop, dict(lr=1e-2, alpha=0.9, momentum=0.5, centered=True, weight_decay=1e-2)),
    "adagrad": (FusedAdagrad, dict(lr=0.1, lr_decay=1e-2, weight_decay=1e-2)),
}


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("case", list(NONFINITE_TWIN))
def test_backend_with_a_nonfinite_gradient_on_the_host_twin(on_twin, case, bad):
    """CudaBackend (host twin) vs the reference when one gradient element is NaN or inf under
    max_grad_norm with error_if_nonfinite=False: the norm pass carries it into N, and the step
    multiplies every gradient by clamp(C / (N + eps), max=1), NaN for a NaN norm (every parameter
    NaN) and 0 for an inf one (only the inf element NaN). Two steps: a clipped finite one, then
    the bad one; float64 and float32 parameters together. Tolerances as _assert_same_run's."""
    on_twin(chunk=8, threads=3)
    cls, kwargs = NONFINITE_TWIN[case]
    runs = []
    for name in ("reference", "twin"):
        params = [p.requires_grad_() for p in _twin_params(lambda dt: dt)]
        opt = cls(params, backend="reference", max_grad_norm=0.5, **kwargs)
        if name == "twin":
            _on_cuda_backend(opt)
        gen = torch.Generator().manual_seed(5)
        for step in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            if step == 1:
                params[0].grad.view(-1)[5] = bad
            opt.step()
        assert opt.backend == ("cuda" if name == "twin" else "reference")
        assert math.isnan(float(opt.last_grad_norm)) == math.isnan(bad)
        runs.append((params, opt))
    (ref_params, ref_opt), (got_params, got_opt) = runs
    assert all(p.isnan().all() for p in ref_params if p.numel()) if math.isnan(bad) else \
        int(sum(p.isnan().sum() for p in ref_params)) == 1
    for pr, pg in zip(ref_params, got_params, strict=True):
        tol = dict(rtol=1e-12, atol=1e-12) if pr.dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pg.detach(), pr.detach(), **tol, equal_nan=True)
        sr, sg = ref_opt.state[pr], got_opt.state[pg]
        assert sr.keys() == sg.keys()
        for name in sr:
            torch.testing.assert_close(sg[name], sr[name], **tol, equal_nan=True, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------- memory safety
class _DtypeSpy(_HostTwin):
    """The twin, checking before every launch that each row a bucket's blocks reach holds only
    addresses of tensors of that bucket's dtype among ``tensors()``."""

    def __init__(self, lib, chunk, threads):
        super().__init__(lib, chunk, threads)
        self.tensors = list  # () -> the tensors a launch may address, set by the test
        self.launches = 0
        self.dtype_of = {code: getattr(torch, name) for name, code in self.DTYPES.items()}

    def _check(self, table, blocks, dtypes, first_blocks, n_blocks):
        live = {t.data_ptr(): t.dtype for t in self.tensors()}
        rows_of = np.ctypeslib.as_array(ctypes.cast(blocks, ctypes.POINTER(ctypes.c_int32)),
                                        shape=(max(sum(n_blocks), 1),))
        for code, first, n in zip(dtypes, first_blocks, n_blocks, strict=True):
            for row in set(rows_of[first:first + n].tolist()):
                cols = np.ctypeslib.as_array(ctypes.cast(table + 8 * L.TENSOR_COLS * row,
                                                         ctypes.POINTER(ctypes.c_int64)), shape=(L.TENSOR_COLS,))
                for col in (L.T_PARAM, L.T_GRAD, *range(L.T_STATE0, L.T_STATE0 + L.MAX_STATES)):
                    if cols[col]:
                        assert live.get(int(cols[col])) == self.dtype_of[code], (row, col)
        self.launches += 1

    def norm(self, table, blocks, dtypes, first_blocks, n_blocks, *rest):
        self._check(table, blocks, dtypes, first_blocks, n_blocks)
        super().norm(table, blocks, dtypes, first_blocks, n_blocks, *rest)

    def step(self, rule, program, table, blocks, n_tensors, dtypes, first_blocks, n_blocks, *rest):
        self._check(table, blocks, dtypes, first_blocks, n_blocks)
        super().step(rule, program, table, blocks, n_tensors, dtypes, first_blocks, n_blocks, *rest)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def _train(model, opt, steps, seed, spy=None):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        dtype = next(model.parameters()).dtype
        x = torch.randn(4, 5, generator=gen, dtype=torch.float64).to(dtype)
        model(x).square().sum().backward()
        if spy is not None:
            spy.tensors = lambda: [t for p in model.parameters() for t in (p, p.grad, *opt.state[p].values())]
        opt.step()


def _states_equal(opt_a, model_a, opt_b, model_b, tol):
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, **tol)
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sa.keys() == sb.keys()
        for name in sa.keys() - {"step"}:
            assert sa[name].dtype == pa.dtype == sb[name].dtype
            torch.testing.assert_close(sa[name], sb[name], **tol)
        assert float(sa["step"]) == float(sb["step"])


@pytest.mark.parametrize("make", [
    lambda ps: FusedSGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2, max_grad_norm=1.0, backend="reference"),
    lambda ps: FusedAdamW(ps, lr=0.01, amsgrad=True, max_grad_norm=1.0, backend="reference"),
], ids=["sgd", "adamw-amsgrad"])
def test_model_double_after_steps(on_twin, twin_lib, make):
    """model.double() after float32 steps leaves float32 state (momentum buffers, Adam's three
    moments) behind; the kernels must never see it (a float64 kernel would read and write 8-byte
    elements through 4-byte buffers). The CUDA backend equals the reference end to end, and every
    launch addresses only tensors of its bucket's dtype."""
    spy = on_twin(ext=_DtypeSpy(twin_lib, 8, 3))
    runs = []
    for name in ("reference", "twin"):
        model = _model()
        opt = make(model.parameters())
        if name == "twin":
            _on_cuda_backend(opt)
        _train(model, opt, 3, seed=1, spy=spy if name == "twin" else None)
        model.double()
        _train(model, opt, 3, seed=2, spy=spy if name == "twin" else None)
        assert opt.backend == ("cuda" if name == "twin" else "reference")
        runs.append((opt, model))
    assert spy.launches == 12  # norm and step, 6 steps
    # The float32 steps differ by float32 ulps (the kernels sum the norm in float64, the reference
    # in float32), which the float64 steps carry on; a buffer read through the wrong type would
    # be off by O(1).
    _states_equal(*runs[0], *runs[1], tol=dict(rtol=1e-5, atol=1e-6))


def test_float32_checkpoint_into_a_float64_model(on_twin, twin_lib):
    spy = on_twin(ext=_DtypeSpy(twin_lib, 8, 3))
    runs = []
    for name in ("reference", "twin"):
        model32 = _model()
        opt32 = FusedSGD(model32.parameters(), lr=0.1, momentum=0.9, nesterov=True, backend="reference")
        _train(model32, opt32, 3, seed=1)
        model = _model().double()
        model.load_state_dict(model32.state_dict())
        opt = FusedSGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, backend="reference")
        opt.load_state_dict(opt32.state_dict())
        if name == "twin":
            _on_cuda_backend(opt)
        _train(model, opt, 3, seed=2, spy=spy if name == "twin" else None)
        assert opt.backend == ("cuda" if name == "twin" else "reference")
        runs.append((opt, model))
    assert spy.launches == 3
    _states_equal(*runs[0], *runs[1], tol=dict(rtol=1e-12, atol=1e-12))  # float64 steps from the same start


def _bound_plan(p, g, state, step=0.0):
    plan = Plan.build(p.device, L.RULE_SGD, FusedSGD.coefficients, [(0, 0, p, None)])
    plan.bind([{"momentum_buffer": state}], [torch.tensor(step)])
    plan.set_grads([g], lambda row: "the parameter")
    return plan


def _settings(momentum=0.9, lr=0.1):
    group = dict(lr=lr, momentum=momentum, dampening=0.0, nesterov=False, weight_decay=0.0,
                 decoupled_weight_decay=False, maximize=False, schedule=None)
    return Settings(groups=[group], hyper=_hyper_row(group)[None], schedules=S.Constant().table()[None],
                    lr_tensors={}, max_grad_norm=None, clip_value=None, lr_norm_power=0.0, lr_norm_eps=1e-6,
                    reference_rule=FusedSGD.reference_rule)


@pytest.mark.parametrize("bad", ["dtype", "layout", "address"])
def test_backend_refuses_rows_the_kernel_would_misread(on_twin, bad):
    """Whatever hands it a plan, the backend checks (once per state version) that every row's
    tensors match the bucket's dtype and the parameter's layout, and launches nothing otherwise."""
    ext = on_twin()
    p = torch.randn(4, 6, dtype=torch.float64)
    state = {"dtype": torch.zeros(4, 6, dtype=torch.float32), "layout": torch.zeros(6, 4, dtype=torch.float64).t(),
             "address": torch.zeros(4, 6, dtype=torch.float64)}[bad]
    plan = _bound_plan(p, torch.randn(4, 6, dtype=torch.float64), state)
    if bad == "address":
        plan.table[0, L.T_STATE0] += 8
    before = p.clone()
    ext.step = ext.norm = lambda *a: pytest.fail("launched")
    backend = cb.CudaBackend()
    with pytest.raises(RuntimeError, match="fused_lr cuda backend: .*parameter 0"):
        backend.update(plan, _settings(), torch.zeros(1), StepScalars(None, None), None)
    assert torch.equal(p, before)


# ---------------------------------------------------------------------------- host cost and caching
def test_no_rebuild_while_only_gradients_move(on_twin):
    """100 steps with zero_grad(set_to_none=True): fresh gradients every step are new addresses
    written into the same device table, not a rebuild."""
    on_twin()
    model = _model()
    opt = FusedSGD(model.parameters(), lr=0.1, momentum=0.9, max_grad_norm=1.0, backend="reference")
    backend = _on_cuda_backend(opt)
    _train(model, opt, 1, seed=0)
    table = backend._tables.table
    assert backend.rebuilds == 1
    addresses = []
    for seed in range(1, 100):
        _train(model, opt, 1, seed=seed)
        addresses.append(int(table[0, L.T_GRAD]))
    assert backend.rebuilds == 1 and backend._tables.table is table
    assert len(set(addresses)) > 1  # the gradients did move, and the table followed them
    assert {float(opt.state[p]["step"]) for p in model.parameters()} == {100.0}


def test_gradients_at_unaligned_addresses_take_the_scalar_path(on_twin):
    """The plan's ALIGNED column covers the parameter and state; a gradient's address moves every
    step, so the kernels test it themselves: here every gradient starts 4 bytes past a 16-byte
    boundary (the twin's 16-byte packs would read it misaligned) and the steps match the reference."""
    on_twin(chunk=L.SIZES["CUDA_CHUNK"], threads=L.SIZES["CUDA_BLOCK"])
    gen = torch.Generator().manual_seed(5)
    shapes = [(40,), (3, 17), (1000,)]
    ps = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-2, max_grad_norm=0.5, backend="reference")
    twin, ref = FusedSGD(ps, **kw), FusedSGD(qs, **kw)
    _on_cuda_backend(twin)
    for _ in range(3):
        for p, q in zip(ps, qs, strict=True):
            g = torch.randn(p.numel() + 1, generator=gen)[1:].view(p.shape)  # 4 bytes past the block
            assert g.data_ptr() % 16 == 4
            p.grad, q.grad = g, g.clone()
        twin.step()
        ref.step()
        torch.testing.assert_close(twin.last_grad_norm, ref.last_grad_norm, rtol=1e-6, atol=0)
    assert twin.backend == "cuda"
    for p, q in zip(ps, qs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# The host cost per step (launches stubbed) is a benchmark, not a test: `fused-lr bench --host`
# and benchmarks/test_host.py time it beside torch's step.


# ---------------------------------------------------------------------------- CUDA graph capture
def _graph_opt(on_twin, monkeypatch):
    on_twin()
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    model = _model()
    opt = FusedSGD(model.parameters(), lr=0.1, momentum=0.9, max_grad_norm=1.0, backend="reference")
    backend = _on_cuda_backend(opt)
    backend._device_tables.graph_device = lambda device: True  # the twin's CPU tensors stand in for a GPU's
    x = torch.randn(4, 5)
    model(x).square().sum().backward()  # static gradient tensors, as a captured step needs
    return model, opt, backend, capturing


def test_capture_without_eager_steps_raises(on_twin, monkeypatch):
    model, opt, backend, capturing = _graph_opt(on_twin, monkeypatch)
    capturing[0] = True
    with pytest.raises(RuntimeError, match="while a CUDA graph is being captured.*two eager steps"):
        opt.step()
    assert backend.rebuilds == 0


def test_captured_tables_are_kept_and_never_rewritten(on_twin, monkeypatch):
    model, opt, backend, capturing = _graph_opt(on_twin, monkeypatch)
    opt.step()
    opt.step()
    capturing[0] = True
    opt.step()  # "captured": nothing to upload
    capturing[0] = False
    tabs, groups = backend._tables, backend._groups
    held = (*tabs.buffers(), *groups.buffers())
    assert all(backend._device_tables.held(t) for t in held)
    table, hyper = tabs.table, groups.hyper
    table_then, hyper_then = table.clone(), hyper.clone()

    opt.param_groups[0]["lr"] = 0.05  # eager: fresh hyper buffer, the captured one untouched
    opt.step()
    assert backend._groups.hyper is not hyper and torch.equal(hyper, hyper_then)
    assert float(backend._groups.hyper[0, L.H_LR]) == 0.05

    capturing[0] = True  # a capture that would need an upload
    opt.param_groups[0]["lr"] = 0.02
    with pytest.raises(RuntimeError, match="hyper-parameters.*two eager steps"):
        opt.step()
    capturing[0] = False

    opt.zero_grad(set_to_none=True)  # eager: new gradients, a fresh table, the captured one untouched
    model(torch.randn(4, 5)).square().sum().backward()
    opt.step()
    assert backend._tables.table is not table and torch.equal(table, table_then)
    assert backend.rebuilds == 1

    opt.param_groups[0]["momentum"] = 0.0  # a new plan: rebuilt; what the graph read stays alive
    opt.step()
    assert backend.rebuilds == 2 and all(backend._device_tables.held(t) for t in held)


# ---------------------------------------------------------------------------- launches
def _resnet50_params(float64_every=0):
    """ResNet-50's 161 parameters as small float32 tensors (every ``float64_every``-th one float64)."""
    from fused_lr.tools.bench.host import tiny_resnet50_groups

    params = [p for g in tiny_resnet50_groups() for p in g["params"]]
    if float64_every:
        for p in params[::float64_every]:
            p.data = p.data.double()
    return params


@pytest.mark.parametrize("check,mixed,launches", [(False, False, 3), (True, False, 4), (False, True, 5)],
                         ids=["clip", "clip-error_if_nonfinite", "clip-two-dtypes"])
def test_launches_per_step(on_twin, twin_lib, check, mixed, launches):
    """ResNet-50's 161 float32 tensors with global-norm clipping: three kernel launches a step (the
    norm's partial sums; prepare, which sums them into the norm, writes every scalar and advances
    the step counts and clocks; the update). One more when the host reads the norm before the
    update (error_if_nonfinite), and a norm and an update launch per further dtype. The numbers
    equal the reference's either way."""
    on_twin(chunk=8, threads=3)
    runs = []
    for backend in ("reference", "twin"):
        params = _resnet50_params(float64_every=7 if mixed else 0)
        opt = FusedSGD(params, lr=0.1, momentum=0.9, max_grad_norm=0.5, error_if_nonfinite=check,
                       schedule=S.Cosine(10), backend="reference")
        if backend == "twin":
            _on_cuda_backend(opt)
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            before = twin_lib.flr_launches()
            opt.step()
            if backend == "twin":
                assert twin_lib.flr_launches() - before == launches
        assert opt.backend == ("cuda" if backend == "twin" else "reference")
        runs.append((params, opt))
    (ref, ref_opt), (got, got_opt) = runs
    # float32: the kernels sum the norm in float64, the reference in float32 (a few ulps a step)
    torch.testing.assert_close(got_opt.last_grad_norm, ref_opt.last_grad_norm, rtol=1e-5, atol=0)
    for r, g in zip(ref, got, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
