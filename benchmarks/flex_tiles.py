"""FlexAttention tile configurations for ALiBi and DPB on a GPU, timed against flex with no
score_mod (the GPU target's reference), through ``flexpos.attention(..., kernel_options=...)``.

    PYTHONPATH=. python benchmarks/flex_tiles.py                 # bf16, B=4 H=16 D=64, L=8192, fwd+bwd
    PYTHONPATH=. python benchmarks/flex_tiles.py --schemes dpb --configs "fwd 128x64" "bwd 64x64, 2 stages"

Each configuration's options go over flexpos' own (for DPB, ``flexpos.flex.GATHER_TILES``:
forward 64x64, backward 32x64 / 64x32; flex's defaults for ALiBi). A configuration whose kernels
do not fit the GPU's shared memory fails at its first call, and a failed compiled call leaves
later compiled calls in its process on a slow path: the configurations run in a worker process,
and after a failure a fresh worker goes on with the rest. Each configuration is timed as soon as
it is compiled, interleaved with flex with no score_mod in the same worker (every ratio comes from
one process), and printed at once.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import targets  # noqa: E402  (the timing helpers of benchmarks/targets.py)
from targets import fmt, interleaved, say  # noqa: E402

import flexpos  # noqa: E402
from flexpos.bench import Runner, Setup, build_case  # noqa: E402

BWD = ("bwd_BLOCK_M1", "bwd_BLOCK_N1", "bwd_BLOCK_M2", "bwd_BLOCK_N2")


def backward_tiles(m: int, n: int, **more: int) -> dict[str, int]:
    """Backward tiles as flex pairs them: dK/dV M1 x N1 = m x n, dQ M2 x N2 = n x m."""
    return {**dict(zip(BWD, (m, n, n, m))), **{f"bwd_{key}": value for key, value in more.items()}}


CONFIGS: dict[str, dict[str, int | bool]] = {
    "flexpos": {},
    "fwd 128x128": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128},
    "fwd 128x64": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64},
    "fwd 128x64, 2 stages": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_stages": 2},
    "fwd 128x128, 2 stages, 8 warps": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_stages": 2, "fwd_num_warps": 8},
    "fwd 64x64, 2 stages": {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_stages": 2},
    "bwd 64x128": backward_tiles(64, 128),
    "bwd 64x64, 2 stages": backward_tiles(64, 64, num_stages=2),
    "bwd 64x64, 3 stages": backward_tiles(64, 64, num_stages=3),
    "bwd 64x128, 2 stages, 8 warps": backward_tiles(64, 128, num_stages=2, num_warps=8),
    "bwd 32x64, 2 stages": backward_tiles(32, 64, num_stages=2),
    # not a tile: flex skips its guard for rows without keys (safe here: a full mask, finite biases)
    "rows guaranteed safe": {"ROWS_GUARANTEED_SAFE": True},
}
"""Named kernel_options (stages and warps not named: flex's defaults for the GPU). Flex requires
tiles that divide 128 (the BlockMask's blocks) and, in the backward, N1 % M1 == 0 and
M2 % N2 == 0."""

DEFAULT_CONFIGS = {
    # larger tiles first (the likelier to fail, each failure costs a worker restart), so that
    # failures come early and a time limit cuts small-tile variants
    "dpb": ["fwd 128x128", "bwd 64x128", "bwd 64x64, 3 stages", "fwd 128x128, 2 stages, 8 warps",
            "bwd 64x128, 2 stages, 8 warps", "flexpos", "fwd 128x64", "fwd 128x64, 2 stages",
            "fwd 64x64, 2 stages", "bwd 64x64, 2 stages", "bwd 32x64, 2 stages", "rows guaranteed safe"],
    # flex's defaults are ALiBi's: 128x128 forward, 64x128 backward on an H100/H200
    "alibi": ["flexpos", "fwd 128x64", "fwd 128x128, 2 stages, 8 warps", "bwd 64x64, 2 stages",
              "bwd 64x128, 2 stages, 8 warps", "rows guaranteed safe"],
}

DONE, FAILED = "## done: ", "## failed: "  # a worker's markers, one line per configuration


def time_configs(scheme: str, names: Sequence[str], s: Setup, repeat: int) -> None:
    """In this process: ``scheme`` under each configuration in ``names``, one after the other,
    each compiled, then timed interleaved with flex with no score_mod and printed, so that a
    time limit cuts at most the configuration under way. At a configuration that fails to run,
    exits with status 3 (the parent times the rest in a fresh worker)."""
    case = build_case(Setup(scheme, s.length, batch=s.batch, heads=s.heads, head_dim=s.head_dim,
                            dtype=s.dtype, device=s.device, backward=s.backward, dense="formula"))
    runner = Runner(torch.device(s.device), s.backward, case.leaves)
    q, k, v = case.leaves
    module = case.modules["flexpos"]
    reference = "flex no score_mod"
    if targets.first_call(f"{scheme}, {reference}", runner, case.flex_floor) is None:
        sys.exit(3)  # nothing to compare with: the parent reports every configuration untimed
    for name in names:
        fn = lambda o=CONFIGS[name]: flexpos.attention(q, k, v, module, pos=case.pos, kernel_options=o)  # noqa: E731
        seconds = targets.first_call(f"{scheme}, {name}", runner, fn)
        if seconds is None:
            say(f"{FAILED}{name}")
            sys.exit(3)
        say(f"  {scheme}, {name}: first call (compile + run) {seconds:.1f} s")
        times = interleaved({reference: lambda: runner.call(case.flex_floor), name: lambda: runner.call(fn)},
                            runner.sync, repeat)
        ref, t = times.get(reference), times.get(name)
        if t is None:  # failed while timing (said so): later calls in this process would be slow
            say(f"{FAILED}{name}")
            sys.exit(3)
        ratio = f"{statistics.median(ref) / statistics.median(t):.2f}x" if ref else "-"
        say(f"  {scheme}, {name:32s} {fmt(t):>24s}  {ratio} of flex no score_mod ({fmt(ref) if ref else '-'})")
        say(f"{DONE}{name}")


def run_workers(scheme: str, names: Sequence[str], worker_args: Sequence[str]) -> None:
    """Time ``names`` in worker processes, a fresh one after each failure; their output is
    printed as it comes (a hung worker is left to the caller's time limit, gpu.sh's step)."""
    remaining = list(names)
    while remaining:
        cmd = [sys.executable, __file__, "--worker", "--schemes", scheme, *worker_args, "--configs", *remaining]
        ended: set[str] = set()  # timed or failed
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                print(line, end="", flush=True)
                for marker in (DONE, FAILED):
                    if line.startswith(marker):
                        ended.add(line[len(marker):].strip())
        left = [n for n in remaining if n not in ended]
        if len(left) == len(remaining):  # no progress: the reference failed, or the worker crashed
            say(f"  worker exited with status {proc.returncode}; not timed: {', '.join(remaining)}")
            return
        remaining = left


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # DPB first: the further it is from its target, and a step's time limit cuts the last scheme
    p.add_argument("--schemes", nargs="+", default=["dpb", "alibi"], choices=["alibi", "dpb"])
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), metavar="NAME",
                   help=f"named configurations (default: all for DPB, six for ALiBi): {', '.join(CONFIGS)}")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--forward-only", action="store_true")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    s = Setup("alibi", args.length, batch=args.batch, heads=args.heads, head_dim=64, dtype=args.dtype,
              device=args.device, backward=not args.forward_only)
    if args.worker:
        time_configs(args.schemes[0], args.configs, s, args.repeat)
        return 0
    say(f"flexpos flex tiles: {args.device} {torch.cuda.get_device_name() if args.device == 'cuda' else ''}; "
        f"torch {torch.__version__}; {args.dtype}; B={args.batch} H={args.heads} D=64 L={args.length}; "
        f"{'forward' if args.forward_only else 'forward+backward'}")
    shared = ["--device", args.device, "--dtype", args.dtype, "--length", str(args.length), "--batch",
              str(args.batch), "--heads", str(args.heads), "--repeat", str(args.repeat)]
    shared += ["--forward-only"] if args.forward_only else []
    for scheme in args.schemes:
        say(f"\n[{scheme}]")
        run_workers(scheme, args.configs or DEFAULT_CONFIGS[scheme], shared)
    return 0


if __name__ == "__main__":
    sys.exit(main())
