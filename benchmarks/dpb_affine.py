"""bio-attention's default DPB (depth 1, an affine MLP), CPU: its rate and shift per head against its table.

    python benchmarks/dpb_affine.py [--repeat 5] [--lengths 1024 4096]

DPB(32, H) with H=8, D=64, B=1, float32, on the chunked backend, at integer positions (gaps of
1-3) and at float positions; forward under no_grad, and forward + backward with gradients into
q, k, v and the MLP. Three rows per case, timed in one process on the same inputs: flexpos as
shipped (the MLP's rate and shift per head), the same module read from its table (as before
the affine MLP had its own score_mod; the same numbers within rounding), and the call without
DPB. Each line: median milliseconds over calls that alternate between the three rows
(compile and a warm-up call excluded), and table / shipped.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Callable
from unittest import mock

import torch
from targets import interleaved  # also makes flexpos importable from a checkout

import flexpos

H, D = 8, 64


def positions(length: int, integer: bool) -> torch.Tensor:
    gaps = torch.randint(1, 4, (1, length)) if integer else torch.rand(1, length) * 3
    return gaps.cumsum(-1)


def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dpb: flexpos.DPB | None, pos: torch.Tensor, backward: bool) -> Callable[[], object]:
    mods = [dpb] if dpb is not None else []

    def forward() -> object:
        with torch.no_grad():
            return flexpos.attention(q, k, v, *mods, pos=pos)

    def forward_backward() -> object:
        out = flexpos.attention(q, k, v, *mods, pos=pos)
        out.sum().backward()
        return out

    return forward_backward if backward else forward


def as_table(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with DPB reading its table, as for any MLP that is not affine."""

    def run() -> object:
        with mock.patch.object(flexpos.DPB, "affine", new=property(lambda self: False)):
            return fn()

    return run


def alternating_ms(fns: list[Callable[[], object]], repeat: int) -> list[float]:
    """Median milliseconds per function, after a warm-up call each; calls taken in turn, so that
    the machine's load drifts hit all alike."""
    for fn in fns:
        fn()
    times = interleaved({str(i): fn for i, fn in enumerate(fns)}, lambda: None, repeat)
    return [1e3 * statistics.median(times[str(i)]) for i in range(len(fns))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per line (default 5)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    args = parser.parse_args()
    torch.manual_seed(0)
    dpb = flexpos.DPB(32, H)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; DPB(32, {H}) affine: {dpb.affine}")
    print(f"{'L':>5} {'positions':>9} {'pass':>8}  {'shipped ms':>10}  {'table ms':>8}  {'no DPB ms':>9}  {'table/shipped':>13}")
    for length in args.lengths:
        for integer in (True, False):
            pos = positions(length, integer)
            for backward in (False, True):
                q, k, v = (torch.randn(1, H, length, D, requires_grad=backward) for _ in range(3))
                rows = [step(q, k, v, dpb, pos, backward), as_table(step(q, k, v, dpb, pos, backward)),
                        step(q, k, v, None, pos, backward)]
                shipped, table, none = alternating_ms(rows, args.repeat)
                kind = "int" if integer else "float"
                mode = "fwd+bwd" if backward else "fwd"
                print(f"{length:>5} {kind:>9} {mode:>8}  {shipped:10.1f}  {table:8.1f}  {none:9.1f}  {table / shipped:12.2f}x")


if __name__ == "__main__":
    main()
