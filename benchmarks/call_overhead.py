"""flexpos' fixed cost per call on CPU: tiny inputs, where attention itself takes microseconds.

    python benchmarks/call_overhead.py [--length 64] [--repeat 300]

ALiBi forward at B=1 H=2 D=16 (float32, no_grad), with no mask, ``causal=True`` and a bool key
padding mask, against SDPA with the same dense ALiBi bias built in the call (the dense path);
plus one call in grad mode with nothing requiring a gradient (a model in eval() without
no_grad). Each line: median microseconds and the ratio to the dense path. Compile excluded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

try:
    import flexpos
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import flexpos


def median_us(fn: Callable[[], object], repeat: int) -> float:
    for _ in range(5):  # compiles and warms up
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=64, help="L (default 64)")
    parser.add_argument("--repeat", type=int, default=300, help="timed calls per line (default 300)")
    args = parser.parse_args()
    torch.manual_seed(0)
    heads, length = 2, args.length
    q, k, v = (torch.randn(1, heads, length, 16) for _ in range(3))
    pos = torch.randint(0, 10**6, (1, length)).sort(-1).values
    valid = torch.ones(1, length, dtype=torch.bool)
    valid[:, -3:] = False
    alibi = flexpos.ALiBi(heads)
    slopes = alibi.slopes.view(1, heads, 1, 1).float()
    causal = torch.ones(length, length, dtype=torch.bool).tril()

    def dense(keep: torch.Tensor | None = None) -> torch.Tensor:
        bias = -slopes * (pos[:, None, :, None] - pos[:, None, None, :]).abs().float()
        if keep is not None:
            bias = bias.masked_fill(~keep, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    cases = {
        "no mask": (lambda: flexpos.attention(q, k, v, alibi, pos=pos), lambda: dense()),
        "causal": (lambda: flexpos.attention(q, k, v, alibi, pos=pos, causal=True), lambda: dense(causal)),
        "key padding": (
            lambda: flexpos.attention(q, k, v, alibi, pos=pos, mask=valid),
            lambda: dense(valid[:, None, None, :]),
        ),
    }
    print(f"flexpos {flexpos.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"ALiBi forward, B=1 H={heads} L={length} D=16, float32")
    print(f"{'case':32s} {'flexpos us':>10s} {'dense us':>9s} {'flexpos/dense':>13s}")
    with torch.no_grad():
        for name, (ours, theirs) in cases.items():
            a, b = median_us(ours, args.repeat), median_us(theirs, args.repeat)
            print(f"{name:32s} {a:10.0f} {b:9.0f} {a / b:12.1f}x")
    a = median_us(lambda: flexpos.attention(q, k, v, alibi, pos=pos), args.repeat)
    b = median_us(dense, args.repeat)
    print(f"{'no mask, grad mode (no grads)':32s} {a:10.0f} {b:9.0f} {a / b:12.1f}x")


if __name__ == "__main__":
    main()
