"""Fixtures for the step benchmarks: the contenders come from fused_lr.tools.bench, built once per
model and optimizer (clip + SGD momentum, clip + AdamW; each with a cosine schedule)."""

import pytest

from fused_lr.tools import bench

MODELS = ("resnet18", "resnet50")


def pytest_generate_tests(metafunc):
    if "model" in metafunc.fixturenames:
        metafunc.parametrize("model", MODELS, scope="module")
    if "optimizer" in metafunc.fixturenames:
        metafunc.parametrize("optimizer", sorted(bench.OPTIMIZERS), scope="module")
    if "contender" in metafunc.fixturenames:
        names = [f"torch {impl}" for impl in bench.TORCH_IMPLS] + [f"fused_lr {b}" for b in bench.cpu_backends()]
        metafunc.parametrize("contender", names)


@pytest.fixture(scope="module")
def steps(model, optimizer):
    """Every contender's step function for ``model`` plus the streaming bound."""
    fns = bench.contenders(model, bench.cpu_backends(), optimizer)
    numel = sum(p.numel() for g in bench.parameter_groups(model) for p in g["params"])
    fns.update(bench.stream_steps(numel, optimizer))
    return fns
