"""CUDA, bfloat16, B=4 H=16 D=64: forward and forward+backward, L from 1k to 64k.

Paths: flexpos, the dense path (the bias formulas of ``flexpos.bench``, so bio-attention is not
needed on the GPU machine), plain SDPA, and flex with no score_mod (``flex_floor``, the
reference for the score_mods' throughput target; not for the input encodings, which attend
with SDPA on every path). Skipped without CUDA.
"""

import pytest
import torch
from _harness import PATHS, lengths, run

from flexpos.bench import INPUT_SCHEMES, Setup

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SCHEMES = ("alibi", "dpb", "xl", "rotary", *INPUT_SCHEMES)
LENGTHS = lengths((1024, 4096, 16384, 65536))
MODES = ("fwd", "fwdbwd")
GPU_PATHS = (*PATHS, "flex_floor")


def paths(scheme):
    """The input encodings attend with SDPA on every path: no flex floor to compare with."""
    return PATHS if scheme in INPUT_SCHEMES else GPU_PATHS


CASES = [(s, n, m, p) for m in MODES for s in SCHEMES for n in LENGTHS for p in paths(s)]
WINDOW_LENGTH = max(LENGTHS) if len(LENGTHS) == 1 else 16384
WINDOWS = [2 * WINDOW_LENGTH // d for d in (64, 16, 4, 1)]
WINDOW_CASES = [(m, w, p) for m in MODES for w in WINDOWS for p in ("flexpos", "dense")]


def setup(scheme, length, mode, window=512.0):
    return Setup(scheme, length, batch=4, heads=16, head_dim=64, dtype="bfloat16", device="cuda",
                 backward=mode == "fwdbwd", dense="formula", window=float(window))


@pytest.mark.parametrize("scheme,length,mode,path", CASES, ids=[f"{s}-{n}-{m}-{p}" for s, n, m, p in CASES])
def test_gpu(benchmark, scheme, length, mode, path):
    run(benchmark, setup(scheme, length, mode), path, rounds=5)


@pytest.mark.parametrize("mode,window,path", WINDOW_CASES, ids=[f"{m}-w{w}-{p}" for m, w, p in WINDOW_CASES])
def test_gpu_distance_window(benchmark, mode, window, path):
    run(benchmark, setup("window", WINDOW_LENGTH, mode, window), path, rounds=5)
