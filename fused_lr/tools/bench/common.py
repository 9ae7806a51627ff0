"""What every benchmark run shares: the thread counts, the machine's description, the verdict on
its own disturbance, and the output folder checked before anything is timed.

A shared 2-core machine distorts timings badly (torch's and Numba's OpenMP workers spin at
barriers when another process holds a core), so every run measures its own disturbance: the load
average before and after, the spread between each contender's median and fastest step, and (where
the benchmark has one) a bandwidth probe repeated at the end. A run past the limits says so plainly.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path

from fused_lr.tools.cli import CommandError, OneLineParser, output_folder

# A run is flagged when another process held the machine: the 1-minute load average beyond what
# the benchmark's own threads make, a contender's median more than 25 % above its fastest step,
# or the streaming probe's bandwidth moving by more than 15 % between the start and the end.
SPREAD_LIMIT, PROBE_DRIFT_LIMIT = 1.25, 0.15


def disturbance(load_before: float, load_after: float, threads: int, spreads: dict[str, float],
                probe_before: float, probe_after: float) -> list[str]:
    """Why a run cannot be trusted (empty when it can)."""
    reasons = []
    own = threads + 0.5
    if max(load_before, load_after) > own:
        reasons.append(f"load average {load_before:.1f} -> {load_after:.1f} with {threads} benchmark threads: "
                       f"other processes held cores")
    wide = {name: s for name, s in spreads.items() if s > SPREAD_LIMIT}
    if wide:
        worst = max(wide, key=wide.get)
        reasons.append(f"{len(wide)} contender(s) with median/fastest above {SPREAD_LIMIT} "
                       f"(worst {worst}: {wide[worst]:.2f})")
    drift = abs(probe_after - probe_before) / max(probe_before, 1e-9)
    if drift > PROBE_DRIFT_LIMIT:
        reasons.append(f"bandwidth probe moved {100 * drift:.0f}% ({probe_before:.0f} -> {probe_after:.0f} GB/s)")
    return reasons


def verdict(reasons: list[str]) -> str:
    if not reasons:
        return "undisturbed: load, spread and the bandwidth probe stayed within limits"
    return "DISTURBED, do not trust these figures (rerun on a quiet machine): " + "; ".join(reasons)


def set_threads(threads: int) -> None:
    """The same worker count for torch and Numba, so neither contender gets more cores."""
    import numba
    import torch

    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


def last_level_cache_bytes() -> int | None:
    """Bytes of the largest CPU cache this machine lists in Linux sysfs (None where it lists none)."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=None)


def machine() -> dict:
    import numba
    import torch

    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "")
    except OSError:
        model = ""
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        layer = "unset"
    return dict(cpu=model or platform.processor(), cores=torch.get_num_threads(), numba_threads=numba.get_num_threads(),
                threading_layer=layer, torch=torch.__version__, numba=numba.__version__,
                python=platform.python_version(),
                # thread wait policies change how torch and numba threads share busy cores
                env={k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "NUMBA_NUM_THREADS",
                                                     "NUMBA_THREADING_LAYER")})


def run_into(parser: argparse.ArgumentParser, out: Path, run: Callable[[], int], option: str = "--out") -> int:
    """``run()`` once ``out`` is known to take files (made if missing, removed again if the run
    fails and leaves it empty); a folder that cannot be written is a one-line error before
    anything is timed."""
    try:
        with output_folder(out, option):
            return run()
    except CommandError as e:
        parser.exit(e.exit_code, f"{parser.prog}: error: {e}\n")


def parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """An argument parser whose errors are one line (the fused-lr command's)."""
    return OneLineParser(prog=prog, description=description, epilog=epilog,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
