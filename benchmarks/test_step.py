"""One optimizer step on ResNet parameter sets: torch's SGD/AdamW paths vs the fused_lr backends.

Run with ``pytest benchmarks/ --benchmark-only``; ``fused-lr bench`` times the same functions
interleaved and prints the ratios and the streaming-bound fraction.
"""

import pytest

from fused_lr.tools.bench import STREAM_PASSES

ROUNDS, WARMUP = 10, 3


def test_step(benchmark, steps, model, optimizer, contender):
    benchmark.group = f"{model} {optimizer} step"
    benchmark.pedantic(steps[contender], rounds=ROUNDS, warmup_rounds=WARMUP)


@pytest.mark.parametrize("name", STREAM_PASSES)
def test_streaming_bound(benchmark, steps, model, optimizer, name):
    benchmark.group = f"{model} {optimizer} step"
    benchmark.pedantic(steps[name], rounds=ROUNDS, warmup_rounds=WARMUP)
