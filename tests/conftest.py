import os
from collections import Counter

import pytest

# Threads. Every tensor in this suite is tiny, so a second torch thread buys nothing, and on a
# loaded machine OpenMP threads that spin while waiting for each other made runs several times
# slower (two 200-step parity runs under a load of 4 on 2 cores: 14 s of CPU with OMP_NUM_THREADS=1,
# 32 s with 2). Numba's parallel kernels keep their threads (how they split the work is under
# test) but wait passively, which OpenMP reads once, when torch loads it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

torch.set_num_threads(1)

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; this must be
# decided before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# Skip summary: pytest's `-rs` (in `-ra`, see pyproject addopts) prints one line per test file and
# reason, so a reason shared by many files (every GPU-only case) repeats once per file. These two
# hooks take the skips out of pytest's short summary and print one line per distinct reason.
@pytest.hookimpl(trylast=True)  # after the terminal reporter exists
def pytest_configure(config):
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and "s" in reporter.reportchars and getattr(reporter, "foldskipped", True):
        reporter.reportchars = reporter.reportchars.replace("s", "")
        config.stash[_SKIPS_BY_REASON] = True


_SKIPS_BY_REASON = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)  # the outer wrapper: runs after pytest's short summary
def pytest_terminal_summary(terminalreporter, config):
    result = yield
    if config.stash.get(_SKIPS_BY_REASON, False):
        reasons = Counter(_skip_reason(report) for report in terminalreporter.stats.get("skipped", []))
        if reasons:
            terminalreporter.write_sep("=", "skipped, one line per reason", cyan=True, bold=True)
            for reason, n in reasons.most_common():
                terminalreporter.write_line(f"SKIPPED [{n}] {reason}", yellow=True)
    return result


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")
