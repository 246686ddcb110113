"""Measure flexpos' performance targets as ratios in one process and print them.

    python benchmarks/targets.py            # CPU targets (and GPU targets when CUDA is present)
    python benchmarks/targets.py --gpu-only # GPU targets only (benchmarks/gpu.sh)

CPU (float32):
  1. ALiBi forward, B=1 H=8 D=64, L=4096: flexpos >= 2x faster than the dense path.
  2. ALiBi forward, L=8192: flexpos' peak memory growth <= 1/10 of the dense path's;
     L=32768 runs.
  3. Rotary on (4, 4096, 8, 64): the compiled transform >= 4x faster than the original's
     ``mod_qkv`` (bio-attention when installed, else the eager formula of flexpos.bench).
GPU (bfloat16, B=4 H=16 D=64):
  4. L=8192 forward+backward: ALiBi and DPB >= 0.85x the throughput of flex with no
     score_mod, and >= 3x faster than the dense path.
  5. L=32768 forward+backward: the dense path runs out of memory or is >= 5x slower; flexpos runs.
  6. Rotary transform >= 70% of the GPU's memory bandwidth.

Timings are medians of interleaved runs (min in brackets: on a shared machine the fastest
run is the least disturbed one); compile time is excluded. torch.compile is reset between the
CPU cases, not between the GPU ones (sizes turn symbolic at the second L; later ones need no
recompile). Exit status 0 even when a target is missed: the printout is the result.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

try:
    import flexpos
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import flexpos

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from flexpos.bench import (  # noqa: E402
    GIB,
    Case,
    PeakMemory,
    Runner,
    Setup,
    available_bytes,
    bio_available,
    build_case,
    dense_rotate,
    irregular_positions,
    machine_facts,
)

RESULTS: list[tuple[str, str, str]] = []  # (target, measured, MET / MISSED / n/a)


def say(text: str = "") -> None:
    print(text, flush=True)


def verdict(name: str, measured: str, ok: Optional[bool]) -> None:
    mark = "n/a" if ok is None else ("MET" if ok else "MISSED")
    RESULTS.append((name, measured, mark))
    say(f"  -> {name}: {measured}  [{mark}]")


def interleaved(fns: dict[str, Callable[[], object]], sync: Callable[[], None], repeat: int) -> dict[str, list[float]]:
    """Host-timed runs, one path after the other, ``repeat`` rounds. A path that fails (say, out
    of GPU memory) is dropped from the result, and said so; the others go on."""
    fns = dict(fns)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in list(fns.items()):
            sync()
            start = time.perf_counter()
            failure = attempt(lambda fn=fn: (fn(), sync()))
            if failure:
                say(f"  {name}: {failure} while timing; dropped")
                del fns[name], times[name]
                release()
                continue
            times[name].append(time.perf_counter() - start)
    return times


def attempt(fn: Callable[[], object]) -> str:
    """Run ``fn``; '' if it worked, else what went wrong in one line. Callers free memory after
    this returns: inside the ``except`` block the traceback still holds the failed call's tensors."""
    try:
        fn()
        return ""
    except torch.cuda.OutOfMemoryError:
        return OOM
    except Exception as err:
        return f"failed: {type(err).__name__}: {str(err).splitlines()[0][:150] if str(err) else ''}"


OOM = "CUDA out of memory"


def device_seconds(fn: Callable[[], object], device: torch.device, calls: int = 20) -> float:
    """GPU seconds per call: ``calls`` calls queued back to back between two CUDA events, so the
    host's launch overhead overlaps the kernels instead of adding to them."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def fmt(t: Sequence[float]) -> str:
    return f"{statistics.median(t) * 1e3:,.1f} ms (min {min(t) * 1e3:,.1f})"


def ratio(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(median a / median b, min a / min b)."""
    return statistics.median(a) / statistics.median(b), min(a) / min(b)


def guarded(label: str, section: Callable[..., None], *args: object) -> None:
    """Run one section of targets; an error is reported as its verdict and the next section
    still runs."""
    failure = attempt(lambda: section(*args))
    if failure:
        verdict(label, failure, False)
        fresh()


def release() -> None:
    """Free what the last case left (Python garbage, the CUDA cache); compiled code stays."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fresh() -> None:
    """:func:`release`, and drop every compiled function (after a failed compile, which leaves
    later compiled calls on a slow path)."""
    torch._dynamo.reset()
    release()


def first_call(label: str, runner: Runner, fn: Callable[[], object]) -> Optional[float]:
    """Compile/warm one path; None (and a printed reason) if it fails."""
    start = time.perf_counter()
    failure = attempt(lambda: (runner.call(fn), runner.sync()))
    if not failure:
        return time.perf_counter() - start
    say(f"  {label}: {failure}")
    fresh()
    return None


# --------------------------------------------------------------------------------------------
# CPU


def cpu_alibi_speed(repeat: int) -> None:
    say("\n[1] CPU ALiBi forward, float32, B=1 H=8 D=64, L=4096: flexpos vs dense")
    fresh()
    s = Setup("alibi", 4096, batch=1, heads=8, head_dim=64)
    case = build_case(s)
    runner = Runner(torch.device("cpu"), False, case.leaves)
    say(f"  dense = {case.dense_label}")
    compile_s = first_call("flexpos", runner, case.flexpos)
    if compile_s is None:
        verdict("CPU ALiBi L=4096 speed-up >= 2x", "flexpos did not run", False)
        return
    say(f"  flexpos first call (compile + run): {compile_s:.1f} s")
    out_f, out_d = runner.call(case.flexpos)[0], runner.call(case.dense)[0]
    say(f"  max |flexpos - dense| = {float((out_f - out_d).abs().max()):.1e}")
    runner.call(case.floor)
    times = interleaved({"dense": lambda: runner.call(case.dense), "flexpos": lambda: runner.call(case.flexpos),
                         "floor": lambda: runner.call(case.floor)}, runner.sync, repeat)
    for name, t in times.items():
        say(f"  {name:8s} {fmt(t)}")
    med, best = ratio(times["dense"], times["flexpos"])
    verdict("CPU ALiBi L=4096 speed-up >= 2x", f"{med:.2f}x median ({best:.2f}x min)", med >= 2.0)


def cpu_alibi_memory() -> None:
    say("\n[2] CPU ALiBi forward, float32, B=1 H=8 D=64: peak memory growth at L=8192; L=32768 runs")
    memory = PeakMemory(torch.device("cpu"))
    say(f"  memory: {memory.method}")
    peaks: dict[str, float] = {}
    fresh()
    s = Setup("alibi", 8192, batch=1, heads=8, head_dim=64)
    case = build_case(s)
    runner = Runner(torch.device("cpu"), False, case.leaves)
    say(f"  dense path estimated at {case.dense_bytes / GIB:.1f} GiB; its (1, 8, 8192, 8192) float32 bias alone is 2 GiB")
    if first_call("flexpos", runner, case.flexpos) is not None:
        t, peaks["flexpos"] = memory.measure(lambda: runner.timed(case.flexpos))
        say(f"  flexpos  L=8192: {t * 1e3:,.0f} ms, peak growth {peaks['flexpos']:,.1f} MiB")
    runner.call(case.dense)
    t, peaks["dense"] = memory.measure(lambda: runner.timed(case.dense))
    say(f"  dense    L=8192: {t * 1e3:,.0f} ms, peak growth {peaks['dense']:,.1f} MiB")
    if "flexpos" in peaks and peaks["dense"]:
        share = peaks["flexpos"] / peaks["dense"]
        verdict("CPU L=8192 flexpos memory <= 1/10 of dense", f"{share:.4f} of dense (1/{1 / max(share, 1e-9):,.0f})",
                share <= 0.1)
    else:
        verdict("CPU L=8192 flexpos memory <= 1/10 of dense", "flexpos did not run", False)
    del case, runner
    fresh()
    s = Setup("alibi", 32768, batch=1, heads=8, head_dim=64)
    case = build_case(s)
    runner = Runner(torch.device("cpu"), False, case.leaves)
    free = available_bytes(torch.device("cpu")) or 0
    say(f"  dense    L=32768: not run, would need {case.dense_bytes / GIB:.0f} GiB ({free / GIB:.1f} GiB free)")
    say("  flexpos  L=32768: compiling and running (about a minute or two on 2 cores) ...")
    if first_call("flexpos", runner, case.flexpos) is None:
        verdict("CPU L=32768 runs", "flexpos failed", False)
        return
    t, peak = memory.measure(lambda: runner.timed(case.flexpos))
    say(f"  flexpos  L=32768: {t:,.1f} s, peak growth {peak:,.1f} MiB")
    verdict("CPU L=32768 runs", f"flexpos {t:.1f} s, {peak:,.0f} MiB peak growth", True)


def cpu_rotary(repeat: int) -> None:
    say("\n[3] CPU Rotary on (4, 4096, 8, 64) float32: compiled flexpos transform vs the original's mod_qkv")
    fresh()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 4096, 8, 64, generator=gen) for _ in range(3))  # bio layout (B, L, NH, H)
    pos = irregular_positions(4, 4096, gen)
    qh, kh = (t.transpose(1, 2).contiguous() for t in (q, k))  # flexpos layout (B, H, L, D)
    rot = flexpos.Rotary(64)
    fns: dict[str, Callable[[], object]] = {}
    if bio_available():
        from bio_attention import positional as bio

        original = bio.Rotary(64)
        fns["bio-attention mod_qkv"] = lambda: original.mod_qkv(q, k, v, pos_q_k=pos)
        reference = "bio-attention mod_qkv"
    else:
        fns["eager formula"] = lambda: (dense_rotate(rot, qh, pos), dense_rotate(rot, kh, pos))
        reference = "eager formula"
    start = time.perf_counter()
    out = rot(qh, kh, pos=pos)
    say(f"  flexpos transform first call (compile + run): {time.perf_counter() - start:.1f} s")
    fns["flexpos compiled"] = lambda: rot(qh, kh, pos=pos)
    want = fns[reference]()
    want_q = want[0] if reference.startswith("bio") else want[0].transpose(1, 2)
    say(f"  max |flexpos - {reference}| = {float((out[0].transpose(1, 2) - want_q).abs().max()):.1e}")

    def run_eager() -> object:
        previous = flexpos.set_compile(False)
        try:
            return rot(qh, kh, pos=pos)
        finally:
            flexpos.set_compile(previous)

    run_eager()
    fns["flexpos eager"] = run_eager
    times = interleaved(fns, lambda: None, repeat)
    for name, t in times.items():
        say(f"  {name:22s} {fmt(t)}")
    med, best = ratio(times[reference], times["flexpos compiled"])
    verdict("CPU Rotary compiled >= 4x the original", f"{med:.2f}x median ({best:.2f}x min) vs {reference}", med >= 4.0)


# --------------------------------------------------------------------------------------------
# GPU


def gpu_peak_bandwidth(device: torch.device) -> tuple[Optional[float], str]:
    """Theoretical DRAM bandwidth in bytes/s, and where the number came from."""
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8, f"2 x {clock_khz / 1e3:.0f} MHz x {bus_bits} bit (device properties)"
    table = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12,
             "H100 NVL": 3.9e12, "A100-SXM4-80GB": 2.039e12, "A100-SXM4-40GB": 1.555e12, "A100 80GB PCIe": 1.935e12}
    for name, bw in table.items():
        if name in props.name:
            return bw, f"datasheet value for {name}"
    return None, "unknown"


def measured_copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a device-to-device copy of 1 GiB (it reads 1 GiB and writes 1 GiB)."""
    x = torch.empty(GIB, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize(device)
    n = 10
    start = time.perf_counter()
    for _ in range(n):
        y.copy_(x)
    torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / n
    del x, y
    return 2 * GIB / seconds


def gpu_score_mods(repeat: int, lengths: Sequence[int] = (8192, 32768)) -> None:
    # No Dynamo reset between cases: flex's sizes turn symbolic at the second length, after
    # which no length recompiles (a reset would recompile each, ~10-30 s apiece on a GPU).
    for length in lengths:
        for scheme in ("alibi", "dpb"):
            say(f"\n[{4 if length == 8192 else 5}] GPU {scheme} forward+backward, bfloat16, B=4 H=16 D=64, L={length}")
            release()
            guarded(f"GPU {scheme} L={length}", gpu_score_mod_case, scheme, length, repeat)
            release()


def gpu_score_mod_case(scheme: str, length: int, repeat: int) -> None:
    device = torch.device("cuda")
    s = Setup(scheme, length, batch=4, heads=16, head_dim=64, dtype="bfloat16", device="cuda",
              backward=True, dense="formula")
    case = build_case(s)
    runner = Runner(device, True, case.leaves)
    fns: dict[str, Callable[[], object]] = {}
    paths = [("flexpos", case.flexpos)]
    if length == 8192:  # the references for the throughput target; at 32768 only "does it run"
        paths += [("flex no score_mod", case.flex_floor), ("sdpa floor", case.floor)]
        if scheme == "dpb":  # without gradients into its tables (atomic adds per score element)
            frozen = copy.deepcopy(case.modules["flexpos"]).requires_grad_(False)
            q, k, v = case.leaves
            paths.append(("flexpos MLP frozen", lambda: flexpos.attention(q, k, v, frozen, pos=case.pos)))
    for name, fn in paths:
        t0 = first_call(name, runner, fn)
        if t0 is not None:
            say(f"  {name}: first call (compile + run) {t0:.1f} s")
            fns[name] = lambda fn=fn: runner.call(fn)
    dense_failure = first_dense(runner, case, fns)
    times = interleaved(fns, lambda: torch.cuda.synchronize(device), repeat)
    for name, t in times.items():
        say(f"  {name:18s} {fmt(t)}")
    if "flexpos" not in times:
        verdict(f"GPU {scheme} L={length}", "flexpos did not run", False)
        return
    if length == 8192:
        if "flex no score_mod" in times:
            med, best = ratio(times["flex no score_mod"], times["flexpos"])
            verdict(f"GPU {scheme} L=8192 throughput >= 0.85x flex no score_mod",
                    f"{med:.2f}x median ({best:.2f}x min)", med >= 0.85)
            if "flexpos MLP frozen" in times:
                med, best = ratio(times["flex no score_mod"], times["flexpos MLP frozen"])
                say(f"  (DPB with its MLP frozen: {med:.2f}x median ({best:.2f}x min) of flex no score_mod)")
        if "dense" in times:
            med, best = ratio(times["dense"], times["flexpos"])
            verdict(f"GPU {scheme} L=8192 >= 3x faster than dense", f"{med:.2f}x median ({best:.2f}x min)", med >= 3.0)
        else:  # a dense path that cannot run at all is slower than any; other failures say nothing
            verdict(f"GPU {scheme} L=8192 >= 3x faster than dense", f"dense did not run: {dense_failure}",
                    True if OOM in dense_failure else None)
    elif "dense" in times:
        med, _ = ratio(times["dense"], times["flexpos"])
        verdict(f"GPU {scheme} L=32768 dense OOM or >= 5x slower", f"dense ran, {med:.2f}x slower", med >= 5)
    else:
        verdict(f"GPU {scheme} L=32768 dense OOM or >= 5x slower", f"dense: {dense_failure}; flexpos ran",
                True if OOM in dense_failure else None)


def first_dense(runner: Runner, case: Case, fns: dict[str, Callable[[], object]]) -> str:
    """Run the dense path once, even where its memory estimate says it will not fit (an
    out-of-memory error is harmless), and add it to ``fns`` if it ran; '' or why it did not.
    Prints max|flexpos - dense| over the output and input gradients when both ran."""
    free = available_bytes(runner.device) or 0
    outputs: list[tuple[Tensor, ...]] = []
    failure = attempt(lambda: outputs.append(runner.call(case.dense)))
    if failure:
        release()  # outside attempt's except block, whose traceback held the tensors
        failure += f" (estimated {case.dense_bytes / GIB:.0f} GiB, {free / GIB:.0f} GiB free)"
        say(f"  dense: {failure}")
        return failure
    fns["dense"] = lambda: runner.call(case.dense)
    if "flexpos" in fns:
        ours = runner.call(case.flexpos)
        diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(ours, outputs[0]))
        say(f"  max |flexpos - dense| over the output and input gradients: {diff:.2e}")
    return ""


def gpu_rotary(repeat: int) -> None:
    # q and k of 1 GiB each: a call moves 4 GiB, ~1 ms even at 4.8 TB/s, well above the host's
    # time to launch it, so the kernels and not the launches set the time
    length = 131072
    say(f"\n[6] GPU Rotary transform, bfloat16, q and k of (4, 16, {length}, 64): achieved memory bandwidth")
    device = torch.device("cuda")
    release()
    gen = torch.Generator(device).manual_seed(0)
    q, k = (torch.randn(4, 16, length, 64, generator=gen, device=device, dtype=torch.bfloat16) for _ in range(2))
    pos = irregular_positions(4, length, torch.Generator().manual_seed(0)).to(device)
    rot = flexpos.Rotary(64).to(device)
    start = time.perf_counter()
    rot(q, k, pos=pos)
    torch.cuda.synchronize(device)
    say(f"  first call (compile + run): {time.perf_counter() - start:.1f} s")
    paths = {"flexpos": lambda: rot(q, k, pos=pos),
             "eager formula": lambda: (dense_rotate(rot, q, pos), dense_rotate(rot, k, pos))}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeat):  # interleaved; each sample: GPU time per call over 20 queued calls
        for name, fn in paths.items():
            times[name].append(device_seconds(fn, device))
    # useful bytes: read and write q and k, read the positions (the cos/sin table is not counted)
    moved = 2 * 2 * q.numel() * q.element_size() + 2 * pos.numel() * pos.element_size()
    for name, t in times.items():
        say(f"  {name:18s} {fmt(t)}  -> {moved / statistics.median(t) / 1e9:,.0f} GB/s")
    achieved = moved / statistics.median(times["flexpos"])
    peak, source = gpu_peak_bandwidth(device)
    copy = measured_copy_bandwidth(device)
    say(f"  device-to-device copy: {copy / 1e9:,.0f} GB/s; theoretical peak: "
        f"{'unknown' if peak is None else f'{peak / 1e9:,.0f} GB/s'} ({source})")
    reference = peak or copy
    verdict("GPU Rotary >= 70% of memory bandwidth",
            f"{achieved / 1e9:,.0f} GB/s = {achieved / reference:.0%} of {'peak' if peak else 'copy'} "
            f"({achieved / copy:.0%} of measured copy)", achieved / reference >= 0.7)


# --------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu-only", action="store_true", help="skip the CPU targets")
    p.add_argument("--cpu-only", action="store_true", help="skip the GPU targets")
    p.add_argument("--repeat", type=int, default=7, help="interleaved timed runs per path")
    p.add_argument("--skip-32k", action="store_true", help="skip the L=32768 runs (minutes on CPU)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu_only
    device = torch.device("cuda" if cuda else "cpu")
    facts = machine_facts(device)
    say("flexpos targets")
    say(f"command: {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}")
    say(f"date: {facts['date']}; python {facts['python']}; torch {facts['torch']}; {facts['platform']}")
    say(f"cpu: {facts['cpu']}; {facts['cpu_count']} cores; torch threads {facts['torch_threads']}")
    if cuda:
        say(f"gpu: {facts['gpu']} ({facts['gpu_memory_gib']} GiB), CUDA {facts['cuda']}")
    say(f"flexpos {facts.get('flexpos', '?')}; bio-attention {facts.get('bio_attention', 'not installed')}; "
        f"FLEXPOS_COMPILE={os.environ.get('FLEXPOS_COMPILE', '1')}")
    if not args.gpu_only:
        cpu_alibi_speed(args.repeat)
        cpu_alibi_memory() if not args.skip_32k else say("\n[2] skipped (--skip-32k)")
        cpu_rotary(args.repeat)
    try:
        if cuda:  # quickest first: gpu.sh gives this script a time limit
            guarded("GPU Rotary", gpu_rotary, args.repeat)
            gpu_score_mods(args.repeat, (8192,) if args.skip_32k else (8192, 32768))
        elif not args.cpu_only:
            say("\nGPU targets: no CUDA device here (run benchmarks/gpu.sh on a GPU machine)")
    except KeyboardInterrupt:  # gpu.sh's time limit: keep the verdicts reached so far
        say("\ninterrupted: the targets below are the ones reached before the interruption")
    say("\nsummary")
    for name, measured, mark in RESULTS:
        say(f"  {mark:6s}  {name}: {measured}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
