"""Bad input: a clear error naming the problem, raised before anything changes."""

import math

import pytest
import torch
from cases import backend_cases, batches, make_model

from fused_lr import FusedSGD, available_backends, schedules


def params(n=2):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64)) for _ in range(n)]


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(lr=-0.1), ValueError, "lr"),
    (dict(lr=float("nan")), ValueError, "lr"),
    (dict(lr=float("inf")), ValueError, "lr"),
    (dict(momentum=1.0), ValueError, "momentum"),
    (dict(momentum=-0.1), ValueError, "momentum"),
    (dict(nesterov=True), ValueError, "nesterov"),
    (dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError, "nesterov"),
    (dict(max_grad_norm=0.0), ValueError, "max_grad_norm"),
    (dict(max_grad_norm=-1.0), ValueError, "max_grad_norm"),
    (dict(max_grad_norm=float("nan")), ValueError, "max_grad_norm"),
    (dict(clip_value=-1.0), ValueError, "clip_value"),
    (dict(weight_decay=-5e-4), ValueError, "weight_decay"),
    (dict(schedule=lambda k: 1.0), TypeError, "schedule"),
    (dict(schedule=schedules.MultiStep(list(range(1, 30)))), ValueError, "segments"),
    (dict(backend="tpu"), ValueError, "unknown backend 'tpu'"),
])
def test_bad_hyper_parameters(kwargs, error, message):
    with pytest.raises(error, match=message):
        FusedSGD(params(), **{"lr": 0.1, **kwargs})


def test_bad_hyper_parameter_in_a_group_names_the_group():
    with pytest.raises(ValueError, match="param group 1: momentum"):
        FusedSGD([dict(params=params(1)), dict(params=params(1), momentum=2.0)], lr=0.1)


def test_bad_parameters():
    p = params(2)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        FusedSGD([p[0], torch.zeros(3, dtype=torch.int64)], lr=0.1)
    with pytest.raises(ValueError, match="listed twice"):
        FusedSGD([p[0], p[1], p[0]], lr=0.1)
    with pytest.raises(ValueError, match="listed twice"):
        FusedSGD([dict(params=[p[0]]), dict(params=[p[0]])], lr=0.1)
    with pytest.raises(ValueError, match="one device"):
        FusedSGD([p[0], torch.nn.Parameter(torch.zeros(3, device="meta"))], lr=0.1)


def test_unavailable_backend_says_why():
    missing = {n: why for n, why in available_backends().items() if why is not True}
    if not missing:
        pytest.skip("every backend is available on this machine")
    name, why = next(iter(missing.items()))
    with pytest.raises(RuntimeError, match=f"backend '{name}' is unavailable"):
        FusedSGD(params(), lr=0.1, backend=name)
    assert why  # a non-empty reason


def snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()})


def assert_unchanged(model, opt, before):
    ps, state = before
    for p, q in zip(model.parameters(), ps):
        assert torch.equal(p.detach(), q)
    assert {id(p) for p in opt.state} == set(state)
    for p, s in opt.state.items():
        assert s.keys() == state[id(p)].keys()
        for k, v in s.items():
            assert torch.equal(v, state[id(p)][k]), k


def trained(backend, device, **kw):
    """A model and optimizer three steps into training, so there is state to protect."""
    model = make_model(torch.float32, device)
    opt = FusedSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, backend=backend,
                   schedule=schedules.Cosine(50), **kw)
    data = batches(4, torch.float32, device)
    for x, y in list(data)[:3]:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad()
    x, y = next(batches(1, torch.float32, device, seed=7))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return model, opt


def break_lr(model, opt):
    opt.param_groups[0]["lr"] = float("nan")


def break_momentum(model, opt):
    opt.param_groups[0]["momentum"] = 1.5


def sparse_grad(model, opt):
    p = model.fc.bias
    p.grad = p.grad.to_sparse()


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("breaker,message", [
    (break_lr, "lr must be"),
    (break_momentum, "momentum must be"),
    (sparse_grad, "sparse"),
])
def test_failed_step_changes_nothing(backend, device, breaker, message):
    model, opt = trained(backend, device, max_grad_norm=1.0)
    breaker(model, opt)
    before = snapshot(model, opt)
    with pytest.raises((ValueError, RuntimeError), match=message):
        opt.step()
    assert_unchanged(model, opt, before)


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_nonfinite_norm_raises_and_changes_nothing(backend, device, bad):
    model, opt = trained(backend, device, max_grad_norm=1.0, error_if_nonfinite=True)
    model.conv.weight.grad[0, 0, 0, 0] = bad
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="non-finite"):
        opt.step()
    assert_unchanged(model, opt, before)
    # the same optimizer goes on once the gradient is sane again
    model.conv.weight.grad[0, 0, 0, 0] = 0.0
    opt.step()
    assert {float(s["step"]) for s in opt.state.values()} == {4.0}


@pytest.mark.parametrize("backend,device", backend_cases())
def test_params_without_grad_are_skipped(backend, device):
    model = make_model(torch.float32, device)
    opt = FusedSGD(model.parameters(), lr=0.1, momentum=0.9, max_grad_norm=1.0, backend=backend)
    frozen = model.conv.weight
    x, y = next(batches(1, torch.float32, device))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    frozen.grad = None
    before = frozen.detach().clone()
    opt.step()
    assert torch.equal(frozen.detach(), before)
    assert frozen not in opt.state
    assert all(float(opt.state[p]["step"]) == 1.0 for p in model.parameters() if p is not frozen)
    # and a step where no parameter has a gradient is a no-op
    opt.zero_grad()
    opt.step()
    assert all(float(opt.state[p]["step"]) == 1.0 for p in model.parameters() if p is not frozen)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to split parameters across devices")
def test_parameter_moved_to_another_device_is_refused():
    model, opt = trained("reference", "cpu")
    p = model.fc.bias
    p.data = p.data.cuda()
    p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match="one device"):
        opt.step()
