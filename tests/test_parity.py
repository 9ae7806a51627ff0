"""The one parity matrix: every backend against stock torch over a real training run.

torch side: clip_grad_value_ + clip_grad_norm_ + torch.optim.SGD + LambdaLR driven by the very
schedule under test (each schedule's equality with torch's own scheduler classes is
test_schedules.py's job). Backends join by registering in fused_lr.backends, not by copying.

Lengths. Every configuration runs SHORT_STEPS (20) steps, with its schedule laid over those 20
steps so each schedule passes through all its phases (warm-up, decay boundaries, several cycles,
the annealing tail); one long trajectory per backend and dtype (the ResNet recipe: momentum,
nesterov, weight decay, norm clipping, warm-up + cosine) runs LONG_STEPS (200), where rounding
differences have had 200 steps to grow through the gradients.

Tolerances, unchanged from when every configuration ran 200 steps, and the same for both
lengths (differences only grow with the number of steps, so the short runs are held tighter
relative to what they can accumulate). float64: 1e-10 relative (the contract); both sides do the
same IEEE operations except the norm's reduction order and fused a*b+c in kernels, measured
<= 2e-15. float32: 1e-5 relative. A single step agrees to a few ulps, but training feeds every
difference back through the gradients. Measured worst cases (reference, numba, triton in the
interpreter): the 20-step matrix f64 8.8e-16, f32 3.8e-7; the 200-step runs f64 1.1e-15, f32
7.0e-7; the whole matrix at 200 steps, as it once ran, f32 8.9e-7. So 1e-5 leaves a 10x margin.
"""

import functools
import math

import pytest
import torch
from cases import backend_cases, batches, make_model, max_rel_diff, split_groups

from fused_lr import FusedSGD, schedules

SHORT_STEPS, LONG_STEPS = 20, 200
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])


def configs(n):
    """The configurations, each schedule scaled to a run of n steps."""
    return {
        "plain": dict(),
        "momentum": dict(momentum=0.9),
        "nesterov": dict(momentum=0.9, nesterov=True, weight_decay=5e-4),
        "dampening": dict(momentum=0.9, dampening=0.3, weight_decay=5e-4),
        "decay": dict(momentum=0.9, weight_decay=5e-4, max_grad_norm=0.05),
        "decoupled": dict(momentum=0.9, weight_decay=5e-2, decoupled_weight_decay=True),
        "maximize": dict(momentum=0.9, maximize=True, max_grad_norm=0.05),
        "clip-value": dict(momentum=0.9, clip_value=0.01, max_grad_norm=0.05),
        "cosine": dict(momentum=0.9, weight_decay=5e-4, max_grad_norm=0.05, schedule=schedules.Cosine(n)),
        "warmup-cosine": dict(momentum=0.9, nesterov=True, max_grad_norm=0.05,
                              schedule=schedules.Warmup(n // 10, schedules.Cosine(n - n // 10), start_factor=0.1)),
        "step": dict(momentum=0.9, weight_decay=5e-4, schedule=schedules.Step(n // 4, 0.5)),
        "onecycle": dict(momentum=0.9, max_grad_norm=0.05, schedule=schedules.OneCycle(n)),
        "cyclic": dict(momentum=0.9, dampening=0.1, schedule=schedules.Cyclic(3.0, n // 8, mode="triangular2")),
        "inverse-time": dict(weight_decay=5e-4, max_grad_norm=0.05, schedule=schedules.InverseTime(0.5, n // 20)),
    }


CONFIGS = configs(SHORT_STEPS)
# the long run: the ResNet recipe, every stateful feature on
LONG = dict(momentum=0.9, nesterov=True, weight_decay=5e-4, max_grad_norm=0.05,
            schedule=schedules.Warmup(LONG_STEPS // 10, schedules.Cosine(LONG_STEPS - LONG_STEPS // 10),
                                      start_factor=0.1))
# the no-decay group gets its own lr and schedule, as a ResNet recipe would
SECOND_LR, SECOND_SCHEDULE = 0.05, schedules.Exponential(0.995)


@functools.cache
def torch_run(name, dtype, device, steps):
    """The torch oracle for one configuration; shared by every backend (callers must not modify it)."""
    cfg = LONG if name == "long" else CONFIGS[name]
    model = make_model(dtype, device)
    decay, no_decay = split_groups(model)
    wd = cfg.get("weight_decay", 0.0)
    decoupled = cfg.get("decoupled_weight_decay", False)
    sgd_kw = dict(momentum=cfg.get("momentum", 0.0), dampening=cfg.get("dampening", 0.0),
                  nesterov=cfg.get("nesterov", False), maximize=cfg.get("maximize", False))
    opt = torch.optim.SGD([dict(params=decay, weight_decay=0.0 if decoupled else wd),
                           dict(params=no_decay, lr=SECOND_LR, weight_decay=0.0)], lr=0.1, **sgd_kw)
    sched = cfg.get("schedule", schedules.Constant())
    lrs = torch.optim.lr_scheduler.LambdaLR(opt, [sched, SECOND_SCHEDULE])
    params = list(model.parameters())
    for x, y in batches(steps, dtype, device):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if cfg.get("clip_value"):
            torch.nn.utils.clip_grad_value_(params, cfg["clip_value"])
        if cfg.get("max_grad_norm"):
            torch.nn.utils.clip_grad_norm_(params, cfg["max_grad_norm"])
        if decoupled:
            with torch.no_grad():
                for p in decay:
                    p.mul_(1 - opt.param_groups[0]["lr"] * wd)
        opt.step()
        lrs.step()
    return model


def fused_run(cfg, dtype, device, backend, steps):
    model = make_model(dtype, device)
    decay, no_decay = split_groups(model)
    opt = FusedSGD([dict(params=decay),
                    dict(params=no_decay, lr=SECOND_LR, weight_decay=0.0, schedule=SECOND_SCHEDULE)],
                   lr=0.1, backend=backend, **cfg)
    norms = []
    for x, y in batches(steps, dtype, device):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if opt.last_grad_norm is not None:
            norms.append(float(opt.last_grad_norm))
    return model, opt, norms


def check(name, cfg, dtype, device, backend, steps):
    expected = torch_run(name, dtype, device, steps)
    got, opt, norms = fused_run(cfg, dtype, device, backend, steps)
    assert opt.backend == backend
    if cfg.get("max_grad_norm"):
        # the case must exercise clipping, or it could not catch a clipping bug
        assert max(norms) > cfg["max_grad_norm"]
        assert all(math.isfinite(n) for n in norms)
    assert {float(opt.state[p]["step"]) for p in got.parameters()} == {float(steps)}
    assert max_rel_diff(expected, got) <= TOL[dtype]


@DTYPES
@pytest.mark.parametrize("case", list(CONFIGS))
@pytest.mark.parametrize("backend,device", backend_cases())
def test_matches_torch(backend, device, case, dtype):
    check(case, CONFIGS[case], dtype, device, backend, SHORT_STEPS)


@DTYPES
@pytest.mark.parametrize("backend,device", backend_cases())
def test_long_trajectory_matches_torch(backend, device, dtype):
    check("long", LONG, dtype, device, backend, LONG_STEPS)
