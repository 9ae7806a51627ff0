"""The demo's catalogues: learning-rate schedules sized to a run's length, the fused optimizers
with their defaults for the digits task, and the runs of ``demo --compare``.

Kept apart from :mod:`fused_lr.tools.demo` so that the CLI can list them (``--schedule`` and
``--optimizer`` choices, ``--help``) at start-up: the schedules are built through
``fused_lr.schedules``, which the package loads on first use, so importing this module loads
neither torch nor numpy.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, NamedTuple

import fused_lr

if TYPE_CHECKING:
    from fused_lr import schedules


class Strategy(NamedTuple):
    """``make(fused_lr.schedules, total)`` builds the schedule for a run of ``total`` steps (the
    module is passed in so that it loads only then). ``lr_scale`` multiplies the group lr so
    that every strategy peaks at the requested ``--lr`` (Cyclic treats the group lr as its low end)."""

    make: Callable[[ModuleType, int], schedules.Schedule]
    lr_scale: float
    about: str


_CYCLIC_PEAK = 10.0

# The schedule catalogue sized for the demo: every one decays over the run (or cycles) so a
# run of any length ends near its intended final lr.
STRATEGIES: dict[str, Strategy] = {
    "constant": Strategy(lambda s, t: s.Constant(), 1.0, "lr throughout"),
    "step": Strategy(lambda s, t: s.Step(max(1, t // 3), 0.1), 1.0, "x0.1 every third of the run"),
    "multistep": Strategy(lambda s, t: s.MultiStep(sorted({max(1, t // 2), max(2, 3 * t // 4)}), 0.1), 1.0,
                          "x0.1 at 1/2 and 3/4 of the run"),
    "exponential": Strategy(lambda s, t: s.Exponential(0.01 ** (1 / t)), 1.0, "gamma^k down to lr/100"),
    "linear": Strategy(lambda s, t: s.Linear(1.0, 0.01, t), 1.0, "lr -> lr/100 linearly"),
    "polynomial": Strategy(lambda s, t: s.Polynomial(t, power=2.0), 1.0, "(1 - k/T)^2"),
    "cosine": Strategy(lambda s, t: s.Cosine(t), 1.0, "half cosine to 0"),
    "cosine-restarts": Strategy(lambda s, t: s.CosineRestarts(max(1, t // 3)), 1.0, "three cosine cycles"),
    "cyclic": Strategy(lambda s, t: s.Cyclic(_CYCLIC_PEAK, max(1, t // 8), mode="triangular2"),
                       1 / _CYCLIC_PEAK, "triangular2 between lr/10 and lr, 4 cycles"),
    "one-cycle": Strategy(lambda s, t: s.OneCycle(max(t, 4)), 1.0, "up to lr over 30%, then down"),
    "inverse-time": Strategy(lambda s, t: s.InverseTime(1.0, max(1, t // 10)), 1.0,
                             "lr / (1 + 10 k/T)"),
    "inverse-sqrt": Strategy(lambda s, t: s.InverseSqrt(max(1, t // 20)), 1.0,
                             "linear warm-up over 5%, then 1/sqrt(k)"),
    "power-law": Strategy(lambda s, t: s.PowerLaw(0.01, 2.0, t), 1.0, "0.01^((k/T)^2)"),
}



class Optimizer(NamedTuple):
    """A fused optimizer (``cls``, a name exported by fused_lr) and its defaults for the demo.
    ``momentum`` is None where the optimizer has none; ``fixed`` holds its other arguments
    (torch's names), which the demo does not expose."""

    cls: str
    lr: float
    weight_decay: float
    momentum: float | None
    fixed: dict
    about: str


# Defaults tuned on the digits task (seed 0, 20 epochs, warm-up + cosine; README "The demo" has
# each one's accuracy). Weight decay goes on conv and linear weights only (fused_lr.param_groups).
OPTIMIZERS: dict[str, Optimizer] = {
    "sgd": Optimizer("FusedSGD", 0.1, 5e-4, 0.9, {}, "SGD with momentum"),
    "adamw": Optimizer("FusedAdamW", 1e-2, 1e-2, None, {"betas": (0.9, 0.999)}, "AdamW, decoupled weight decay"),
    "rmsprop": Optimizer("FusedRMSprop", 3e-3, 0.0, 0.0, {"alpha": 0.99}, "RMSprop: lr / sqrt(E[g^2])"),
    "adagrad": Optimizer("FusedAdagrad", 0.1, 0.0, None, {}, "Adagrad: lr / sqrt(sum g^2)"),
}


class Run(NamedTuple):
    """One training run of the demo: ``optimizer`` (an OPTIMIZERS key) under the schedule
    ``schedule`` (a STRATEGIES key), with the gradient-norm rate's power ``lr_norm_power`` and
    its lr scaled by ``lr_scale``."""

    name: str
    optimizer: str
    schedule: str
    lr_norm_power: float = 0.0
    lr_scale: float = 1.0


# The nine classic schedules that `demo --compare` runs side by side with FusedSGD, in the order it lists them.
COMPARED = ("constant", "step", "exponential", "linear", "polynomial", "cosine", "cyclic", "inverse-time",
            "one-cycle")
# The gradient-norm rate in the comparison, lr x (N + eps)^-0.5: with power 1 the update
# lr x g / N has the length lr whatever the gradient, so only a schedule could make it settle;
# 0.5 still shrinks the step as the gradients vanish (in proportion to sqrt(N)) while raising the
# lr where they are small. The norm falls from ~5 to ~0.08 over a run (README, "The demo"), so the
# rate multiplies the lr by 0.45 to 3.6: the run's base lr is scaled by 0.3 to peak near SGD's.
NORM_RATE_POWER, NORM_RATE_SCALE = 0.5, 0.3
# The articles' adaptive strategies beside them: AdamW under the cosine schedule; RMSprop's
# average-gradient rate and SGD's gradient-norm rate alone (a constant schedule), so that the
# rate is all that moves the step size.
ADAPTIVE = (
    Run("adamw-cosine", "adamw", "cosine"),
    Run("rmsprop", "rmsprop", "constant"),
    Run("sgd-norm-rate", "sgd", "constant", NORM_RATE_POWER, NORM_RATE_SCALE),
)
# The stock torch recipe the comparison holds FusedSGD's "cosine" run against.
CONTROL = "torch-sgd-cosine"
COMPARE_RUNS = (*(Run(name, "sgd", name) for name in COMPARED), *ADAPTIVE, Run(CONTROL, "sgd", "cosine"))


def default_warmup(steps: int) -> int:
    return steps // 20


def fused_schedule(name: str, steps: int, warmup: int) -> tuple[schedules.Schedule, float]:
    """The schedule for a run of ``steps`` steps with ``warmup`` of them warming up linearly
    from 0, and the lr scale of the strategy."""
    strategy, s = STRATEGIES[name], fused_lr.schedules
    if warmup == 0:
        return strategy.make(s, steps), strategy.lr_scale
    return s.Warmup(warmup, strategy.make(s, steps - warmup)), strategy.lr_scale
