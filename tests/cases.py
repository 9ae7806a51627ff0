"""Shared test fixtures: the backends under test, a small conv+BN+linear model, data."""

import pytest
import torch
from torch import nn

from fused_lr import available_backends
from fused_lr.backends import devices


def backend_cases():
    """(backend, device) pairs: every registered backend on each device it runs on here,
    and a skip naming the reason for each one that cannot run."""
    cases = []
    for name, status in available_backends().items():
        if status is not True:
            cases.append(pytest.param(name, "cpu", id=name, marks=pytest.mark.skip(reason=f"{name}: {status}")))
            continue
        for dev in ("cpu", "cuda"):
            if dev not in devices(name):
                continue
            if dev == "cuda" and not torch.cuda.is_available():
                cases.append(pytest.param(name, dev, id=f"{name}-{dev}",
                                          marks=pytest.mark.skip(reason="no CUDA device here")))
            else:
                cases.append(pytest.param(name, dev, id=f"{name}-{dev}"))
    return cases


class SmallNet(nn.Module):
    """conv + BN + residual-free head: the smallest model with every kind of ResNet parameter."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


def make_model(dtype=torch.float64, device="cpu", seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return SmallNet().to(device=device, dtype=dtype)


def batches(n: int, dtype=torch.float64, device="cpu", seed=1, size=8):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(size, 3, 6, 6, generator=g).to(device=device, dtype=dtype)
        y = torch.randint(0, 5, (size,), generator=g).to(device)
        yield x, y


def split_groups(model: nn.Module):
    """The ResNet recipe: decay on conv/linear weights, none on BN and biases."""
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    return decay, no_decay


def max_rel_diff(a: nn.Module, b: nn.Module) -> float:
    worst = 0.0
    for pa, pb in zip(a.parameters(), b.parameters()):
        scale = pa.detach().abs().max().clamp_min(1e-30)
        worst = max(worst, float((pa.detach() - pb.detach()).abs().max() / scale))
    return worst
