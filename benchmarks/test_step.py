"""One optimizer step on ResNet parameter sets: torch's SGD/AdamW paths vs the fused_lr backends.

Run with ``pytest --benchmark-only`` (or ``make bench``); ``fused-lr bench`` times the same functions
interleaved and prints the ratios, the streaming-bound fraction and its verdict on the run.
"""

from fused_lr.tools.bench.step import STREAM

ROUNDS, WARMUP = 10, 3


def test_step(benchmark, steps, model, optimizer, contender):
    benchmark.group = f"{model} {optimizer} step"
    benchmark.pedantic(steps[contender], rounds=ROUNDS, warmup_rounds=WARMUP)


def test_streaming_bound(benchmark, steps, model, optimizer):
    benchmark.group = f"{model} {optimizer} step"
    benchmark.pedantic(steps[STREAM], rounds=ROUNDS, warmup_rounds=WARMUP)
