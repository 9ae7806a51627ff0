"""Every benchmark of fused_lr, behind one command: ``fused-lr bench`` (or ``python -m fused_lr.tools.bench``,
where nothing is installed yet, as on a bare GPU machine).

  fused-lr bench [step] [--optimizer sgd|adamw] ...   the CPU step on ResNet parameter sets (step.py)
  fused-lr bench --host                               the host cost of a step, GPU launches stubbed (host.py)
  fused-lr bench fsdp [--views] [--clip]              FSDP2 on gloo CPU ranks (fsdp.py; make bench-fsdp)
  fused-lr bench gpu WORKLOAD                         one GPU workload, its result as JSON (gpu.py)
  fused-lr bench gpu-check                            every GPU check on a bare GPU machine (gpu_check.py;
                                                      make gpu-check)

The step they all time is recipe.py's (clip, weight decay, momentum or AdamW, a cosine schedule;
torch's contenders and fused_lr's), and common.py holds what every run shares: thread counts, the
machine, the verdict on its own disturbance, the output folder. The pytest-benchmark cases in
benchmarks/ call the same functions (``pytest --benchmark-only`` collects them: pytest_plugin.py).

Importing this package loads nothing heavy: each command imports its own module.
"""

from __future__ import annotations

import sys
from importlib import import_module

COMMANDS = {"step": "step", "fsdp": "fsdp", "gpu": "gpu", "gpu-check": "gpu_check"}  # word -> module


def main(argv: list[str] | None = None) -> int:
    """``fused-lr bench [COMMAND] ...``: without a command word, the CPU step benchmark."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "step"
    return import_module(f"{__name__}.{COMMANDS[command]}").main(argv)
