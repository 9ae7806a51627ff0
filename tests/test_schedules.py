"""The schedule catalogue: torch's schedulers, the closed formulas, and the kernel table.

Tolerance against torch: 1e-9 relative, plus 1e-12 of the base lr absolute. torch's schedulers
are recursive (each lr is the previous one times a ratio), so their rounding error grows
roughly linearly with the step: ~2000 steps x 1e-16 stays far below 1e-9. The absolute term
covers the end of a cosine, where the lr itself goes to 0 and a relative error means nothing.
"""

import math

import numpy as np
import pytest
import torch
from torch.optim import lr_scheduler as L

from fused_lr import schedules as S

BASE = 0.1
N = 2000


def torch_lrs(make, n=N, base=BASE):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    sched = make(opt)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.array(out)


def ours(s, n=N, base=BASE):
    return np.array([base * s(k) for k in range(n)])


TORCH_PAIRS = {
    "step": (S.Step(30, 0.5), lambda o: L.StepLR(o, 30, 0.5)),
    "multistep": (S.MultiStep([100, 500, 1200], 0.3), lambda o: L.MultiStepLR(o, [100, 500, 1200], 0.3)),
    "exponential": (S.Exponential(0.998), lambda o: L.ExponentialLR(o, 0.998)),
    "linear": (S.Linear(0.2, 1.0, 300), lambda o: L.LinearLR(o, 0.2, 1.0, 300)),
    "linear-down": (S.Linear(1.0, 0.05, 1700), lambda o: L.LinearLR(o, 1.0, 0.05, 1700)),
    "polynomial": (S.Polynomial(1500, 2.0), lambda o: L.PolynomialLR(o, 1500, 2.0)),
    "cosine": (S.Cosine(N, 0.1), lambda o: L.CosineAnnealingLR(o, N, eta_min=BASE * 0.1)),
    "cosine-to-0": (S.Cosine(N), lambda o: L.CosineAnnealingLR(o, N)),
    "restarts": (S.CosineRestarts(100, 2, 0.05), lambda o: L.CosineAnnealingWarmRestarts(o, 100, 2, BASE * 0.05)),
    "restarts-1": (S.CosineRestarts(300), lambda o: L.CosineAnnealingWarmRestarts(o, 300)),
    "cyclic-triangular": (S.Cyclic(4.0, 150, 250),
                          lambda o: L.CyclicLR(o, BASE, 4 * BASE, 150, 250, cycle_momentum=False)),
    "cyclic-triangular2": (S.Cyclic(4.0, 100, mode="triangular2"),
                           lambda o: L.CyclicLR(o, BASE, 4 * BASE, 100, mode="triangular2", cycle_momentum=False)),
    "cyclic-exp-range": (S.Cyclic(4.0, 100, 60, mode="exp_range", gamma=0.999),
                         lambda o: L.CyclicLR(o, BASE, 4 * BASE, 100, 60, mode="exp_range", gamma=0.999,
                                              cycle_momentum=False)),
    "onecycle-cos": (S.OneCycle(N), lambda o: L.OneCycleLR(o, BASE, total_steps=N, cycle_momentum=False)),
    "onecycle-linear": (S.OneCycle(N, 0.25, 10.0, 100.0, "linear"),
                        lambda o: L.OneCycleLR(o, BASE, total_steps=N, pct_start=0.25, div_factor=10.0,
                                               final_div_factor=100.0, anneal_strategy="linear",
                                               cycle_momentum=False)),
    "warmup-cosine": (S.Warmup(100, S.Cosine(N - 100), 0.1),
                      lambda o: L.SequentialLR(o, [L.LinearLR(o, 0.1, 1.0, 100), L.CosineAnnealingLR(o, N - 100)],
                                               [100])),
    "join": (S.Join([(S.Constant(), 500), (S.Exponential(0.999), 700), S.Step(100, 0.5)]),
             lambda o: L.SequentialLR(o, [L.ConstantLR(o, 1.0, 500), L.ExponentialLR(o, 0.999),
                                          L.StepLR(o, 100, 0.5)], [500, 1200])),
}


@pytest.mark.parametrize("name", list(TORCH_PAIRS))
def test_equals_torch_scheduler(name):
    sched, make = TORCH_PAIRS[name]
    expected, got = torch_lrs(make), ours(sched)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12 * BASE)


def test_reduce_on_plateau_equals_torch():
    rng = np.random.default_rng(0)
    metrics = np.concatenate([np.linspace(1, 0.5, 30), 0.5 + 0.01 * rng.random(120)])
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=BASE)
    ref = L.ReduceLROnPlateau(opt, factor=0.5, patience=5, cooldown=2, min_lr=BASE * 0.01)
    ours_ = S.ReduceOnPlateau(S.Cosine(1000), factor=0.5, patience=5, cooldown=2, min_factor=0.01)
    reductions = 0
    for k, m in enumerate(metrics):
        ref.step(m)
        before = ours_.host_scale
        ours_.step(m)
        reductions += ours_.host_scale < before
        assert ours_.host_scale * BASE == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        assert ours_(k) == pytest.approx(ours_.host_scale * S.Cosine(1000)(k), rel=1e-15)
    assert reductions >= 3  # the plateau really triggered, more than once


# Every schedule, for the table and composition tests: each kind, odd parameters included.
CATALOGUE = {
    "constant": S.Constant(),
    "constant-half": S.Constant(0.5),
    **{name: pair[0] for name, pair in TORCH_PAIRS.items()},
    "polynomial-end": S.Polynomial(700, 0.5, end=0.1),
    "inverse-time": S.InverseTime(0.5, 10),
    "inverse-time-power": S.InverseTime(2.0, 100, power=0.75),
    "inverse-sqrt": S.InverseSqrt(250),
    "power-law": S.PowerLaw(0.01, 2.0, 1500),
    "plateau": S.ReduceOnPlateau(S.Exponential(0.999)),
    "nested-join": S.Join([(S.Warmup(50, S.Constant()), 80), (S.Join([(S.Constant(0.5), 20), S.Exponential(0.99)]),
                                                               300), S.InverseSqrt(10)]),
}


def table_values(s, ks):
    table = s.table()
    return np.array([s.host_scale * S.eval_table(table, k) for k in ks])


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_table_evaluator_equals_schedule(name):
    s = CATALOGUE[name]
    ks = range(N)
    np.testing.assert_allclose(table_values(s, ks), [s(k) for k in ks], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_warmup_and_join_compose(name):
    s = CATALOGUE[name]
    warm = S.Warmup(40, s, start_factor=0.2)
    joined = S.Join([(S.Cosine(30), 30), (s, 300), S.Constant(0.01)])
    for k in range(0, 800, 7):
        expected_warm = 0.2 + 0.8 * k / 40 if k < 40 else s(k - 40)
        assert warm(k) == pytest.approx(expected_warm, rel=1e-12, abs=1e-15)
        expected_join = S.Cosine(30)(k) if k < 30 else (s(k - 30) if k < 330 else 0.01)
        assert joined(k) == pytest.approx(expected_join, rel=1e-12, abs=1e-15)
    ks = range(800)
    for c in (warm, joined):
        np.testing.assert_allclose(table_values(c, ks), [c(k) for k in ks], rtol=1e-12, atol=1e-15)


def test_formulas_without_torch_counterpart():
    k = np.arange(N, dtype=np.float64)
    cases = [
        (S.InverseTime(0.5, 10), (1 + 0.5 * k / 10) ** -1.0),
        (S.InverseTime(2.0, 100, power=0.75), (1 + 2.0 * k / 100) ** -0.75),
        (S.InverseSqrt(250), np.where(k < 250, k / 250, np.sqrt(250 / np.maximum(k, 1)))),
        (S.PowerLaw(0.01, 2.0, 1500), 0.01 ** ((np.minimum(k, 1500) / 1500) ** 2.0)),
        (S.Polynomial(700, 0.5, end=0.1), 0.1 + 0.9 * (1 - np.minimum(k, 700) / 700) ** 0.5),
        # the seeds' "fixed decay" (1-d)^k and e^(-beta k) are Exponential
        (S.Exponential(1 - 0.003), (1 - 0.003) ** k),
        (S.Exponential(math.exp(-0.002)), np.exp(-0.002 * k)),
    ]
    for s, expected in cases:
        np.testing.assert_allclose([s(int(i)) for i in k], expected, rtol=1e-12, err_msg=repr(s))


def test_clamped_at_total():
    for s, total in [(S.Cosine(100, 0.1), 100), (S.Linear(1.0, 0.5, 100), 100), (S.Polynomial(100, 2.0), 100),
                     (S.PowerLaw(0.1, 1.0, 100), 100), (S.OneCycle(100), 99)]:
        assert s(total + 1000) == s(total)


@pytest.mark.parametrize("make,message", [
    (lambda: S.Step(0), "step_size"),
    (lambda: S.Step(2.5), "step_size"),
    (lambda: S.MultiStep([30, 10]), "increasing"),
    (lambda: S.Exponential(-0.5), "gamma"),
    (lambda: S.Cosine(-5), "total"),
    (lambda: S.Cyclic(2.0, 10, mode="sawtooth"), "mode"),
    (lambda: S.OneCycle(100, pct_start=1.5), "pct_start"),
    (lambda: S.PowerLaw(0.0, 1.0, 10), "decay"),
    (lambda: S.Warmup(10, then=lambda k: 1.0), "then"),
    (lambda: S.Join([S.Constant(), S.Constant()]), "pair"),
    (lambda: S.Linear(float("nan"), 1.0, 10), "start"),
])
def test_bad_schedule_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_too_many_segments_is_refused():
    s = S.MultiStep(list(range(1, 40)), 0.9)
    assert s(39) == pytest.approx(0.9**39)  # the host formula still works
    with pytest.raises(ValueError, match="segments"):
        s.table()


def test_cyclic_triangular2_far_out_does_not_overflow():
    s = S.Cyclic(2.0, 3, 5, mode="triangular2")
    assert s(12345) == S.eval_table(s.table(), 12345) == 1.0  # the amplitude has halved to nothing
