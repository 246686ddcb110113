"""Where flexpos' CPU time goes: ALiBi or DPB forward, B=1 H=8 D=64, float32, one process.

    python benchmarks/breakdown.py [--scheme alibi] [--length 4096] [--repeat 5]

Each step's median time and its ratio to plain SDPA (the floor), compile excluded. ALiBi:

  floor        SDPA with no mask
  sdpa + bias  SDPA with the whole (1, H, L, L) ALiBi bias precomputed (the dense path's attention)
  by chunks    the same, one SDPA call per query chunk of flexpos' size with its slice of the bias
  bias kernel  flexpos' compiled bias kernel alone, over every query chunk
  flexpos      flexpos.attention (chunked backend: bias kernel and SDPA, chunk by chunk)
  one part     the same, reading one float32 part per side of these integer positions, as on
               accelerators (CPU reads both: see flexpos.positions.fewer_tables)
  cpu flex     Inductor's CPU flex kernel (backend='flex'), with no score_mod and with ALiBi

DPB (dim 32, depth 2; its MLP runs on a grid of distances, see flexpos/dpb.py):

  floor        SDPA with no mask
  table        the MLP on the grid of float positions (table_size nodes, whatever L)
  flexpos      flexpos.attention with float positions (table + chunked backend)
  int          flexpos.attention with integer positions (on CPU the grid has 2 * span + 1 nodes)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable
from unittest import mock

import torch
import torch.nn.functional as F

try:
    import flexpos
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import flexpos
from flexpos import chunked
from flexpos._compile import torch_version
from flexpos.base import index_grids
from flexpos.dpb import DistanceGrid
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


def alibi_steps(length: int) -> dict[str, Callable[[], object]]:
    """The timed ALiBi steps on one set of inputs (see the module docstring)."""
    q, k, v = (torch.randn(B, H, length, D) for _ in range(3))
    pos = torch.randint(1, 4, (B, length)).cumsum(-1)
    alibi = flexpos.ALiBi(H)
    positions = Positions.resolve((B,), length, length, q.device, pos=pos)
    score_mod = alibi.score_mod(positions)
    bias = score_mod(torch.zeros(()), *index_grids(B, H, length, length))
    rows = chunked.chunk_rows(B * H, length)

    chunks = [(start, bias[:, :, start : start + rows].clone()) for start in range(0, length, rows)]

    def by_chunks() -> None:
        for start, part in chunks:
            F.scaled_dot_product_attention(q[:, :, start : start + rows], k, v, attn_mask=part)

    def bias_kernel() -> None:
        for start in range(0, length, rows):
            n = min(rows, length - start)
            chunked._compiled_bias(score_mod, None, B, H, start, n, 0, length, torch.float32, q.device)

    found = {
        "floor": lambda: F.scaled_dot_product_attention(q, k, v),
        "sdpa + bias": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias),
        f"by chunks of {rows}": by_chunks,
        "bias kernel": bias_kernel,
        "flexpos": lambda: flexpos.attention(q, k, v, alibi, pos=pos),
        "flexpos, one part": lambda: one_part(lambda: flexpos.attention(q, k, v, alibi, pos=pos)),
    }
    if torch_version() >= flexpos.backends.CPU_FLEX_MIN_TORCH:
        found["cpu flex, no score_mod"] = lambda: flexpos.attention(q, k, v, backend="flex")
        found["cpu flex, ALiBi"] = lambda: flexpos.attention(q, k, v, alibi, pos=pos, backend="flex")
    return found


def one_part(fn: Callable[[], object]) -> object:
    with mock.patch.object(flexpos.positions, "fewer_tables", lambda device: True):
        return fn()


def dpb_steps(length: int) -> dict[str, Callable[[], object]]:
    """The timed DPB steps on one set of inputs (see the module docstring)."""
    q, k, v = (torch.randn(B, H, length, D) for _ in range(3))
    pos_int = torch.randint(1, 4, (B, length)).cumsum(-1)
    pos_float = pos_int + torch.rand(B, length)
    dpb = flexpos.DPB(32, H, depth=2)
    span = (pos_float.max() - pos_float.min()).double()
    grid = DistanceGrid.covering(span, integer=False, table_size=dpb.table_size)
    return {
        "floor": lambda: F.scaled_dot_product_attention(q, k, v),
        f"table ({dpb.table_size} nodes)": lambda: dpb.tables(grid, torch.float32),
        "flexpos, float positions": lambda: flexpos.attention(q, k, v, dpb, pos=pos_float),
        "flexpos, int positions": lambda: flexpos.attention(q, k, v, dpb, pos=pos_int),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheme", choices=("alibi", "dpb"), default="alibi")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    steps = alibi_steps if args.scheme == "alibi" else dpb_steps
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.scheme} forward, B={B} H={H} "
          f"D={D} L={args.length}, float32; median of {args.repeat} runs, compile excluded")
    with torch.no_grad():
        times = {name: median_ms(fn, args.repeat) for name, fn in steps(args.length).items()}
    for name, ms in times.items():
        print(f"{name:24s} {ms:8.1f} ms  {ms / times['floor']:5.2f}x floor")


if __name__ == "__main__":
    main()
