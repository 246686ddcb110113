"""cos and sin of float64 angles, computed in float32 at float64's accuracy of the angle.

Rotary and Sinusoidal form their angles ``p * w / divide`` in float64: at positions near 1e9
float32 angles hold no phase. Float64 trig is slow (on an H200 it made Rotary's table kernel
take half as long as rotating q and k; on a 2-core CPU Sinusoidal's compiled encoding of
(1, L, 512) took 1.2-1.8x as long with it, L=512-8192, benchmarks/results/cpu-2026-11-30.txt),
so :func:`cos_sin` reduces each angle
to [-pi, pi] in float64 and evaluates float32 trig there.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _three_part_tau() -> tuple[float, float, float]:
    """2*pi as c1 + c2 + c3, c1 and c2 of 21 significant bits: for whole turns n < 2^32,
    ``n * c1`` and ``n * c2`` are exact in float64 (Cody-Waite reduction)."""
    tail = 2.4492935982947064e-16  # 2*pi minus its float64 value
    c1 = math.ldexp(round(math.ldexp(math.tau, 18)), -18)
    rest = math.tau - c1
    exponent = math.frexp(rest)[1]
    c2 = math.ldexp(round(math.ldexp(rest, 21 - exponent)), exponent - 21)
    return c1, c2, (rest - c2) + tail


TAU_PARTS = _three_part_tau()


def cos_sin(angles: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin of float64 ``angles`` in ``dtype`` (float32 or float64).

    For float32 each angle is reduced to [-pi, pi] in float64 (exactly, for angles below
    2.7e10) and evaluated in float32, with a first-order correction for the reduced angle's
    rounding: as close to float64 trig as float32 trig itself is (compiled kernels use
    functions accurate to 2 ulps; absolute error below 1.2e-7). Larger angles, up to 2**53,
    are reduced with float64's 2*pi in one step, within about an ulp of the float64 angle
    (itself rounded by half an ulp). Past 2**53 float64 angles lie 2 or more radians apart and
    hold no phase: they count as 0 (cos 1, sin 0). Float64 trig made Rotary's table kernel
    take half as long as rotating q and k on an H200 (gpu-2026-11-27-e.txt).
    """
    if dtype == torch.float64:
        return angles.cos(), angles.sin()
    turns = torch.round(angles / math.tau)
    exact = ((angles - turns * TAU_PARTS[0]) - turns * TAU_PARTS[1]) - turns * TAU_PARTS[2]
    wide = torch.where(angles.abs() < 2.0**53, angles - turns * math.tau, 0.0)
    reduced = torch.where(turns.abs() < 2.0**32, exact, wide)
    near = reduced.to(dtype)
    rest = (reduced - near.double()).to(dtype)
    cos, sin = near.cos(), near.sin()
    return cos - sin * rest, sin + cos * rest
