"""PyTorch Lightning: one place clips the gradients (docs/frameworks.md).

``Trainer(gradient_clip_val=...)`` makes Lightning clip the gradients in a pass of its own just
before ``optimizer.step``; a fused_lr optimizer (``FusedSGD(max_grad_norm=..., clip_value=...)``,
FusedAdamW, ...) clips inside its fused step. With both set the gradients are clipped twice, and
the tighter threshold silently wins. :class:`FusedClipCheck` refuses that combination when
training starts, before any step, and also Lightning's clipping under a GradScaler, which cannot
work with a fused_lr optimizer.

The package registers :func:`callbacks` under Lightning's ``lightning.pytorch.callbacks_factory``
entry point, so every ``lightning.pytorch.Trainer`` carries the check without being asked.
"""

from __future__ import annotations

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden

from fused_lr.core.optimizer import FusedOptimizer


def _own_clipping(opt: FusedOptimizer) -> list[str]:
    return [f"{name}={value}" for name, value in (("max_grad_norm", opt.max_grad_norm),
                                                  ("clip_value", opt.clip_value)) if value is not None]


class FusedClipCheck(Callback):
    """Raise when ``Trainer(gradient_clip_val=...)`` cannot sensibly clip for a fused_lr optimizer.

    Refused: the Trainer and the optimizer both clipping; and the Trainer clipping under a
    GradScaler (``precision="16-mixed"``), where the optimizer unscales the gradients inside its
    step, after Lightning's clipping would run (Lightning itself raises at the first step then).
    Lightning's clipping alone, with ``max_grad_norm=None, clip_value=None``, and the optimizer's
    alone are both fine. Where the LightningModule overrides ``configure_gradient_clipping``, that hook
    decides what ``gradient_clip_val`` means, so the check only warns.
    """

    def on_fit_start(self, trainer, pl_module) -> None:
        clip_val = trainer.gradient_clip_val
        if not clip_val:  # None or 0: Lightning does not clip
            return
        algorithm = trainer.gradient_clip_algorithm.value if trainer.gradient_clip_algorithm else "norm"
        lightning = f"Trainer(gradient_clip_val={clip_val}, gradient_clip_algorithm={algorithm!r})"
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        for i, opt in enumerate(trainer.optimizers):
            if not isinstance(opt, FusedOptimizer):
                continue
            name = type(opt).__name__
            own = _own_clipping(opt)
            if scaled:
                message = (f"{lightning} cannot clip for optimizer {i}: under a GradScaler {name} unscales the "
                           f"gradients inside its step, after Lightning's clipping would run. Clip in {name} "
                           f"instead: max_grad_norm (for 'norm') or clip_value (for 'value'), and drop "
                           f"gradient_clip_val.")
            elif own:
                message = (f"{lightning} clips the gradients before optimizer {i}'s step, and "
                           f"{name}({', '.join(own)}) clips them again inside it. Keep one: {name}'s clipping "
                           f"(fused, no extra pass; drop gradient_clip_val) or Lightning's (pass "
                           f"max_grad_norm=None, clip_value=None to {name}).")
            else:
                continue
            if is_overridden("configure_gradient_clipping", pl_module):
                rank_zero_warn(f"{message} configure_gradient_clipping is overridden, so it may not clip; "
                               f"going on.")
            else:
                raise MisconfigurationException(message)


def callbacks() -> list[Callback]:
    """The ``lightning.pytorch.callbacks_factory`` entry point: callbacks every Trainer gets."""
    return [FusedClipCheck()]
