"""The demo's learning-rate strategies, sized to a run's length.

Kept apart from :mod:`fused_lr.tools.demo` so that the CLI can list them (``--schedule``
choices, ``--help``) at start-up: the schedules are built through ``fused_lr.schedules``, which
the package loads on first use, so importing this module loads neither torch nor numpy.
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

# The nine classic strategies that `demo --compare` runs side by side, in the order it lists them.
COMPARED = ("constant", "step", "exponential", "linear", "polynomial", "cosine", "cyclic", "inverse-time",
            "one-cycle")
# The stock torch recipe the comparison holds FusedSGD's "cosine" run against.
CONTROL = "torch-sgd-cosine"


def default_warmup(steps: int) -> int:
    return steps // 20


def fused_schedule(name: str, steps: int, warmup: int) -> tuple[schedules.Schedule, float]:
    """The schedule for a run of ``steps`` steps with ``warmup`` of them warming up linearly
    from 0, and the lr scale of the strategy."""
    strategy, s = STRATEGIES[name], fused_lr.schedules
    if warmup == 0:
        return strategy.make(s, steps), strategy.lr_scale
    return s.Warmup(warmup, strategy.make(s, steps - warmup)), strategy.lr_scale
