"""The digits demo: a small ResNet trained with FusedSGD on scikit-learn's handwritten digits.

``run_demo`` trains once (warm-up + a schedule from :data:`STRATEGIES`, global-norm clipping,
no weight decay on BN and biases) and plots loss, accuracy, lr and gradient norm per step.
``run_compare`` trains the same model once per strategy in :data:`COMPARED` and once with
stock ``torch.optim.SGD`` + ``clip_grad_norm_`` + ``CosineAnnealingLR`` as the control.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn

from fused_lr import FusedSGD, param_groups, schedules
from fused_lr.tools.models import digits_resnet
from fused_lr.tools.plots import plot_compare, plot_run
from fused_lr.tools.strategies import COMPARED, CONTROL, STRATEGIES, default_warmup, fused_schedule

DTYPES = ("float32", "float64")


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
    dtype: str = "float32"


class ConfigError(ValueError):
    """A setting that cannot work, found before anything is trained."""


class Diverged(RuntimeError):
    """The training loss stopped being a finite number."""


@dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_data(device: torch.device, dtype: torch.dtype = torch.float32) -> Data:
    """The 1797 8x8 digits, a fixed stratified 75/25 split (the same for every seed), standardised
    with the training set's mean and std."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    mean, std = x_tr.mean(), x_tr.std()

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.tensor((a - mean) / std, dtype=dtype, device=device).reshape(-1, 1, 8, 8)

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.tensor(a, dtype=torch.long, device=device)

    return Data(images(x_tr), labels(y_tr), images(x_te), labels(y_te))


def total_steps(config: Config, data: Data) -> tuple[int, int]:
    """(steps in the run, batches per epoch); the last partial batch of an epoch is dropped."""
    per_epoch = len(data.y_train) // config.batch_size
    return (config.steps if config.steps is not None else config.epochs * per_epoch), per_epoch


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
    test_acc: list[float] = field(default_factory=list)  # right answers / test images, exact in float64
    optimizer_time_s: float | None = None
    total_time_s: float = 0.0

    @property
    def final_test_acc(self) -> float:
        return self.test_acc[-1]


class _Recorder:
    """Keeps per-step metrics as device tensors and reads them back in batches, so a GPU run
    does not wait for the device after every step; on the CPU reading back costs nothing.
    Each read-back checks the loss, so a diverging run stops there."""

    def __init__(self, history: History, every: int):
        self.history, self.every = history, every
        self.pending: list[torch.Tensor] = []  # one [loss, accuracy, grad norm] row per step

    def add(self, loss: torch.Tensor, acc: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Record a step; True when the rows were just read back."""
        self.pending.append(torch.stack([loss.detach().double(), acc.double(), grad_norm.detach().double()]))
        if len(self.pending) < self.every:
            return False
        self.flush()
        return True

    def flush(self) -> None:
        if not self.pending:
            return
        h = self.history
        for loss, acc, norm in torch.stack(self.pending).tolist():
            h.loss.append(loss)
            h.train_acc.append(acc)
            h.grad_norm.append(norm)
            if not math.isfinite(loss):
                k = len(h.loss)
                raise Diverged(f"{h.name} diverged: the training loss became {loss} at step {k} of {h.steps} "
                               f"(lr {h.lr[k - 1]:.3g} there), so the run stopped with nothing written; try a "
                               f"lower --lr (or --max-grad-norm)")
        self.pending.clear()


def _batches(n: int, batch_size: int, generator: torch.Generator, device: torch.device):
    """Endless shuffled mini-batch indices, an epoch at a time, the last partial batch dropped."""
    while True:
        perm = torch.randperm(n, generator=generator).to(device)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i : i + batch_size]


@torch.no_grad()
def _test_right(model: nn.Module, data: Data) -> torch.Tensor:
    """How many test images the model classifies right (a device tensor: no host sync)."""
    model.eval()
    right = (model(data.x_test).argmax(1) == data.y_test).sum()
    model.train()
    return right


def _progress(console: Console | None) -> Progress:
    metrics = TextColumn("loss {task.fields[loss]:.3f}  acc {task.fields[acc]:6.1%}  lr {task.fields[lr]:.4f}  "
                         "|g| {task.fields[gnorm]:.2f}")
    return Progress(TextColumn("{task.description:>16}"), BarColumn(bar_width=24), MofNCompleteColumn(), metrics,
                    TimeElapsedColumn(), console=console, disable=console is None)


def make_optimizer(config: Config, model: nn.Module, name: str, steps: int, warmup: int = 0):
    """(optimizer, torch scheduler or None) for run ``name``: FusedSGD under the strategy ``name``
    after ``warmup`` warm-up steps or, for name == CONTROL, stock SGD + CosineAnnealingLR."""
    groups = param_groups(model, config.weight_decay)
    if name == CONTROL:
        opt = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    schedule, lr_scale = fused_schedule(name, steps, warmup)
    return FusedSGD(groups, lr=config.lr * lr_scale, momentum=config.momentum, max_grad_norm=config.max_grad_norm,
                    schedule=schedule, backend=config.backend), None


def check(config: Config, names: tuple[str, ...], steps: int, warmup: int = 0) -> None:
    """Try the seed on a generator and build every run's optimizer once, so that torch's and
    FusedSGD's own checks reject a bad setting before any output, not in the middle of a run."""
    try:
        torch.Generator().manual_seed(config.seed)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"--seed {config.seed}: {e}") from None
    device = torch.device(config.device)
    for name in names:
        try:
            make_optimizer(config, digits_resnet().to(device, getattr(torch, config.dtype)), name, steps, warmup)
        except (ValueError, TypeError, RuntimeError) as e:
            raise ConfigError(str(e)) from None


def train(config: Config, data: Data, name: str, progress: Progress | None = None, *, warmup: int = 0,
          time_steps: bool = True) -> History:
    """Train ``digits_resnet`` from seed ``config.seed`` with :func:`make_optimizer`'s optimizer
    for ``name``. ``time_steps`` measures the optimizer's share of the time (on a GPU that costs
    a synchronisation around every step). Raises :class:`Diverged` when the loss is not finite."""
    device = data.x_train.device
    steps, per_epoch = total_steps(config, data)
    torch.manual_seed(config.seed)
    model = digits_resnet().to(device, data.x_train.dtype)
    opt, sched = make_optimizer(config, model, name, steps, warmup)
    history = History(name, steps, "torch" if name == CONTROL else "")

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
            evals.append(_test_right(model, data))
        correct = (logits.detach().argmax(1) == data.y_train[idx]).double().mean()
        if recorder.add(loss, correct, norm) and progress is not None:
            _show(progress, task, history, k + 1, next_lr())
    recorder.flush()
    history.test_acc = [right / len(data.y_test) for right in torch.stack(evals).tolist()]
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
    layer = nn.Linear(4, 2, device=device, dtype=getattr(torch, config.dtype))
    opt = FusedSGD(param_groups(layer, config.weight_decay), lr=0.0, momentum=config.momentum,
                   max_grad_norm=config.max_grad_norm, schedule=schedules.Cosine(10), backend=config.backend)
    layer(torch.ones(1, 4, device=device, dtype=layer.weight.dtype)).sum().backward()
    opt.step()


def _describe(config: Config, data: Data, steps: int, per_epoch: int) -> str:
    n_params = sum(p.numel() for p in digits_resnet().parameters())
    budget = f"{steps} steps" + (f" ({config.epochs} epochs x {per_epoch})" if config.steps is None else "")
    return (f"digits_resnet ({n_params:,} parameters, {config.dtype}) on {len(data.y_train)} training / "
            f"{len(data.y_test)} test digits, {config.device}; {budget}, batch {config.batch_size}, lr {config.lr}, "
            f"momentum {config.momentum}, weight decay {config.weight_decay} (none on BN/bias), max_grad_norm "
            f"{config.max_grad_norm}, seed {config.seed}")


def _prepare(config: Config) -> tuple[torch.device, Data, int, int]:
    if config.dtype not in DTYPES:
        raise ConfigError(f"--dtype {config.dtype}: the demo trains in {' or '.join(DTYPES)}")
    device = torch.device(config.device)
    data = load_data(device, getattr(torch, config.dtype))
    if config.batch_size > len(data.y_train):
        raise ConfigError(f"--batch-size {config.batch_size} exceeds the {len(data.y_train)} training images")
    steps, per_epoch = total_steps(config, data)
    return device, data, steps, per_epoch


def _right_of(acc: float, data: Data) -> str:
    n = len(data.y_test)
    return f"{acc:.2%} ({round(acc * n)}/{n})"


def run_demo(config: Config, out: Path, progress_console: Console | None = None) -> History:
    """Train once with FusedSGD, print the test accuracy, write ``demo.png`` and ``demo.json``."""
    device, data, steps, per_epoch = _prepare(config)
    warmup = default_warmup(steps) if config.warmup is None else config.warmup
    if warmup >= steps:
        raise ConfigError(f"--warmup {warmup} must be smaller than the number of steps ({steps})")
    check(config, (config.schedule,), steps, warmup)
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
    print(f"backend {history.backend}: test accuracy {_right_of(history.final_test_acc, data)}; "
          f"time {wall:.1f} s (training {history.total_time_s:.1f} s{opt})")
    print(f"wrote {png} and {js}")
    return history


def run_compare(config: Config, out: Path, progress_console: Console | None = None) -> list[History]:
    """Train once per strategy in COMPARED and once as the torch control; print the table, write
    ``compare.png`` and ``compare.csv``."""
    device, data, steps, per_epoch = _prepare(config)
    check(config, COMPARED, steps)
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
        table.add_row(r.name, r.backend, _right_of(r.final_test_acc, data), f"{r.optimizer_time_s:.2f}",
                      f"{r.total_time_s:.2f}")
    Console(width=100).print(table)
    print(_twins(runs, config, data))

    png, table_csv = out / "compare.png", out / "compare.csv"
    plot_compare(runs, png)
    with table_csv.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["strategy", "backend", "test_accuracy", "optimizer_time_s", "total_time_s"])
        writer.writerows([r.name, r.backend, r.final_test_acc, f"{r.optimizer_time_s:.3f}", f"{r.total_time_s:.3f}"]
                         for r in runs)
    print(f"wrote {png} and {table_csv}")
    return runs


def _twins(runs: list[History], config: Config, data: Data) -> str:
    """Says how far FusedSGD's cosine run and the torch control (the same recipe) ended apart, and why."""
    fused, control = (next(r for r in runs if r.name == name) for name in ("cosine", CONTROL))
    rel = [abs(a - b) / abs(b) for a, b in zip(fused.loss, control.loss)]
    agree = next((k for k, r in enumerate(rel) if r > 1e-3), len(rel))
    if agree == len(rel):
        how = f"their per-step losses agree to {max(rel):.0e} relative over all {len(rel)} steps"
    else:
        how = f"their per-step losses agree to 1e-3 relative for {agree} steps, then drift apart"
    n = len(data.y_test)
    images = abs(round(fused.final_test_acc * n) - round(control.final_test_acc * n))
    why = ("That is float32 rounding: the fused step rounds in another order than torch's SGD + clip_grad_norm_, "
           "a few ulps a step, which training compounds; with --dtype float64 the two agree to float64 rounding."
           if config.dtype == "float32" else "Only float64 rounding separates them.")
    return (f"cosine and {CONTROL} run the same recipe: {how}, and they end {images} test "
            f"image{'' if images == 1 else 's'} apart. {why}")
