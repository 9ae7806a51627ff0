"""The digits demo: a small ResNet trained with FusedSGD on scikit-learn's handwritten digits.

``run_demo`` trains once (warm-up + a schedule from :data:`STRATEGIES`, global-norm clipping,
no weight decay on BN and biases) and plots loss, accuracy, lr and gradient norm per step.
``run_compare`` trains the same model once per seed strategy in :data:`COMPARED` and once with
stock ``torch.optim.SGD`` + ``clip_grad_norm_`` + ``CosineAnnealingLR`` as the control.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn

from fused_lr import FusedSGD, param_groups, schedules
from fused_lr.tools.models import digits_resnet


class Strategy(NamedTuple):
    """A schedule sized to a run of ``total`` steps. ``lr_scale`` multiplies the group lr so that
    every strategy peaks at the requested ``--lr`` (Cyclic treats the group lr as its low end)."""

    make: Callable[[int], schedules.Schedule]
    lr_scale: float
    about: str


_CYCLIC_PEAK = 10.0

# The schedule catalogue sized for the demo: every one decays over the run (or cycles) so a
# run of any length ends near its intended final lr.
STRATEGIES: dict[str, Strategy] = {
    "constant": Strategy(lambda t: schedules.Constant(), 1.0, "lr throughout"),
    "step": Strategy(lambda t: schedules.Step(max(1, t // 3), 0.1), 1.0, "x0.1 every third of the run"),
    "multistep": Strategy(lambda t: schedules.MultiStep(sorted({max(1, t // 2), max(2, 3 * t // 4)}), 0.1), 1.0,
                          "x0.1 at 1/2 and 3/4 of the run"),
    "exponential": Strategy(lambda t: schedules.Exponential(0.01 ** (1 / t)), 1.0, "gamma^k down to lr/100"),
    "linear": Strategy(lambda t: schedules.Linear(1.0, 0.01, t), 1.0, "lr -> lr/100 linearly"),
    "polynomial": Strategy(lambda t: schedules.Polynomial(t, power=2.0), 1.0, "(1 - k/T)^2"),
    "cosine": Strategy(lambda t: schedules.Cosine(t), 1.0, "half cosine to 0"),
    "cosine-restarts": Strategy(lambda t: schedules.CosineRestarts(max(1, t // 3)), 1.0, "three cosine cycles"),
    "cyclic": Strategy(lambda t: schedules.Cyclic(_CYCLIC_PEAK, max(1, t // 8), mode="triangular2"),
                       1 / _CYCLIC_PEAK, "triangular2 between lr/10 and lr, 4 cycles"),
    "one-cycle": Strategy(lambda t: schedules.OneCycle(max(t, 4)), 1.0, "up to lr over 30%, then down"),
    "inverse-time": Strategy(lambda t: schedules.InverseTime(1.0, max(1, t // 10)), 1.0,
                             "lr / (1 + 10 k/T)"),
    "inverse-sqrt": Strategy(lambda t: schedules.InverseSqrt(max(1, t // 20)), 1.0,
                             "linear warm-up over 5%, then 1/sqrt(k)"),
    "power-law": Strategy(lambda t: schedules.PowerLaw(0.01, 2.0, t), 1.0, "0.01^((k/T)^2)"),
}

# The seeds' strategies, in the order the comparison lists them.
COMPARED = ("constant", "step", "exponential", "linear", "polynomial", "cosine", "cyclic", "inverse-time",
            "one-cycle")
CONTROL = "torch-sgd-cosine"


@dataclass
class Config:
    steps: int | None = None  # None: epochs x batches per epoch
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    max_grad_norm: float = 1.0
    warmup: int | None = None  # None: 5% of the steps
    schedule: str = "cosine"
    seed: int = 0
    backend: str = "auto"
    device: str = "cpu"


@dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_data(device: torch.device) -> Data:
    """The 1797 8x8 digits, a fixed stratified 75/25 split (the same for every seed), standardised
    with the training set's mean and std."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    mean, std = x_tr.mean(), x_tr.std()

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.tensor((a - mean) / std, dtype=torch.float32, device=device).reshape(-1, 1, 8, 8)

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.tensor(a, dtype=torch.long, device=device)

    return Data(images(x_tr), labels(y_tr), images(x_te), labels(y_te))


def total_steps(config: Config, data: Data) -> tuple[int, int]:
    """(steps in the run, batches per epoch); the last partial batch of an epoch is dropped."""
    per_epoch = len(data.y_train) // config.batch_size
    return (config.steps if config.steps is not None else config.epochs * per_epoch), per_epoch


def default_warmup(steps: int) -> int:
    return steps // 20


def fused_schedule(name: str, steps: int, warmup: int) -> tuple[schedules.Schedule, float]:
    """The schedule for a run of ``steps`` steps with ``warmup`` of them warming up linearly
    from 0, and the lr scale of the strategy."""
    strategy = STRATEGIES[name]
    if warmup == 0:
        return strategy.make(steps), strategy.lr_scale
    return schedules.Warmup(warmup, strategy.make(steps - warmup)), strategy.lr_scale


@dataclass
class History:
    name: str
    steps: int
    backend: str
    loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    optimizer_time_s: float | None = None
    total_time_s: float = 0.0

    @property
    def final_test_acc(self) -> float:
        return self.test_acc[-1]


class _Recorder:
    """Keeps per-step metrics as device tensors and reads them back in batches, so a GPU run
    does not wait for the device after every step; on the CPU reading back costs nothing."""

    def __init__(self, history: History, every: int):
        self.history, self.every = history, every
        self.pending: list[torch.Tensor] = []  # one [loss, accuracy, grad norm] row per step

    def add(self, loss: torch.Tensor, acc: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Record a step; True when the rows were just read back."""
        self.pending.append(torch.stack([loss.detach().float(), acc.float(), grad_norm.detach().float()]))
        if len(self.pending) < self.every:
            return False
        self.flush()
        return True

    def flush(self) -> None:
        if not self.pending:
            return
        for loss, acc, norm in torch.stack(self.pending).tolist():
            self.history.loss.append(loss)
            self.history.train_acc.append(acc)
            self.history.grad_norm.append(norm)
        self.pending.clear()


def _batches(n: int, batch_size: int, generator: torch.Generator, device: torch.device):
    """Endless shuffled mini-batch indices, an epoch at a time, the last partial batch dropped."""
    while True:
        perm = torch.randperm(n, generator=generator).to(device)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i : i + batch_size]


@torch.no_grad()
def _test_accuracy(model: nn.Module, data: Data) -> torch.Tensor:
    model.eval()
    acc = (model(data.x_test).argmax(1) == data.y_test).float().mean()
    model.train()
    return acc


def _progress(console: Console | None) -> Progress:
    metrics = TextColumn("loss {task.fields[loss]:.3f}  acc {task.fields[acc]:6.1%}  lr {task.fields[lr]:.4f}  "
                         "|g| {task.fields[gnorm]:.2f}")
    return Progress(TextColumn("{task.description:>16}"), BarColumn(bar_width=24), MofNCompleteColumn(), metrics,
                    TimeElapsedColumn(), console=console, disable=console is None)


def train(config: Config, data: Data, name: str, progress: Progress | None = None, *, warmup: int = 0,
          time_steps: bool = True) -> History:
    """Train ``digits_resnet`` from seed ``config.seed``: with FusedSGD under the strategy
    ``name`` (after ``warmup`` warm-up steps), or with name == CONTROL, stock SGD +
    clip_grad_norm_ + CosineAnnealingLR. ``time_steps`` measures the optimizer's share of
    the time (on a GPU that costs a synchronisation around every step)."""
    device = data.x_train.device
    steps, per_epoch = total_steps(config, data)
    torch.manual_seed(config.seed)
    model = digits_resnet().to(device)
    groups = param_groups(model, config.weight_decay)
    if name == CONTROL:
        opt = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        history = History(name, steps, "torch")
    else:
        schedule, lr_scale = fused_schedule(name, steps, warmup)
        opt = FusedSGD(groups, lr=config.lr * lr_scale, momentum=config.momentum,
                       max_grad_norm=config.max_grad_norm, schedule=schedule, backend=config.backend)
        history = History(name, steps, "")

    def next_lr() -> float:  # for the progress bar; FusedSGD reads its step count from the device
        return sched.get_last_lr()[0] if name == CONTROL else opt.current_lr()[0]

    sync = time_steps and device.type == "cuda"  # CUDA runs asynchronously: time it synchronised
    recorder = _Recorder(history, every=1 if device.type == "cpu" else 25)
    task = None if progress is None else progress.add_task(name, total=steps, loss=math.nan, acc=0.0, lr=0.0,
                                                           gnorm=math.nan)
    batches = _batches(len(data.y_train), config.batch_size, torch.Generator().manual_seed(config.seed), device)
    evals: list[torch.Tensor] = []
    opt_time = 0.0
    start = time.perf_counter()
    model.train()
    for k in range(steps):
        idx = next(batches)
        logits = model(data.x_train[idx])
        loss = nn.functional.cross_entropy(logits, data.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        history.lr.append(_lr_of_step(opt, k))
        if sync:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        if name == CONTROL:
            norm = nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            opt.step()
            sched.step()
        else:
            opt.step()
            norm = opt.last_grad_norm
        if sync:
            torch.cuda.synchronize(device)
        opt_time += time.perf_counter() - t0
        if (k + 1) % per_epoch == 0 or k + 1 == steps:
            history.eval_step.append(k + 1)
            evals.append(_test_accuracy(model, data))
        correct = (logits.detach().argmax(1) == data.y_train[idx]).float().mean()
        if recorder.add(loss, correct, norm) and progress is not None:
            _show(progress, task, history, k + 1, next_lr())
    recorder.flush()
    history.test_acc = torch.stack(evals).tolist()
    history.total_time_s = time.perf_counter() - start
    history.optimizer_time_s = opt_time if time_steps else None
    if name != CONTROL:
        history.backend = opt.backend
    if progress is not None:
        _show(progress, task, history, steps, next_lr())
    return history


def _lr_of_step(opt: torch.optim.Optimizer, k: int) -> float:
    """The lr step ``k`` runs with. For FusedSGD that is what ``current_lr()`` reports, computed
    from the host's step count instead of reading ``k`` back from the device."""
    group = opt.param_groups[0]
    schedule = group.get("schedule")
    return group["lr"] * (1.0 if schedule is None else schedule(k))


def _show(progress: Progress, task, history: History, done: int, lr: float) -> None:
    recent = history.train_acc[-20:]
    progress.update(task, completed=done, loss=history.loss[-1], acc=sum(recent) / len(recent), lr=lr,
                    gnorm=history.grad_norm[-1])


def warm_up(config: Config, device: torch.device) -> None:
    """One throwaway FusedSGD step, so that a backend's one-off JIT compilation (numba) is not
    counted in the timed runs."""
    layer = nn.Linear(4, 2, device=device)
    opt = FusedSGD(param_groups(layer, config.weight_decay), lr=0.0, momentum=config.momentum,
                   max_grad_norm=config.max_grad_norm, schedule=schedules.Cosine(10), backend=config.backend)
    layer(torch.ones(1, 4, device=device)).sum().backward()
    opt.step()


def _describe(config: Config, data: Data, steps: int, per_epoch: int) -> str:
    n_params = sum(p.numel() for p in digits_resnet().parameters())
    budget = f"{steps} steps" + (f" ({config.epochs} epochs x {per_epoch})" if config.steps is None else "")
    return (f"digits_resnet ({n_params:,} parameters) on {len(data.y_train)} training / {len(data.y_test)} test "
            f"digits, {config.device}; {budget}, batch {config.batch_size}, lr {config.lr}, momentum "
            f"{config.momentum}, weight decay {config.weight_decay} (none on BN/bias), max_grad_norm "
            f"{config.max_grad_norm}, seed {config.seed}")


class ConfigError(ValueError):
    """A setting that cannot work, found before anything is trained."""


def _prepare(config: Config) -> tuple[torch.device, Data, int, int]:
    device = torch.device(config.device)
    data = load_data(device)
    if config.batch_size > len(data.y_train):
        raise ConfigError(f"--batch-size {config.batch_size} exceeds the {len(data.y_train)} training images")
    steps, per_epoch = total_steps(config, data)
    return device, data, steps, per_epoch


def run_demo(config: Config, out: Path, progress_console: Console | None = None) -> History:
    """Train once with FusedSGD, print the test accuracy, write ``demo.png`` and ``demo.json``."""
    from .plots import plot_run

    device, data, steps, per_epoch = _prepare(config)
    warmup = default_warmup(steps) if config.warmup is None else config.warmup
    if warmup >= steps:
        raise ConfigError(f"--warmup {warmup} must be smaller than the number of steps ({steps})")
    print(f"fused-lr demo: {_describe(config, data, steps, per_epoch)}")
    print(f"schedule: {warmup} warm-up steps, then {config.schedule} ({STRATEGIES[config.schedule].about})")
    start = time.perf_counter()
    warm_up(config, device)
    with _progress(progress_console) as progress:
        history = train(config, data, config.schedule, progress, warmup=warmup, time_steps=device.type == "cpu")
    wall = time.perf_counter() - start
    png, js = out / "demo.png", out / "demo.json"
    plot_run(history, png, max_grad_norm=config.max_grad_norm, warmup=warmup)
    js.write_text(json.dumps({"config": asdict(config), "warmup": warmup, "wall_time_s": wall, **asdict(history),
                              "final_test_acc": history.final_test_acc}, indent=1))
    opt = "" if history.optimizer_time_s is None else f", optimizer steps {history.optimizer_time_s:.2f} s"
    print(f"backend {history.backend}: test accuracy {history.final_test_acc:.2%} "
          f"({round(history.final_test_acc * len(data.y_test))}/{len(data.y_test)}); "
          f"time {wall:.1f} s (training {history.total_time_s:.1f} s{opt})")
    print(f"wrote {png} and {js}")
    return history


def run_compare(config: Config, out: Path, progress_console: Console | None = None) -> list[History]:
    """Train once per strategy in COMPARED and once as the torch control; print the table, write
    ``compare.png`` and ``compare.csv``."""
    from .plots import plot_compare

    device, data, steps, per_epoch = _prepare(config)
    print(f"fused-lr demo --compare: {_describe(config, data, steps, per_epoch)}")
    print(f"{len(COMPARED)} FusedSGD strategies without warm-up, and the control {CONTROL}: torch.optim.SGD + "
          f"clip_grad_norm_ + CosineAnnealingLR; every run starts from the same weights and sees the same batches")
    warm_up(config, device)
    with _progress(progress_console) as progress:
        runs = [train(config, data, name, progress) for name in (*COMPARED, CONTROL)]

    table = Table(title=f"digits_resnet, {steps} steps per run, seed {config.seed}")
    for col in ("strategy", "backend", "test accuracy", "optimizer steps (s)", "total (s)"):
        table.add_column(col, justify="left" if col in ("strategy", "backend") else "right")
    for r in runs:
        table.add_row(r.name, r.backend, f"{r.final_test_acc:.2%}", f"{r.optimizer_time_s:.2f}",
                      f"{r.total_time_s:.2f}")
    Console(width=100).print(table)

    png, table_csv = out / "compare.png", out / "compare.csv"
    plot_compare(runs, png)
    with table_csv.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["strategy", "backend", "test_accuracy", "optimizer_time_s", "total_time_s"])
        writer.writerows([r.name, r.backend, r.final_test_acc, r.optimizer_time_s, r.total_time_s] for r in runs)
    print(f"wrote {png} and {table_csv}")
    return runs
