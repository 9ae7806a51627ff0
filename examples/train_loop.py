"""A real training loop with FusedSGD: autocast + GradScaler, checkpoint save/resume, and either
a fused_lr schedule or a torch.optim.lr_scheduler.

    python examples/train_loop.py --steps 200                        # fused schedule
    python examples/train_loop.py --steps 200 --scheduler torch      # torch scheduler instead
    python examples/train_loop.py --steps 200 --save-at 100 --ckpt ck.pt
    python examples/train_loop.py --steps 200 --resume ck.pt         # continues at step 100

The data is synthetic (a fixed random teacher), generated per step from the step index, so a
resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch import nn

from fused_lr import FusedSGD, param_groups, schedules

FEATURES, CLASSES, BATCH = 32, 10, 64


def batch(step: int, device: str):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(BATCH, FEATURES, generator=g)
    teacher = torch.randn(FEATURES, CLASSES, generator=torch.Generator().manual_seed(-1))
    y = (x @ teacher).argmax(dim=1)
    return x.to(device), y.to(device)


def build(args, device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, 128), nn.ReLU(), nn.Linear(128, CLASSES)).to(device)
    groups = param_groups(model, weight_decay=5e-4)  # no decay on biases
    warm = max(1, args.steps // 10)
    if args.scheduler == "fused":
        # evaluated on the device from each parameter's step count: nothing to step, nothing to save
        schedule = schedules.Warmup(warm, schedules.Cosine(args.steps - warm), start_factor=0.1)
        opt = FusedSGD(groups, lr=0.2, momentum=0.9, nesterov=True, max_grad_norm=1.0,
                       schedule=schedule, backend=args.backend)
        sched = None
    else:
        opt = FusedSGD(groups, lr=0.2, momentum=0.9, nesterov=True, max_grad_norm=1.0, backend=args.backend)
        sched = torch.optim.lr_scheduler.SequentialLR(opt, [
            torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=warm),
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps - warm)], milestones=[warm])
    return model, opt, sched


def fail(message: str):
    """A mistake in the arguments or the checkpoint: one line on stderr, no traceback."""
    print(f"train_loop.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def load_checkpoint(path: str, args, device: str) -> dict:
    try:
        # our checkpoints hold only tensors and plain values: weights_only=True reads them
        state = torch.load(path, map_location=device, weights_only=True)
    except OSError as e:
        fail(f"cannot read --resume {path}: {e.strerror or e}")
    except Exception as e:  # the unpickler fails in many ways on a file that is no checkpoint
        fail(f"--resume {path} is not a checkpoint that torch.load can read ({type(e).__name__})")
    if not isinstance(state, dict) or not {"model", "optimizer", "scaler", "step"} <= state.keys():
        fail(f"--resume {path} is not a checkpoint of this script")
    # The schedule is configuration, rebuilt from the arguments: it must be the one that was saved.
    saved = "fused" if state.get("scheduler") is None else "torch"
    if saved != args.scheduler:
        fail(f"{path} was saved with --scheduler {saved}; resume it with --scheduler {saved}")
    if state.get("steps", args.steps) != args.steps:
        fail(f"{path} comes from a --steps {state['steps']} run (its lr schedule spans that many steps); "
             f"resume it with --steps {state['steps']}")
    if state["step"] >= args.steps:
        fail(f"{path} is at step {state['step']}, so --steps {args.steps} leaves nothing to train")
    return state


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--scheduler", choices=["fused", "torch"], default="fused")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--save-at", type=int, default=None, help="write a checkpoint after this many steps")
    ap.add_argument("--ckpt", default="checkpoint.pt")
    ap.add_argument("--resume", default=None, help="checkpoint to continue from")
    args = ap.parse_args(argv)
    if args.steps < 2:
        fail(f"--steps must be at least 2 (one warm-up step, then the cosine), got {args.steps}")
    if args.save_at is not None and not 1 <= args.save_at < args.steps:
        fail(f"--save-at must be a step between 1 and --steps - 1 ({args.steps - 1}), got {args.save_at}")
    if args.save_at is not None and not os.access(Path(args.ckpt).parent, os.W_OK):
        fail(f"cannot write --ckpt {args.ckpt}: its folder does not exist or is not writable")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # fp16 needs the GradScaler; with bf16 (CPU) it never finds an inf but costs nothing
    amp_dtype = torch.float16 if device == "cuda" else torch.bfloat16
    try:
        model, opt, sched = build(args, device)  # FusedSGD checks its settings (--backend) here
    except (ValueError, TypeError, RuntimeError) as e:
        fail(str(e))
    scaler = torch.amp.GradScaler(device)
    start = 0
    if args.resume:
        state = load_checkpoint(args.resume, args, device)
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])  # includes each parameter's step = schedule position
            scaler.load_state_dict(state["scaler"])
            if sched is not None:
                sched.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as e:
            fail(f"--resume {args.resume} does not fit this script's model and optimizer: {str(e).splitlines()[0]}")
        start = state["step"]

    for step in range(start, args.steps):
        x, y = batch(step, device)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=amp_dtype):
            loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)  # unscale, inf check, clipping, lr schedule, momentum: one fused step
        scaler.update()
        if sched is not None:
            sched.step()
        if step + 1 == args.save_at:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                        "scheduler": sched.state_dict() if sched is not None else None, "step": step + 1,
                        "steps": args.steps},
                       args.ckpt)
            print(f"saved {args.ckpt} at step {step + 1}")
        if (step + 1) % max(1, args.steps // 10) == 0 or step + 1 == args.steps:
            # .item() syncs: only for logging, every tenth of the run
            lr = opt.current_lr()[0] if sched is None else sched.get_last_lr()[0]  # the next step's
            print(f"step {step + 1:5d}  loss {loss.item():.4f}  lr {lr:.5f}"
                  f"  grad-norm {opt.last_grad_norm.item():.3f}  backend {opt.backend}")
    checksum = sum(p.detach().double().sum().item() for p in model.parameters())
    print(f"final loss {loss.item():.6f} checksum {checksum.hex()}")


if __name__ == "__main__":
    main()
