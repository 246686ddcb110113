"""Where flexpos' CPU time goes: ALiBi forward, B=1 H=8 D=64, float32, one process.

    python benchmarks/breakdown.py [--length 4096] [--repeat 5]

Each step's median time and its ratio to plain SDPA (the floor), compile excluded:

  floor        SDPA with no mask
  sdpa + bias  SDPA with the whole (1, H, L, L) ALiBi bias precomputed (the dense path's attention)
  by chunks    the same, one SDPA call per query chunk of flexpos' size with its slice of the bias
  bias kernel  flexpos' compiled bias kernel alone, over every query chunk
  flexpos      flexpos.attention (chunked backend: bias kernel and SDPA, chunk by chunk)
  cpu flex     Inductor's CPU flex kernel (backend='flex'), with no score_mod and with ALiBi
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
from flexpos import backends
from flexpos._compile import torch_version
from flexpos.base import index_grids
from flexpos.positions import Positions

B, H, D = 1, 8, 64


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()  # compile and warm up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def steps(length: int) -> dict[str, Callable[[], object]]:
    """The timed steps on one set of inputs (see the module docstring)."""
    q, k, v = (torch.randn(B, H, length, D) for _ in range(3))
    pos = torch.randint(1, 4, (B, length)).cumsum(-1)
    alibi = flexpos.ALiBi(H)
    positions = Positions.resolve((B,), length, length, q.device, pos=pos)
    score_mod = alibi.score_mod(positions)
    bias = score_mod(torch.zeros(()), *index_grids(B, H, length, length))
    rows = backends.chunk_rows(B * H, length)

    chunks = [(start, bias[:, :, start : start + rows].clone()) for start in range(0, length, rows)]

    def by_chunks() -> None:
        for start, part in chunks:
            F.scaled_dot_product_attention(q[:, :, start : start + rows], k, v, attn_mask=part)

    def bias_kernel() -> None:
        for start in range(0, length, rows):
            n = min(rows, length - start)
            backends._compiled_bias(score_mod, None, B, H, start, n, 0, length, torch.float32, q.device)

    found = {
        "floor": lambda: F.scaled_dot_product_attention(q, k, v),
        "sdpa + bias": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias),
        f"by chunks of {rows}": by_chunks,
        "bias kernel": bias_kernel,
        "flexpos": lambda: flexpos.attention(q, k, v, alibi, pos=pos),
    }
    if torch_version() >= flexpos.backends.CPU_FLEX_MIN_TORCH:
        found["cpu flex, no score_mod"] = lambda: flexpos.attention(q, k, v, backend="flex")
        found["cpu flex, ALiBi"] = lambda: flexpos.attention(q, k, v, alibi, pos=pos, backend="flex")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ALiBi forward, B={B} H={H} "
          f"D={D} L={args.length}, float32; median of {args.repeat} runs, compile excluded")
    with torch.no_grad():
        times = {name: median_ms(fn, args.repeat) for name, fn in steps(args.length).items()}
    for name, ms in times.items():
        print(f"{name:24s} {ms:8.1f} ms  {ms / times['floor']:5.2f}x floor")


if __name__ == "__main__":
    main()
