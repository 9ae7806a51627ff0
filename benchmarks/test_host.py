"""Host cost of one step on ResNet-50's 161 tensors shrunk to 1-8 elements (fused_lr/tools/host_bench.py):
torch fused SGD + clip_grad_norm_(foreach) + scheduler against each fused_lr backend's host path
(GPU launches stubbed). ``make bench`` runs it; the figures are in benchmarks/README.md."""

import pytest

from fused_lr.tools import host_bench


@pytest.mark.parametrize("name", list(host_bench.contenders()))
def test_host_step(benchmark, name):
    new_grads, step = host_bench.contenders()[name]
    benchmark.pedantic(step, setup=new_grads, rounds=200, warmup_rounds=20)
