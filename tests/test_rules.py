"""Every rule the layout declares has an optimizer and an update in every kernel, and a rule code
no kernel knows is refused on the host before any kernel runs; a kernel handed one anyway writes
NaN (a visible result), never another rule's update (docs/step.md, "Kernel layout").

Tolerance: float64, 1e-12 relative against the reference: the same operations per element, the
global norm summed in another order."""

import pytest
import torch
from cases import backend_cases
from test_cuda_host import generated, on_twin, twin_lib  # noqa: F401 (fixtures of the CUDA host twin)

from fused_lr import FusedAdagrad, FusedAdam, FusedRMSprop, FusedSGD
from fused_lr.core import layout as L

OPTIMIZERS = {cls.rule: cls for cls in (FusedSGD, FusedAdam, FusedRMSprop, FusedAdagrad)}
KERNELS = [c for c in backend_cases() if c.values[1] == "cpu" and c.values[0] != "reference"]


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in ((5, 3), (7,))]


def _steps(opt, params, n=3):
    gen = torch.Generator().manual_seed(1)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()


def test_every_declared_rule_has_an_optimizer():
    assert sorted(OPTIMIZERS) == sorted(L.RULES.values())


def _against_reference(code, backend):
    cls = OPTIMIZERS[code]
    ours, ref = _params(), _params()
    kw = dict(lr=0.05, max_grad_norm=1.0, weight_decay=1e-2)
    opt = cls(ours, backend=backend, **kw)
    _steps(opt, ours)
    _steps(cls(ref, backend="reference", **kw), ref)
    for a, b in zip(ours, ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=0), (cls.__name__, backend)
    return opt


@pytest.mark.parametrize("code", sorted(L.RULES.values()))
@pytest.mark.parametrize("backend,device", KERNELS)
def test_every_declared_rule_has_an_update_in_every_kernel(code, backend, device):
    assert _against_reference(code, backend).backend == backend


@pytest.mark.parametrize("code", sorted(L.RULES.values()))
def test_every_declared_rule_has_an_update_on_the_cuda_host_twin(code, request):
    import fused_lr.backends.cuda as cb

    request.getfixturevalue("on_twin")()
    cls = OPTIMIZERS[code]
    ours, ref = _params(), _params()
    kw = dict(lr=0.05, max_grad_norm=1.0, weight_decay=1e-2)
    opt = cls(ours, backend="reference", **kw)
    opt._backend = cb.CudaBackend()  # kept by the core: its devices (the twin's) take the parameters'
    _steps(opt, ours)
    _steps(cls(ref, backend="reference", **kw), ref)
    assert opt.backend == "cuda"
    for a, b in zip(ours, ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=0)


class _Unknown(FusedSGD):
    rule = max(L.RULES.values()) + 1


@pytest.mark.parametrize("backend,device", KERNELS)
def test_a_kernel_handed_an_unknown_rule_writes_nan(backend, device):
    """Past the host's check (the plan's rule rewritten by hand): NaN, not SGD's or Adagrad's update.
    Triton picks its rule function by the code, so it finds none and raises naming the code, before
    any launch."""
    params = _params()
    opt = FusedSGD(params, lr=0.1, momentum=0.9, backend=backend)
    _steps(opt, params, 1)
    plan = opt._plans[None]
    plan.rule = _Unknown.rule
    before = [p.detach().clone() for p in params]
    if backend == "triton":
        with pytest.raises(RuntimeError, match=f"no update for rule code {_Unknown.rule}: it is not in"):
            opt._backend.update(plan, opt._settings, opt._clocks, plan_scalars(), None)
        assert all(torch.equal(a, b) for a, b in zip(params, before, strict=True))
        return
    opt._backend.update(plan, opt._settings, opt._clocks, plan_scalars(), None)
    assert all(torch.isnan(p).all() for p in params)


class _UnknownLrKind(FusedSGD):
    coefficients = FusedSGD.coefficients & ~31 | len(L.LR_KINDS) << 3  # LR: a kind no prepare stage has


@pytest.mark.parametrize("cls,error", [(_Unknown, f"unknown rule code {_Unknown.rule}"),
                                       (_UnknownLrKind, "bad coefficient program: slot 0 has kind 3")],
                         ids=["rule", "coefficient-kind"])
@pytest.mark.parametrize("backend,device", backend_cases())
def test_an_unknown_rule_or_coefficient_kind_is_refused_before_anything_changes(backend, device, cls, error):
    params = _params()
    before = [p.detach().clone() for p in params]
    opt = cls(params, lr=0.1, momentum=0.9, backend=backend)
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=error):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, before, strict=True)) and not opt.state


@pytest.mark.parametrize("backend,device", KERNELS)
def test_a_prepare_stage_handed_an_unknown_coefficient_kind_writes_nan(backend, device):
    """Past the host's check (the plan's program rewritten by hand): a NaN step, never another
    kind's lr."""
    params = _params()
    opt = FusedSGD(params, lr=0.1, momentum=0.9, backend=backend)
    _steps(opt, params, 1)
    plan = opt._plans[None]
    plan.coefficients = _UnknownLrKind.coefficients
    opt._backend.update(plan, opt._settings, opt._clocks, plan_scalars(), None)
    assert all(torch.isnan(p).all() for p in params)


def plan_scalars():
    from fused_lr.core.plan import StepScalars

    return StepScalars(None, None)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_a_schedule_kind_without_a_formula_never_passes_for_another(backend, device):
    """A schedule table whose segment kind no evaluator knows (written past the host's checks):
    Numba's evaluator raises, Triton's gives NaN; never the constant schedule's p0."""
    from fused_lr import schedules

    params = _params()
    opt = FusedSGD(params, lr=0.1, backend=backend, schedule=schedules.Exponential(0.5))
    _steps(opt, params, 1)
    settings = opt._settings
    settings.schedules[0, 0, 1] = max(L.SCHEDULE_KINDS.values()) + 1
    settings.version += 1
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    try:
        opt._backend.update(opt._plans[None], settings, opt._clocks, plan_scalars(), None)
    except ValueError as e:
        assert backend == "numba" and "unknown schedule segment kind" in str(e)
        assert all(torch.equal(a, b) for a, b in zip(params, before, strict=True))
    else:
        assert all(torch.isnan(p).all() for p in params)
