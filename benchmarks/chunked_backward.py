"""The chunked backend's forward + backward on CPU: chunks that keep SDPA's output (the default
where the bias needs no gradient) against checkpointed chunks, side by side in one process; then
where the flash kernel's backward spends its time (denormal floats).

    python benchmarks/chunked_backward.py            # B=1 H=8 D=64, L=1024 and 2048

Part 1 times ``flexpos.attention(...)`` + ``torch.autograd.grad`` with
``chunked._keeps_outputs`` as shipped and forced off (ALiBi, ALiBi with a position window, a
frozen DPB, a key padding mask alone), and prints the largest difference of their gradients. Part 2 times SDPA's CPU flash backward on one ALiBi-like bias (chunks of 256
queries, L=2048) with denormals as they come and flushed (``torch.set_flush_denormal``, which
acts on the calling thread only). Part 3 times the chunks where SDPA would run its math kernel
(``MATH_CASES``: a bias that needs a gradient, XL, torch 2.6 emulated) with ``chunked._attend_math``
as shipped and replaced by SDPA's math kernel, and prints the largest difference of their
outputs or gradients relative to the largest value (of q, k, v; of the parameters).

    python benchmarks/chunked_backward.py --parts 3   # part 3 alone
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence
from unittest import mock

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

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


def inputs(length: int) -> tuple[torch.Tensor, ...]:
    """q, k, v (1, 8, length, 64) that need gradients, an output gradient, positions (1, length)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, length, 64, generator=gen).requires_grad_() for _ in range(3))
    return q, k, v, torch.randn(1, 8, length, 64, generator=gen), irregular_positions(1, length, gen)


def kept_vs_checkpointed(case: str, length: int, repeat: int) -> None:
    q, k, v, grad, pos = inputs(length)
    gen = torch.Generator().manual_seed(1)
    modules = {"ALiBi": [flexpos.ALiBi(8)], "ALiBi + position window 512": [flexpos.ALiBi(8)],
               "DPB, frozen": [flexpos.DPB(32, 8, depth=2).requires_grad_(False)]}.get(case, [])
    mask = {"ALiBi + position window 512": flexpos.distance_window_mask(512.0, pos=pos),
            "key padding mask alone": torch.rand(1, length, generator=gen) > 0.2}.get(case)

    def step() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(flexpos.attention(q, k, v, *modules, pos=pos, mask=mask), (q, k, v), grad)

    def checkpointed() -> tuple[torch.Tensor, ...]:
        with mock.patch.object(chunked, "_keeps_outputs", lambda *args: False):
            return step()

    diff = max(float((a - b).abs().max()) for a, b in zip(step(), checkpointed()))
    ms = median_ms({"kept": step, "checkpointed": checkpointed}, repeat)
    print(f"  {case:28s} L={length}: checkpointed {ms['checkpointed']:7.1f} ms, outputs kept "
          f"{ms['kept']:7.1f} ms, {ms['checkpointed'] / ms['kept']:.2f}x; max |grad difference| {diff:.1e}")


def sdpa_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    with sdpa_kernel(SDPBackend.MATH):  # the kernel SDPA picks wherever flexpos runs its own math
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


MATH_CASES = ("ALiBi, learned divisor", "DPB, learned", "XL, key padding mask", "ALiBi, as in torch 2.6")
"""Cases where chunks run flexpos' own math: a bias that needs a gradient (checkpointed chunks),
q and k with more features than v (XL), and a torch whose CPU flash kernel takes no bias
(emulated: the flash kernel is refused; torch 2.6's does take one, docs/design.md). The last
two also run it without gradients."""


def explicit_vs_sdpa(case: str, length: int, repeat: int) -> None:
    q, k, v, grad, pos = inputs(length)
    module = {"ALiBi, learned divisor": flexpos.ALiBi(8, divide=2.0, learned_div=True), "DPB, learned":
              flexpos.DPB(32, 8, depth=2), "XL, key padding mask": flexpos.XL(512, 8)}.get(case, flexpos.ALiBi(8))
    mask = torch.rand(1, length, generator=torch.Generator().manual_seed(1)) > 0.2 if case.startswith("XL") else None
    leaves = (q, k, v, *module.parameters())
    as_torch_2_6 = case.endswith("2.6")

    def run(forward_only: bool, own: bool) -> Callable[[], tuple[torch.Tensor, ...]]:
        def timed() -> tuple[torch.Tensor, ...]:
            with contextlib.ExitStack() as stack:
                if as_torch_2_6:
                    stack.enter_context(mock.patch.object(chunked, "_flash_cpu_takes_a_bias", lambda: False))
                if not own:
                    stack.enter_context(mock.patch.object(chunked, "_attend_math", sdpa_math))
                with torch.set_grad_enabled(not forward_only):
                    out = flexpos.attention(q, k, v, module, pos=pos, mask=mask)
                return (out,) if forward_only else torch.autograd.grad(out, leaves, grad)
        return timed

    for forward_only in (True, False) if as_torch_2_6 or mask is not None else (False,):
        got, want = run(forward_only, True)(), run(forward_only, False)()
        # relative to the largest gradient of q, k, v and of the parameters: some parameter gradients
        # are 0 in exact arithmetic (DPB's output bias shifts every score of a head), rounding noise here
        parts = (slice(0, 1),) if forward_only else (slice(0, 3), slice(3, None))
        diffs = ", ".join(f"{relative_difference(got[part], want[part]):.1e}" for part in parts if got[part])
        ms = median_ms({"explicit": run(forward_only, True), "sdpa": run(forward_only, False)}, repeat)
        kind = "forward" if forward_only else "forward + backward"
        print(f"  {case:24s} {kind:18s} L={length}: SDPA (math kernel) {ms['sdpa']:7.1f} ms, explicit "
              f"{ms['explicit']:7.1f} ms, {ms['sdpa'] / ms['explicit']:.2f}x; max |difference| / max |value| "
              f"({'output' if forward_only else 'q, k, v; parameters'}): {diffs}")


def relative_difference(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    scale = max(float(w.abs().max()) for w in want)
    return max(float((g - w).abs().max()) for g, w in zip(got, want)) / scale


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
    p.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    args = p.parse_args(argv)
    print(f"flexpos chunked backward on CPU: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          "float32, B=1 H=8 D=64")
    if 1 in args.parts:
        for case in CASES:
            for length in args.lengths:
                kept_vs_checkpointed(case, length, args.repeat)
    if 2 in args.parts:
        flash_backward_denormals(max(3, args.repeat // 2))
    if 3 in args.parts:
        for case in MATH_CASES:
            for length in args.lengths:
                explicit_vs_sdpa(case, length, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
