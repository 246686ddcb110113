"""Where the GPU targets' time goes: variants of flexpos' paths, timed side by side in one process.

    PYTHONPATH=. python benchmarks/gpu_variants.py            # bf16, B=4 H=16 D=64, L=8192, fwd+bwd
    ... --skip-rotary --score-rows ALiBi --profile "ALiBi" "ALiBi, |rate * distance|"
                                         # ALiBi's rows; then the shipped call and the kernel
                                         # alone under torch.profiler: where a call's time goes

Score_mod rows (ratio = time of flex with no score_mod / time of the row, as in the targets):
  flex no score_mod       flexpos.attention(q, k, v): the reference (static sizes on CUDA)
  flex no score_mod, symbolic sizes
                          torch.compile(flex_attention, dynamic=True): what symbolic sizes cost
  flex no score_mod, DPB's tiles
                          the same with flexpos.flex.GATHER_TILES: what DPB's smaller tiles
                          cost before any per-score work
  per-head constant       score - rate_h: what any score_mod costs before per-score work
  ALiBi                   flexpos.ALiBi as shipped: these integer positions are less than 2^24
                          apart, so one float32 table per side is read
  ALiBi, hi + lo parts    the same score_mod reading both parts per side, as for float positions,
                          wider spans and inside a caller's torch.compile
  ALiBi, |rate * distance|
                          the score_mod as shipped until 2026-11-30: score - |rate_h * (p_q - p_k)|
                          (a multiply, then a subtraction) where ALiBi now forms
                          score - rate_h * |p_q - p_k| (one fused multiply-add with an
                          absolute-value operand): equal for rates >= 0, up to the rounding
                          that the fused form leaves out
  ALiBi, default positions
                          no positions given: distances from token indices, no tables
  ALiBi, learned divisor  flexpos.ALiBi(learned_div=True), shipped: flex's backward adds each
                          score's gradient into its head's rate (one atomic add per score, all
                          of a tile's into one address)
  ALiBi, learned divisor, rates spread
                          the same bias reading its head's rate from one of 128 copies (by key
                          index mod 128): a tile's atomic adds go to as many addresses as it has
                          key columns; the copies' gradients are summed after the kernel
  DPB frozen              flexpos.DPB without parameter gradients (no atomic adds into the
                          tables' gradients), shipped: an exact grid known on the host, so the
                          value alone is read per score
  DPB frozen, int32 index   the shipped score_mod with the table index formed in int32 instead of
                          int64 (a GPU does 64-bit integer arithmetic in several instructions)
  DPB frozen, bfloat16 table
                          the same with its table in bfloat16 (half the bytes per gather; other
                          numbers: timing only)
  DPB frozen, grid chosen on the device
                          as inside a caller's torch.compile: a value and a slope per score
  DPB frozen, float positions
                          shipped, on the positions times 1.1 (no exact grid: a value and a slope
                          per score), its check of the grid's interpolation error run every call
                          (it stops after its first warning): the check reads its estimate back
                          to the host
  DPB frozen, float positions, no grid check
                          the same without that check: what the check and its read cost
  DPB affine frozen       bio-attention's default DPB (depth 1), shipped without parameter
                          gradients: a rate and a shift per head, no table
  DPB affine trained      the same with gradients into its MLP, shipped: its table, whose cells
                          spread flex's atomic gradient adds
  DPB affine trained, rate and shift
                          the same reading its rate and shift per head in float32: all of a
                          tile's atomic adds into one address per head and tensor (not shipped)
                          (With --forward-only nothing trains: these two rows then time the
                          frozen path, the first one exactly as shipped.)
Rotary rows: the shipped module call (on CUDA flexpos.rotary_triton: all heads of a tile of
positions per program, angles formed in the kernel, no table), that kernel alone with other
tiles and on q and k laid out (B, L, H, D); the compiled path that Rotary takes inside a
caller's torch.compile or with a learned divisor that trains (a float32 cos/sin table per call,
then q and k rotated in one Inductor kernel, static sizes until a second shape) and its parts;
the largest difference between the two paths; GPU time per call over queued calls.

Positions are sorted integers with gaps 1-3, as in the targets. Score_mod tables are built once
outside the timed calls for the variants that call flex directly (the shipped rows rebuild them
per call: a few small kernels).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence
from unittest import mock

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
import targets  # noqa: E402  (the timing helpers of benchmarks/targets.py)
from targets import fmt, interleaved, release, say  # noqa: E402

import flexpos  # noqa: E402
from flexpos import flex  # noqa: E402
from flexpos._compile import lazy_compile  # noqa: E402
from flexpos.bench import Runner, Setup, build_case, irregular_positions  # noqa: E402
from flexpos.dpb import DistanceGrid  # noqa: E402
from flexpos.positions import Positions  # noqa: E402
from flexpos.rotary import _rotate_real_pair, rotate_real_pair, rotation  # noqa: E402

ScoreFn = Callable[[], Tensor]


def per_head_constant(alibi: flexpos.ALiBi) -> Callable[..., Tensor]:
    rates = alibi.slopes.reshape(-1).float()

    def head_constant(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score - rates[h]

    return head_constant


def self_attention(pos: Tensor, length: int) -> Positions:
    """Positions (B, length) of queries and keys alike."""
    return Positions.resolve((pos.shape[0],), length, length, pos.device, pos)


def on_device_only(module: flexpos.Positional, pos: Tensor, length: int) -> Callable[..., Tensor]:
    """``module``'s score_mod as a caller's torch.compile gets it: nothing read back to the host
    (ALiBi reads hi and lo parts, DPB a value and a slope)."""
    with flexpos.no_host_reads(), torch.no_grad():
        positions = self_attention(pos, length)
        return module.score_mod(positions)


def abs_of_product(alibi: flexpos.ALiBi, pos: Tensor, length: int) -> Callable[..., Tensor]:
    """Symmetric ALiBi's score_mod (no CLS tokens) as ``score - |rate_h * distance|``."""
    with torch.no_grad():
        rel = self_attention(pos, length).relative()
        rates = alibi.rates()

    def alibi_mul_sub(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        delta, _ = rel.distance(b, q_idx, kv_idx)
        return score - (rates[h] * delta).abs().to(score.dtype)

    return alibi_mul_sub


def spread_rates(alibi: flexpos.ALiBi, pos: Tensor, length: int, copies: int = 128) -> Callable[[], Callable[..., Tensor]]:
    """Symmetric ALiBi's score_mod (no CLS tokens) with its (H,) rates, which carry the learned
    divisor's gradient, read from ``copies`` copies per head by key index: made per call, as the
    rates are."""
    with torch.no_grad():
        rel = self_attention(pos, length).relative()

    def make() -> Callable[..., Tensor]:
        rates = alibi.rates()
        spread = rates[:, None].expand(-1, copies).contiguous()  # (H, copies)

        def alibi_spread(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            delta, _ = rel.distance(b, q_idx, kv_idx)
            return score - (spread[h, kv_idx % copies] * delta).abs()

        return alibi_spread

    return make


def affine_rate_and_shift(dpb: flexpos.DPB, pos: Tensor, length: int) -> Callable[[], Callable[..., Tensor]]:
    """An affine DPB's score_mod (no CLS tokens) reading its rate and shift per head in float32,
    with gradients into them: made per call, as they are."""
    with torch.no_grad():
        rel = self_attention(pos, length).relative()

    def make() -> Callable[..., Tensor]:
        rates, shifts = (t.float() for t in dpb.rate_and_shift())

        def dpb_rate_shift(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            delta, _ = rel.distance(b, q_idx, kv_idx)
            return score - (rates[h] * delta + shifts[h])

        return dpb_rate_shift

    return make


def int32_index(dpb: flexpos.DPB, pos: Tensor, length: int) -> Callable[..., Tensor]:
    """DPB's score_mod on the exact grid (integer positions of one span known on the host, no CLS
    tokens) with the table index in int32: the same numbers as the shipped score_mod."""
    with torch.no_grad():
        positions = self_attention(pos, length)
        grid = DistanceGrid.covering(positions.span_tensor(), True, dpb.table_size, positions.integer_span())
        if not grid.exact:
            raise ValueError("int32_index needs integer positions whose distances fit DPB's table")
        values, _ = dpb.tables(grid, torch.float32)
        rel, start = positions.relative(), grid.start.float()

    def dpb_int32(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        delta, _ = rel.distance(b, q_idx, kv_idx)
        return score - values[h, (delta - start).to(torch.int32) + 1]

    return dpb_int32


def with_bf16_tables(dpb: flexpos.DPB, fn: ScoreFn) -> Tensor:
    """``fn()`` while ``dpb`` hands its score_mod bfloat16 tables (half the bytes per gather;
    other numbers, so timing only)."""
    tables = dpb.tables

    def half_tables(grid: object, dtype: torch.dtype, precise: bool = False) -> tuple[Tensor, ...]:
        return tuple(t.to(torch.bfloat16) for t in tables(grid, dtype, precise))

    with mock.patch.object(dpb, "tables", half_tables):
        return fn()


def grid_check(dpb: flexpos.DPB, run: bool, fn: ScoreFn) -> Tensor:
    """``fn()`` with ``dpb``'s check of its grid's interpolation error run (as if it had never
    warned; a warning is ignored) or skipped."""
    if not run:
        with mock.patch.object(dpb, "_warn_if_coarse", lambda *args: None):
            return fn()
    dpb._warned_coarse = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def score_rows(s: Setup, repeat: int, chosen: Sequence[str] = (), profiled: Sequence[str] = ()) -> None:
    """The score_mod rows (all, or the first and those whose names start with one of ``chosen``);
    then the rows named in ``profiled`` under torch.profiler (:func:`profile_row`)."""
    device = torch.device(s.device)
    case = build_case(s)
    q, k, v = case.leaves
    pos, length = case.pos, s.length
    fpos = pos.double() * 1.1
    runner = Runner(device, s.backward, case.leaves)
    mask = flexpos.full_mask(length, length, device)
    alibi = case.modules["flexpos"]
    dpb = flexpos.DPB(32, s.heads, depth=2).to(device).requires_grad_(False)
    symbolic = torch.compile(flex_attention, dynamic=True)
    tiles = flex.flex_kernel_options(device, [dpb])

    learned = flexpos.ALiBi(s.heads, divide=1.0, learned_div=True).to(device)
    spread = spread_rates(learned, pos, length)
    affine = flexpos.DPB(32, s.heads).to(device)
    rate_and_shift = affine_rate_and_shift(affine, pos, length)
    frozen_affine = flexpos.DPB(32, s.heads).to(device).requires_grad_(False)

    def direct(mod: Callable[..., Tensor], options: Optional[dict[str, int]]) -> ScoreFn:
        return lambda: flex.run_flex(q, k, v, mod, mask, q.shape[-1] ** -0.5, options)

    rows: list[tuple[str, ScoreFn]] = [
        ("flex no score_mod", case.flex_floor),
        ("flex no score_mod, symbolic sizes", lambda: symbolic(q, k, v, block_mask=mask)),
        ("flex no score_mod, DPB's tiles", lambda: flexpos.attention(q, k, v, kernel_options=flex.GATHER_TILES)),
        ("per-head constant", direct(per_head_constant(alibi), None)),
        ("ALiBi", case.flexpos),
        ("ALiBi, hi + lo parts", direct(on_device_only(alibi, pos, length), None)),
        ("ALiBi, |rate * distance|", direct(abs_of_product(alibi, pos, length), None)),
        ("ALiBi, default positions", lambda: flexpos.attention(q, k, v, alibi)),
        ("ALiBi, learned divisor", lambda: flexpos.attention(q, k, v, learned, pos=pos)),
        ("ALiBi, learned divisor, rates spread",
         lambda: flex.run_flex(q, k, v, spread(), mask, q.shape[-1] ** -0.5)),
        ("DPB frozen", lambda: flexpos.attention(q, k, v, dpb, pos=pos)),
        ("DPB frozen, int32 index", direct(int32_index(dpb, pos, length), tiles)),
        ("DPB frozen, bfloat16 table", lambda: with_bf16_tables(dpb, lambda: flexpos.attention(q, k, v, dpb, pos=pos))),
        ("DPB frozen, grid chosen on the device", direct(on_device_only(dpb, pos, length), tiles)),
        ("DPB frozen, float positions", lambda: grid_check(dpb, True, lambda: flexpos.attention(q, k, v, dpb, pos=fpos))),
        ("DPB frozen, float positions, no grid check",
         lambda: grid_check(dpb, False, lambda: flexpos.attention(q, k, v, dpb, pos=fpos))),
        ("DPB affine frozen", lambda: flexpos.attention(q, k, v, frozen_affine, pos=pos)),
        ("DPB affine trained", lambda: flexpos.attention(q, k, v, affine, pos=pos)),
        ("DPB affine trained, rate and shift",
         lambda: flex.run_flex(q, k, v, rate_and_shift(), mask, q.shape[-1] ** -0.5)),
    ]
    if chosen:
        rows = rows[:1] + [row for row in rows[1:] if row[0].startswith(tuple(chosen))]
    time_rows(rows, runner, repeat)
    for name, fn in rows:
        if name in profiled:
            profile_row(name, fn, runner)
    if s.backward and any(name.startswith("ALiBi, learned divisor") for name, _ in rows):
        say(f"  learned divisor's gradient, shipped and spread: {divisor_grads(learned, rows, runner)}")


def divisor_grads(alibi: flexpos.ALiBi, rows: Sequence[tuple[str, ScoreFn]], runner: Runner) -> str:
    """The learned divisor's gradient from one call of each 'ALiBi, learned divisor' row."""
    found = []
    for name, fn in rows:
        if name.startswith("ALiBi, learned divisor"):
            alibi.div.grad = None
            runner.call(fn)
            found.append(f"{float(alibi.div.grad):.6e}")
    return ", ".join(found)


def time_rows(rows: Sequence[tuple[str, ScoreFn]], runner: Runner, repeat: int) -> None:
    """First calls, then interleaved timed rounds; the ratio is to the first row. Interrupted
    (a step's time limit) after a round, it prints the rounds done, then stops."""
    fns: dict[str, ScoreFn] = {}
    for name, fn in rows:
        seconds = targets.first_call(name, runner, fn)
        if seconds is not None:
            say(f"  {name}: first call (compile + run) {seconds:.1f} s")
            fns[name] = lambda fn=fn: runner.call(fn)
    times: dict[str, list[float]] = {}
    try:
        for _ in range(repeat):
            done = interleaved(fns, runner.sync, 1)
            fns = {name: fn for name, fn in fns.items() if name in done}  # a row that failed is dropped
            for name, t in done.items():
                times.setdefault(name, []).extend(t)
    except KeyboardInterrupt:
        if times:
            print_rows(times, rows[0][0])
        raise
    print_rows(times, rows[0][0])


def profile_row(name: str, fn: ScoreFn, runner: Runner, calls: int = 3) -> None:
    """``calls`` calls of a row under torch.profiler, each from a synced device as timed: the ops
    by host time spent in them (launches, reads back, syncs), and the host time per call."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            runner.sync()
            runner.call(fn)
            runner.sync()
    say(f"\n  [profile] {name}: {calls} calls")
    say(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def print_rows(times: dict[str, list[float]], reference: str) -> None:
    ref = times.get(reference)
    say(f"\n  {'row':44s} {'time':>24s}  ratio to {reference}")
    for name, t in times.items():
        ratio = f"{statistics.median(ref) / statistics.median(t):.2f}x" if ref else "-"
        say(f"  {name:44s} {fmt(t):>24s}  {ratio}")
    say()


def rotary_rows(s: Setup, length: int, repeat: int) -> None:
    """The shipped module call; the Triton kernel alone (CUDA, or Triton's interpreter) with
    other tiles and on q and k laid out (B, L, H, D) in memory, as AttentionLayer's projections
    give them; the compiled path (table with symbolic and with static sizes, then q and k in
    one kernel) and its kernel alone, also with a bfloat16 table (other numbers: timing only)."""
    device = torch.device(s.device)
    gen = torch.Generator(device).manual_seed(0)
    shape = (s.batch, s.heads, length, s.head_dim)
    q, k = (torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16) for _ in range(2))
    q3, k3 = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k))
    pos = irregular_positions(s.batch, length, torch.Generator().manual_seed(0)).to(device)
    rot = flexpos.Rotary(s.head_dim).to(device)
    positions = Positions.resolve((s.batch,), length, length, device, pos)
    pos64, div = positions.absolute("q"), rot.divisor(torch.float64)
    inputs = (pos64, positions.has_position("q"), rot.thetas, div)
    cos_sin = rotation(*inputs, torch.float32)
    half = cos_sin.to(torch.bfloat16)
    static_table = lazy_compile(rotation.fn, dynamic=False)
    static_pair = lazy_compile(rotate_real_pair, dynamic=False)
    paths = {"Rotary module call (shipped)": lambda: rot(q, k, pos=pos)}
    kernel = triton_kernel(device)
    if kernel is not None:
        angles = (pos64, rot.thetas, div)
        for rows in KERNEL_ROWS:
            paths[f"Triton kernel, {rows} positions per program"] = lambda r=rows: kernel(*angles, q, k, rows=r)
        paths["Triton kernel, q and k laid out (B, L, H, D)"] = lambda: kernel(*angles, q3, k3)
    paths.update({
        "compiled: table (symbolic sizes) + rotation": lambda: _rotate_real_pair(q, k, rotation(*inputs, torch.float32)),
        "compiled: table (static sizes) + rotation": lambda: _rotate_real_pair(q, k, static_table(*inputs, torch.float32)),
        "compiled: rotation alone (table built)": lambda: _rotate_real_pair(q, k, cos_sin),
        "compiled: rotation alone, bfloat16 table": lambda: static_pair(q, k, half),
        "compiled: rotation, q and k laid out (B, L, H, D)": lambda: static_pair(q3, k3, cos_sin),
    })
    for fn in paths.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeat):
        for name, fn in paths.items():
            times[name].append(targets.device_seconds(fn, device) if device.type == "cuda" else timed(fn))
    moved = 2 * 2 * q.numel() * q.element_size()  # read and write q and k (same for every row)
    for name, t in times.items():
        say(f"  {name:50s} {fmt(t)}  -> {moved / statistics.median(t) / 1e9:,.0f} GB/s")
    if kernel is not None:
        pairs = zip(kernel(*angles, q, k), _rotate_real_pair(q, k, cos_sin))
        say(f"  max |Triton kernel - compiled path| over q and k: {max(float((a.float() - b.float()).abs().max()) for a, b in pairs):.2e}")


KERNEL_ROWS = (16, 32, 64)
"""Positions per program of the Triton kernel's rows (the shipped choice at D=64: 32)."""


def triton_kernel(device: torch.device) -> Optional[Callable[..., tuple[Tensor, ...]]]:
    """flexpos.rotary_triton.rotate where it runs (CUDA with Triton, or Triton's interpreter on
    CPU), else None."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        from flexpos.rotary_triton import rotate
    except ImportError as err:
        say(f"  (Triton kernel not timed: {err})")
        return None
    return rotate


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--rotary-length", type=int, default=131072)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--forward-only", action="store_true")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--score-rows", nargs="*", default=(), metavar="PREFIX",
                   help="time only the score_mod rows whose names start with one of these (and the first)")
    p.add_argument("--skip-rotary", action="store_true")
    p.add_argument("--profile", nargs="*", default=(), metavar="ROW",
                   help="after timing, run these score_mod rows (full names) under torch.profiler")
    args = p.parse_args(argv)
    s = Setup("alibi", args.length, batch=args.batch, heads=args.heads, head_dim=64, dtype=args.dtype,
              device=args.device, backward=not args.forward_only, dense="formula")
    say(f"flexpos GPU variants: {args.device} {torch.cuda.get_device_name() if args.device == 'cuda' else ''}; "
        f"torch {torch.__version__}; {args.dtype}; B={args.batch} H={args.heads} D=64")
    # Rotary first: its rows print at the end of their timing, and a step's limit cuts the last part
    if not args.skip_rotary:
        say(f"\n[rotary] q and k of ({args.batch}, {args.heads}, {args.rotary_length}, 64) bfloat16")
        targets.guarded("rotary variants", rotary_rows, s, args.rotary_length, args.repeat)
        release()
    say(f"\n[score_mods] L={args.length}, {'forward' if args.forward_only else 'forward+backward'}")
    targets.guarded("score_mod variants", score_rows, s, args.repeat, args.score_rows, args.profile)
    for name, measured, mark in targets.RESULTS:
        say(f"  {mark:6s}  {name}: {measured}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
