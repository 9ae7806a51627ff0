"""FusedSGD under torch.amp.GradScaler, on every backend.

FusedSGD sets ``_step_supports_amp_scaling``, so ``scaler.step(opt)`` does not unscale the
gradients itself: it hands the optimizer ``grad_scale`` and ``found_inf`` and the fused step
unscales and skips (GradScaler's inf check is its own foreach pass; the skip decision is read
on the device). The oracle is torch's for-loop SGD with the documented recipe
``scaler.unscale_`` + ``clip_grad_norm_`` + ``scaler.step``.

Tolerances. float64 with power-of-two loss scales: unscaling is exact on both sides, so the
runs differ only by the clip coefficient's reduction order, ~1e-15 per step; 1e-10 after the
short runs here. bf16 autocast: see test_autocast_bf16.
"""

import math

import pytest
import torch
from cases import backend_cases, batches, make_model, max_rel_diff

from fused_lr import FusedSGD

STEPS = 12
INF_STEPS = {0, 5}  # the first step (docs/step.md, "The stock fused SGD defect", on a real model) and one mid-run
CFG = dict(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=5e-4)
MAX_NORM = 0.05


def make_scaler(device):
    # growth every 2 clean steps so the run sees the scale both grow and back off
    return torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=2)


def loss_of(model, x, y, i):
    loss = torch.nn.functional.cross_entropy(model(x), y)
    return loss * math.inf if i in INF_STEPS else loss


def torch_scaled_run(dtype, device):
    model = make_model(dtype, device)
    opt = torch.optim.SGD(model.parameters(), foreach=False, **CFG)
    scaler, scales = make_scaler(device), []
    for i, (x, y) in enumerate(batches(STEPS, dtype, device)):
        opt.zero_grad()
        scaler.scale(loss_of(model, x, y, i)).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return model, scales


def fused_scaled_run(dtype, device, backend, unscale_first=False):
    model = make_model(dtype, device)
    opt = FusedSGD(model.parameters(), max_grad_norm=MAX_NORM, backend=backend, **CFG)
    scaler, scales = make_scaler(device), []
    for i, (x, y) in enumerate(batches(STEPS, dtype, device)):
        opt.zero_grad()
        scaler.scale(loss_of(model, x, y, i)).backward()
        if unscale_first:  # e.g. to log the true gradients; the step then gets grad_scale=None
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return model, opt, scales


@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaled", "unscale-first"])
@pytest.mark.parametrize("backend,device", backend_cases())
def test_scaler_matches_torch_loop(backend, device, unscale_first):
    expected, torch_scales = torch_scaled_run(torch.float64, device)
    got, opt, scales = fused_scaled_run(torch.float64, device, backend, unscale_first)
    assert opt.backend == backend
    # the run exercised the scaler: it backed off on each inf and grew in between
    assert len(set(scales)) >= 3 and scales[0] < 2.0**10
    assert scales == torch_scales  # both scalers saw the same found_inf on every step
    assert {float(opt.state[p]["step"]) for p in got.parameters()} == {float(STEPS - len(INF_STEPS))}
    assert max_rel_diff(expected, got) <= 1e-10


def snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            [p.grad.clone() for p in model.parameters()],
            [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()])


@pytest.mark.parametrize("backend,device", backend_cases())
def test_skipped_step_changes_nothing(backend, device):
    model = make_model(torch.float32, device)
    opt = FusedSGD(model.parameters(), max_grad_norm=MAX_NORM, backend=backend, **CFG)
    scaler = make_scaler(device)
    data = list(batches(4, torch.float32, device))
    for x, y in data[:3]:
        opt.zero_grad()
        scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
    x, y = data[3]
    opt.zero_grad()
    scaler.scale(torch.nn.functional.cross_entropy(model(x), y) * math.inf).backward()
    # one parameter's gradient finite, the rest not: the skip is global, not per tensor
    next(model.parameters()).grad.zero_()
    before = snapshot(model, opt)
    scaler.step(opt)
    after = snapshot(model, opt)
    for b, a in zip(before, after, strict=True):
        for tb, ta in zip(b, a, strict=True):
            if isinstance(tb, dict):
                assert tb.keys() == ta.keys()
                assert all(torch.equal(tb[k], ta[k]) for k in tb)
            else:
                assert torch.equal(tb.nan_to_num(), ta.nan_to_num())
    assert {float(opt.state[p]["step"]) for p in model.parameters()} == {3.0}


def skipped_first_step(opt_factory, dampening=0.0, deterministic=False):
    """The scenario of docs/step.md, "The stock fused SGD defect": the first step is skipped for an
    inf gradient, then a unit gradient.
    Returns the parameter after the second step."""
    p = torch.nn.Parameter(torch.zeros(64))
    opt = opt_factory([p], lr=0.1, momentum=0.9, dampening=dampening)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    old = torch.are_deterministic_algorithms_enabled()
    # in deterministic mode torch fills uninitialised memory with NaN, which makes a read of
    # a never-written buffer visible instead of depending on what the allocator returned
    torch.use_deterministic_algorithms(deterministic)
    try:
        scaler.scale((p * math.inf).sum()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        scaler.scale(p.sum()).backward()
        scaler.step(opt)
        scaler.update()
    finally:
        torch.use_deterministic_algorithms(old)
    return p.detach()


@pytest.mark.parametrize("dampening", [0.0, 0.3])
@pytest.mark.parametrize("backend,device", backend_cases())
def test_skipped_first_step_then_step(backend, device, dampening):
    # dampening 0.3 tells "buffer initialised from the gradient" (b = g) apart from "zero
    # buffer updated as usual" (b = 0.7 g), which would equal it without dampening
    expected = skipped_first_step(lambda *a, **kw: torch.optim.SGD(*a, foreach=False, **kw), dampening)
    got = skipped_first_step(lambda *a, **kw: FusedSGD(*a, backend=backend, **kw), dampening)
    assert torch.equal(got, expected)
    assert torch.allclose(expected, torch.full_like(expected, -0.1))


def test_stock_fused_sgd_defect():
    """Why the test above exists: torch's own fused SGD reads a momentum buffer it allocated,
    uninitialised, during the skipped step (docs/step.md, "The stock fused SGD defect")."""
    loop = skipped_first_step(lambda *a, **kw: torch.optim.SGD(*a, foreach=False, **kw), deterministic=True)
    stock = skipped_first_step(lambda *a, **kw: torch.optim.SGD(*a, fused=True, **kw), deterministic=True)
    assert torch.allclose(loop, torch.full_like(loop, -0.1))
    if torch.equal(stock, loop):
        pytest.skip(f"torch {torch.__version__} fixed fused SGD's uninitialised buffer after a skipped step")
    assert not torch.isfinite(stock).all()


@pytest.mark.parametrize("backend,device", backend_cases())
def test_autocast_bf16(backend, device):
    """The everyday mixed-precision loop: float32 weights, bf16 autocast, GradScaler. No
    clipping here: a clipped step would hide a missing unscale."""
    def run(make_opt):
        model = make_model(torch.float32, device)
        opt = make_opt(model.parameters())
        scaler = make_scaler(device)
        for x, y in batches(STEPS, torch.float32, device):
            opt.zero_grad()
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return model
    expected = run(lambda ps: torch.optim.SGD(ps, foreach=False, **CFG))
    got = run(lambda ps: FusedSGD(ps, backend=backend, **CFG))
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in got.parameters())
    # the forward runs in bf16 (8-bit mantissa): a float32-ulp difference in a weight can
    # flip a bf16 rounding, so after 12 steps the runs agree to bf16 resolution, not f32's
    assert max_rel_diff(expected, got) <= 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are only observable on a CUDA device")
@pytest.mark.parametrize("backend,device", backend_cases())
def test_scaled_step_does_not_sync(backend, device):
    if device != "cuda" or backend == "reference":
        pytest.skip("the reference backend reads found_inf and the step counts on the host by design")
    model = make_model(torch.float32, device)
    opt = FusedSGD(model.parameters(), max_grad_norm=MAX_NORM, backend=backend, **CFG)
    scaler = make_scaler(device)
    for x, y in batches(3, torch.float32, device):
        opt.zero_grad()
        scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.step(opt)
            scaler.update()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert {float(opt.state[p]["step"]) for p in model.parameters()} == {3.0}
