"""The digits demo: a small ResNet trained with a fused optimizer on scikit-learn's handwritten digits.

``run_demo`` trains once with one of :data:`OPTIMIZERS` (warm-up + a schedule from
:data:`STRATEGIES`, global-norm clipping, no weight decay on BN and biases) and plots loss,
accuracy, lr and gradient norm per step. ``run_compare`` trains the same model once per run of
:data:`COMPARE_RUNS`: FusedSGD under each classic schedule, the adaptive strategies (AdamW,
RMSprop, the gradient-norm rate) and stock ``torch.optim.SGD`` + ``clip_grad_norm_`` +
``CosineAnnealingLR`` as the control.
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

import fused_lr
from fused_lr import param_groups
from fused_lr.tools.models import digits_resnet
from fused_lr.tools.plots import plot_compare, plot_run
from fused_lr.tools.strategies import (
    COMPARE_RUNS,
    COMPARED,
    CONTROL,
    OPTIMIZERS,
    STRATEGIES,
    Run,
    default_warmup,
    fused_schedule,
)

DTYPES = ("float32", "float64")


@dataclass
class Config:
    """A demo's settings. ``lr``, ``momentum`` and ``weight_decay`` belong to ``optimizer``; None
    takes that optimizer's default from OPTIMIZERS (:meth:`settings`). In ``--compare`` they set
    the runs of ``optimizer``; the runs of other optimizers take their defaults."""

    steps: int | None = None  # None: epochs x batches per epoch
    epochs: int = 20
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    max_grad_norm: float = 1.0
    lr_norm_power: float = 0.0  # the gradient-norm rate of the single run (docs/step.md)
    warmup: int | None = None  # None: 5% of the steps
    schedule: str = "cosine"
    seed: int = 0
    backend: str = "auto"
    device: str = "cpu"
    dtype: str = "float32"

    def settings(self, optimizer: str) -> tuple[float, float, float | None]:
        """(lr, weight decay, momentum or None) of a run with ``optimizer``."""
        spec = OPTIMIZERS[optimizer]
        if optimizer != self.optimizer:
            return spec.lr, spec.weight_decay, spec.momentum
        return (spec.lr if self.lr is None else self.lr,
                spec.weight_decay if self.weight_decay is None else self.weight_decay,
                spec.momentum if self.momentum is None else self.momentum)

    def single_run(self) -> Run:
        return Run(self.schedule, self.optimizer, self.schedule, self.lr_norm_power)


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
    optimizer: str  # the class that ran: FusedSGD, ..., torch.optim.SGD for the control
    backend: str
    lr_norm_power: float = 0.0  # the gradient-norm rate's power; 0: off
    loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)  # with the gradient-norm rate: the effective lr
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
    Each read-back checks the loss, so a diverging run stops there.

    With the gradient-norm rate (``power`` > 0) the lr recorded is the effective one,
    lr x s(k) x (N + eps)^-power (docs/step.md, "The gradient-norm rate"), computed on the host
    from the norm N when the rows are read back, so it costs no extra synchronisation."""

    def __init__(self, history: History, every: int, power: float = 0.0, eps: float = 0.0):
        self.history, self.every, self.power, self.eps = history, every, power, eps
        self.pending: list[torch.Tensor] = []  # one [loss, accuracy, grad norm] row per step
        self.scheduled: list[float] = []  # lr x s(k) per pending step, known on the host

    def add(self, loss: torch.Tensor, acc: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> bool:
        """Record a step and the scheduled lr it ran with; True when the rows were just read back."""
        self.pending.append(torch.stack([loss.detach().double(), acc.double(), grad_norm.detach().double()]))
        self.scheduled.append(lr)
        if len(self.pending) < self.every:
            return False
        self.flush()
        return True

    def flush(self) -> None:
        if not self.pending:
            return
        h = self.history
        for (loss, acc, norm), lr in zip(torch.stack(self.pending).tolist(), self.scheduled, strict=True):
            h.loss.append(loss)
            h.train_acc.append(acc)
            h.grad_norm.append(norm)
            h.lr.append(lr * (norm + self.eps) ** -self.power if self.power else lr)
            if not math.isfinite(loss):
                k = len(h.loss)
                raise Diverged(f"{h.name} diverged: the training loss became {loss} at step {k} of {h.steps} "
                               f"(lr {h.lr[k - 1]:.3g} there), so the run stopped with nothing written; try a "
                               f"lower --lr (or --max-grad-norm)")
        self.pending.clear()
        self.scheduled.clear()


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


def optimizer_name(run: Run) -> str:
    return "torch.optim.SGD" if run.name == CONTROL else OPTIMIZERS[run.optimizer].cls


def make_optimizer(config: Config, model: nn.Module, run: Run, steps: int, warmup: int = 0):
    """(optimizer, torch scheduler or None) for ``run``: its fused optimizer under its schedule
    after ``warmup`` warm-up steps or, for the CONTROL run, stock SGD + CosineAnnealingLR."""
    lr, weight_decay, momentum = config.settings(run.optimizer)
    groups = param_groups(model, weight_decay)
    if run.name == CONTROL:
        opt = torch.optim.SGD(groups, lr=lr, momentum=momentum)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    spec = OPTIMIZERS[run.optimizer]
    schedule, lr_scale = fused_schedule(run.schedule, steps, warmup)
    kwargs = spec.fixed if momentum is None else {**spec.fixed, "momentum": momentum}
    cls = getattr(fused_lr, spec.cls)
    return cls(groups, lr=lr * lr_scale * run.lr_scale, max_grad_norm=config.max_grad_norm, schedule=schedule,
               lr_norm_power=run.lr_norm_power, backend=config.backend, **kwargs), None


def check(config: Config, runs: tuple[Run, ...], steps: int, warmup: int = 0) -> None:
    """Try the seed on a generator and build every run's optimizer once, so that torch's and
    the fused optimizers' own checks reject a bad setting before any output, not in the middle
    of a run."""
    try:
        torch.Generator().manual_seed(config.seed)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"--seed {config.seed}: {e}") from None
    device = torch.device(config.device)
    for run in runs:
        try:
            make_optimizer(config, digits_resnet().to(device, getattr(torch, config.dtype)), run, steps, warmup)
        except (ValueError, TypeError, RuntimeError) as e:
            # named for the optimizer that refused, which --compare's many runs need
            who = optimizer_name(run)
            raise ConfigError(str(e) if str(e).startswith(who) else f"{who}: {e}") from None


def train(config: Config, data: Data, run: Run, progress: Progress | None = None, *, warmup: int = 0,
          time_steps: bool = True) -> History:
    """Train ``digits_resnet`` from seed ``config.seed`` with :func:`make_optimizer`'s optimizer
    for ``run``. ``time_steps`` measures the optimizer's share of the time (on a GPU that costs
    a synchronisation around every step). Raises :class:`Diverged` when the loss is not finite."""
    device = data.x_train.device
    steps, per_epoch = total_steps(config, data)
    torch.manual_seed(config.seed)
    model = digits_resnet().to(device, data.x_train.dtype)
    opt, sched = make_optimizer(config, model, run, steps, warmup)
    name = run.name
    history = History(name, steps, optimizer_name(run), "torch" if name == CONTROL else "", run.lr_norm_power)
    sync = time_steps and device.type == "cuda"  # CUDA runs asynchronously: time it synchronised
    recorder = _Recorder(history, every=1 if device.type == "cpu" else 25, power=run.lr_norm_power,
                         eps=getattr(opt, "lr_norm_eps", 0.0))
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
        lr = _lr_of_step(opt, k)
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
        if recorder.add(loss, correct, norm, lr) and progress is not None:
            _show(progress, task, history, k + 1)
    recorder.flush()
    history.test_acc = [right / len(data.y_test) for right in torch.stack(evals).tolist()]
    history.total_time_s = time.perf_counter() - start
    history.optimizer_time_s = opt_time if time_steps else None
    if name != CONTROL:
        history.backend = opt.backend
    if progress is not None:
        _show(progress, task, history, steps)
    return history


def _lr_of_step(opt: torch.optim.Optimizer, k: int) -> float:
    """The scheduled lr step ``k`` runs with. For a fused optimizer that is what ``current_lr()``
    reports, computed from the host's step count instead of reading ``k`` back from the device."""
    group = opt.param_groups[0]
    schedule = group.get("schedule")
    return group["lr"] * (1.0 if schedule is None else schedule(k))


def _show(progress: Progress, task, history: History, done: int) -> None:
    recent = history.train_acc[-20:]
    progress.update(task, completed=done, loss=history.loss[-1], acc=sum(recent) / len(recent), lr=history.lr[-1],
                    gnorm=history.grad_norm[-1])


def warm_up(config: Config, device: torch.device, runs: tuple[Run, ...]) -> None:
    """One throwaway step per fused optimizer in ``runs`` (lr 0), so that a backend's one-off JIT
    compilation (numba) is not counted in the timed runs."""
    seen = set()
    for run in runs:
        if run.name == CONTROL or (run.optimizer, run.lr_norm_power) in seen:
            continue
        seen.add((run.optimizer, run.lr_norm_power))
        layer = nn.Linear(4, 2, device=device, dtype=getattr(torch, config.dtype))
        opt, _ = make_optimizer(config, layer, run, steps=10)
        for group in opt.param_groups:
            group["lr"] = 0.0
        layer(torch.ones(1, 4, device=device, dtype=layer.weight.dtype)).sum().backward()
        opt.step()


def _describe(config: Config, data: Data, steps: int, per_epoch: int) -> str:
    n_params = sum(p.numel() for p in digits_resnet().parameters())
    budget = f"{steps} steps" + (f" ({config.epochs} epochs x {per_epoch})" if config.steps is None else "")
    return (f"digits_resnet ({n_params:,} parameters, {config.dtype}) on {len(data.y_train)} training / "
            f"{len(data.y_test)} test digits, {config.device}; {budget}, batch {config.batch_size}, max_grad_norm "
            f"{config.max_grad_norm}, seed {config.seed}")


def _settings(config: Config, optimizer: str) -> str:
    """The settings of ``optimizer``'s runs, as the header prints them."""
    lr, weight_decay, momentum = config.settings(optimizer)
    spec = OPTIMIZERS[optimizer]
    extra = "".join(f", {key} {value}" for key, value in
                    [*([] if momentum is None else [("momentum", momentum)]), *spec.fixed.items()])
    return f"{spec.cls} lr {lr}{extra}, weight decay {weight_decay} (none on BN/bias)"


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


def _rate(power: float) -> str:
    return f"the gradient-norm rate lr x s(k) / (|g| + eps)^{power:g}"


def run_demo(config: Config, out: Path, progress_console: Console | None = None) -> History:
    """Train once with ``config.optimizer``, print the test accuracy, write ``demo-OPTIMIZER.png`` and
    ``demo-OPTIMIZER.json`` (named by the optimizer, so the runs of different optimizers sit side by side)."""
    device, data, steps, per_epoch = _prepare(config)
    warmup = default_warmup(steps) if config.warmup is None else config.warmup
    if warmup >= steps:
        raise ConfigError(f"--warmup {warmup} must be smaller than the number of steps ({steps})")
    run = config.single_run()
    check(config, (run,), steps, warmup)
    print(f"fused-lr demo: {_describe(config, data, steps, per_epoch)}")
    print(f"optimizer: {_settings(config, config.optimizer)}"
          + (f"; {_rate(run.lr_norm_power)}" if run.lr_norm_power else ""))
    print(f"schedule: {warmup} warm-up steps, then {config.schedule} ({STRATEGIES[config.schedule].about})")
    start = time.perf_counter()
    warm_up(config, device, (run,))
    with _progress(progress_console) as progress:
        history = train(config, data, run, progress, warmup=warmup, time_steps=device.type == "cpu")
    wall = time.perf_counter() - start
    png, js = out / f"demo-{config.optimizer}.png", out / f"demo-{config.optimizer}.json"
    plot_run(history, png, max_grad_norm=config.max_grad_norm, warmup=warmup)
    js.write_text(json.dumps({"config": asdict(config), "warmup": warmup, "wall_time_s": wall, **asdict(history),
                              "final_test_acc": history.final_test_acc}, indent=1))
    opt = "" if history.optimizer_time_s is None else f", optimizer steps {history.optimizer_time_s:.2f} s"
    print(f"{history.optimizer} on backend {history.backend}: test accuracy {_right_of(history.final_test_acc, data)}"
          f"; time {wall:.1f} s (training {history.total_time_s:.1f} s{opt})")
    print(f"wrote {png} and {js}")
    return history


def _about(run: Run) -> str:
    """How a run of --compare sets its step size, for the header."""
    if run.name == CONTROL:
        return "torch.optim.SGD + clip_grad_norm_ + CosineAnnealingLR, the stock recipe of the cosine run"
    about = f"{OPTIMIZERS[run.optimizer].cls} under {run.schedule}"
    if run.lr_norm_power:
        about += f" with {_rate(run.lr_norm_power)}, lr x {run.lr_scale:g}"
    elif run.optimizer != "sgd":
        about += f" ({OPTIMIZERS[run.optimizer].about})"
    return about


def run_compare(config: Config, out: Path, progress_console: Console | None = None) -> list[History]:
    """Train once per run of COMPARE_RUNS; print the table, write ``compare.png``,
    ``compare.csv`` and ``compare.json``."""
    device, data, steps, per_epoch = _prepare(config)
    check(config, COMPARE_RUNS, steps)
    print(f"fused-lr demo --compare: {_describe(config, data, steps, per_epoch)}")
    for optimizer in dict.fromkeys(r.optimizer for r in COMPARE_RUNS):
        print(f"  {_settings(config, optimizer)}")
    print(f"{len(COMPARE_RUNS)} runs without warm-up, from the same weights on the same batches: FusedSGD under "
          f"{len(COMPARED)} schedules ({', '.join(COMPARED)}), and")
    for run in COMPARE_RUNS:
        if run.name not in COMPARED:
            print(f"  {run.name}: {_about(run)}")
    warm_up(config, device, COMPARE_RUNS)
    with _progress(progress_console) as progress:
        runs = [train(config, data, run, progress) for run in COMPARE_RUNS]

    table = Table(title=f"digits_resnet, {steps} steps per run, seed {config.seed}")
    for col in ("run", "optimizer", "backend", "test accuracy", "optimizer steps (s)", "total (s)"):
        table.add_column(col, justify="left" if col in ("run", "optimizer", "backend") else "right")
    for r in runs:
        table.add_row(r.name, r.optimizer, r.backend, _right_of(r.final_test_acc, data), f"{r.optimizer_time_s:.2f}",
                      f"{r.total_time_s:.2f}")
    Console(width=110).print(table)
    print(_twins(runs, config, data))

    png, table_csv, js = out / "compare.png", out / "compare.csv", out / "compare.json"
    plot_compare(runs, png)
    with table_csv.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["strategy", "optimizer", "backend", "test_accuracy", "optimizer_time_s", "total_time_s"])
        writer.writerows([r.name, r.optimizer, r.backend, r.final_test_acc, f"{r.optimizer_time_s:.3f}",
                          f"{r.total_time_s:.3f}"] for r in runs)
    js.write_text(json.dumps({"config": asdict(config), "runs": [
        {**asdict(r), "schedule": spec.schedule, "lr_norm_power": spec.lr_norm_power,
         "final_test_acc": r.final_test_acc} for spec, r in zip(COMPARE_RUNS, runs)]},
        indent=1))
    print(f"wrote {png}, {table_csv} and {js}")
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
