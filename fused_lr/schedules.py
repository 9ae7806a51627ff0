"""Learning-rate schedules: pure functions of the step count ``k``.

Every schedule is callable, ``s(k) -> float``, and returns a factor of its param group's base
lr. Each one also lowers to a fixed-size numeric table (:func:`Schedule.table`) that a kernel
evaluates on the device from a step counter; :func:`eval_table` is the plain-Python evaluator
of that table that the Triton and CUDA kernels mirror line for line, and the tests hold it
equal to ``s(k)`` for every schedule.

Table layout: ``MAX_SEGMENTS`` rows of ``ROW`` float64 numbers,
``[start, kind, p0, p1, p2, p3, p4, p5]``. Row 0 starts at step 0; the row in force at step
``k`` is the last one with ``start <= k`` and it sees the local step ``k - start``. Unused rows
start at +inf. Composites (``Join``, ``Warmup``, ``MultiStep``) flatten into rows, so the
evaluator never recurses.

docs/step.md states the catalogue ("Schedules") and the table with every kind's parameters
("The schedule table").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fused_lr.core import layout

MAX_SEGMENTS, ROW = layout.MAX_SEGMENTS, layout.SEGMENT_COLS
# Segment kinds: the codes the kernels share, named as in fused_lr/core/layout.py.
CONST, STEP, EXP, LINEAR, POLY, COSINE, COSINE_RESTARTS, CYCLIC, ONECYCLE, INVTIME, INVSQRT, POWERLAW = (
    layout.SCHEDULE_KINDS[name] for name in ("CONST", "STEP", "EXP", "LINEAR", "POLY", "COSINE", "COSINE_RESTARTS",
                                             "CYCLIC", "ONECYCLE", "INVTIME", "INVSQRT", "POWERLAW"))
N_PARAMS = ROW - 2
CYCLIC_MODES = {"triangular": 0, "triangular2": 1, "exp_range": 2}
ONECYCLE_ANNEAL = {"cos": 0, "linear": 1}


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _positive_int(name: str, value) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool) and value > 0,
           f"{name} must be a positive integer, got {value!r}")


def _finite(name: str, value) -> None:
    _check(isinstance(value, (int, float)) and math.isfinite(value), f"{name} must be a finite number, got {value!r}")


class Schedule:
    """Base class. Subclasses define ``__call__`` (the readable formula) and ``segments``."""

    def __call__(self, k: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def segments(self) -> list[tuple[float, int, tuple[float, ...]]]:
        """Rows ``(start, kind, params)`` with starts relative to this schedule's step 0."""
        raise NotImplementedError  # pragma: no cover - abstract

    @property
    def host_scale(self) -> float:
        """A host-side factor on top of the table (only ReduceOnPlateau has one)."""
        return 1.0

    @property
    def is_constant(self) -> bool:
        rows = self.segments()
        return len(rows) == 1 and rows[0][1] == CONST and rows[0][2][0] == 1.0

    def table(self) -> np.ndarray:
        """The kernel table, built once per schedule (schedules are immutable) and read-only."""
        cached = self.__dict__.get("_table")
        if cached is None:
            cached = self._build_table()
            cached.setflags(write=False)
            self.__dict__["_table"] = cached  # bypasses the frozen dataclass on purpose
        return cached

    def _build_table(self) -> np.ndarray:
        rows = self.segments()
        if len(rows) > MAX_SEGMENTS:
            raise ValueError(
                f"{self!r} needs {len(rows)} table segments; kernels evaluate at most {MAX_SEGMENTS}"
            )
        out = np.zeros((MAX_SEGMENTS, ROW), dtype=np.float64)
        out[:, 0] = np.inf
        for i, (start, kind, params) in enumerate(rows):
            out[i, 0] = start
            out[i, 1] = kind
            out[i, 2 : 2 + len(params)] = params
        return out


def _cosine(m: float, t: float, period: float) -> float:
    return m + (1.0 - m) * (1.0 + math.cos(math.pi * t / period)) / 2.0


@dataclass(frozen=True)
class Constant(Schedule):
    value: float = 1.0

    def __post_init__(self):
        _finite("Constant value", self.value)

    def __call__(self, k):
        return float(self.value)

    def segments(self):
        return [(0.0, CONST, (float(self.value),))]


@dataclass(frozen=True)
class Step(Schedule):
    step_size: int
    gamma: float = 0.1

    def __post_init__(self):
        _positive_int("Step step_size", self.step_size)
        _finite("Step gamma", self.gamma)

    def __call__(self, k):
        return self.gamma ** (k // self.step_size)

    def segments(self):
        return [(0.0, STEP, (float(self.step_size), float(self.gamma)))]


@dataclass(frozen=True)
class MultiStep(Schedule):
    milestones: Sequence[int]
    gamma: float = 0.1

    def __post_init__(self):
        ms = tuple(self.milestones)
        for m in ms:
            _positive_int("MultiStep milestone", m)
        _check(list(ms) == sorted(set(ms)), f"MultiStep milestones must be increasing, got {ms}")
        _finite("MultiStep gamma", self.gamma)
        object.__setattr__(self, "milestones", ms)

    def __call__(self, k):
        return self.gamma ** sum(1 for m in self.milestones if m <= k)

    def segments(self):
        rows = [(0.0, CONST, (1.0,))]
        rows += [(float(m), CONST, (self.gamma ** (i + 1),)) for i, m in enumerate(self.milestones)]
        return rows


@dataclass(frozen=True)
class Exponential(Schedule):
    gamma: float

    def __post_init__(self):
        _check(isinstance(self.gamma, (int, float)) and self.gamma > 0 and math.isfinite(self.gamma),
               f"Exponential gamma must be a positive finite number, got {self.gamma!r}")

    def __call__(self, k):
        return self.gamma**k

    def segments(self):
        return [(0.0, EXP, (float(self.gamma),))]


@dataclass(frozen=True)
class Linear(Schedule):
    start: float
    end: float
    total: int

    def __post_init__(self):
        _finite("Linear start", self.start)
        _finite("Linear end", self.end)
        _positive_int("Linear total", self.total)

    def __call__(self, k):
        return self.start + (self.end - self.start) * min(k, self.total) / self.total

    def segments(self):
        return [(0.0, LINEAR, (float(self.start), float(self.end), float(self.total)))]


@dataclass(frozen=True)
class Polynomial(Schedule):
    total: int
    power: float = 1.0
    end: float = 0.0

    def __post_init__(self):
        _positive_int("Polynomial total", self.total)
        _finite("Polynomial power", self.power)
        _finite("Polynomial end", self.end)

    def __call__(self, k):
        return self.end + (1.0 - self.end) * (1.0 - min(k, self.total) / self.total) ** self.power

    def segments(self):
        return [(0.0, POLY, (float(self.total), float(self.power), float(self.end)))]


@dataclass(frozen=True)
class Cosine(Schedule):
    total: int
    min_factor: float = 0.0

    def __post_init__(self):
        _positive_int("Cosine total", self.total)
        _finite("Cosine min_factor", self.min_factor)

    def __call__(self, k):
        return _cosine(self.min_factor, min(k, self.total), self.total)

    def segments(self):
        return [(0.0, COSINE, (float(self.total), float(self.min_factor)))]


@dataclass(frozen=True)
class CosineRestarts(Schedule):
    period: int
    mult: int = 1
    min_factor: float = 0.0

    def __post_init__(self):
        _positive_int("CosineRestarts period", self.period)
        _positive_int("CosineRestarts mult", self.mult)
        _finite("CosineRestarts min_factor", self.min_factor)

    def __call__(self, k):
        t, length = k, self.period
        while t >= length:  # geometric cycle lengths: at most ~log(k) turns
            t -= length
            length *= self.mult
        return _cosine(self.min_factor, t, length)

    def segments(self):
        return [(0.0, COSINE_RESTARTS, (float(self.period), float(self.mult), float(self.min_factor)))]


@dataclass(frozen=True)
class Cyclic(Schedule):
    """CyclicLR with the group lr as the low end and ``lr * max_factor`` as the high end."""

    max_factor: float
    step_up: int
    step_down: int | None = None
    mode: str = "triangular"
    gamma: float = 1.0

    def __post_init__(self):
        _finite("Cyclic max_factor", self.max_factor)
        _positive_int("Cyclic step_up", self.step_up)
        if self.step_down is not None:
            _positive_int("Cyclic step_down", self.step_down)
        _check(self.mode in CYCLIC_MODES, f"Cyclic mode must be one of {sorted(CYCLIC_MODES)}, got {self.mode!r}")
        _finite("Cyclic gamma", self.gamma)

    def __call__(self, k):
        down = self.step_up if self.step_down is None else self.step_down
        size = self.step_up + down
        ratio = self.step_up / size
        cycle = math.floor(1 + k / size)
        x = 1.0 + k / size - cycle
        scale = x / ratio if x <= ratio else (x - 1) / (ratio - 1)
        if self.mode == "triangular":
            amp = 1.0
        elif self.mode == "triangular2":
            amp = 0.5 ** (cycle - 1)  # not 1/2**n: that overflows after ~1000 cycles
        else:
            amp = self.gamma**k
        return 1.0 + (self.max_factor - 1.0) * scale * amp

    def segments(self):
        down = self.step_up if self.step_down is None else self.step_down
        params = (float(self.max_factor), float(self.step_up), float(down), float(CYCLIC_MODES[self.mode]),
                  float(self.gamma))
        return [(0.0, CYCLIC, params)]


@dataclass(frozen=True)
class OneCycle(Schedule):
    """OneCycleLR with the group lr as the peak (``max_lr``)."""

    total: int
    pct_start: float = 0.3
    div: float = 25.0
    final_div: float = 1e4
    anneal: str = "cos"

    def __post_init__(self):
        _positive_int("OneCycle total", self.total)
        _check(isinstance(self.pct_start, (int, float)) and 0 < self.pct_start < 1,
               f"OneCycle pct_start must be in (0, 1), got {self.pct_start!r}")
        _check(self.pct_start * self.total - 1 > 0,
               f"OneCycle warm-up phase is empty: pct_start * total = {self.pct_start * self.total} must exceed 1")
        _check(self.total - self.pct_start * self.total > 0, "OneCycle annealing phase is empty")
        _finite("OneCycle div", self.div)
        _finite("OneCycle final_div", self.final_div)
        _check(self.anneal in ONECYCLE_ANNEAL, f"OneCycle anneal must be 'cos' or 'linear', got {self.anneal!r}")

    def __call__(self, k):
        k = min(k, self.total - 1)
        low, peak, final = 1.0 / self.div, 1.0, 1.0 / (self.div * self.final_div)
        up_end = self.pct_start * self.total - 1
        if k <= up_end:
            pct, a, b = k / up_end, low, peak
        else:
            pct, a, b = (k - up_end) / (self.total - 1 - up_end), peak, final
        if self.anneal == "cos":
            return b + (a - b) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (b - a) * pct + a

    def segments(self):
        params = (float(self.total), float(self.pct_start), float(self.div), float(self.final_div),
                  float(ONECYCLE_ANNEAL[self.anneal]))
        return [(0.0, ONECYCLE, params)]


@dataclass(frozen=True)
class InverseTime(Schedule):
    rate: float
    decay_steps: int = 1
    power: float = 1.0

    def __post_init__(self):
        _finite("InverseTime rate", self.rate)
        _check(self.rate >= 0, f"InverseTime rate must be >= 0, got {self.rate}")
        _positive_int("InverseTime decay_steps", self.decay_steps)
        _finite("InverseTime power", self.power)

    def __call__(self, k):
        return (1.0 + self.rate * k / self.decay_steps) ** (-self.power)

    def segments(self):
        return [(0.0, INVTIME, (float(self.rate), float(self.decay_steps), float(self.power)))]


@dataclass(frozen=True)
class InverseSqrt(Schedule):
    warmup: int

    def __post_init__(self):
        _positive_int("InverseSqrt warmup", self.warmup)

    def __call__(self, k):
        return k / self.warmup if k < self.warmup else math.sqrt(self.warmup / k)

    def segments(self):
        return [(0.0, INVSQRT, (float(self.warmup),))]


@dataclass(frozen=True)
class PowerLaw(Schedule):
    decay: float
    power: float
    total: int

    def __post_init__(self):
        _check(isinstance(self.decay, (int, float)) and self.decay > 0 and math.isfinite(self.decay),
               f"PowerLaw decay must be a positive finite number, got {self.decay!r}")
        _finite("PowerLaw power", self.power)
        _positive_int("PowerLaw total", self.total)

    def __call__(self, k):
        return self.decay ** ((min(k, self.total) / self.total) ** self.power)

    def segments(self):
        return [(0.0, POWERLAW, (float(self.decay), float(self.power), float(self.total)))]


def _as_schedule(s, where: str) -> Schedule:
    _check(isinstance(s, Schedule), f"{where} must be a fused_lr schedule, got {type(s).__name__}")
    return s


@dataclass(frozen=True)
class Join(Schedule):
    """``Join([(S1, n1), (S2, n2), S_last])``: S1 for n1 steps, then S2 restarted at 0, ..."""

    parts: Sequence

    def __post_init__(self):
        parts = list(self.parts)
        _check(len(parts) >= 1, "Join needs at least one schedule")
        timed = []
        for i, part in enumerate(parts[:-1]):
            _check(isinstance(part, tuple) and len(part) == 2,
                   f"Join part {i} must be a (schedule, steps) pair; only the last part stands alone")
            s, n = part
            _positive_int(f"Join part {i} steps", n)
            timed.append((_as_schedule(s, f"Join part {i}"), n))
        last = parts[-1]
        if isinstance(last, tuple):  # a trailing (S, n): S simply goes on after n
            last = last[0]
        object.__setattr__(self, "parts", (*timed, _as_schedule(last, "Join last part")))

    def __call__(self, k):
        for s, n in self.parts[:-1]:
            if k < n:
                return s(k)
            k -= n
        return self.parts[-1](k)

    def segments(self):
        rows, offset = [], 0
        for s, n in self.parts[:-1]:
            rows += [(offset + start, kind, p) for start, kind, p in s.segments() if start < n]
            offset += n
        rows += [(offset + start, kind, p) for start, kind, p in self.parts[-1].segments()]
        return rows


@dataclass(frozen=True)
class Warmup(Schedule):
    """Linear warm-up from ``start_factor`` to 1 over ``steps``, then ``then(k - steps)``."""

    steps: int
    then: Schedule = field(default_factory=Constant)
    start_factor: float = 0.0

    def __post_init__(self):
        _positive_int("Warmup steps", self.steps)
        _as_schedule(self.then, "Warmup then")
        _finite("Warmup start_factor", self.start_factor)

    def _joined(self) -> Join:
        return Join([(Linear(self.start_factor, 1.0, self.steps), self.steps), self.then])

    def __call__(self, k):
        if k < self.steps:
            return self.start_factor + (1.0 - self.start_factor) * k / self.steps
        return self.then(k - self.steps)

    def segments(self):
        return self._joined().segments()


class ReduceOnPlateau(Schedule):
    """A host-side factor driven by a metric (``step(metric)``), multiplying ``inner``.

    Mirrors ``torch.optim.lr_scheduler.ReduceLROnPlateau``; ``min_factor`` and ``eps`` are in
    units of the group's base lr. The factor lives on the host, so it stays out of the table:
    kernels receive ``base lr * host_scale`` and evaluate ``inner`` on the device.
    """

    def __init__(self, inner: Schedule | None = None, mode: str = "min", factor: float = 0.1,
                 patience: int = 10, threshold: float = 1e-4, threshold_mode: str = "rel",
                 cooldown: int = 0, min_factor: float = 0.0, eps: float = 1e-8):
        _check(mode in ("min", "max"), f"ReduceOnPlateau mode must be 'min' or 'max', got {mode!r}")
        _check(threshold_mode in ("rel", "abs"),
               f"ReduceOnPlateau threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}")
        _check(isinstance(factor, (int, float)) and 0 < factor < 1,
               f"ReduceOnPlateau factor must be in (0, 1), got {factor!r}")
        _check(isinstance(patience, int) and patience >= 0, f"ReduceOnPlateau patience must be >= 0, got {patience!r}")
        self.inner = _as_schedule(inner if inner is not None else Constant(), "ReduceOnPlateau inner")
        self.mode, self.factor, self.patience = mode, factor, patience
        self.threshold, self.threshold_mode = threshold, threshold_mode
        self.cooldown, self.min_factor, self.eps = cooldown, min_factor, eps
        self.scale = 1.0
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad = 0
        self.cooldown_left = 0

    def __repr__(self):
        return f"ReduceOnPlateau(inner={self.inner!r}, factor={self.factor}, patience={self.patience})"

    def _better(self, a: float) -> bool:
        rel = self.threshold_mode == "rel"
        if self.mode == "min":
            return a < (self.best * (1 - self.threshold) if rel else self.best - self.threshold)
        return a > (self.best * (1 + self.threshold) if rel else self.best + self.threshold)

    def step(self, metric: float) -> None:
        metric = float(metric)
        if self._better(metric):
            self.best, self.num_bad = metric, 0
        else:
            self.num_bad += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.num_bad = 0
        if self.num_bad > self.patience:
            new = max(self.scale * self.factor, self.min_factor)
            if self.scale - new > self.eps:
                self.scale = new
            self.cooldown_left, self.num_bad = self.cooldown, 0

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("scale", "best", "num_bad", "cooldown_left")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)

    @property
    def host_scale(self) -> float:
        return self.scale

    @property
    def is_constant(self) -> bool:
        return False

    def __call__(self, k):
        return self.scale * self.inner(k)

    def segments(self):
        return self.inner.segments()


# The table evaluator. The Numba backend compiles this very function (so it stays within what
# numba's nopython mode accepts: array indexing, math, no helper calls); Triton and CUDA mirror it
# branch for branch.
def eval_table(table, k: float) -> float:
    """Evaluate a schedule table (a (MAX_SEGMENTS, ROW) array) at step ``k``, without host_scale."""
    row = 0
    for i in range(MAX_SEGMENTS):
        if table[i, 0] <= k:
            row = i
    start, kind = table[row, 0], int(table[row, 1])
    p = table[row, 2:]
    t = k - start
    if kind == CONST:
        return p[0]
    if kind == STEP:
        return p[1] ** math.floor(t / p[0])
    if kind == EXP:
        return p[0] ** t
    if kind == LINEAR:
        return p[0] + (p[1] - p[0]) * min(t, p[2]) / p[2]
    if kind == POLY:
        return p[2] + (1.0 - p[2]) * (1.0 - min(t, p[0]) / p[0]) ** p[1]
    if kind in (COSINE, COSINE_RESTARTS):
        if kind == COSINE:
            m, length, t = p[1], p[0], min(t, p[0])
        else:
            m, length = p[2], p[0]
            if p[1] == 1.0:
                t = np.fmod(t, length)  # C fmod; numba has no math.fmod
            else:
                while t >= length:
                    t -= length
                    length *= p[1]
        return m + (1.0 - m) * (1.0 + math.cos(math.pi * t / length)) / 2.0
    if kind == CYCLIC:
        size = p[1] + p[2]
        ratio = p[1] / size
        cycle = math.floor(1.0 + t / size)
        x = 1.0 + t / size - cycle
        scale = x / ratio if x <= ratio else (x - 1.0) / (ratio - 1.0)
        mode = int(p[3])
        amp = 1.0 if mode == 0 else (0.5 ** (cycle - 1.0) if mode == 1 else p[4] ** t)
        return 1.0 + (p[0] - 1.0) * scale * amp
    if kind == ONECYCLE:
        t = min(t, p[0] - 1.0)
        up_end = p[1] * p[0] - 1.0
        low, final = 1.0 / p[2], 1.0 / (p[2] * p[3])
        if t <= up_end:
            pct, a, b = t / up_end, low, 1.0
        else:
            pct, a, b = (t - up_end) / (p[0] - 1.0 - up_end), 1.0, final
        if p[4] == 0.0:
            return b + (a - b) / 2.0 * (math.cos(math.pi * pct) + 1.0)
        return (b - a) * pct + a
    if kind == INVTIME:
        return (1.0 + p[0] * t / p[1]) ** (-p[2])
    if kind == INVSQRT:
        return t / p[0] if t < p[0] else math.sqrt(p[0] / t)
    if kind == POWERLAW:
        return p[0] ** ((min(t, p[2]) / p[2]) ** p[1])
    raise ValueError("unknown schedule segment kind")


__all__ = [
    "Schedule", "Constant", "Step", "MultiStep", "Exponential", "Linear", "Polynomial", "Cosine",
    "CosineRestarts", "Cyclic", "OneCycle", "InverseTime", "InverseSqrt", "PowerLaw", "Warmup", "Join",
    "ReduceOnPlateau", "eval_table", "MAX_SEGMENTS", "ROW",
]
