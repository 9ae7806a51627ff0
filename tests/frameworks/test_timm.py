"""timm's schedulers drive FusedSGD as they drive torch.optim.SGD (docs/frameworks.md).

timm's schedulers write ``group["lr"]`` between steps, per update (``step_update``) or per epoch
(``step``); FusedSGD(schedule=None) reads it afresh on every step. Runs are float64 on the CPU
with the same data: the lr histories are identical and the parameters agree to 1e-10 relative
(FusedSGD clips inside its step, torch with ``clip_grad_norm_``: only the clip coefficient's
reduction order differs, ~1e-15 per step; the tolerance of tests/test_torch_schedulers.py).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from cases import batches, make_model, max_rel_diff, split_groups
from timm.scheduler import CosineLRScheduler

from fused_lr import FusedSGD, schedules

EPOCH, EPOCHS = 4, 5
STEPS = EPOCH * EPOCHS
DATA = list(batches(EPOCH))
CFG = dict(momentum=0.9, nesterov=True, weight_decay=5e-4)
LRS = (0.1, 0.05)  # the two groups' base lrs
MAX_NORM = 0.05
WARMUP, WARMUP_LR, LR_MIN = 5, 1e-3, 1e-4


def groups(model):
    decay, no_decay = split_groups(model)
    return [dict(params=decay, lr=LRS[0]), dict(params=no_decay, lr=LRS[1], weight_decay=0.0)]


def cosine(opt, per_update: bool, prefix: bool = False):
    """Warm-up then cosine, over the run's updates (or epochs), with a flat tail at lr_min."""
    length, warmup = (STEPS - 2, WARMUP) if per_update else (EPOCHS - 1, 1)
    return CosineLRScheduler(opt, t_initial=length - (warmup if prefix else 0), lr_min=LR_MIN, warmup_t=warmup,
                             warmup_lr_init=WARMUP_LR, warmup_prefix=prefix, t_in_epochs=not per_update)


def lr_now(opt) -> list[float]:
    return opt.current_lr() if isinstance(opt, FusedSGD) else [g["lr"] for g in opt.param_groups]


def train(opt, model, sched=None, per_update=True, clip=False):
    """timm's training loop: step_update after every update, step at the end of every epoch."""
    history, updates = [], 0
    for epoch in range(EPOCHS):
        for x, y in DATA:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
            history.append(lr_now(opt))
            opt.step()
            updates += 1
            if sched is not None and per_update:
                sched.step_update(num_updates=updates)
        if sched is not None and not per_update:
            sched.step(epoch + 1)
    return history


@pytest.mark.parametrize("per_update", [True, False], ids=["step_update", "per-epoch"])
def test_cosine_with_warmup_drives_fused_sgd_like_torch_sgd(per_update):
    expected = make_model()
    torch_opt = torch.optim.SGD(groups(expected), foreach=False, **CFG)
    torch_history = train(torch_opt, expected, cosine(torch_opt, per_update), per_update, clip=True)

    got = make_model()
    opt = FusedSGD(groups(got), max_grad_norm=MAX_NORM, **CFG)
    history = train(opt, got, cosine(opt, per_update), per_update)

    assert history == torch_history
    # the lr really moves: up from warmup_lr_init over the warm-up, then down to lr_min
    first = [h[0] for h in history]
    peak = WARMUP if per_update else EPOCH
    assert first[0] == WARMUP_LR and first[-1] == LR_MIN
    assert first[:peak + 1] == sorted(first[:peak + 1]) and first[peak:] == sorted(first[peak:], reverse=True)
    assert first[peak] > LRS[0] / 2
    assert max_rel_diff(expected, got) <= 1e-10


def test_fused_schedule_reproduces_timm_cosine_with_warmup():
    """The same schedule without timm: timm's CosineLRScheduler(warmup_prefix=True), per update,
    is fused_lr's Warmup(Cosine) with factors relative to each group's base lr. Both compute the
    same formulas in a different order: lrs agree to 1e-12 relative, parameters to 1e-10."""
    expected = make_model()
    torch_opt = torch.optim.SGD(groups(expected), foreach=False, **CFG)
    timm_history = train(torch_opt, expected, cosine(torch_opt, per_update=True, prefix=True), clip=True)

    got = make_model()
    fused_groups = groups(got)
    for g in fused_groups:
        g["schedule"] = schedules.Warmup(WARMUP, schedules.Cosine(STEPS - 2 - WARMUP, min_factor=LR_MIN / g["lr"]),
                                         start_factor=WARMUP_LR / g["lr"])
    opt = FusedSGD(fused_groups, max_grad_norm=MAX_NORM, **CFG)
    history = train(opt, got)

    for k, (a, b) in enumerate(zip(history, timm_history, strict=True)):
        assert all(math.isclose(x, y, rel_tol=1e-12) for x, y in zip(a, b)), (k, a, b)
    assert max_rel_diff(expected, got) <= 1e-10
