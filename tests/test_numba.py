"""Numba-backend specifics: the dtype/layout fallback, the address tables across chunk
boundaries, and the cases that move or replace tensors under a cached table.

Every test runs the same sequence on the reference backend and compares. Tolerances, relative
to each tensor's max |value|: float64 1e-12 (measured worst here 2e-16): both sides do the same
IEEE operations per element; only the global norm is summed in another order. float32 1e-5
(measured worst here 1.1e-7): the reference's float32 norm comes from torch's float32
accumulation and this kernel's from float64, so the clip coefficient may differ by a few ulps
(more on bigger or clipped gradients: see test_properties.py), and each step adds roundings.
"""

import copy
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fused_lr import FusedAdamW, FusedSGD, available_backends, schedules
from fused_lr.backends import numba as numba_backend

pytestmark = pytest.mark.skipif(available_backends()["numba"] is not True, reason="numba backend unavailable")

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
KW = dict(lr=0.1, momentum=0.9, weight_decay=1e-2, max_grad_norm=0.5, schedule=schedules.Cosine(20))
ROOT = Path(__file__).resolve().parent.parent


def odd_params(dtype, seed=0):
    """0-dim, empty, sizes 1, odd, and across one and two CHUNK boundaries."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(), (0,), (1,), (3,), (7, 5), (numba_backend.CHUNK + 1,), (2 * numba_backend.CHUNK + 13,), (17, 3, 3)]
    return [nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in sizes]


def set_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


def assert_close(got, expected, dtype):
    for a, b in zip(got, expected, strict=True):
        assert a.shape == b.shape
        if b.numel() == 0:
            continue
        scale = b.detach().abs().max().clamp_min(1e-30)
        assert float((a.detach() - b.detach()).abs().max() / scale) <= TOL[dtype]


def twin_run(dtype, steps, *, groups=lambda ps: [dict(params=ps)], kw=KW, between=None, make=odd_params):
    """The same steps on numba and on the reference; returns (numba params, ref params, opts)."""
    out = []
    for backend in ("numba", "reference"):
        params = make(dtype)
        opt = FusedSGD(groups(params), backend=backend, **kw)
        for s in range(steps):
            set_grads(params, seed=100 + s)
            opt.step()
            if between is not None:
                params = between(s, params, opt)
        assert opt.backend == backend
        out.append((params, opt))
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_odd_sizes_match_reference(dtype):
    groups = lambda ps: [dict(params=ps[:3], nesterov=True), dict(params=ps[3:], lr=0.03, momentum=0.5,
                                                                  dampening=0.2, schedule=schedules.Step(2, 0.5))]
    (got, opt), (expected, ref) = twin_run(dtype, 4, groups=groups)
    assert_close(got, expected, dtype)
    assert_close([opt.state[p]["momentum_buffer"] for p in got],
                 [ref.state[p]["momentum_buffer"] for p in expected], dtype)
    assert {float(opt.state[p]["step"]) for p in got} == {4.0}
    assert float(opt.last_grad_norm) == pytest.approx(float(ref.last_grad_norm), rel=TOL[dtype])


def test_mixed_float32_and_float64():
    # one table per dtype; the norm spans both and comes back in float64, as the reference's
    make = lambda dtype: [p if i % 2 else nn.Parameter(p.detach().double()) for i, p in enumerate(odd_params(dtype))]
    (got, opt), (expected, ref) = twin_run(torch.float32, 3, make=make)
    assert {p.dtype for p in got} == {torch.float32, torch.float64}
    assert_close(got, expected, torch.float32)
    assert opt.last_grad_norm.dtype == torch.float64


def test_bf16_falls_back_with_one_warning():
    params = [nn.Parameter(p.detach().bfloat16()) for p in odd_params(torch.float32)]
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    opt = FusedSGD(params, backend="numba", **KW)
    ref = FusedSGD(twins, backend="reference", **KW)
    for step in range(2):
        set_grads(params, seed=step)
        set_grads(twins, seed=step)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        ours = [w for w in caught if "numba backend" in str(w.message)]
        assert len(ours) == (1 if step == 0 else 0)
        if ours:
            assert "torch.bfloat16" in str(ours[0].message) and "reference" in str(ours[0].message)
        ref.step()
    for a, b in zip(params, twins, strict=True):
        assert torch.equal(a, b)  # the fallback *is* the reference


def test_mismatched_grad_layout_is_staged_in_the_parameters_layout():
    p = nn.Parameter(torch.randn(6, 4, dtype=torch.float64).t())  # dense, transposed
    twin = nn.Parameter(p.detach().clone())
    opt, ref = FusedSGD([p], backend="numba", **KW), FusedSGD([twin], backend="reference", **KW)
    grad = torch.randn(4, 6, dtype=torch.float64)  # contiguous: its memory order differs from p's
    p.grad, twin.grad = grad.clone(), grad.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a correct path in the kernel, no fallback
        opt.step()
    ref.step()
    assert opt.backend == "numba"
    assert_close([p], [twin], torch.float64)


def test_channels_last_runs_in_kernel():
    p = nn.Parameter(torch.randn(4, 3, 5, 5, dtype=torch.float64).to(memory_format=torch.channels_last))
    twin = nn.Parameter(p.detach().clone(memory_format=torch.channels_last))
    opt, ref = FusedSGD([p], backend="numba", **KW), FusedSGD([twin], backend="reference", **KW)
    for s in range(3):
        grad = torch.randn(p.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(s))
        p.grad = grad.clone(memory_format=torch.channels_last)
        twin.grad = grad.clone(memory_format=torch.channels_last)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # must not fall back
            opt.step()
        ref.step()
    assert_close([p], [twin], torch.float64)


# ---------------------------------------------------------------- tensors moving under the table
def test_model_to_float64_updates_the_new_tensors_only():
    def to_double(step, params, opt):
        if step != 1:
            return params
        old = [p.detach().clone() for p in params]
        olds = [p.data for p in params]
        for p in params:
            p.data = p.data.double()
        for st in opt.state.values():
            st["momentum_buffer"] = st["momentum_buffer"].double()
        to_double.kept.append((olds, old))
        return params

    to_double.kept = []
    (got, _), (expected, _) = twin_run(torch.float32, 4, between=to_double)
    assert {p.dtype for p in got} == {torch.float64}
    assert_close(got, expected, torch.float32)
    # the float32 storage the first table pointed to is never written after the move
    for olds, snapshot in to_double.kept:
        for o, s in zip(olds, snapshot, strict=True):
            assert torch.equal(o, s)


def test_module_to_float64():
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(7, 5), nn.Linear(5, 3)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [FusedSGD(m.parameters(), backend=b, **KW) for m, b in zip(models, ("numba", "reference"), strict=True)]
    x = torch.randn(9, 7)
    for step in range(4):
        if step == 2:
            for m, o in zip(models, opts, strict=True):
                m.to(torch.float64)
                for st in o.state.values():
                    st["momentum_buffer"] = st["momentum_buffer"].double()
            x = x.double()
        for m, o in zip(models, opts, strict=True):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    assert_close(list(models[0].parameters()), list(models[1].parameters()), torch.float32)


def test_set_to_none_and_replaced_grads():
    def churn(step, params, opt):
        opt.zero_grad(set_to_none=True)
        if step == 1:  # the next grads land in fresh tensors: keep the old ones alive elsewhere
            churn.hold = [torch.empty_like(p) for p in params]
        return params

    (got, opt), (expected, _) = twin_run(torch.float64, 4, between=churn)
    assert_close(got, expected, torch.float64)
    assert all(p.grad is None for p in got)

    # a replaced .grad between steps is read at its new address, the old tensor is left alone
    (got, opt), (expected, ref) = twin_run(torch.float64, 1)
    for o, ps in ((opt, got), (ref, expected)):
        olds = [p.grad for p in ps]
        snapshot = [g.clone() for g in olds]
        set_grads(ps, seed=7)
        o.step()
        assert all(torch.equal(a, b) for a, b in zip(olds, snapshot, strict=True))
    assert_close(got, expected, torch.float64)


def test_load_state_dict_rebinds_buffers_and_steps():
    (got, opt), (expected, ref) = twin_run(torch.float64, 2)
    # state_dict() hands out the live tensors; a checkpoint is a copy
    saved = {"numba": copy.deepcopy(opt.state_dict()), "reference": copy.deepcopy(ref.state_dict())}
    for o, ps, name in ((opt, got, "numba"), (ref, expected, "reference")):
        set_grads(ps, seed=50)
        o.step()  # a step we then roll back
        o.load_state_dict(saved[name])
        for s in range(2):
            set_grads(ps, seed=60 + s)
            o.step()
    assert_close(got, expected, torch.float64)
    assert {float(opt.state[p]["step"]) for p in got} == {4.0}


def test_new_gradients_each_step_reuse_the_tables():
    """zero_grad(set_to_none=True) gives every backward new gradient tensors: the tables must not
    be rebuilt for that (it cost more than the step), yet every step must read the new ones."""
    params = odd_params(torch.float32)
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    fused, ref = FusedSGD(params, backend="numba", **KW), FusedSGD(twins, backend="reference", **KW)
    for step in range(6):
        for ps, opt in ((params, fused), (twins, ref)):
            opt.zero_grad(set_to_none=True)
            set_grads(ps, seed=step)
            opt.step()
    assert fused._backend.rebuilds == 1  # the work lists, built at the first step
    for p, q in zip(params, twins):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=TOL[torch.float32], atol=TOL[torch.float32])


SERIAL_TWIN = '''
import numpy as np
from numba import njit, prange
from fused_lr.kernels.numba_kernels import _serial

@njit(parallel=True, cache=True)
def total(x):
    s = 0.0
    for i in prange(x.shape[0]):
        s += x[i]
    return s

total_serial = _serial(total)
'''


def test_serial_twins_have_their_own_cache_entries(tmp_path):
    """Numba's on-disk cache files machine code under the function's qualified name and line, not
    its compile options: a one-thread twin built from the same function object shared the parallel
    kernel's entry, so whichever variant compiled first was loaded for both (ResNet-50's step ran
    on one thread at half speed after a test had cached the serial variant)."""
    (tmp_path / "twin_mod.py").write_text(SERIAL_TWIN)
    code = "import numpy as np, twin_mod; x = np.ones(8); assert twin_mod.total_serial(x) == twin_mod.total(x) == 8"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": f"{tmp_path}:{ROOT}"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    indexes = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").rglob("twin_mod.*.nbi"))
    assert indexes == ["twin_mod.total", "twin_mod.total_serial"]
    for kernel in (numba_backend.K.update, numba_backend.K.sumsq):
        twin = getattr(numba_backend.K, kernel.py_func.__name__ + "_serial")
        assert twin.py_func.__qualname__ != kernel.py_func.__qualname__
        assert twin.py_func.__code__ is kernel.py_func.__code__  # one kernel source, two compilations


# ---------------------------------------------------------------- float32 arithmetic
def _adam_f32(p, m, v, g, t, lr, b1, b2, eps, wd):
    """torch's AdamW formula, one unfused float32 operation at a time (scalars rounded to float32
    first), with lerp in its two-formula form."""
    f = np.float32
    w1 = f(1.0 - b1)
    p = p * f(1.0 - lr * wd)
    m = m + w1 * (g - m) if w1 < 0.5 else g - (g - m) * (f(1) - w1)
    v = v * f(b2) + f(1.0 - b2) * g * g
    denom = np.sqrt(v) / f((1.0 - b2 ** t) ** 0.5) + f(eps)
    return p + f(-(lr / (1.0 - b1 ** t))) * m / denom, m, v


@pytest.mark.parametrize("beta1", [0.9, 0.3], ids=["lerp-low", "lerp-high"])
def test_float32_adamw_is_float32_arithmetic(beta1):
    """Bit for bit the float32 formula: a float64 intermediate (once the result of lerp's
    ``1 - w`` written with an integer literal) rounds differently and stops the loop using
    float32 vectors."""
    lr, b2, eps, wd = 1e-3, 0.999, 1e-8, 1e-2
    gen = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(numba_backend.CHUNK + 37, generator=gen))
    opt = FusedAdamW([p], lr=lr, betas=(beta1, b2), eps=eps, weight_decay=wd, backend="numba")
    want = p.detach().numpy().copy()
    m, v = np.zeros_like(want), np.zeros_like(want)
    for t in (1, 2, 3):
        g = torch.randn(p.shape, generator=gen)
        p.grad = g
        opt.step()
        want, m, v = _adam_f32(want, m, v, g.numpy(), t, lr, beta1, b2, eps, wd)
    assert opt.backend == "numba"
    np.testing.assert_array_equal(opt.state[p]["exp_avg"].numpy(), m)
    np.testing.assert_array_equal(opt.state[p]["exp_avg_sq"].numpy(), v)
    np.testing.assert_array_equal(p.detach().numpy(), want)
