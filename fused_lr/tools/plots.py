"""PNG figures for the demo, drawn with matplotlib's Agg canvas (no display, no pyplot state).

The demo imports this module, not the other way round: a run is anything shaped like
:class:`Run` (the demo's ``History`` is).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


class Run(Protocol):
    """One training run's per-step curves and held-out accuracy."""

    name: str
    steps: int
    backend: str  # "torch" marks the stock torch control
    loss: list[float]
    train_acc: list[float]
    lr: list[float]
    grad_norm: list[float]
    eval_step: list[int]
    test_acc: list[float]

    @property
    def final_test_acc(self) -> float: ...


def smooth(values: Sequence[float], beta: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction: per-batch curves are too noisy to read."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)


def plot_run(history: Run, path: Path, *, max_grad_norm: float, warmup: int) -> None:
    """Loss, accuracy, lr and gradient norm per step of one run, in a 2x2 grid."""
    steps = range(1, len(history.loss) + 1)
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    (ax_loss, ax_acc), (ax_lr, ax_norm) = fig.subplots(2, 2, sharex=True)
    fig.suptitle(f"digits_resnet, FusedSGD ({history.backend}), {history.name} schedule: "
                 f"test accuracy {history.final_test_acc:.2%}")

    ax_loss.plot(steps, history.loss, color="tab:blue", alpha=0.25, lw=0.8, label="batch")
    ax_loss.plot(steps, smooth(history.loss), color="tab:blue", label="smoothed")
    ax_loss.set_yscale("log")
    ax_loss.set_title("training loss")
    ax_loss.legend()

    ax_acc.plot(steps, smooth(history.train_acc), color="tab:green", label="training batches (smoothed)")
    ax_acc.plot(history.eval_step, history.test_acc, "o-", color="tab:red", ms=3, label="held-out test set")
    ax_acc.set_ylim(0, 1.01)
    ax_acc.set_title("accuracy")
    ax_acc.legend(loc="lower right")

    ax_lr.plot(steps, history.lr, color="tab:purple")
    if warmup:
        ax_lr.axvline(warmup, color="gray", ls=":", label=f"end of warm-up ({warmup} steps)")
        ax_lr.legend()
    ax_lr.set_title("learning rate")
    ax_lr.set_xlabel("step")

    ax_norm.plot(steps, history.grad_norm, color="tab:orange", lw=0.8, label="global norm (before clipping)")
    ax_norm.axhline(max_grad_norm, color="black", ls="--", lw=1, label=f"max_grad_norm = {max_grad_norm}")
    ax_norm.set_yscale("log")
    ax_norm.set_title("gradient norm")
    ax_norm.set_xlabel("step")
    ax_norm.legend()
    _save(fig, path)


def plot_compare(runs: Sequence[Run], path: Path) -> None:
    """lr, training loss and test accuracy of every run, side by side. The torch control is
    drawn on top, dashed with wide gaps: it runs the same recipe as FusedSGD's cosine, whose
    line shows through the gaps instead of hiding under it."""
    fig = Figure(figsize=(17, 5.5), layout="constrained")
    ax_lr, ax_loss, ax_acc = fig.subplots(1, 3, sharex=True)
    fig.suptitle(f"digits_resnet: lr strategies with FusedSGD vs. the stock torch control "
                 f"({runs[0].steps} steps each)")
    for i, run in enumerate(runs):
        control = run.backend == "torch"
        style = (dict(color="black", ls=(0, (2, 4)), lw=1.4, zorder=3) if control
                 else dict(color=f"C{i % 10}", lw=1.2))
        label = f"{run.name} ({run.final_test_acc:.1%})"
        steps = range(1, len(run.loss) + 1)
        ax_lr.plot(steps, run.lr, label=label, **style)
        ax_loss.plot(steps, smooth(run.loss), label=label, **style)
        ax_acc.plot(run.eval_step, run.test_acc, marker="o", ms=2.5, label=label, **style)
    ax_lr.set_title("learning rate")
    ax_loss.set_title("training loss (smoothed)")
    ax_loss.set_yscale("log")
    ax_acc.set_title("held-out test accuracy")
    ax_acc.set_ylim(max(0.0, min(min(r.test_acc) for r in runs) - 0.02), 1.005)
    for ax in (ax_lr, ax_loss, ax_acc):
        ax.set_xlabel("step")
    ax_acc.legend(title="strategy (final accuracy); dashed: torch control", fontsize=8, loc="lower right")
    _save(fig, path)
