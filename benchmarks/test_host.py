"""Host cost of one step on ResNet-50's 161 tensors shrunk to 1-8 elements (fused_lr/tools/bench/host.py,
``fused-lr bench --host``): torch fused SGD + clip_grad_norm_(foreach) + scheduler against each fused_lr
backend's host path, the GPU launches stubbed (built directly: no TRITON_INTERPRET). ``make bench`` runs it;
the figures are in benchmarks/README.md."""

import pytest

from fused_lr.tools.bench import host


@pytest.fixture(scope="module")
def contenders():
    return host.contenders()


@pytest.mark.parametrize("name", list(host.available()))
def test_host_step(benchmark, contenders, name):
    benchmark.group = "host cost per step"
    new_grads, step = contenders[name]
    benchmark.pedantic(step, setup=new_grads, rounds=200, warmup_rounds=20)
