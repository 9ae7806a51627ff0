"""PNG figures for the demo and the step benchmark, drawn with matplotlib's Agg canvas (no display,
no pyplot state).

The demo and the benchmark import this module, not the other way round: a run is anything shaped
like :class:`Run` (the demo's ``History`` is), a benchmark result anything shaped like
:class:`BenchResult` (fused_lr.tools.bench.step's ``ModelResult`` is).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter


class Run(Protocol):
    """One training run's per-step curves and held-out accuracy."""

    name: str
    steps: int
    optimizer: str  # the class: FusedSGD, FusedAdamW, ..., torch.optim.SGD
    backend: str  # "torch" marks the stock torch control
    lr_norm_power: float  # > 0: the gradient-norm rate, and ``lr`` holds the effective lr
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


def _adaptive(run: Run) -> bool:
    """Whether the step size also follows the gradients (an adaptive optimizer or the gradient-norm rate)."""
    return run.optimizer not in ("FusedSGD", "torch.optim.SGD") or run.lr_norm_power > 0


def _lr_title(runs: Sequence[Run]) -> str:
    notes = []
    if any(r.lr_norm_power > 0 for r in runs):
        notes.append("gradient-norm rate: the effective lr x s(k) / (|g| + eps)^power")
    if any(r.optimizer not in ("FusedSGD", "torch.optim.SGD") for r in runs):
        notes.append("Adam/RMSprop/Adagrad: lr x s(k), before the per-element 1/sqrt(v)")
    return "learning rate" + "".join(f"\n{n}" for n in notes)


def plot_run(history: Run, path: Path, *, max_grad_norm: float, warmup: int) -> None:
    """Loss, accuracy, lr and gradient norm per step of one run, in a 2x2 grid."""
    steps = range(1, len(history.loss) + 1)
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    (ax_loss, ax_acc), (ax_lr, ax_norm) = fig.subplots(2, 2, sharex=True)
    rate = f", gradient-norm rate power {history.lr_norm_power:g}" if history.lr_norm_power else ""
    fig.suptitle(f"digits_resnet, {history.optimizer} ({history.backend}), {history.name} schedule{rate}: "
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
    ax_lr.set_title(_lr_title([history]), fontsize=10)
    ax_lr.set_xlabel("step")

    ax_norm.plot(steps, history.grad_norm, color="tab:orange", lw=0.8, label="global norm (before clipping)")
    ax_norm.axhline(max_grad_norm, color="black", ls="--", lw=1, label=f"max_grad_norm = {max_grad_norm}")
    ax_norm.set_yscale("log")
    ax_norm.set_title("gradient norm")
    ax_norm.set_xlabel("step")
    ax_norm.legend()
    _save(fig, path)


# the adaptive runs' colours, apart from the schedules' tab10 cycle; they are drawn dash-dotted too
_ADAPTIVE_COLORS = ("#1b9e77", "#e7298a", "#000080", "#b8860b", "#8b0000")
_LR_DECADES = 4  # the lr axis shows this many decades below the highest lr: schedules ending near 0 would squash it


def plot_compare(runs: Sequence[Run], path: Path) -> Figure:
    """lr, training loss and test accuracy of every run, side by side, and one legend to the
    right of them (inside an axes, 13 entries hid the curves). The lr axis is logarithmic: the
    adaptive optimizers' rates are 10-100x below SGD's. The torch control is drawn on top, dashed
    with wide gaps: it runs the same recipe as FusedSGD's cosine, whose line shows through the
    gaps instead of hiding under it."""
    fig = Figure(figsize=(19, 5.8), layout="constrained")
    ax_lr, ax_loss, ax_acc = fig.subplots(1, 3, sharex=True)
    fig.suptitle(f"digits_resnet: lr schedules with FusedSGD, adaptive strategies and the stock torch control "
                 f"({runs[0].steps} steps each)")
    schedules, adaptive = iter(range(10)), iter(_ADAPTIVE_COLORS)
    styles = []
    for run in runs:
        if run.backend == "torch":
            style = dict(color="black", ls=(0, (2, 4)), lw=1.4, zorder=3)
        elif _adaptive(run):
            style = dict(color=next(adaptive), ls="-.", lw=1.5, zorder=2.5)
        else:
            style = dict(color=f"C{next(schedules)}", lw=1.2)
        styles.append(style)
        label = f"{run.name}: {run.optimizer} ({run.final_test_acc:.1%})"
        steps = range(1, len(run.loss) + 1)
        ax_lr.plot(steps, run.lr, label=label, **style)
        ax_loss.plot(steps, smooth(run.loss), **style)
        ax_acc.plot(run.eval_step, run.test_acc, marker="o", ms=2.5, **style)
    ax_lr.set_title(_lr_title(runs), fontsize=10)
    ax_lr.set_yscale("log")
    ax_lr.set_ylim(bottom=max(max(r.lr) for r in runs) * 10.0**-_LR_DECADES)
    ax_loss.set_title("training loss (smoothed)")
    ax_loss.set_yscale("log")
    ax_acc.set_title("held-out test accuracy")
    ax_acc.set_ylim(max(0.0, min(min(r.test_acc) for r in runs) - 0.02), 1.005)
    ax_acc.yaxis.set_major_formatter(PercentFormatter(1.0))
    _zoom_on_the_finish(ax_acc, runs, styles)
    for ax in (ax_lr, ax_loss, ax_acc):
        ax.set_xlabel("step")
    fig.legend(loc="outside right center", fontsize=8,
               title="run: optimizer (final test accuracy)\ndash-dot: adaptive; dashed: torch control")
    _save(fig, path)
    return fig


_ZOOM_POINTS = 0.05  # the inset's accuracy axis reaches this far below the best finish at most


def _zoom_on_the_finish(ax, runs: Sequence[Run], styles: list[dict]):
    """An inset on the second half of the run, its accuracy axis from just below the lowest final
    accuracy: the runs finish a few test images apart (97.8-99.3 % measured), which the whole
    axis (from the first epoch's ~25 %) squeezes into one line. A run that ends more than
    _ZOOM_POINTS below the best stays on the main axis only. Returns the inset."""
    last = max(r.eval_step[-1] for r in runs)
    start = last / 2
    tail = [a for r in runs for step, a in zip(r.eval_step, r.test_acc) if step >= start]
    best = max(r.final_test_acc for r in runs)
    low, high = min(r.final_test_acc for r in runs if r.final_test_acc >= best - _ZOOM_POINTS), max(tail)
    inset = ax.inset_axes([0.4, 0.08, 0.56, 0.55])
    for run, style in zip(runs, styles, strict=True):
        inset.plot(run.eval_step, run.test_acc, marker="o", ms=2.5, **style)
    inset.set_xlim(start - 0.02 * last, last * 1.02)
    inset.set_ylim(max(0.0, low - max(0.005, 0.15 * (high - low))), min(high, 1.0) + 0.004)
    inset.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=1))
    inset.tick_params(labelsize=7)
    inset.set_title("the finish, zoomed", fontsize=8)
    ax.indicate_inset_zoom(inset, edgecolor="gray")
    return inset


class BenchResult(Protocol):
    """One model's row of the step benchmark (fused_lr.tools.bench.step.ModelResult)."""

    model: str
    tensors: int
    numel: int
    stream_ms: float
    rows: list[dict]  # each with "name" and "median_ms"


def plot_bench(results: Sequence[BenchResult], path: Path, verdict: str) -> Figure:
    """bench.png: per model, each contender's median ms per step against the streaming bound. The
    run's verdict on its own disturbance is the title's second line, red when DISTURBED: a figure
    passed around alone still says whether to trust it."""
    width = max(7.0, 6.0 * len(results))
    fig = Figure(figsize=(width, 5.2), layout="constrained")
    for ax, r in zip(fig.subplots(1, len(results), squeeze=False)[0], results, strict=True):
        names = [row["name"] for row in r.rows]
        ms = [row["median_ms"] for row in r.rows]
        ax.barh(names, ms, color=["tab:gray" if n.startswith("torch") else "tab:blue" for n in names])
        ax.axvline(r.stream_ms, color="tab:red", linestyle="--", label=f"streaming bound {r.stream_ms:.1f} ms")
        for y, v in enumerate(ms):
            ax.text(v, y, f" {v:.1f}", va="center", fontsize=8)
        ax.margins(x=0.1)  # room for the last bar's label
        ax.set_xlabel("ms per step (median)")
        ax.set_title(f"{r.model} ({r.numel / 1e6:.1f} M params, {r.tensors} tensors)")
        ax.invert_yaxis()
        ax.legend(loc="lower right", fontsize=8)
    disturbed = verdict.startswith("DISTURBED")
    chars = int(12 * width)  # what a line of 9-point text holds across the figure
    fig.suptitle(textwrap.fill("CPU optimizer step: clip_grad_norm + weight decay + momentum + cosine schedule", chars)
                 + "\n" + textwrap.fill(verdict, chars), color="tab:red" if disturbed else "black", fontsize=9)
    _save(fig, path)
    return fig
