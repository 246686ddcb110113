"""The input encodings alone, CPU: flexpos' compiled transform against the eager one.

    python benchmarks/input_encodings.py [--lengths 512 2048 8192] [--repeat 21] [--backward]

Sinusoidal, LearnedVocab and LearnedContinuous (the cases of ``flexpos.bench``: dim 512,
sorted irregular integer positions) on x (1, L, 512), float32. Against bio-attention's
``mod_x`` where it is installed, else the eager formula of ``flexpos.bench.dense_encoding``,
with the same weights. Each line: median milliseconds of interleaved calls, compile excluded,
and eager / flexpos. ``--backward`` times forward + backward into x (and LearnedVocab's table).

``--rejected`` adds the alternative each design choice replaced, timed in the same rounds:
Sinusoidal with float64 cos and sin (before ``flexpos._trig.cos_sin``), and LearnedVocab's
compiled lookup in CPU training (before ``flexpos.learned._trains_on_cpu`` sent training to an
eager lookup; forward alone it is what flexpos runs).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any, Callable, Optional

import torch
from targets import interleaved  # also makes flexpos importable from a checkout

import flexpos.learned
import flexpos.sinusoidal
from flexpos.bench import INPUT_SCHEMES, bio_available, dense_encoding, irregular_positions
from flexpos.bench.cases import bio_input_module, input_module

DIM = 512


_sinusoidal_add = flexpos.sinusoidal._sinusoidal_add


def _float64_trig_add(x: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor, inv_freq: torch.Tensor,
                      div: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Sinusoidal's compiled add with float64 cos and sin (its path for float64 x), whatever
    ``dtype``; the encoding is cast to x's dtype in the add."""
    return _sinusoidal_add(x, pos, keep, inv_freq, div, torch.float64)


REJECTED: dict[str, tuple[Any, str, Any]] = {  # scheme: (module, attribute, replacement)
    "sinusoidal": (flexpos.sinusoidal, "_sinusoidal_add", _float64_trig_add),
    "learned_vocab": (flexpos.learned, "_trains_on_cpu", lambda emb: False),
}


def swapped(module: Any, name: str, value: Any, fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` run with ``module.name`` set to ``value``, restored after each call."""
    def call() -> None:
        previous = getattr(module, name)
        setattr(module, name, value)
        try:
            fn()
        finally:
            setattr(module, name, previous)
    return call


def paths(scheme: str, length: int, backward: bool, rejected: bool = False) -> dict[str, Callable[[], None]]:
    """flexpos' and the eager encoding of one (1, L, DIM) x, as zero-argument callables."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, length, DIM, generator=gen).requires_grad_(backward)
    pos = irregular_positions(1, length, gen)
    grad = torch.randn(1, length, DIM, generator=gen)
    fx = input_module(scheme, DIM, length)
    if bio_available():
        bm = bio_input_module(scheme, fx)
        eager = lambda: bm(x, pos=pos)  # noqa: E731
    else:
        eager = lambda: dense_encoding(fx, x, pos)  # noqa: E731

    def run(encode):
        def call() -> None:
            out = encode()
            if backward:
                x.grad = None
                out.backward(grad)
        return call

    calls = {"flexpos": run(lambda: fx(x, pos=pos)), "eager": run(eager)}
    if rejected and scheme in REJECTED:
        calls["rejected"] = swapped(*REJECTED[scheme], calls["flexpos"])
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--repeat", type=int, default=21, help="timed calls per path (default 21)")
    parser.add_argument("--backward", action="store_true", help="forward + backward into x")
    parser.add_argument("--rejected", action="store_true", help="also time the alternatives the design replaced")
    args = parser.parse_args()
    eager = "bio-attention mod_x" if bio_available() else "eager formula"
    extra = "  rejected ms  rejected / flexpos" if args.rejected else ""
    print(f"{'scheme':<20} {'L':>5}  {'flexpos ms':>10}  {eager + ' ms':>24}  eager / flexpos{extra}")
    for scheme in INPUT_SCHEMES:
        for length in args.lengths:
            fns = paths(scheme, length, args.backward, args.rejected)
            with torch.set_grad_enabled(args.backward):
                for fn in fns.values():
                    fn(), fn()  # compile and warm up
                times = interleaved(fns, lambda: None, args.repeat)
            ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
            line = f"{scheme:<20} {length:>5}  {ms['flexpos']:10.2f}  {ms['eager']:24.2f}  {ms['eager'] / ms['flexpos']:14.2f}x"
            print(line + _rejected_columns(ms.get("rejected"), ms["flexpos"]))


def _rejected_columns(rejected: Optional[float], flexpos_ms: float) -> str:
    return "" if rejected is None else f"  {rejected:11.2f}  {rejected / flexpos_ms:17.2f}x"


if __name__ == "__main__":
    main()
