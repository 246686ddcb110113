"""The command line: arguments, progress lines, the loop over (scheme, L), table, JSON, plot."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .cases import DPB_DEPTH, DPB_DIM, DTYPES, SCHEMES, Setup, resolve_dense
from .memory import MIB, PeakMemory
from .report import PLOT_NEEDS, cell, format_table, machine_facts, plot_results
from .run import Log, Row, run_case

DEFAULT_LENGTHS = (512, 2048)


def foresee(seen: Sequence[tuple[int, float]], length: int) -> Optional[float]:
    """Bytes flexpos should need at ``length`` from its peaks (L, MiB) at smaller lengths.

    Grows as L**e, e measured between the last two lengths (clamped to 1..2), or 2 with one.
    """
    if not seen or seen[-1][0] >= length:
        return None
    (l1, p1), e = seen[-1], 2.0
    if len(seen) > 1 and seen[-2][0] < l1 and seen[-2][1] > 0:
        l0, p0 = seen[-2]
        e = min(2.0, max(1.0, math.log(p1 / p0) / math.log(l1 / l0)))
    return p1 * MIB * (length / l1) ** e


def _split_list(text: Sequence[str]) -> list[str]:
    return [item for part in text for item in part.replace(",", " ").split()]


def program() -> str:
    """How this process was started: the console script's name, ``python -m flexpos`` or
    ``python -m flexpos.bench``."""
    path = Path(sys.argv[0])
    if path.name.startswith("flexpos"):
        return path.name
    return "python -m flexpos" if path.parent.name == "flexpos" else "python -m flexpos.bench"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=program(),
        description="flexpos vs the dense path (materialised (B, NH, L, L) bias + SDPA), side by side.",
        epilog="Example: python -m flexpos.bench --schemes alibi dpb --lengths 1024 4096 --json out.json",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--lengths", nargs="+", default=None, metavar="L",
                   help=f"sequence lengths (default {' '.join(map(str, DEFAULT_LENGTHS))})")
    p.add_argument("--schemes", nargs="+", default=None, metavar="S",
                   help=f"any of {', '.join(SCHEMES)} (default {' '.join(SCHEMES)})")
    p.add_argument("--mode", choices=("fwd", "fwdbwd"), default="fwd", help="forward, or forward + backward (default fwd)")
    p.add_argument("--batch", type=int, default=1, help="sequences per call (default 1)")
    p.add_argument("--heads", type=int, default=8, help="attention heads (default 8)")
    p.add_argument("--head-dim", type=int, default=64, help="features per head (default 64)")
    p.add_argument("--window", type=float, default=512.0, help="window of the 'window' scheme, in position units (default 512)")
    p.add_argument("--dense", choices=("auto", "bio", "formula"), default="auto",
                   help="dense baseline: bio-attention's plugins, or the dense formulas in flexpos.bench "
                   "(default auto: bio-attention where installed)")
    p.add_argument("--backend", choices=("auto", "flex", "chunked"), default="auto", help="flexpos backend (default auto)")
    p.add_argument("--repeat", type=int, default=3,
                   help="timed runs per path, median reported (paths slower than 5 s run once; default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs and weights (default 0)")
    p.add_argument("--json", metavar="PATH", help="save the results and machine facts as JSON")
    p.add_argument("--plot", metavar="PATH", help="draw time and memory vs L (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    args.schemes = _split_list(args.schemes) if args.schemes else list(SCHEMES)
    bad = [s for s in args.schemes if s not in SCHEMES]
    if bad:
        p.error(f"unknown scheme(s) {', '.join(bad)}; choose from {', '.join(SCHEMES)}")
    try:
        args.lengths = [int(x) for x in _split_list(args.lengths)] if args.lengths else list(DEFAULT_LENGTHS)
    except ValueError:
        p.error("--lengths takes integers")
    if any(length < 1 for length in args.lengths) or args.repeat < 1:
        p.error("lengths and --repeat must be positive")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # before the run, not after it
        p.error(PLOT_NEEDS)
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder is not None and not os.path.isdir(folder):
            p.error(f"{option} {path}: no folder {folder}")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    return args


def _header(args: argparse.Namespace, device: torch.device, dense_kind: str, memory: PeakMemory,
            facts: dict[str, Any]) -> list[str]:
    """The lines above the table: machine, settings, what the dense path and the floor are."""
    where = facts.get("gpu") or f"{facts['cpu']} ({facts['torch_threads']} threads)"
    mode = "forward + backward" if args.mode == "fwdbwd" else "forward"
    dense = (f"bio-attention {facts.get('bio_attention', '')} mod_qkv/mod_mask" if dense_kind == "bio"
             else "dense formulas in flexpos.bench")
    header = [
        f"flexpos bench: {device.type} {where}; torch {torch.__version__}; {args.dtype}; {mode}; "
        f"B={args.batch} H={args.heads} D={args.head_dim}",
        f"dense = {dense} -> (B, NH, L, L) float bias -> SDPA; floor = SDPA with no positional effect",
        f"positions: sorted irregular integers (gaps 1-3); memory: {memory.method}",
    ]
    if device.type == "cpu" and args.backend == "auto":
        header.append("CPU: flexpos runs its chunked backend (compiled bias per query chunk -> SDPA)")
    return header


def _run_all(args: argparse.Namespace, device: torch.device, dense_kind: str, memory: PeakMemory,
             log: Log) -> tuple[list[Row], bool]:
    """Every (scheme, L), shortest L first per scheme; (rows, interrupted). SIGINT (a time
    limit) stops the loop and keeps the finished rows."""
    rows: list[Row] = []
    cases = [(scheme, length) for scheme in args.schemes for length in sorted(args.lengths)]
    seen: dict[str, list[tuple[int, float]]] = {}  # scheme -> [(L, flexpos peak MiB)]
    try:
        for i, (scheme, length) in enumerate(cases, 1):
            setup = Setup(scheme, length, args.batch, args.heads, args.head_dim, args.dtype, str(device),
                          args.mode == "fwdbwd", dense_kind, args.window, args.backend, args.seed)
            log(f"[{i}/{len(cases)}] {scheme} L={length}")
            row = run_case(setup, args.repeat, memory, log, flexpos_need=foresee(seen.get(scheme, []), length),
                           fresh=scheme not in seen)
            seen.setdefault(scheme, [])
            if row.flexpos_peak_mb and row.flexpos_peak_mb > 0:
                seen[scheme].append((length, row.flexpos_peak_mb))
            rows.append(row)
            log(f"{scheme} L={length}: dense {cell('dense_ms', row.dense_ms)} ms, flexpos "
                f"{cell('flexpos_ms', row.flexpos_ms)} ms, speed-up {cell('speedup', row.speedup)}")
    except KeyboardInterrupt:
        log(f"interrupted: reporting the {len(rows)} finished case(s) of {len(cases)}")
        return rows, True
    return rows, False


def _save_json(path: str, argv: Optional[Sequence[str]], args: argparse.Namespace, dense_kind: str,
               memory: PeakMemory, facts: dict[str, Any], rows: Sequence[Row], elapsed: float,
               interrupted: bool) -> None:
    payload = {
        "command": " ".join([program(), *(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))]),
        "machine": facts,
        "settings": {
            "device": args.device, "dtype": args.dtype, "mode": args.mode, "batch": args.batch,
            "heads": args.heads, "head_dim": args.head_dim, "dense": dense_kind, "backend": args.backend,
            "repeat": args.repeat, "window": args.window, "memory_method": memory.method,
            "dpb": {"dim": DPB_DIM, "depth": DPB_DEPTH},
        },
        "results": [asdict(r) for r in rows],
        "elapsed_s": round(elapsed, 1),
        "interrupted": interrupted,
    }
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m flexpos.bench [options]``: progress on stderr, the table on stdout."""
    args = parse_args(argv)
    device = torch.device(args.device)
    dense_kind = resolve_dense(args.dense)
    memory = PeakMemory(device)
    facts = machine_facts(device)
    log: Log = (lambda msg: None) if args.quiet else (
        lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True))

    header = _header(args, device, dense_kind, memory, facts)
    log(header[0])
    if device.type == "cpu":
        log("compiling on CPU is slow: each scheme compiles at its first length (~15 s cold, a few s from cache)")
    started = time.perf_counter()
    rows, interrupted = _run_all(args, device, dense_kind, memory, log)
    elapsed = time.perf_counter() - started

    print("\n".join(header))
    print(format_table(rows))
    if interrupted:
        print(f"INTERRUPTED after {len(rows)} of {len(args.schemes) * len(args.lengths)} cases")
    print(f"speed-up = dense ms / flexpos ms; peak = memory growth during one warm call; "
          f"compile s = first call - steady call; total {elapsed:.0f} s")
    if args.json:
        _save_json(args.json, argv, args, dense_kind, memory, facts, rows, elapsed, interrupted)
        log(f"wrote {args.json}")
    if args.plot:
        plot_results(rows, args.plot)
        log(f"wrote {args.plot}")
    return 0
