"""Shared pieces of the benchmark suites: one live case at a time, compiled once, ratios at the end.

A case is one (device, scheme, L, mode[, window]) with three paths on the same inputs: flexpos,
the dense path (materialised bias + SDPA) and the floor (SDPA without positional effect). The
suites run a case's paths back to back; building the next case drops the previous one and
resets torch.compile, so each case compiles once, outside the timings, and the recompile limit
(8 per function) is never reached.
"""

from __future__ import annotations

import gc
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from flexpos.bench import GIB, Case, PeakMemory, Runner, Setup, available_bytes, build_case

PATHS = ("flexpos", "dense", "floor")
# group -> path -> median seconds, filled by `run` and printed by conftest's terminal summary
MEDIANS: dict[str, dict[str, float]] = defaultdict(dict)
# scheme -> (L, flexpos peak MiB) of the last measured case, to foresee flexpos' own memory
_FLEXPOS_PEAK: dict[tuple[str, str, str], tuple[int, float]] = {}


@dataclass
class Live:
    key: tuple
    setup: Setup
    case: Case
    runner: Runner
    memory: PeakMemory
    flexpos_error: Optional[str] = None


_live: Optional[Live] = None


def lengths(default: tuple[int, ...]) -> list[int]:
    """The suite's lengths, or those in FLEXPOS_BENCH_LENGTHS; a window suite runs at the
    one length given there, else at its own."""
    text = os.environ.get("FLEXPOS_BENCH_LENGTHS")
    return [int(x) for x in text.replace(",", " ").split()] if text else list(default)


def live_case(setup: Setup) -> Live:
    """The case for ``setup``, built (and its flexpos path compiled) on first use."""
    global _live
    key = tuple(sorted(vars(setup).items()))
    if _live is not None and _live.key == key:
        return _live
    _live = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    device = torch.device(setup.device)
    case = build_case(setup)
    live = Live(key, setup, case, Runner(device, setup.backward, case.leaves), PeakMemory(device))
    flexpos_guard(live)
    try:
        live.runner.call(case.flexpos)  # compiles; excluded from every timing
    except Exception as err:  # the benchmark reports it; later cases start from a reset
        live.flexpos_error = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
        torch._dynamo.reset()
    _live = live
    return live


def flexpos_guard(live: Live) -> None:
    """Skip flexpos where its memory, extrapolated as L**2 from a smaller L, would not fit."""
    s = live.setup
    seen = _FLEXPOS_PEAK.get((s.device, s.scheme, str(s.backward)))
    limit = available_bytes(torch.device(s.device))
    if seen is None or limit is None or seen[0] >= s.length:
        return
    need = seen[1] * 2**20 * (s.length / seen[0]) ** 2
    if need > 0.8 * limit:
        live.flexpos_error = (
            f"skipped: would need ~{need / GIB:.1f} GiB ({seen[1]:.0f} MiB at L={seen[0]}, scaled as L^2)"
        )


def run(benchmark, setup: Setup, path: str, rounds: int = 3) -> None:
    """Benchmark one path of ``setup``'s case; records peak memory in extra_info."""
    live = live_case(setup)
    s = setup
    mode = "fwd+bwd" if s.backward else "fwd"
    window = f" window={s.window:g}" if s.scheme == "window" else ""
    group = f"{s.device} {s.scheme} L={s.length}{window} {mode}"
    benchmark.group = group
    benchmark.extra_info.update(scheme=s.scheme, length=s.length, path=path, mode=mode, dtype=s.dtype)
    if path == "flexpos" and live.flexpos_error:
        pytest.skip(f"flexpos: {live.flexpos_error}")
    fn = getattr(live.case, path)
    if path == "dense":
        limit = available_bytes(torch.device(s.device))
        if limit is not None and live.case.dense_bytes > 0.9 * limit:
            pytest.skip(f"dense path would need {live.case.dense_bytes / GIB:.1f} GiB ({limit / GIB:.1f} GiB free)")
        try:
            live.runner.call(fn)  # warm-up; an out-of-memory here is a result, not a failure
        except torch.cuda.OutOfMemoryError:
            gc.collect()
            torch.cuda.empty_cache()
            pytest.skip("dense path: CUDA out of memory")
    _, peak = live.memory.measure(lambda: live.runner.call(fn))
    if peak is not None:
        benchmark.extra_info["peak_mb"] = round(peak, 1)
        if path == "flexpos":
            _FLEXPOS_PEAK[(s.device, s.scheme, str(s.backward))] = (s.length, peak)

    def target() -> None:
        live.runner.call(fn)
        live.runner.sync()

    benchmark.pedantic(target, rounds=rounds, iterations=1, warmup_rounds=0)
    MEDIANS[group][path] = benchmark.stats.stats.median


def summary_lines() -> list[str]:
    """One line per case: dense / flexpos and flexpos / floor time ratios."""
    lines = []
    for group, times in MEDIANS.items():
        parts = []
        if "dense" in times and "flexpos" in times:
            parts.append(f"dense/flexpos {times['dense'] / times['flexpos']:.2f}x")
        if "floor" in times and "flexpos" in times:
            parts.append(f"flexpos/floor {times['flexpos'] / times['floor']:.2f}x")
        if "flex_floor" in times and "flexpos" in times:
            parts.append(f"flex-floor/flexpos {times['flex_floor'] / times['flexpos']:.2f}")
        if parts:
            lines.append(f"{group:40s} " + "  ".join(parts))
    return lines
