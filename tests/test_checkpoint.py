"""Checkpoints: save mid-schedule, resume in a fresh process, interoperate with torch.optim.SGD.

A FusedSGD checkpoint is ``torch.optim.SGD``'s layout (``momentum_buffer`` per param) plus a
per-param ``step``, which is the schedule position; schedules themselves are configuration,
rebuilt by the code that resumes, so every checkpoint loads with ``weights_only=True``.

Tolerances. A resumed run repeats the uninterrupted run's operations in the same order, so on
the same backend they agree exactly (asserted bit for bit). Runs that continue on another
implementation (torch <-> FusedSGD) agree to 1e-10 relative in float64: only the clip
coefficient's reduction order differs (~1e-15 per step).
"""

import math
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from cases import backend_cases, batches, make_model, max_rel_diff, split_groups
from torch.optim import lr_scheduler as lrs

from fused_lr import FusedSGD, schedules

STEPS, SAVE_AT = 12, 5
CFG = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
MAX_NORM = 0.05
SCHEDULE = schedules.Warmup(3, schedules.Cosine(STEPS - 3), start_factor=0.1)
SECOND_LR, SECOND_SCHEDULE = 0.05, schedules.Exponential(0.9)
ROOT = Path(__file__).resolve().parent.parent


def fused_opt(model, backend, schedule=True):
    decay, no_decay = split_groups(model)
    second = dict(params=no_decay, lr=SECOND_LR, weight_decay=0.0, schedule=SECOND_SCHEDULE if schedule else None)
    return FusedSGD([dict(params=decay), second], max_grad_norm=MAX_NORM, backend=backend,
                    schedule=SCHEDULE if schedule else None, **CFG)


def torch_opt(model):
    decay, no_decay = split_groups(model)
    return torch.optim.SGD([dict(params=decay), dict(params=no_decay, lr=SECOND_LR, weight_decay=0.0)],
                           foreach=False, **CFG)


def train(model, opt, data, clip=False, on_step=None):
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()
        if on_step is not None:
            on_step()


def load(path, device):
    return torch.load(path, map_location=device, weights_only=True)


def resume_main(backend, device, ckpt, out):
    """Runs in a fresh interpreter: rebuild model and optimizer from code, load, continue."""
    model = make_model(torch.float64, device, seed=1234)  # other weights: the load must overwrite them
    opt = fused_opt(model, backend)
    state = load(ckpt, device)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    train(model, opt, list(batches(STEPS, torch.float64, device))[SAVE_AT:])
    torch.save({"model": model.state_dict(), "lr": opt.current_lr()}, out)


@pytest.fixture(scope="module")
def fresh_process(tmp_path_factory):
    """A checkpoint taken mid-schedule on every backend that runs here, all resumed by one fresh
    interpreter (starting one costs more than the runs): (the child's stderr, the folder with
    its outputs, the lr each saved optimizer would have used next)."""
    folder = tmp_path_factory.mktemp("resume")
    jobs, saved_lrs = [], {}
    for backend, device in (tuple(case.values) for case in backend_cases() if not case.marks):
        part = make_model(torch.float64, device)
        part_opt = fused_opt(part, backend)
        train(part, part_opt, list(batches(STEPS, torch.float64, device))[:SAVE_AT])
        saved_lrs[backend, device] = part_opt.current_lr()
        ckpt = folder / f"{backend}-{device}.pt"
        torch.save({"model": part.state_dict(), "opt": part_opt.state_dict()}, ckpt)
        jobs += [backend, device, str(ckpt), str(folder / f"{backend}-{device}-resumed.pt")]
    proc = subprocess.run([sys.executable, __file__, *jobs], capture_output=True, text=True, cwd=ROOT,
                          env=os.environ, timeout=300)
    return proc.stderr, folder, saved_lrs


@pytest.mark.parametrize("backend,device", backend_cases())
def test_resume_in_fresh_process(backend, device, fresh_process):
    stderr, folder, saved_lrs = fresh_process
    out = folder / f"{backend}-{device}-resumed.pt"
    assert out.exists(), stderr
    full = make_model(torch.float64, device)
    full_opt = fused_opt(full, backend)
    train(full, full_opt, list(batches(STEPS, torch.float64, device)))
    assert saved_lrs[backend, device] != full_opt.current_lr()  # saved mid-schedule
    resumed = load(out, device)
    assert resumed["lr"] == full_opt.current_lr()
    for name, value in full.state_dict().items():
        assert torch.equal(resumed["model"][name], value), name


@pytest.mark.parametrize("backend,device", backend_cases())
def test_load_onto_float64(backend, device, tmp_path):
    """A float32 checkpoint resumed in float64 (model.to(float64), then load): the buffers are
    cast to the parameters' dtype, the step counts are kept. The oracle is torch.optim.SGD
    resuming from the very same checkpoint with the same lr per step."""
    data32 = list(batches(STEPS, torch.float32, device))
    model = make_model(torch.float32, device)
    opt = fused_opt(model, backend)
    train(model, opt, data32[:SAVE_AT])
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    saved = load(tmp_path / "ckpt.pt", device)
    data = list(batches(STEPS, torch.float64, device))[SAVE_AT:]

    got = make_model(torch.float32, device, seed=7).to(torch.float64)
    got_opt = fused_opt(got, backend)
    got.load_state_dict(saved["model"])
    got_opt.load_state_dict(saved["opt"])
    for p in got.parameters():
        st = got_opt.state[p]
        assert st["momentum_buffer"].dtype == torch.float64
        assert st["step"].dtype == torch.float32 and float(st["step"]) == SAVE_AT
    train(got, got_opt, data)

    expected = make_model(torch.float32, device, seed=7).to(torch.float64)
    exp_opt = torch_opt(expected)
    expected.load_state_dict(saved["model"])
    exp_opt.load_state_dict(saved["opt"])
    k = SAVE_AT

    def set_lr():  # the lr of the next step, k = steps taken so far
        exp_opt.param_groups[0]["lr"] = CFG["lr"] * SCHEDULE(k)
        exp_opt.param_groups[1]["lr"] = SECOND_LR * SECOND_SCHEDULE(k)

    def advance():
        nonlocal k
        k += 1
        set_lr()

    set_lr()
    train(expected, exp_opt, data, clip=True, on_step=advance)
    assert max_rel_diff(expected, got) <= 1e-10


def interop_run(first, second, backend, device, tmp_path):
    """SAVE_AT steps on ``first`` ("torch" or "fused"), checkpoint (model, optimizer, StepLR),
    then the rest on ``second`` from that checkpoint. A torch scheduler drives both."""
    data = list(batches(STEPS, torch.float64, device))

    def build(kind, seed):
        model = make_model(torch.float64, device, seed)
        opt = torch_opt(model) if kind == "torch" else fused_opt(model, backend, schedule=False)
        return model, opt, lrs.StepLR(opt, step_size=4, gamma=0.5)

    model, opt, sched = build(first, 0)
    train(model, opt, data[:SAVE_AT], clip=first == "torch", on_step=sched.step)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()},
               tmp_path / f"{first}.pt")
    state = load(tmp_path / f"{first}.pt", device)
    model, opt, sched = build(second, 99)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    train(model, opt, data[SAVE_AT:], clip=second == "torch", on_step=sched.step)
    return model


@pytest.mark.parametrize("direction", ["torch-to-fused", "fused-to-torch"])
@pytest.mark.parametrize("backend,device", backend_cases())
def test_checkpoint_interop(backend, device, direction, tmp_path):
    first, second = direction.split("-to-")
    expected = interop_run("torch", "torch", backend, device, tmp_path)
    got = interop_run(first, second, backend, device, tmp_path)
    assert max_rel_diff(expected, got) <= 1e-10
    assert max_rel_diff(expected, make_model(torch.float64, device)) > 1e-3  # it trained


@pytest.mark.parametrize("backend,device", backend_cases())
def test_checkpoint_after_skipped_first_step(backend, device, tmp_path):
    """The first step skipped by GradScaler leaves FusedSGD a buffer with no momentum in it
    yet; a checkpoint taken then must not hand it to torch.optim.SGD as real momentum."""
    def skip_first(model, opt):
        scaler = torch.amp.GradScaler(device)
        x, y = next(batches(1, torch.float64, device))
        scaler.scale(torch.nn.functional.cross_entropy(model(x), y) * math.inf).backward()
        scaler.step(opt)
        scaler.update()

    data = list(batches(4, torch.float64, device, seed=5))
    expected = make_model(torch.float64, device)
    exp_opt = torch_opt(expected)
    skip_first(expected, exp_opt)
    train(expected, exp_opt, data, clip=True)

    model = make_model(torch.float64, device)
    opt = fused_opt(model, backend, schedule=False)
    skip_first(model, opt)
    torch.save(opt.state_dict(), tmp_path / "skipped.pt")
    got_opt = torch_opt(model)
    got_opt.load_state_dict(load(tmp_path / "skipped.pt", device))
    assert all("momentum_buffer" not in got_opt.state[p] for p in model.parameters())
    train(model, got_opt, data, clip=True)
    assert max_rel_diff(expected, model) <= 1e-10


if __name__ == "__main__":
    # (backend, device, checkpoint, output) per job; a job that fails leaves no output, and the
    # others still run
    args, failed = sys.argv[1:], False
    for i in range(0, len(args), 4):
        try:
            resume_main(*args[i : i + 4])
        except Exception:
            traceback.print_exc()
            failed = True
    sys.exit(1 if failed else 0)
