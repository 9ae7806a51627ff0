"""``pytest --benchmark-only`` at the repository root runs the benchmarks.

pyproject.toml loads this plugin (``-p`` in addopts). The default run collects ``testpaths``, the
tests, which hold no benchmark, so ``--benchmark-only`` alone skipped every one of them. Given
``--benchmark-only`` and no paths, from the root, this collects benchmarks/ instead, as if it had
been named (``make bench``), and loads none of the tests' conftest. Plain ``pytest`` is left
alone. Where a ``--benchmark-only`` run selects no benchmark all the same (paths given), the
summary says where they are.
"""

from __future__ import annotations

import pytest

BENCHMARKS = "benchmarks"
_NONE_SELECTED = pytest.StashKey[bool]()


def pytest_load_initial_conftests(early_config, parser, args):
    ns = early_config.known_args_namespace
    if not getattr(ns, "benchmark_only", False) or ns.file_or_dir or getattr(ns, "pyargs", False):
        return
    if early_config.invocation_params.dir != early_config.rootpath:  # testpaths apply at the root only
        return
    if (early_config.rootpath / BENCHMARKS).is_dir():
        args.append(BENCHMARKS)  # the arguments pytest parses next
        ns.file_or_dir = [BENCHMARKS]  # what picks the initial conftests (pytest's own hook runs last)


def pytest_collection_modifyitems(session, config, items):
    if config.getoption("benchmark_only", False):
        config.stash[_NONE_SELECTED] = not any("benchmark" in getattr(i, "fixturenames", ()) for i in items)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if config.stash.get(_NONE_SELECTED, False):
        terminalreporter.write_line(f"--benchmark-only: no benchmark was selected; they are in {BENCHMARKS}/ "
                                    f"(pytest {BENCHMARKS}/ --benchmark-only, or make bench)")
