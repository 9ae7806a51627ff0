"""torch.optim.lr_scheduler drives FusedSGD (schedule=None) exactly as it drives torch.optim.SGD.

The schedulers write ``group["lr"]`` (and, with ``cycle_momentum``, ``group["momentum"]``)
between steps; FusedSGD reads both afresh on every step. Both runs are float64 with the same
data and the same scheduler class, so the lr and momentum histories must be identical and
the parameters agree to 1e-10 relative (only the clip coefficient's reduction order differs,
~1e-15 per step).
"""

import pytest
import torch
from cases import backend_cases, batches, make_model, max_rel_diff, split_groups
from torch.optim import lr_scheduler as lrs

from fused_lr import FusedSGD

STEPS = 30
CFG = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
MAX_NORM = 0.5

SCHEDULERS = {
    "step": lambda opt: lrs.StepLR(opt, step_size=7, gamma=0.5),
    "onecycle-momentum": lambda opt: lrs.OneCycleLR(opt, max_lr=[0.2, 0.1], total_steps=STEPS,
                                                    cycle_momentum=True, base_momentum=0.8, max_momentum=0.95),
    "cyclic-momentum": lambda opt: lrs.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=5,
                                                cycle_momentum=True, base_momentum=0.8, max_momentum=0.9),
    "plateau": lambda opt: lrs.ReduceLROnPlateau(opt, factor=0.5, patience=1, threshold=0.05),
    "sequential": lambda opt: lrs.SequentialLR(opt, [lrs.LinearLR(opt, start_factor=0.1, total_iters=5),
                                                     lrs.CosineAnnealingLR(opt, T_max=STEPS - 5)], milestones=[5]),
}


def run(make_opt, scheduler, fused, device):
    model = make_model(torch.float64, device)
    decay, no_decay = split_groups(model)
    opt = make_opt([dict(params=decay), dict(params=no_decay, lr=0.05, weight_decay=0.0)])
    sched = SCHEDULERS[scheduler](opt)
    history = []
    for x, y in batches(STEPS, torch.float64, device):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if not fused:
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()
        history.append([(g["lr"], g["momentum"]) for g in opt.param_groups])
        if isinstance(sched, lrs.ReduceLROnPlateau):
            sched.step(loss.item())
        else:
            sched.step()
    return model, opt, history


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("backend,device", backend_cases())
def test_torch_scheduler_drives_fused_sgd(backend, device, scheduler):
    expected, _, torch_history = run(lambda g: torch.optim.SGD(g, foreach=False, **CFG), scheduler, False, device)
    got, opt, history = run(lambda g: FusedSGD(g, max_grad_norm=MAX_NORM, backend=backend, **CFG),
                            scheduler, True, device)
    assert opt.backend == backend
    assert history == torch_history
    # the scheduler must really move the lr (and the momentum where it cycles it)
    assert len({h[0][0] for h in history}) > 2
    if "momentum" in scheduler:
        assert len({h[0][1] for h in history}) > 2
    assert max_rel_diff(expected, got) <= 1e-10
