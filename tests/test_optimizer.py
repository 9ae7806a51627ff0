"""FusedSGD as a torch.optim.Optimizer: groups, introspection, dispatch."""

import pytest
import torch
from cases import backend_cases, batches, make_model

import fused_lr
from fused_lr import FusedSGD, schedules


def test_is_a_torch_optimizer_with_torch_positional_order():
    model = make_model()
    opt = FusedSGD(model.parameters(), 0.1, 0.9, 0.0, 5e-4, True)  # lr, momentum, dampening, wd, nesterov
    assert isinstance(opt, torch.optim.Optimizer)
    g = opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["dampening"], g["weight_decay"], g["nesterov"]) == (0.1, 0.9, 0.0, 5e-4, True)


def test_named_parameters_are_accepted():
    model = make_model()
    opt = FusedSGD(model.named_parameters(), lr=0.1)
    assert len(opt.param_groups[0]["params"]) == len(list(model.parameters()))


def test_available_backends_reports_each_backend():
    status = fused_lr.available_backends()
    assert set(status) == {"reference", "numba", "triton", "cuda"}
    assert status["reference"] is True
    for name, value in status.items():
        assert value is True or (isinstance(value, str) and value), name


@pytest.mark.parametrize("backend,device", backend_cases())
def test_last_grad_norm_is_clip_grad_norms_total(backend, device):
    model = make_model(torch.float64, device)
    twin = make_model(torch.float64, device)
    opt = FusedSGD(model.parameters(), lr=0.1, max_grad_norm=0.01, backend=backend)
    x, y = next(batches(1, torch.float64, device))
    for m in (model, twin):
        torch.nn.functional.cross_entropy(m(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    expected = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.01)
    assert float(expected) > 0.01  # clipping was active
    assert opt.last_grad_norm.device.type == device
    assert float(opt.last_grad_norm) == pytest.approx(float(expected), rel=1e-12)
    # the user's gradients are left as they were: clipping happens inside the step
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)


def test_current_lr_follows_each_groups_schedule():
    model = make_model()
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    warm = schedules.Warmup(5, schedules.Cosine(20))
    opt = FusedSGD([dict(params=decay), dict(params=rest, lr=0.01, schedule=schedules.Constant())],
                   lr=0.1, momentum=0.9, schedule=warm)
    for k, (x, y) in enumerate(batches(12)):
        assert opt.current_lr() == pytest.approx([0.1 * warm(k), 0.01])
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert opt.current_lr()[0] == pytest.approx(0.1 * warm(12))
