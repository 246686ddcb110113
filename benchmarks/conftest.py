"""pytest-benchmark suites: ``pytest benchmarks/ --benchmark-only`` (never part of ``pytest``).

The unit run collects ``tests/`` only (``testpaths``); these suites take minutes to hours.
``FLEXPOS_BENCH_LENGTHS=1024,4096`` limits the lengths of every suite.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from _harness import summary_lines  # noqa: E402


def lengths(default: tuple[int, ...]) -> list[int]:
    """The suite's lengths, or those in FLEXPOS_BENCH_LENGTHS."""
    text = os.environ.get("FLEXPOS_BENCH_LENGTHS")
    return [int(x) for x in text.replace(",", " ").split()] if text else list(default)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter) -> None:
    lines = summary_lines()
    if lines:
        terminalreporter.section("flexpos ratios (medians, same process, same inputs)")
        for line in lines:
            terminalreporter.write_line(line)
