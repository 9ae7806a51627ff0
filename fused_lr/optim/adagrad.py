"""FusedAdagrad: ``torch.optim.Adagrad`` + clipping + a fused lr schedule.

The rule (docs/step.md, "Beyond SGD"), with t the parameter's step count after this update:
``s <- s + g^2``, ``p <- p - lr / (1 + (t - 1) lr_decay) * g / (sqrt(s) + eps)``; the sum starts at
the constructor's ``initial_accumulator_value`` for every parameter, as torch's does (a param group's
own value is kept in the group but not used). Kernels: the RULE_ADAGRAD branches of fused_lr/kernels/
and csrc/.
"""

from __future__ import annotations

import torch

from fused_lr.core import layout as L
from fused_lr.core.hyper import Hyper, real
from fused_lr.core.optimizer import FusedOptimizer

# Checked once, in the constructor: the sum of every parameter starts at the constructor's value
# (torch.optim.Adagrad reads self.defaults, never the group), so it is not a per-group hyper-parameter.
_INITIAL_ACCUMULATOR = Hyper("initial_accumulator_value", 0.0, real(0.0))


class FusedAdagrad(FusedOptimizer):
    """Adagrad with gradient clipping and an lr schedule, fused; arguments follow
    ``torch.optim.Adagrad`` (everything after ``eps`` keyword-only).

    ``initial_accumulator_value`` is the constructor's for every parameter, in every param group, as
    in ``torch.optim.Adagrad``: a group's own ``initial_accumulator_value`` is ignored (and unchecked).
    State is created at the first step, or by :meth:`share_memory`."""

    rule = L.RULE_ADAGRAD
    # lr / (1 + (t - 1) lr_decay); eps (rule_row: lr_decay, eps)
    coefficients = L.program(("DECAY", 0), ("COPY", 1))
    hypers = (
        Hyper("lr_decay", 0.0, real(0.0)),
        Hyper("eps", 1e-10, real(0.0, low_open=True)),
    )

    def __init__(self, params, lr: float | torch.Tensor = 1e-2, lr_decay: float = 0.0, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, eps: float = 1e-10, *, maximize: bool = False, **shared):
        if problem := _INITIAL_ACCUMULATOR.problem(initial_accumulator_value):
            raise ValueError(f"{type(self).__name__}: {problem}")
        defaults = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, eps=eps, maximize=maximize,
                        decoupled_weight_decay=False)
        super().__init__(params, defaults, **shared)

    def state_names(self, group: dict) -> tuple[str, ...]:
        return ("sum",)

    def initial_state(self, name: str, group: dict) -> float:
        return self.defaults["initial_accumulator_value"]  # not the group's: as torch.optim.Adagrad

    def share_memory(self) -> None:
        """As ``torch.optim.Adagrad.share_memory``: moves every parameter's ``sum`` to shared memory
        (``Tensor.share_memory_``), so that processes holding this optimizer (forked, or sent
        through ``torch.multiprocessing``) update one accumulator. State that does not exist yet is
        created first, as torch's constructor creates it: the sum at ``initial_accumulator_value``,
        laid out like the parameter, and a float32 0-dim ``step`` of 0. As in torch, ``step`` stays
        per process (it is not shared). Later steps update the shared sums in place; a
        ``load_state_dict`` or a cast of the parameters replaces them (call this again after one)."""
        fill = self.defaults["initial_accumulator_value"]
        moved = False
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                if st.get("sum") is None:
                    st["sum"] = torch.full_like(p, complex(fill, fill) if p.is_complex() else fill,
                                                memory_format=torch.preserve_format)
                    if st.get("step") is None:
                        st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                if not st["sum"].is_shared():
                    st["sum"].share_memory_()  # new storage, same tensor object: the kernels' addresses moved
                    moved = True
        if moved:
            self._reset_caches()  # a plan holds the state's addresses: the next step binds them again

    def rule_row(self, group: dict) -> tuple[int, tuple[float, ...]]:
        return 0, (group["lr_decay"], group["eps"])

    @staticmethod
    def reference_rule(p, g, states, step, lr, group) -> None:
        clr = lr / (1 + step * group["lr_decay"])  # step counts the earlier updates: t - 1
        state_sum = states["sum"]
        state_sum.addcmul_(g, g, value=1)
        std = state_sum.sqrt().add_(group["eps"])
        p.addcdiv_(g, std, value=-clr)


__all__ = ["FusedAdagrad"]
