"""A non-finite gradient under global-norm clipping, on every backend and optimizer.

With ``max_grad_norm`` set and ``error_if_nonfinite=False`` the fused step must do what
``torch.nn.utils.clip_grad_norm_`` followed by the torch optimizer does: the coefficient is
``clamp(C / (N + 1e-6), max=1)``, so a NaN norm gives a NaN coefficient (torch.clamp keeps NaN)
and every gradient, then every parameter, becomes NaN; an inf norm gives 0, so finite gradients
become 0 and the inf element NaN (inf * 0). A ``min(1, c)`` that drops NaN (Python's ``min``,
``fminf``, ``tl.minimum``) instead takes a full unclipped step and hides the divergence.

Also held here: the gradient-norm rate (``lr_norm_power``) with a non-finite norm equals the
reference backend (a NaN norm makes the lr NaN); a GradScaler step that sees the non-finite
gradient is skipped and changes nothing; ``error_if_nonfinite=True`` raises and changes nothing.

Tolerances (``torch.testing.assert_close`` with ``equal_nan=True``, so NaN must sit at the same
positions on both sides): the runs are two steps long, a clipped finite step and the non-finite
one, and both sides do the same IEEE operations except the norm's reduction order and the kernels'
fused multiply-adds, a few ulps of the O(1) values here. float64: 1e-12 relative and absolute
(an ulp is 2.2e-16); float32: 1e-5 relative and absolute (an ulp is 1.2e-7; Adam's division by
sqrt(v) + eps can carry a few ulps of v into the update). Measured on the finite elements of the
inf runs, parameters and states, every backend: at most 3.3e-16 (float64) and 1.7e-7 (float32)
relative, so the bounds leave a wide margin. A formula that is wrong, or a coefficient of 1 in
place of NaN, is off by far more (or finite where torch is NaN).
"""

import math

import pytest
import torch
from cases import backend_cases

from fused_lr import FusedAdagrad, FusedAdamW, FusedRMSprop, FusedSGD

MAX_NORM = 0.5  # below every finite gradient norm here, so the clipped first step clips
BAD_AT = 3  # the element of the first parameter that gets the non-finite value
OPTIMIZERS = {
    "sgd": (FusedSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2)),
    "adamw": (FusedAdamW, torch.optim.AdamW, dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-2)),
    "rmsprop": (FusedRMSprop, torch.optim.RMSprop, dict(lr=1e-2, alpha=0.9, momentum=0.5, weight_decay=1e-2)),
    "adagrad": (FusedAdagrad, torch.optim.Adagrad, dict(lr=0.1, lr_decay=1e-2, weight_decay=1e-2)),
}
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}
DTYPES = [pytest.param(torch.float64, id="f64"), pytest.param(torch.float32, id="f32")]
BAD = [pytest.param(math.nan, id="nan"), pytest.param(math.inf, id="inf")]


def _params(dtype, device):
    """Two tiny parameters (one vector, one matrix) and two steps of gradients for them: the
    second step's has ``bad`` put in by the caller."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(7,), (2, 3)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device))
              for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device) for s in shapes]
             for _ in range(2)]
    return params, grads


def _with_bad(grads, bad):
    grads = [g.clone() for g in grads]
    grads[0][BAD_AT] = bad
    return grads


def _set(params, grads):
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()


def _torch_run(name, params, steps, **variant):
    _, torch_cls, kw = OPTIMIZERS[name]
    opt = torch_cls(params, foreach=False, **kw | variant)
    for grads in steps:
        _set(params, grads)
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=False)
        opt.step()
    return opt


def _fused_run(name, params, steps, backend, variant=None, **extra):
    fused_cls, _, kw = OPTIMIZERS[name]
    opt = fused_cls(params, backend=backend, **kw | (variant or {}), **extra)
    for grads in steps:
        _set(params, grads)
        opt.step()
    return opt


def _assert_same(got, want, dtype, what):
    torch.testing.assert_close(got, want, **TOL[dtype], equal_nan=True, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("backend,device", backend_cases())
def test_nonfinite_gradient_matches_torch_clip_and_step(backend, device, name, dtype, bad):
    _check_against_torch(backend, device, name, dtype, bad)


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,device", backend_cases())
def test_amsgrad_maximum_keeps_nan_as_torch_maximum(backend, device, dtype, bad):
    """AdamW's amsgrad state: torch.maximum(max_exp_avg_sq, exp_avg_sq) is NaN where either is
    (the NaN coefficient's every element, the inf element's inf * 0), not the old maximum."""
    _check_against_torch(backend, device, "adamw", dtype, bad, dict(amsgrad=True))


def _check_against_torch(backend, device, name, dtype, bad, variant=None):
    params, (g1, g2) = _params(dtype, device)
    steps = [g1, _with_bad(g2, bad)]
    ours = [p.detach().clone().requires_grad_() for p in params]
    theirs = [p.detach().clone().requires_grad_() for p in params]
    opt = _fused_run(name, ours, steps, backend, variant, max_grad_norm=MAX_NORM)
    assert opt.backend == backend
    ref = _torch_run(name, theirs, steps, **(variant or {}))
    # what torch's clamp makes of the norm, so that a test passing can only mean the same divergence
    if math.isnan(bad):
        assert all(p.isnan().all() for p in theirs)
    else:
        assert [int(p.isnan().sum()) for p in theirs] == [1, 0] and theirs[0].isnan()[BAD_AT]
    assert math.isnan(float(opt.last_grad_norm)) if math.isnan(bad) else math.isinf(float(opt.last_grad_norm))
    for i, (p, q) in enumerate(zip(ours, theirs, strict=True)):
        _assert_same(p.detach(), q.detach(), dtype, f"param {i}")
        for key, want in ref.state[q].items():
            got = opt.state[p][key]
            _assert_same(got.to(want.dtype) if key == "step" else got, want, dtype, f"param {i} {key}")


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("clip", [None, MAX_NORM], ids=["rate", "rate-clip"])
@pytest.mark.parametrize("name", ["sgd", "adamw"])
@pytest.mark.parametrize("backend,device", backend_cases())
def test_gradient_norm_rate_with_nonfinite_norm_matches_reference(backend, device, name, clip, bad):
    """lr x (N + eps)^-power: a NaN norm makes it NaN (every parameter NaN), an inf norm makes it
    0 (only the element whose gradient is inf, times lr 0, turns NaN, where clipping is off)."""
    dtype = torch.float32
    params, (g1, g2) = _params(dtype, device)
    steps = [g1, _with_bad(g2, bad)]
    got = [p.detach().clone().requires_grad_() for p in params]
    want = [p.detach().clone().requires_grad_() for p in params]
    extra = dict(max_grad_norm=clip, lr_norm_power=0.5)
    opt = _fused_run(name, got, steps, backend, **extra)
    ref = _fused_run(name, want, steps, "reference", **extra)
    if math.isnan(bad):
        assert all(p.isnan().all() for p in want)
    for i, (p, q) in enumerate(zip(got, want, strict=True)):
        _assert_same(p.detach(), q.detach(), dtype, f"param {i}")
        for key, w in ref.state[q].items():
            _assert_same(opt.state[p][key], w, dtype, f"param {i} {key}")


def _snapshot(params, opt):
    return ([p.detach().clone() for p in params],
            [{k: v.clone() for k, v in opt.state[p].items()} for p in params],
            [float(g["schedule_step"]) for g in opt.state_dict()["param_groups"]])


def _assert_unchanged(before, after):
    (p0, s0, k0), (p1, s1, k1) = before, after
    assert all(torch.equal(a, b) for a, b in zip(p0, p1, strict=True))
    for a, b in zip(s0, s1, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert k0 == k1


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("backend,device", backend_cases())
def test_scaler_skips_a_nonfinite_step_and_changes_nothing(backend, device, name, bad):
    """Under a GradScaler the non-finite gradient sets found_inf: the step is skipped whatever
    the clip coefficient would have been."""
    fused_cls, _, kw = OPTIMIZERS[name]
    params, (g1, g2) = _params(torch.float32, device)
    opt = fused_cls(params, backend=backend, max_grad_norm=MAX_NORM, **kw)
    scaler = torch.amp.GradScaler(device, init_scale=4.0)
    for i, grads in enumerate([g1, _with_bad(g2, bad)]):
        opt.zero_grad()
        scaler.scale(sum((p * g).sum() for p, g in zip(params, grads, strict=True))).backward()
        before = _snapshot(params, opt)
        scaler.step(opt)
        scaler.update()
        if i == 1:
            _assert_unchanged(before, _snapshot(params, opt))
            assert scaler.get_scale() == 2.0  # the scaler saw the inf and backed off
    assert opt.backend == backend
    assert all(p.isfinite().all() for p in params)
    assert {float(opt.state[p]["step"]) for p in params} == {1.0}


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("backend,device", backend_cases())
def test_error_if_nonfinite_raises_and_changes_nothing(backend, device, name, bad):
    params, (g1, g2) = _params(torch.float32, device)
    opt = _fused_run(name, params, [g1], backend, max_grad_norm=MAX_NORM, error_if_nonfinite=True)
    _set(params, _with_bad(g2, bad))
    before = _snapshot(params, opt)
    with pytest.raises(RuntimeError, match="non-finite"):
        opt.step()
    _assert_unchanged(before, _snapshot(params, opt))
