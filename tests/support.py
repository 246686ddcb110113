"""Settings the test modules share.

Tolerances are stated once, per dtype, as the largest allowed |flexpos - float64 reference|
on attention outputs of unit-scale inputs.
"""

import pytest
import torch

from flexpos import backends

TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 2e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}

needs_cpu_flex = pytest.mark.skipif(
    backends.torch_version() < backends.CPU_FLEX_MIN_TORCH, reason="no CPU flex kernel in this torch"
)


def rotation_tolerance(want: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """How far ``x`` rotated in ``dtype`` (computed in float32) may lie from the float64
    rotation ``want``, elementwise: one rounding step of ``dtype`` (Triton's interpreter rounds
    to bfloat16 toward zero, GPUs to nearest) plus a few float32 ulps of the inputs' size (cos
    and sin formed in float32)."""
    return torch.finfo(dtype).eps * want.abs() + 4 * torch.finfo(torch.float32).eps * x.abs().max().double()
