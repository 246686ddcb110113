"""Running one case: first calls (compile), agreement, interleaved timed runs, peak memory."""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .cases import Case, Setup, build_case
from .memory import GIB, PeakMemory, available_bytes

Log = Callable[[str], None]


@dataclass
class Row:
    scheme: str
    length: int
    batch: int
    heads: int
    head_dim: int
    dtype: str
    mode: str
    device: str
    dense_ms: Optional[float] = None
    flexpos_ms: Optional[float] = None
    floor_ms: Optional[float] = None
    speedup: Optional[float] = None
    dense_peak_mb: Optional[float] = None  # peaks: memory growth in MiB
    flexpos_peak_mb: Optional[float] = None
    floor_peak_mb: Optional[float] = None
    max_abs_diff: Optional[float] = None
    dense_abs_diff: Optional[float] = None
    compile_s: Optional[float] = None
    dense_estimate_gib: Optional[float] = None
    dense_status: str = "ok"
    flexpos_status: str = "ok"
    window: Optional[float] = None


class Runner:
    """Runs the three paths of one case: forward only, or forward + backward."""

    def __init__(self, device: torch.device, backward: bool, leaves: Sequence[Tensor]) -> None:
        self.device, self.backward, self.leaves = device, backward, list(leaves)
        self.grad_out: Optional[Tensor] = None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def call(self, fn: Callable[[], Tensor]) -> tuple[Tensor, ...]:
        """Output (and input gradients when running backward), detached."""
        if not self.backward:
            with torch.no_grad():
                return (fn(),)
        for t in self.leaves:
            t.grad = None
        with torch.enable_grad():
            out = fn()
            if self.grad_out is None:
                gen = torch.Generator().manual_seed(1)
                self.grad_out = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
            out.backward(self.grad_out)
        grads = []
        for t in self.leaves:
            if t.grad is None:
                raise RuntimeError("the backward pass left an input without a gradient")
            grads.append(t.grad)
            t.grad = None
        return (out.detach(), *grads)

    def first(self, fn: Callable[[], Tensor]) -> tuple[float, tuple[Tensor, ...]]:
        """(seconds, outputs) of a first call: compile and warm-up included."""
        self.sync()
        start = time.perf_counter()
        out = self.call(fn)
        self.sync()
        return time.perf_counter() - start, out

    def timed(self, fn: Callable[[], Tensor]) -> float:
        self.sync()
        start = time.perf_counter()
        self.call(fn)
        self.sync()
        return time.perf_counter() - start


def _full(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".strip()


def _short(err: BaseException) -> str:
    """The error's first line, cut to fit a table note (the log has it whole)."""
    text = _full(err).splitlines()[0]
    return text if len(text) <= 90 else text[:87] + "..."


def _free(device: torch.device) -> None:
    """Memory a failed call left behind, returned (to the CUDA allocator's pool too)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(err).lower()


def _max_diff(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))


def _agreement(
    s: Setup, case: Case, runner: Runner, row: Row, flexpos_out: Sequence[Tensor], dense_out: Sequence[Tensor],
    log: Log, tag: str,
) -> None:
    """``row.max_abs_diff``: flexpos' largest difference from the dense path (outputs, and input
    gradients when running backward). In float16/bfloat16, from the dense path rerun in float32
    on the same (rounded) inputs instead, next to the low-precision dense path's own difference
    (``row.dense_abs_diff``): its bias, cast to q's dtype, is off by whole units where large."""
    if s.dtype == "float32":
        row.max_abs_diff = _max_diff(flexpos_out, dense_out)
        return
    log(f"{tag}: dense path in float32 on the same inputs, the reference ...")
    try:
        reference = build_case(dataclasses.replace(s, dtype="float32"))
        with torch.no_grad():
            for wide, low in zip(reference.leaves, case.leaves):
                wide.copy_(low)
        wide_runner = Runner(runner.device, s.backward, reference.leaves)
        wide_runner.grad_out = None if runner.grad_out is None else runner.grad_out.float()
        expected = wide_runner.call(reference.dense)
    except Exception as err:  # the difference from the low-precision dense path, then
        log(f"{tag}: no float32 reference ({_full(err)}): max |diff| is from the {s.dtype} dense path")
        _free(runner.device)
        row.max_abs_diff = _max_diff(flexpos_out, dense_out)
        return
    row.max_abs_diff = _max_diff(flexpos_out, expected)
    row.dense_abs_diff = _max_diff(dense_out, expected)


def _reset_compiled() -> None:
    torch._dynamo.reset()


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else round(seconds * 1e3, 2)


def _first_flexpos(
    case: Case, runner: Runner, row: Row, need: Optional[float], limit: Optional[int], log: Log, tag: str
) -> Optional[tuple[float, tuple[Tensor, ...]]]:
    """flexpos' first call (compile included), or None with ``row.flexpos_status`` saying why."""
    if need is not None and limit is not None and need > 0.8 * limit:
        row.flexpos_status = f"skipped: would need ~{need / GIB:.1f} GiB (extrapolated from its peaks at smaller L)"
        log(f"{tag}: flexpos {row.flexpos_status}")
        return None
    slow = " (the first compile takes ~15 s per variant on CPU)" if runner.device.type == "cpu" else ""
    log(f"{tag}: flexpos first call, compiling{slow} ...")
    try:
        return runner.first(case.flexpos)
    except Exception as err:  # reported in the table; the case's compiled state is dropped
        row.flexpos_status = "error: " + _short(err)
        log(f"{tag}: flexpos failed: {_full(err)}")
        _reset_compiled()
        return None


def _first_dense(
    case: Case, runner: Runner, row: Row, limit: Optional[int], log: Log, tag: str
) -> Optional[tuple[float, tuple[Tensor, ...]]]:
    """The dense path's first call, or None with ``row.dense_status`` saying why.

    On CPU a dense path that does not fit would swap or be killed; on CUDA it fails cleanly
    with an out-of-memory error, so it is tried whatever the (upper) estimate says.
    """
    if runner.device.type == "cpu" and limit is not None and case.dense_bytes > 0.9 * limit:
        row.dense_status = f"skipped: would need {case.dense_bytes / GIB:.1f} GiB ({limit / GIB:.1f} GiB free)"
        log(f"{tag}: dense path {row.dense_status}")
        return None
    log(f"{tag}: dense path first call (estimated {case.dense_bytes / GIB:.2f} GiB) ...")
    try:
        return runner.first(case.dense)
    except Exception as err:
        row.dense_status = ("out of memory: " if _is_oom(err) else "error: ") + _short(err)
        log(f"{tag}: dense path failed: {_full(err)}")
        _free(runner.device)
        return None


def _time_paths(
    paths: dict[str, Callable[[], Tensor]], runner: Runner, memory: PeakMemory, row: Row, repeat: int, slow_s: float
) -> dict[str, float]:
    """Median seconds per path over ``repeat`` interleaved rounds, after one round that records
    each path's peak memory into ``row`` (its times, which include the memory probe, count only
    for paths slower than ``slow_s``: those run just once)."""
    times: dict[str, list[float]] = {}
    for name, fn in paths.items():
        seconds, peak = memory.measure(lambda: runner.timed(fn))
        setattr(row, f"{name}_peak_mb", None if peak is None else round(peak, 1))
        times[name] = [seconds] if seconds >= slow_s else []
    for _ in range(repeat):
        for name, fn in paths.items():
            if not times[name] or times[name][0] < slow_s:
                times[name].append(runner.timed(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def run_case(
    s: Setup,
    repeat: int,
    memory: PeakMemory,
    log: Log,
    slow_s: float = 5.0,
    flexpos_need: Optional[float] = None,
    fresh: bool = True,
) -> Row:
    """One (scheme, L): first calls (compile), max |difference|, interleaved timed runs, peaks.

    ``flexpos_need``: bytes flexpos is expected to take (from a smaller L); above 80% of the
    available memory flexpos is not run. ``fresh``: drop compiled code first (the first length
    of a scheme; later lengths reuse it: symbolic sizes need no recompile).
    """
    device = torch.device(s.device)
    row = Row(s.scheme, s.length, s.batch, s.heads, s.head_dim, s.dtype,
              "fwd+bwd" if s.backward else "fwd", s.device,
              window=s.window if s.scheme == "window" else None)
    case = build_case(s)
    runner = Runner(device, s.backward, case.leaves)
    row.dense_estimate_gib = round(case.dense_bytes / GIB, 2)
    if fresh:
        _reset_compiled()
    tag = f"{s.scheme} L={s.length}"
    limit = available_bytes(device)
    first = {
        "flexpos": _first_flexpos(case, runner, row, flexpos_need, limit, log, tag),
        "dense": _first_dense(case, runner, row, limit, log, tag),
        "floor": runner.first(case.floor),
    }
    if first["flexpos"] is not None and first["dense"] is not None:
        _agreement(s, case, runner, row, first["flexpos"][1], first["dense"][1], log, tag)
    started = {name: result[0] for name, result in first.items() if result is not None}
    first.clear()  # the outputs: free them before timing
    gc.collect()

    paths = {name: fn for name, fn in (("flexpos", case.flexpos), ("dense", case.dense), ("floor", case.floor))
             if name in started}
    log(f"{tag}: timing {', '.join(paths)} (up to {repeat} interleaved runs each) ...")
    median = _time_paths(paths, runner, memory, row, repeat, slow_s)
    row.flexpos_ms = _ms(median.get("flexpos"))
    row.dense_ms = _ms(median.get("dense"))
    row.floor_ms = _ms(median.get("floor"))
    if "flexpos" in median:
        row.compile_s = round(max(started["flexpos"] - median["flexpos"], 0.0), 2)
    if row.dense_ms and row.flexpos_ms:
        row.speedup = float(f"{row.dense_ms / row.flexpos_ms:.3g}")  # 3 significant digits, also below 1x
    gc.collect()
    return row
