"""The command line: arguments, progress lines, the loop over (scheme, L), table, JSON, plot."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch

from .cases import (
    BIO_NEEDS,
    CONTINUOUS_DEPTH,
    CONTINUOUS_DIVIDE,
    DPB_DEPTH,
    DPB_DIM,
    DTYPES,
    INPUT_SCHEMES,
    SCHEMES,
    Setup,
    bio_available,
    resolve_dense,
    vocab_size,
)
from .memory import GIB, MIB, PeakMemory, available_bytes
from .report import PLOT_FORMATS, PLOT_NEEDS, cell, format_table, machine_facts, plot_results
from .run import Log, Row, run_case

T = TypeVar("T")
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


def _items(text: str) -> list[str]:
    return text.replace(",", " ").split()


def _parsed(text: str, convert: Callable[[str], T], ok: Callable[[T], bool], expected: str) -> T:
    """``convert(text)`` where it works and gives a value that is ``ok``, else argparse's error."""
    try:
        value = convert(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    return _parsed(text, int, lambda n: n >= 1, "a positive int")


def positive_ints(text: str) -> list[int]:
    """argparse type: positive ints, separated by commas or spaces."""
    if not _items(text):
        raise argparse.ArgumentTypeError(f"must be positive ints, got {text!r}")
    return [positive_int(item) for item in _items(text)]


def scheme_names(text: str) -> list[str]:
    """argparse type: scheme names, separated by commas or spaces."""
    names = _items(text)
    if not names or any(name not in SCHEMES for name in names):
        raise argparse.ArgumentTypeError(f"must be any of {', '.join(SCHEMES)}, got {text!r}")
    return names


def window_width(text: str) -> float:
    """argparse type: a number >= 0, inf for no window."""
    return _parsed(text, float, lambda w: w >= 0, "a number >= 0 (inf for no window)")  # NaN fails


def seed_int(text: str) -> int:
    """argparse type: an int in torch.manual_seed's range."""
    return _parsed(text, int, lambda n: -(2**63) <= n < 2**64, "an int from -2**63 to 2**64 - 1")


def device_name(text: str) -> str:
    """argparse type: auto, cpu, cuda or cuda:N (the devices whose memory the bench measures)."""
    if not re.fullmatch(r"auto|cpu|cuda(:(0|[1-9][0-9]*))?", text):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}")
    return text


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
        epilog="Example: python -m flexpos.bench --schemes alibi dpb --lengths 1024 4096 --json out.json. "
        "Exit status: 0; 1 where flexpos failed on a case; 130 when interrupted.",
    )
    p.add_argument("--device", default="auto", type=device_name, help="auto (cuda if present, else cpu), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--lengths", nargs="+", action="extend", type=positive_ints, default=None, metavar="L",
                   help=f"sequence lengths (default {' '.join(map(str, DEFAULT_LENGTHS))})")
    p.add_argument("--schemes", nargs="+", action="extend", type=scheme_names, default=None, metavar="S",
                   help=f"any of {', '.join(SCHEMES)} (default {' '.join(SCHEMES)})")
    p.add_argument("--mode", choices=("fwd", "fwdbwd"), default="fwd", help="forward, or forward + backward (default fwd)")
    p.add_argument("--batch", type=positive_int, default=1, help="sequences per call (default 1)")
    p.add_argument("--heads", type=positive_int, default=8, help="attention heads (default 8)")
    p.add_argument("--head-dim", type=positive_int, default=64, help="features per head (default 64)")
    p.add_argument("--window", type=window_width, default=512.0, help="window of the 'window' scheme, in position units (default 512)")
    p.add_argument("--dense", choices=("auto", "bio", "formula"), default="auto",
                   help="dense baseline: bio-attention's plugins, or the dense formulas in flexpos.bench "
                   "(default auto: bio-attention where installed)")
    p.add_argument("--backend", choices=("auto", "flex", "chunked"), default="auto", help="flexpos backend (default auto)")
    p.add_argument("--repeat", type=positive_int, default=3,
                   help="timed runs per path, median reported (paths slower than 5 s run once; default 3)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the inputs and weights (default 0)")
    p.add_argument("--json", metavar="PATH", help="save the results and machine facts as JSON")
    p.add_argument("--plot", metavar="PATH", help="draw time and memory vs L (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    # Repeated options add up; a value given twice runs once.
    args.schemes = list(dict.fromkeys(n for names in args.schemes for n in names)) if args.schemes else list(SCHEMES)
    args.lengths = list(dict.fromkeys(n for ns in args.lengths for n in ns)) if args.lengths else list(DEFAULT_LENGTHS)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    _check_device(p, args.device)
    _check_sizes(p, args)
    if args.dense == "bio" and not bio_available():
        p.error(BIO_NEEDS)
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # before the run, not after it
        p.error(PLOT_NEEDS)
    _check_output(p, "--json", args.json)
    _check_output(p, "--plot", args.plot)
    if args.json and args.plot and os.path.abspath(args.json) == os.path.abspath(args.plot):
        p.error(f"--json and --plot name the same file {args.plot}")
    if args.plot and Path(args.plot).suffix.lower().lstrip(".") not in PLOT_FORMATS:
        p.error(f"--plot {args.plot}: name a file ending in .{', .'.join(PLOT_FORMATS)}")
    return args


def _check_device(p: argparse.ArgumentParser, device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {device} but torch.cuda.is_available() is False")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        p.error(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), from cuda:0")


def _least_bytes(args: argparse.Namespace) -> int:
    """Bytes the longest case needs at the least: q, k and v, XL's dim x dim weight and
    LearnedVocab's (3 L + 1, dim) table."""
    itemsize, dim, length = DTYPES[args.dtype].itemsize, args.heads * args.head_dim, max(args.lengths)
    inputs = 3 * args.batch * length * dim * itemsize
    xl = dim**2 * 4 if "xl" in args.schemes else 0
    vocab = vocab_size(length) * dim * 4 if "learned_vocab" in args.schemes else 0
    return inputs + xl + vocab


def _check_sizes(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What the schemes need of the head dim, and that the longest case fits the memory."""
    if "rotary" in args.schemes and args.head_dim % 2:
        p.error(f"--head-dim must be even for the rotary scheme (sin/cos pairs), got {args.head_dim}")
    for scheme in ("xl", "sinusoidal"):
        if scheme in args.schemes and args.heads * args.head_dim % 2:
            p.error(f"--heads x --head-dim must be even for the {scheme} scheme (sin/cos pairs), "
                    f"got {args.heads} x {args.head_dim}")
    free, need = available_bytes(torch.device(args.device)), _least_bytes(args)
    if free is not None and need > free:
        p.error(f"--lengths {max(args.lengths)} --batch {args.batch} --heads {args.heads} --head-dim {args.head_dim} "
                f"({', '.join(args.schemes)}, {args.dtype}) need at least {need / GIB:,.1f} GiB; "
                f"{free / GIB:,.1f} GiB free on {args.device}")


def _check_output(p: argparse.ArgumentParser, option: str, path: Optional[str]) -> None:
    """``path`` names a file that can be written, so that a long run is not lost at the end."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not path or os.path.isdir(path):
        p.error(f"{option} must name a file, got {path!r}")
    if not os.path.isdir(folder):
        p.error(f"{option} {path}: no folder {folder}")
    real = os.path.realpath(path)  # a symlink's target, which the end of the run writes
    existed = os.path.exists(real)
    if existed and not os.path.isfile(real):  # a FIFO or device: opening may block
        if not os.access(real, os.W_OK):
            p.error(f"{option} {path}: not writable")
        return
    try:
        open(real, "a").close()  # as the end of the run will open it; os.access trusts root
    except OSError as err:
        p.error(f"{option} {path}: not writable ({err.strerror})")
    if not existed:
        os.remove(real)


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
    chosen = [scheme for scheme in args.schemes if scheme in INPUT_SCHEMES]
    if chosen:
        encode = "bio-attention mod_x" if dense_kind == "bio" else "eager formulas in flexpos.bench"
        header.append(f"{', '.join(chosen)}: x (B, L, H*D) + encoding (dense = {encode}; flexpos: compiled; "
                      "floor: none) -> LayerNorm -> q, k, v (one fixed projection) -> SDPA; no L x L tensor on any path")
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
            "learned_continuous": {"depth": CONTINUOUS_DEPTH, "divide": CONTINUOUS_DIVIDE},
        },
        "results": [asdict(r) for r in rows],
        "elapsed_s": round(elapsed, 1),
        "interrupted": interrupted,
    }
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m flexpos.bench [options]``: progress on stderr, the table on stdout; the exit
    status of :func:`exit_code`."""
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
    what = "outputs and input gradients" if args.mode == "fwdbwd" else "outputs"
    against = ("the dense path" if args.dtype == "float32" else
               f"the dense path in float32 on the same inputs; dense |diff|: the {args.dtype} dense path's own")
    print(f"speed-up = dense ms / flexpos ms; peak = memory growth during one warm call; "
          f"compile s = first call - steady call; total {elapsed:.0f} s")
    print(f"max |diff| = flexpos' largest difference in its {what} from {against}")
    if args.json:
        _save_json(args.json, argv, args, dense_kind, memory, facts, rows, elapsed, interrupted)
        log(f"wrote {args.json}")
    if args.plot and rows:
        plot_results(rows, args.plot)
        log(f"wrote {args.plot}")
    elif args.plot:
        log(f"no finished case: {args.plot} not drawn")
    return exit_code(rows, interrupted)


def exit_code(rows: Sequence[Row], interrupted: bool) -> int:
    """130 after Ctrl-C (as the shell reports SIGINT), 1 where flexpos failed on a case, else 0."""
    if interrupted:
        return 130
    return 1 if any(r.flexpos_status.startswith("error") for r in rows) else 0
