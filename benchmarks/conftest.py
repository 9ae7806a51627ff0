"""The step benchmarks under pytest-benchmark: the contenders and the streaming bound come from
fused_lr.tools.bench.step, the functions ``fused-lr bench`` times, built once per model and
optimizer (clip + SGD momentum, clip + AdamW; each with a cosine schedule: recipe.py).

``pytest --benchmark-only`` at the root collects this folder (fused_lr/tools/bench/pytest_plugin.py);
plain ``pytest`` runs tests/ only. Nothing here sets an environment variable: the set of
contenders is the one ``fused-lr bench`` times, whatever ran before in the process.
"""

import pytest

from fused_lr.tools.bench import recipe, step

MODELS = ("resnet18", "resnet50")


def pytest_generate_tests(metafunc):
    if "model" in metafunc.fixturenames:
        metafunc.parametrize("model", MODELS, scope="module")
    if "optimizer" in metafunc.fixturenames:
        metafunc.parametrize("optimizer", sorted(recipe.OPTIMIZERS), scope="module")
    if "contender" in metafunc.fixturenames:
        names = [f"torch {impl}" for impl in recipe.TORCH_IMPLS] + [f"fused_lr {b}" for b in step.cpu_backends()]
        metafunc.parametrize("contender", names)


@pytest.fixture(scope="module")
def steps(model, optimizer):
    """Every contender's step function for ``model`` plus the streaming bound."""
    fns = step.contenders(model, step.cpu_backends(), optimizer)
    numel = sum(p.numel() for g in recipe.parameter_groups(model) for p in g["params"])
    fns.update(step.stream_steps(numel, optimizer))
    return fns
