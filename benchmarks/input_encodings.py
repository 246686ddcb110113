"""The input encodings alone, CPU: flexpos' compiled transform against the eager one.

    python benchmarks/input_encodings.py [--lengths 512 2048 8192] [--repeat 21] [--backward]

Sinusoidal, LearnedVocab and LearnedContinuous (the cases of ``flexpos.bench``: dim 512,
sorted irregular integer positions) on x (1, L, 512), float32. Against bio-attention's
``mod_x`` where it is installed, else the eager formula of ``flexpos.bench.dense_encoding``,
with the same weights. Each line: median milliseconds of interleaved calls, compile excluded,
and eager / flexpos. ``--backward`` times forward + backward into x.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from targets import interleaved  # also makes flexpos importable from a checkout

from flexpos.bench import INPUT_SCHEMES, bio_available, dense_encoding, irregular_positions
from flexpos.bench.cases import bio_input_module, input_module

DIM = 512


def paths(scheme: str, length: int, backward: bool) -> dict[str, object]:
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

    return {"flexpos": run(lambda: fx(x, pos=pos)), "eager": run(eager)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--repeat", type=int, default=21, help="timed calls per path (default 21)")
    parser.add_argument("--backward", action="store_true", help="forward + backward into x")
    args = parser.parse_args()
    eager = "bio-attention mod_x" if bio_available() else "eager formula"
    print(f"{'scheme':<20} {'L':>5}  {'flexpos ms':>10}  {eager + ' ms':>24}  eager / flexpos")
    for scheme in INPUT_SCHEMES:
        for length in args.lengths:
            fns = paths(scheme, length, args.backward)
            with torch.set_grad_enabled(args.backward):
                for fn in fns.values():
                    fn(), fn()  # compile and warm up
                times = interleaved(fns, lambda: None, args.repeat)
            ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
            print(f"{scheme:<20} {length:>5}  {ms['flexpos']:10.2f}  {ms['eager']:24.2f}  {ms['eager'] / ms['flexpos']:.2f}x")


if __name__ == "__main__":
    main()
