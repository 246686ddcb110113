"""CPU, float32, forward, B=1 H=8 D=64: flexpos vs the dense path vs plain SDPA (the floor).

Every scheme: the four that act in attention, and the three input encodings (Sinusoidal,
LearnedVocab, LearnedContinuous: x + encoding, then the same projection and SDPA on every
path; see flexpos.bench.cases).

``pytest benchmarks/test_cpu.py --benchmark-only``. Each group of the report is one
(scheme, L); the closing section prints dense/flexpos and flexpos/floor ratios. Dense cases
that would not fit in memory are skipped with the memory they would need.
"""

import pytest
from _harness import PATHS, lengths, run

from flexpos.bench import INPUT_SCHEMES, Setup

SCHEMES = ("alibi", "dpb", "xl", "rotary", *INPUT_SCHEMES)
LENGTHS = lengths((1024, 2048, 4096, 8192, 16384))
CASES = [(scheme, length, path) for scheme in SCHEMES for length in LENGTHS for path in PATHS]

# Position-distance window over L=8192 sorted positions with gaps of 1-3 (span ~16k): each
# query chunk attends only to the BlockMask's non-empty key tiles (on CPU's chunked backend as
# in flex), so flexpos' time should fall with window / span.
WINDOW_LENGTH = max(LENGTHS) if len(LENGTHS) == 1 else 8192
WINDOWS = [2 * WINDOW_LENGTH // d for d in (64, 16, 4, 1)]
WINDOW_CASES = [(window, path) for window in WINDOWS for path in ("flexpos", "dense")]


def setup(scheme, length, window=512.0):
    return Setup(scheme, length, batch=1, heads=8, head_dim=64, dtype="float32", device="cpu",
                 dense="auto", window=float(window))


@pytest.mark.parametrize("scheme,length,path", CASES, ids=[f"{s}-{n}-{p}" for s, n, p in CASES])
def test_forward(benchmark, scheme, length, path):
    run(benchmark, setup(scheme, length), path)


@pytest.mark.parametrize("window,path", WINDOW_CASES, ids=[f"w{w}-{p}" for w, p in WINDOW_CASES])
def test_distance_window(benchmark, window, path):
    run(benchmark, setup("window", WINDOW_LENGTH, window), path)
