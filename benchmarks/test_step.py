"""One optimizer step on ResNet parameter sets: torch's SGD paths vs the fused_lr backends.

Run with ``pytest benchmarks/ --benchmark-only``; ``fused-lr bench`` times the same functions
interleaved and prints the ratios and the streaming-bound fraction.
"""

import pytest

ROUNDS, WARMUP = 10, 3


def test_step(benchmark, steps, model, contender):
    benchmark.group = f"{model} step"
    benchmark.pedantic(steps[contender], rounds=ROUNDS, warmup_rounds=WARMUP)


@pytest.mark.parametrize("name", ["stream read g", "stream read p,g,b write p,b"])
def test_streaming_bound(benchmark, steps, model, name):
    benchmark.group = f"{model} step"
    benchmark.pedantic(steps[name], rounds=ROUNDS, warmup_rounds=WARMUP)
