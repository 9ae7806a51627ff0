"""Hyper-parameter declarations and their checks: an optimizer names each of its hyper-parameters
once, with the rule a value must satisfy, and the core validates groups from that."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


def finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def real(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False
         ) -> tuple[Callable[[Any], bool], str]:
    """A check for a finite number in an interval, and its wording for error messages."""
    def check(v) -> bool:
        return finite_number(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    if high == math.inf:
        words = f"a finite number {'>' if low_open else '>='} {low:g}"
    else:
        words = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return check, words


def flag() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, bool)), "True or False"


@dataclass(frozen=True)
class Hyper:
    """One hyper-parameter of a param group: its name, its default and the check its value must pass."""

    name: str
    default: Any
    rule: tuple[Callable[[Any], bool], str]

    def problem(self, value) -> str | None:
        check, words = self.rule
        return None if check(value) else f"{self.name} must be {words}, got {value!r}"


def lr_problem(lr) -> str | None:
    """A learning rate is a finite number >= 0 or a one-element floating tensor (any device: it is
    read on the device every step, so its value is checked only where that costs no sync)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            return f"a tensor lr must be a one-element floating-point tensor, got {lr.dtype} {tuple(lr.shape)}"
        if lr.device.type == "cpu" and not (math.isfinite(float(lr)) and float(lr) >= 0):
            return f"lr must be a finite number >= 0, got {float(lr)!r}"
        return None
    return None if finite_number(lr) and lr >= 0 else f"lr must be a finite number >= 0, got {lr!r}"


def clip_problem(name: str, value) -> str | None:
    return None if value is None or (finite_number(value) and value > 0) else \
        f"{name} must be a finite number > 0 or None, got {value!r}"
