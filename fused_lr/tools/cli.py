"""The ``fused-lr`` command: ``demo`` (and ``demo --compare``), ``bench`` (fused_lr/tools/bench/), ``info``.

Start-up imports nothing heavy: ``--help``, ``--version`` and argument errors answer without
torch, and each command imports what it uses. The demo's extra packages (``fused_lr[demo]``)
are checked for before the demo is imported, so a plain install gets a one-line hint.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from fused_lr import __version__
from fused_lr.tools.strategies import ADAPTIVE, COMPARED, NORM_RATE_POWER, OPTIMIZERS, STRATEGIES

DEMO_EPOCHS = 20
COMPARE_EPOCHS = 8  # per run: the 13 runs of --compare take about 5x the steps of one demo (2184 vs 420)
# import name -> distribution, for the packages the [demo] extra installs
DEMO_EXTRA = {"rich": "rich", "sklearn": "scikit-learn", "matplotlib": "matplotlib"}


class CommandError(Exception):
    """A command that cannot go on; reported in one line, without a traceback."""

    exit_code = 1


class UsageError(CommandError):
    """A bad argument found after parsing."""

    exit_code = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors in one line (the benchmarks' parsers are ones too)."""

    def error(self, message: str):
        # one line instead of argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _integer(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


def _number(text: str) -> float:
    """Any float: the ranges are the fused optimizers' to check (see demo.check), so the CLI
    cannot disagree with the library about them."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


_positive_int, _non_negative_int = _integer(1), _integer(0)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fused-lr", description="fused_lr: clipping, weight decay, momentum and a scheduled "
                     "lr in one fused optimizer step.")
    parser.add_argument("--version", action="version", version=f"fused_lr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,bench,info}")

    defaults = "; ".join(
        f"{name}: lr {o.lr}, weight decay {o.weight_decay}" + ("" if o.momentum is None else f", momentum {o.momentum}")
        for name, o in OPTIMIZERS.items())
    demo = sub.add_parser(
        "demo", help="train a small ResNet on scikit-learn's digits with a fused optimizer",
        description="Train fused_lr.tools.models.digits_resnet on scikit-learn's 8x8 handwritten digits (fixed 75/25 "
                    "split) with the fused --optimizer: linear warm-up then --schedule, global-norm clipping, no "
                    "weight decay on BN/bias. Prints the held-out accuracy and writes demo-OPTIMIZER.png (loss, "
                    "accuracy, lr, gradient norm per step) and demo-OPTIMIZER.json to --out. With --compare: "
                    f"FusedSGD under each classic schedule ({', '.join(COMPARED)}), the adaptive strategies "
                    f"({', '.join(r.name for r in ADAPTIVE)}) and stock torch.optim.SGD + clip_grad_norm_ + "
                    f"CosineAnnealingLR as the control, {COMPARE_EPOCHS} epochs each by default, no warm-up; writes "
                    f"compare.png, compare.csv and compare.json. Optimizer defaults: {defaults}.")
    budget = demo.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=_positive_int,
                        help=f"passes over the training set (default {DEMO_EPOCHS}; {COMPARE_EPOCHS} per run "
                             "with --compare)")
    budget.add_argument("--steps", type=_positive_int, help="optimizer steps in total, instead of --epochs")
    demo.add_argument("--batch-size", type=_positive_int, default=64, help="default 64")
    demo.add_argument("--optimizer", choices=list(OPTIMIZERS), default=None,
                      help="the fused optimizer (default sgd; --compare runs a fixed set)")
    demo.add_argument("--lr", type=_number, default=None,
                      help="peak learning rate (default: the --optimizer's, listed above)")
    demo.add_argument("--momentum", type=_number, default=None, help="sgd and rmsprop only (default: the "
                      "--optimizer's)")
    demo.add_argument("--weight-decay", type=_number, default=None,
                      help="on conv and linear weights only (default: the --optimizer's)")
    demo.add_argument("--max-grad-norm", type=_number, default=1.0, help="global-norm clipping (default 1)")
    demo.add_argument("--lr-norm-power", type=_number, default=None,
                      help="the power g of the gradient-norm rate lr x s(k) / (|grad| + 1e-6)^g (default 0: off; "
                           f"not with --compare, whose sgd-norm-rate run uses {NORM_RATE_POWER})")
    demo.add_argument("--schedule", choices=sorted(STRATEGIES), default=None,
                      help="the lr schedule after warm-up (default cosine; not with --compare)")
    demo.add_argument("--warmup", type=_non_negative_int, default=None,
                      help="linear warm-up steps (default 5%% of the steps; not with --compare)")
    demo.add_argument("--seed", type=int, default=0, help="initial weights and batch order (default 0)")
    demo.add_argument("--backend", default="auto",
                      help="the fused optimizer's backend: auto (the default: the best one available for --device) "
                           "or one of those `fused-lr info` lists")
    demo.add_argument("--device", default="auto", help="auto (a GPU when there is one, else cpu), cpu, cuda, cuda:N")
    demo.add_argument("--dtype", default="float32",
                      help="float32 (default) or float64, for the model and the data; float64 shows that FusedSGD's "
                           "cosine run and the torch control of --compare differ only by rounding")
    demo.add_argument("--threads", type=_positive_int, default=1,
                      help="CPU threads for torch and the numba kernels (default 1: the model is small, so extra "
                           "threads gain little on idle cores and cost many-fold on busy ones)")
    demo.add_argument("--out", type=Path, default=Path("fused_lr_out"),
                      help="folder for the PNG and the metrics (default ./fused_lr_out)")
    demo.add_argument("--compare", action="store_true",
                      help=f"compare {len(COMPARED)} lr schedules, {len(ADAPTIVE)} adaptive strategies and a stock "
                           "torch control instead")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(func=_demo)

    # bench parses its own arguments (fused_lr.tools.bench.main); main() hands it everything after "bench"
    sub.add_parser("bench", add_help=False, help="the benchmarks: the CPU step (default), --host, fsdp, gpu, gpu-check "
                   "(fused-lr bench --help)")
    info = sub.add_parser("info", help="versions, device and which backends are usable here")
    info.set_defaults(func=_info)
    return parser


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: the demo runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA device is available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    return device


def _check_backend(name: str, device) -> None:
    from fused_lr import backends

    try:
        backends.check_name(name)  # the optimizers' own check: a known name, usable here
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"--backend {name}: {e}") from None
    if name == "auto":
        return
    if device.type not in backends.devices(name):
        raise UsageError(f"--backend {name} runs on {'/'.join(sorted(backends.devices(name)))} tensors, "
                         f"not on --device {device}")


@contextmanager
def output_folder(out: Path, option: str = "--out"):
    """Makes ``out`` (and its missing parents) and checks that it takes a file, before anything is
    trained or timed; an error names it as ``option``. When the command then fails (a setting the
    optimizer rejects, a diverging run, ^C), the folders it made are removed again if still empty:
    a failed command leaves nothing behind."""
    made = [p for p in (out, *out.parents) if not p.exists()]  # deepest first, as rmdir needs
    try:
        try:
            out.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=out):
                pass
        except OSError as e:
            raise UsageError(f"cannot write to {option} {out}: {e.strerror or e}") from None
        yield
    except BaseException:
        for folder in made:
            try:
                folder.rmdir()
            except OSError:  # not made after all, or holds something: keep it
                break
        raise


def _demo(args: argparse.Namespace) -> int:
    missing = [dist for module, dist in DEMO_EXTRA.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise CommandError(f"the demo needs {', '.join(missing)}: pip install 'fused_lr[demo]'")
    from rich.console import Console

    from .demo import Config, ConfigError, Diverged, run_compare, run_demo

    single = {"--schedule": args.schedule, "--warmup": args.warmup, "--lr-norm-power": args.lr_norm_power}
    if args.compare and (given := [name for name, value in single.items() if value is not None]):
        raise UsageError(f"{' and '.join(given)} set{'s' if len(given) == 1 else ''} up a single run; --compare runs "
                         "its fixed set of strategies without warm-up")
    optimizer = args.optimizer or "sgd"
    if args.compare and optimizer != "sgd":
        raise UsageError(f"--optimizer {optimizer} picks a single run's optimizer; --compare runs a fixed set, and "
                         "its --lr, --momentum and --weight-decay set the FusedSGD runs")
    if args.momentum is not None and OPTIMIZERS[optimizer].momentum is None:
        raise UsageError(f"--momentum: {OPTIMIZERS[optimizer].cls} has no momentum (only sgd and rmsprop take it)")
    if args.threads > (os.cpu_count() or 1):
        raise UsageError(f"--threads {args.threads}: this machine has {os.cpu_count()} logical cores")
    device = _device(args.device)
    _check_backend(args.backend, device)
    config = Config(steps=args.steps, epochs=args.epochs or (COMPARE_EPOCHS if args.compare else DEMO_EPOCHS),
                    batch_size=args.batch_size, optimizer=optimizer, lr=args.lr, momentum=args.momentum,
                    weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
                    lr_norm_power=args.lr_norm_power or 0.0, warmup=args.warmup, schedule=args.schedule or "cosine",
                    seed=args.seed, backend=args.backend, device=str(device), dtype=args.dtype)
    console = None if args.no_progress else Console(stderr=True)
    if console is not None and not console.is_terminal:
        console.width = 120  # a log gets the final state of each bar: keep the metrics on one line
    try:
        with output_folder(args.out), _cpu_threads(args.threads):
            (run_compare if args.compare else run_demo)(config, args.out, console)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    except Diverged as e:
        raise CommandError(str(e)) from None
    return 0


@contextmanager
def _cpu_threads(n: int):
    """torch's and numba's thread counts set to ``n`` for the block, then restored: main() may
    run inside a larger process (the tests). Both matter: numba's OpenMP workers spin after each
    parallel step, and on a busy 2-core machine that was measured to slow torch's forward and
    backward passes 10-60x."""
    import torch

    try:
        import numba
    except Exception:  # absent, or broken (its backend then says why: fused-lr info)
        numba = None
    saved = torch.get_num_threads(), numba.get_num_threads() if numba else None
    torch.set_num_threads(n)
    if numba:
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        if numba:
            numba.set_num_threads(saved[1])


def _bench(argv: list[str]) -> int:
    try:
        from .bench import main as bench_main
    except ModuleNotFoundError as e:
        if e.name != "fused_lr.tools.bench":
            raise
        raise CommandError("this installation has no fused_lr.tools.bench") from None
    try:
        return bench_main(argv)
    except SystemExit as e:  # its own argparse: --help, or a bad argument it has reported
        return _exit_code(e)


def _exit_code(e: SystemExit) -> int:
    if e.code is None or isinstance(e.code, int):
        return e.code or 0
    print(e.code, file=sys.stderr)
    return 1


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _info(args: argparse.Namespace) -> int:
    import torch

    from fused_lr import backends

    print(f"fused_lr {__version__}")
    print(f"python   {platform.python_version()} ({platform.python_implementation()}, {sys.platform})")
    print(f"torch    {torch.__version__} (CUDA {torch.version.cuda or 'none'}, {torch.get_num_threads()} CPU threads)")
    for dist in ("numpy", "numba", "triton"):
        print(f"{dist:<8} {_version(dist)}")
    print(f"cpu      {_cpu_name()} ({os.cpu_count()} logical cores)")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            print(f"cuda:{i}   {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    else:
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device visible"
        print(f"cuda     none ({why})")
    print("backends")
    for name, status in backends.available_backends().items():
        where = "/".join(sorted(backends.devices(name)))
        print(f"  {name:<10} " + (f"usable on {where}" if status is True else f"unavailable: {status}"))
    from fused_lr.core import meta

    print("per-step checks: " + ("compiled (fused_lr._meta)" if meta.IMPL == "compiled" else
                                 f"Python ({meta.WHY_PYTHON})"))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, rest = parser.parse_known_args(argv)
        if args.command != "bench" and rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
    except SystemExit as e:  # --help, --version, or a bad argument (already reported)
        return _exit_code(e)
    try:
        return _bench(rest) if args.command == "bench" else args.func(args)
    except CommandError as e:
        print(f"fused-lr {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"fused-lr {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
