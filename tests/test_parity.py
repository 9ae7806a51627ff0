"""The one parity matrix: optimizer x backend x dtype against stock torch over a real training run.

torch side: clip_grad_value_ + clip_grad_norm_ + the torch optimizer (SGD, AdamW, Adam, RMSprop,
Adagrad) + LambdaLR driven by the very schedule under test (each schedule's equality with torch's
own scheduler classes is test_schedules.py's job). Backends join by registering in
fused_lr.backends, and optimizers by a line in OPTIMIZERS and a configuration, not by copying.

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

from fused_lr import FusedAdagrad, FusedAdam, FusedAdamW, FusedRMSprop, FusedSGD, schedules

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
        # the adaptive family: every option of each rule, with clipping and a schedule
        "adamw": dict(optimizer="adamw", weight_decay=5e-2, max_grad_norm=0.05,
                      schedule=schedules.Warmup(n // 10, schedules.Cosine(n - n // 10))),
        "adam-amsgrad": dict(optimizer="adam", betas=(0.8, 0.95), weight_decay=5e-3, amsgrad=True, maximize=True,
                             clip_value=0.01, schedule=schedules.Step(n // 4, 0.5)),
        "rmsprop": dict(optimizer="rmsprop", alpha=0.9, weight_decay=5e-4, max_grad_norm=0.05),
        "rmsprop-centered": dict(optimizer="rmsprop", momentum=0.9, centered=True, max_grad_norm=0.05,
                                 schedule=schedules.Cosine(n)),
        "adagrad": dict(optimizer="adagrad", lr_decay=1e-2, initial_accumulator_value=0.1, weight_decay=5e-4,
                        max_grad_norm=0.05, schedule=schedules.OneCycle(n)),
    }


# optimizer -> (fused_lr's, torch's, base lr)
OPTIMIZERS = {"sgd": (FusedSGD, torch.optim.SGD, 0.1), "adamw": (FusedAdamW, torch.optim.AdamW, 0.01),
              "adam": (FusedAdam, torch.optim.Adam, 0.01), "rmsprop": (FusedRMSprop, torch.optim.RMSprop, 0.01),
              "adagrad": (FusedAdagrad, torch.optim.Adagrad, 0.1)}
FUSED_ONLY = ("optimizer", "max_grad_norm", "clip_value", "schedule", "decoupled_weight_decay")
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
    _, torch_cls, lr = OPTIMIZERS[cfg.get("optimizer", "sgd")]
    model = make_model(dtype, device)
    decay, no_decay = split_groups(model)
    wd = cfg.get("weight_decay", 0.0)
    decoupled = cfg.get("decoupled_weight_decay", False)  # SGD's: torch.optim.SGD has none, done by hand below
    kw = {k: v for k, v in cfg.items() if k not in FUSED_ONLY and k != "weight_decay"}
    opt = torch_cls([dict(params=decay, weight_decay=0.0 if decoupled else wd),
                     dict(params=no_decay, lr=SECOND_LR, weight_decay=0.0)], lr=lr, **kw)
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
    fused_cls, _, lr = OPTIMIZERS[cfg.get("optimizer", "sgd")]
    model = make_model(dtype, device)
    decay, no_decay = split_groups(model)
    opt = fused_cls([dict(params=decay),
                     dict(params=no_decay, lr=SECOND_LR, weight_decay=0.0, schedule=SECOND_SCHEDULE)],
                    lr=lr, backend=backend, **{k: v for k, v in cfg.items() if k != "optimizer"})
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


# one long trajectory per backend in the default run (float64); the float32 ones with the slow tests
@pytest.mark.parametrize("dtype", [torch.float64, pytest.param(torch.float32, marks=pytest.mark.slow)],
                         ids=["f64", "f32"])
@pytest.mark.parametrize("backend,device", backend_cases())
def test_long_trajectory_matches_torch(backend, device, dtype):
    check("long", LONG, dtype, device, backend, LONG_STEPS)
