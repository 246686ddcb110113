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
