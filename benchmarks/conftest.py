"""pytest-benchmark suites: ``pytest benchmarks/ --benchmark-only`` (never part of ``pytest``).

The unit run collects ``tests/`` only (``testpaths``); these suites take minutes to hours, so
a run without ``--benchmark-only`` (``pytest .``, say) skips them.
``FLEXPOS_BENCH_LENGTHS=1024,4096`` limits the lengths of the scheme suites (see
:func:`_harness.lengths`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from _harness import summary_lines  # noqa: E402


def pytest_collection_modifyitems(config, items) -> None:
    if config.getoption("benchmark_only", False):
        return
    skip = pytest.mark.skip(reason="benchmarks run with `pytest benchmarks/ --benchmark-only`")
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(skip)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter) -> None:
    lines = summary_lines()
    if lines:
        terminalreporter.section("flexpos ratios (medians, same process, same inputs)")
        for line in lines:
            terminalreporter.write_line(line)
