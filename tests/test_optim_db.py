"""torch's own optimizer test inputs through the fused optimizers, and the drop-in details around them.

``torch.testing._internal.common_optimizers.optim_db`` holds, per torch optimizer, the constructor
configurations torch's own test suite runs (``OptimizerInfo.optim_inputs_func(device="cpu")``). Each
configuration of SGD, Adam, AdamW, RMSprop and Adagrad is built twice, once as the torch optimizer
and once as its fused counterpart on the ``reference`` and ``numba`` backends, on the same few small
float64 parameters; both take the same gradients (a function of the parameters, so a difference
feeds back) for ``STEPS`` steps, and every parameter and every state tensor torch keeps must then
agree. A configuration is skipped only for a constructor argument the fused optimizers leave out on
purpose (``LEFT_OUT``: they select or change torch's own implementation) or a Tensor ``betas``;
every skip names its argument.

Tolerance: float64, ``rtol=1e-9`` with ``atol=1e-12``. The two sides run the same formulas in a
different order (the kernels fold the bias corrections and the lr into one factor, fuse
multiply-adds, evaluate ``lr / (1 + (t - 1) lr_decay)`` once per tensor), so each step's update
differs by a few ulps (float64: 1.1e-16 relative) of each of its ~10 operations; over ``STEPS``
steps, fed back through the gradients, that stays below ~1e-14 relative. 1e-9 leaves five orders
of magnitude of headroom and still catches a wrong rule: these runs move the parameters (of order
1) by 4e-3 to 0.4, so a wrong bias correction, decay, dampening, momentum or lr_decay term is off by
a fair fraction of a step, far above 1e-9. (Terms of eps's size are not resolved: an Adam eps of
1e-8 moved inside the square root changes a step by ~1e-8 of itself.) ``atol`` only covers values
that pass near 0, where a relative bound means nothing. Measured here: the reference backend is
bit-identical to torch on every configuration, numba within 1.3e-14 relative.

Complex parameters: torch steps a complex parameter as its ``view_as_real``; each optimizer gets
one complex128 case of its own (optim_db has none), stepped on the real views as torch steps it.

Importing optim_db costs ~6 s at collection (it loads torch's OpInfo database); the tests ~10 s
more on the 2-core machine (the numba kernels already compiled and cached).
"""

from __future__ import annotations

import inspect

import pytest
import torch

from fused_lr import FusedAdagrad, FusedAdam, FusedAdamW, FusedRMSprop, FusedSGD, available_backends

FUSED = {"SGD": FusedSGD, "Adam": FusedAdam, "AdamW": FusedAdamW, "RMSprop": FusedRMSprop,
         "Adagrad": FusedAdagrad}
# torch's constructor arguments the fused optimizers do not take, and why (a config using one is skipped)
LEFT_OUT = {
    "foreach": "foreach selects torch's multi-tensor implementation; fused_lr picks its own with backend=",
    "fused": "fused selects torch's fused kernels; fused_lr picks its own with backend=",
    "capturable": "capturable (torch's CUDA-graph-safe variant) is not implemented",
    "differentiable": "differentiable (autograd through the step) is not implemented",
}
BACKENDS = ("reference", "numba")
STEPS = 6
RTOL, ATOL = 1e-9, 1e-12


def _torch_optim_inputs() -> dict[str, list]:
    """Per optimizer name, optim_db's OptimizerInputs for the CPU. Importing torch's test database
    would also freeze torch.backends' flags for the rest of the session (torch's own suite calls
    torch.backends.disable_global_flags() there); that call is a no-op during the import. (The
    import also sets TORCHINDUCTOR_CACHE_DIR to inductor's default, which inductor would set anyway.)"""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.backends, "disable_global_flags", lambda: None)
        from torch.testing._internal.common_optimizers import optim_db
    infos = {info.optim_cls.__name__: info for info in optim_db}
    return {name: infos[name].optim_inputs_func(device="cpu") for name in FUSED}


OPTIM_INPUTS = _torch_optim_inputs()
CASES = [(name, i, config) for name, configs in OPTIM_INPUTS.items() for i, config in enumerate(configs)]


def _case_id(case) -> str:
    name, i, config = case
    return f"{name}-{i}-{config.desc.replace(' ', '_')}"


def _params(dtype=torch.float64, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (5,), (2, 2, 3)]
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]


def _twins(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def _grad(p: torch.Tensor, k: int, i: int) -> torch.Tensor:
    """Step k's gradient of parameter i: depends on the parameter (differences feed back), its sign
    varies over elements and steps."""
    x = torch.view_as_real(p.detach()) if p.is_complex() else p.detach()
    ramp = torch.linspace(-1.0, 1.0, x.numel(), dtype=x.dtype).reshape(x.shape)
    g = torch.sin(x * (k + 1) + i) + 0.5 * ramp * (-1) ** k
    return torch.view_as_complex(g) if p.is_complex() else g


def _groups(spec, params: list[torch.Tensor]):
    """The config's params with our tensors in: several groups (dicts) split our tensors among them."""
    if spec is None or not any(isinstance(s, dict) for s in spec):
        return params
    groups = [{k: v for k, v in s.items() if k != "params"} for s in spec]
    for gi, group in enumerate(groups):
        group["params"] = params[gi::len(groups)]
    assert all(g["params"] for g in groups), "more groups than test parameters"
    return groups


def _run(opt, params: list[torch.Tensor], steps: int = STEPS, start: int = 0) -> None:
    for k in range(start, start + steps):
        for i, p in enumerate(params):
            p.grad = _grad(p, k, i)
        opt.step()


def _assert_same(ours, theirs, ps: list[torch.Tensor], qs: list[torch.Tensor]) -> None:
    """Parameters and every state tensor torch keeps (its step count included) agree."""
    for i, (p, q) in enumerate(zip(ps, qs, strict=True)):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=RTOL, atol=ATOL, msg=lambda m, i=i: f"param {i}: {m}")
        st_ours, st_torch = ours.state[p], theirs.state[q]
        for key, t in st_torch.items():
            if not isinstance(t, torch.Tensor):
                continue
            assert key in st_ours, f"param {i}: torch keeps state {key!r}, ours does not"
            mine = st_ours[key]
            if key == "step":
                assert float(mine) == float(t), f"param {i}: step {float(mine)} != torch's {float(t)}"
                continue
            torch.testing.assert_close(mine, t, rtol=RTOL, atol=ATOL, msg=lambda m, i=i, key=key: f"param {i} "
                                       f"state {key!r}: {m}")


def _skip_reason(kwargs: dict) -> str | None:
    for key in LEFT_OUT:
        if key in kwargs:
            return f"{key}={kwargs[key]!r}: {LEFT_OUT[key]}"
    betas = kwargs.get("betas")
    if betas is not None and any(isinstance(b, torch.Tensor) for b in betas):
        return "Tensor betas: the fused optimizers take numbers"
    return None


def _backend_ready(backend: str) -> None:
    status = available_backends()[backend]
    if status is not True:
        pytest.skip(f"{backend} backend unavailable here: {status}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_torch_optim_inputs(case, backend):
    name, _, config = case
    if reason := _skip_reason(config.kwargs):
        pytest.skip(reason)
    _backend_ready(backend)
    qs = _params()
    ps = _twins(qs)
    theirs = getattr(torch.optim, name)(_groups(config.params, qs), **config.kwargs)
    ours = FUSED[name](_groups(config.params, ps), backend=backend, **config.kwargs)
    for k in range(STEPS):
        for i, (p, q) in enumerate(zip(ps, qs, strict=True)):
            q.grad = _grad(q, k, i)
            p.grad = _grad(p, k, i)
        theirs.step()
        ours.step()
    assert ours.backend == backend  # the chosen backend ran the step, not a fallback
    _assert_same(ours, theirs, ps, qs)


# one complex case per optimizer, with its state-keeping options on
COMPLEX = {
    "SGD": dict(lr=0.05, momentum=0.9, weight_decay=0.1, nesterov=True),
    "Adam": dict(lr=0.01, weight_decay=0.1, amsgrad=True),
    "AdamW": dict(lr=0.01, weight_decay=0.1),
    "RMSprop": dict(lr=0.01, weight_decay=0.1, momentum=0.1, centered=True),
    "Adagrad": dict(lr=0.1, lr_decay=0.5, weight_decay=0.1, initial_accumulator_value=0.1),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", COMPLEX)
def test_complex_parameter(name, backend):
    _backend_ready(backend)
    qs = [_params(torch.complex128, seed=1)[0], _params(seed=2)[1]]  # a complex128 and a float64 parameter
    ps = _twins(qs)
    theirs = getattr(torch.optim, name)(qs, **COMPLEX[name])
    ours = FUSED[name](ps, backend=backend, **COMPLEX[name])
    _run(theirs, qs)
    _run(ours, ps)
    assert ours.backend == backend
    _assert_same(ours, theirs, ps, qs)


# ---------------------------------------------------------------- the constructors against torch's


@pytest.mark.parametrize("name", FUSED)
def test_constructor_takes_torchs_arguments(name):
    """Every argument of the torch optimizer's constructor, LEFT_OUT aside, with its default; the
    positional ones in torch's order up to the first one left out."""
    ours = inspect.signature(FUSED[name].__init__).parameters
    if name == "AdamW":  # FusedAdamW passes its keyword arguments on to FusedAdam
        ours = {**inspect.signature(FusedAdam.__init__).parameters, **ours}
        ours.pop("decoupled_weight_decay")  # always decoupled, as torch.optim.AdamW
    theirs = inspect.signature(getattr(torch.optim, name).__init__).parameters
    missing = sorted(set(theirs) - set(ours) - set(LEFT_OUT))
    assert not missing, f"Fused{name} lacks torch's {missing}"
    for key, param in theirs.items():
        if key in ours and key not in ("self", "params"):
            assert ours[key].default == param.default, f"{key}: default {ours[key].default!r} != {param.default!r}"
    positional = [k for k, p in theirs.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    prefix = positional[:next((i for i, k in enumerate(positional) if k in LEFT_OUT), len(positional))]
    assert [k for k, p in ours.items() if p.kind is p.POSITIONAL_OR_KEYWORD][:len(prefix)] == prefix


@pytest.mark.parametrize("backend", BACKENDS)
def test_adam_decoupled_weight_decay_is_adamw(backend):
    """torch.optim.Adam(decoupled_weight_decay=True) is AdamW; so is FusedAdam's."""
    _backend_ready(backend)
    kw = dict(lr=0.01, weight_decay=0.1, amsgrad=True)
    qs = _params()
    ps, rs = _twins(qs), _twins(qs)
    theirs = torch.optim.Adam(qs, decoupled_weight_decay=True, **kw)
    ours = FusedAdam(ps, decoupled_weight_decay=True, backend=backend, **kw)
    adamw = FusedAdamW(rs, backend=backend, **kw)
    assert ours.param_groups[0]["decoupled_weight_decay"] is True
    _run(theirs, qs)
    _run(ours, ps)
    _run(adamw, rs)
    _assert_same(ours, theirs, ps, qs)
    assert all(torch.equal(p, r) for p, r in zip(ps, rs, strict=True))
    assert FusedAdam(_params()).defaults["decoupled_weight_decay"] is False
    with pytest.raises(TypeError, match="decoupled_weight_decay"):
        torch.optim.AdamW(_params(), decoupled_weight_decay=False)
    with pytest.raises(TypeError, match="decoupled_weight_decay"):
        FusedAdamW(_params(), decoupled_weight_decay=False)
    with pytest.raises(ValueError, match="decoupled_weight_decay"):
        FusedAdam(_params(), decoupled_weight_decay="yes")


# ---------------------------------------------------------------- Adagrad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stepped_first", [False, True], ids=["fresh", "after-a-step"])
def test_adagrad_share_memory(backend, stepped_first):
    """share_memory() puts every sum in shared memory (creating the state a fresh optimizer lacks,
    as torch's constructor does); later steps update those very storages, with torch's numbers."""
    _backend_ready(backend)
    kw = dict(lr=0.1, lr_decay=0.1, weight_decay=0.1, initial_accumulator_value=0.25)
    qs = _params()
    ps = _twins(qs)
    theirs = torch.optim.Adagrad(qs, **kw)
    ours = FusedAdagrad(ps, backend=backend, **kw)
    if stepped_first:
        _run(theirs, qs, steps=1)
        _run(ours, ps, steps=1)
    theirs.share_memory()
    ours.share_memory()
    sums = [ours.state[p]["sum"] for p in ps]
    for p, s in zip(ps, sums, strict=True):
        assert s.is_shared()
        assert (s.dtype, s.shape, s.stride(), s.device) == (p.dtype, p.shape, p.stride(), p.device)
        step = ours.state[p]["step"]
        assert (step.dtype, step.dim(), step.device, float(step)) == (torch.float32, 0, p.device,
                                                                      float(stepped_first))
        if not stepped_first:
            assert torch.equal(s, torch.full_like(p, 0.25))
    storages = [s.untyped_storage().data_ptr() for s in sums]
    _run(theirs, qs, steps=2, start=1)
    _run(ours, ps, steps=2, start=1)
    assert ours.backend == backend
    for p, s, ptr in zip(ps, sums, storages, strict=True):
        st = ours.state[p]["sum"]
        assert st is s and st.is_shared() and st.untyped_storage().data_ptr() == ptr
    _assert_same(ours, theirs, ps, qs)
    ours.share_memory()  # again: nothing moves
    assert [s.untyped_storage().data_ptr() for s in sums] == storages


@pytest.mark.parametrize("backend", BACKENDS)
def test_adagrad_initial_accumulator_value_is_the_constructors(backend):
    """torch.optim.Adagrad starts every sum at the constructor's initial_accumulator_value (its
    self.defaults), whatever a param group says, and does not check the group's value."""
    _backend_ready(backend)
    qs = _params()
    ps = _twins(qs)

    def groups(ts):
        return [{"params": ts[:1]}, {"params": ts[1:2], "initial_accumulator_value": 3.0},
                {"params": ts[2:], "initial_accumulator_value": -1.0}]

    theirs = torch.optim.Adagrad(groups(qs), lr=0.1, initial_accumulator_value=0.5)
    ours = FusedAdagrad(groups(ps), lr=0.1, initial_accumulator_value=0.5, backend=backend)
    late_q = _params(seed=3)[0]  # a group added later reads the constructor's too
    late_p = _twins([late_q])[0]
    theirs.add_param_group({"params": [late_q], "initial_accumulator_value": 2.0})
    ours.add_param_group({"params": [late_p], "initial_accumulator_value": 2.0})
    assert [g["initial_accumulator_value"] for g in ours.param_groups] == [0.5, 3.0, -1.0, 2.0]
    _run(theirs, [*qs, late_q], steps=1)
    _run(ours, [*ps, late_p], steps=1)
    for p in [*ps, late_p]:
        torch.testing.assert_close(ours.state[p]["sum"], 0.5 + p.grad ** 2, rtol=RTOL, atol=ATOL)
    _run(theirs, [*qs, late_q], steps=2, start=1)
    _run(ours, [*ps, late_p], steps=2, start=1)
    _assert_same(ours, theirs, [*ps, late_p], [*qs, late_q])
    with pytest.raises(ValueError, match="initial_accumulator_value"):
        FusedAdagrad(_params(), initial_accumulator_value=-1.0)
