"""flexpos' fixed cost per call on CPU: tiny inputs, where attention itself takes microseconds.

    python benchmarks/call_overhead.py [--length 64] [--repeat 300]

ALiBi forward at B=1 H=2 D=16 (float32, no_grad), with no mask, ``causal=True`` and a bool key
padding mask, against SDPA with the same dense ALiBi bias built in the call (the dense path);
plus one call in grad mode with nothing requiring a gradient (a model in eval() without
no_grad). Each line: median microseconds and the ratio to the dense path. Compile excluded.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from breakdown import median_ms  # also makes flexpos importable from a checkout

import flexpos
from flexpos.bench.dense import dense_alibi_bias


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
    causal = torch.ones(length, length, dtype=torch.bool).tril()

    def dense(keep: torch.Tensor | None = None) -> torch.Tensor:
        bias = dense_alibi_bias(alibi, pos)
        if keep is not None:
            bias = bias.masked_fill(~keep, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    no_mask = lambda: flexpos.attention(q, k, v, alibi, pos=pos)  # noqa: E731
    cases = [  # name, flexpos, dense path, grad mode
        ("no mask", no_mask, dense, False),
        ("causal", lambda: flexpos.attention(q, k, v, alibi, pos=pos, causal=True), lambda: dense(causal), False),
        ("key padding", lambda: flexpos.attention(q, k, v, alibi, pos=pos, mask=valid),
         lambda: dense(valid[:, None, None, :]), False),
        ("no mask, grad mode (no grads)", no_mask, dense, True),
    ]
    print(f"flexpos {flexpos.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"ALiBi forward, B=1 H={heads} L={length} D=16, float32")
    print(f"{'case':32s} {'flexpos us':>10s} {'dense us':>9s} {'flexpos/dense':>13s}")
    for name, ours, theirs, grad_mode in cases:
        with torch.set_grad_enabled(grad_mode):
            a, b = (1e3 * median_ms(fn, args.repeat) for fn in (ours, theirs))
        print(f"{name:32s} {a:10.0f} {b:9.0f} {a / b:12.1f}x")


if __name__ == "__main__":
    main()
