"""DPB on short sequences with float positions, CPU: the cost per call of its MLP.

    python benchmarks/dpb_short.py [--repeat 20]

DPB forward (dim 32, depth 2; H=8, D=64, float32, no_grad) at float positions, against the same
call without DPB. On the grid the MLP runs on ``table_size`` (65,537) nodes whatever L; where a
call has fewer (sequence, query, key) pairs, the chunked backend runs it at every pair instead.
Run it on two checkouts to compare them. Each line: median milliseconds, compile excluded.
"""

from __future__ import annotations

import argparse

import torch
from breakdown import median_ms  # also makes flexpos importable from a checkout

import flexpos

H, D = 8, 64
SHAPES = [(1, 64), (1, 128), (1, 256), (8, 64)]  # (B, L)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20, help="timed calls per line (default 20)")
    args = parser.parse_args()
    torch.manual_seed(0)
    dpb = flexpos.DPB(32, H, depth=2)
    print(f"{'B':>2} {'L':>4}  {'DPB ms':>7}  {'no module ms':>12}")
    for b, length in SHAPES:
        q, k, v = (torch.randn(b, H, length, D) for _ in range(3))
        pos = torch.rand(b, length).cumsum(-1) * 100
        with torch.no_grad():
            with_dpb = median_ms(lambda: flexpos.attention(q, k, v, dpb, pos=pos), args.repeat)
            without = median_ms(lambda: flexpos.attention(q, k, v, pos=pos), args.repeat)
        print(f"{b:>2} {length:>4}  {with_dpb:7.2f}  {without:12.2f}")


if __name__ == "__main__":
    main()
