"""The chunked backend's forward + backward on CPU: chunks that keep SDPA's output (the default
where the bias needs no gradient) against checkpointed chunks, side by side in one process; then
where the flash kernel's backward spends its time (denormal floats).

    python benchmarks/chunked_backward.py            # B=1 H=8 D=64, L=1024 and 2048

Part 1 times ``flexpos.attention(...)`` + ``torch.autograd.grad`` with
``chunked._keeps_outputs`` as shipped and forced off (ALiBi, ALiBi with a position window, a
frozen DPB, a key padding mask alone), and prints the largest difference of their gradients. Part 2 times SDPA's CPU flash backward on one ALiBi-like bias (chunks of 256
queries, L=2048) with denormals as they come and flushed (``torch.set_flush_denormal``, which
acts on the calling thread only).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import flexpos  # noqa: E402
from flexpos import chunked  # noqa: E402
from flexpos.bench import irregular_positions  # noqa: E402
from targets import interleaved  # noqa: E402  (the timing helper of benchmarks/targets.py)


def median_ms(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """:func:`targets.interleaved` after one warm-up each: median milliseconds per name."""
    for fn in fns.values():
        fn()
    times = interleaved(fns, lambda: None, repeat)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


CASES = ("ALiBi", "ALiBi + position window 512", "DPB, frozen", "key padding mask alone")


def kept_vs_checkpointed(case: str, length: int, repeat: int) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, length, 64, generator=gen).requires_grad_() for _ in range(3))
    grad = torch.randn(1, 8, length, 64, generator=gen)
    pos = irregular_positions(1, length, gen)
    modules = {"ALiBi": [flexpos.ALiBi(8)], "ALiBi + position window 512": [flexpos.ALiBi(8)],
               "DPB, frozen": [flexpos.DPB(32, 8, depth=2).requires_grad_(False)]}.get(case, [])
    mask = {"ALiBi + position window 512": flexpos.distance_window_mask(512.0, pos=pos),
            "key padding mask alone": torch.rand(1, length, generator=gen) > 0.2}.get(case)
    shipped = chunked._keeps_outputs

    def step() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(flexpos.attention(q, k, v, *modules, pos=pos, mask=mask), (q, k, v), grad)

    def checkpointed() -> tuple[torch.Tensor, ...]:
        chunked._keeps_outputs = lambda *args: False
        try:
            return step()
        finally:
            chunked._keeps_outputs = shipped

    diff = max(float((a - b).abs().max()) for a, b in zip(step(), checkpointed()))
    ms = median_ms({"kept": step, "checkpointed": checkpointed}, repeat)
    print(f"  {case:28s} L={length}: checkpointed {ms['checkpointed']:7.1f} ms, outputs kept "
          f"{ms['kept']:7.1f} ms, {ms['checkpointed'] / ms['kept']:.2f}x; max |grad difference| {diff:.1e}")


def flash_backward_denormals(repeat: int, length: int = 2048, rows: int = 256) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(1, 8, length, 64, generator=gen) for _ in range(4))
    idx = torch.arange(length, dtype=torch.float32)
    slopes = torch.tensor(flexpos.alibi.alibi_slopes(8)).view(1, 8, 1, 1)
    bias = -(slopes * (idx[:, None] - idx[None, :]).abs() * 2)  # gaps of 2 positions
    ops = torch.ops.aten
    starts = range(0, length, rows)
    saved = [ops._scaled_dot_product_flash_attention_for_cpu(q[:, :, s : s + rows], k, v, 0.0, False,
                                                             attn_mask=bias[:, :, s : s + rows]) for s in starts]

    def backward() -> None:
        for (out, lse), s in zip(saved, starts):
            ops._scaled_dot_product_flash_attention_for_cpu_backward(
                grad[:, :, s : s + rows], q[:, :, s : s + rows], k, v, out, lse, 0.0, False,
                attn_mask=bias[:, :, s : s + rows])

    def flushed() -> None:
        torch.set_flush_denormal(True)
        try:
            backward()
        finally:
            torch.set_flush_denormal(False)

    ms = median_ms({"as they come": backward, "flushed": flushed}, repeat)
    print(f"  flash backward, L={length}, ALiBi bias: denormals as they come {ms['as they come']:.1f} ms, "
          f"flushed on the calling thread {ms['flushed']:.1f} ms ({torch.get_num_threads()} threads)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args(argv)
    print(f"flexpos chunked backward on CPU: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          "float32, B=1 H=8 D=64")
    for case in CASES:
        for length in args.lengths:
            kept_vs_checkpointed(case, length, args.repeat)
    flash_backward_denormals(max(3, args.repeat // 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
