"""Shared helpers of the legacy adapter tests: paired modules and comparisons.

Every pair is (bio-attention 0.1.15 module, legacy module) with the legacy module loaded from
the original's state_dict (strict), so both hold the same weights.
"""

from __future__ import annotations

from typing import Any

import torch
from bio_attention import positional as original
from torch import Tensor

from support import TOLERANCE
from legacy import positional as legacy

F32_ATOL = TOLERANCE[torch.float32]
F64_ATOL = TOLERANCE[torch.float64]

# (class name, args, kwargs): every option of every scheme the original constructs.
SCHEMES: list[tuple[str, tuple, dict]] = [
    ("Sinusoidal", (24,), {}),
    ("Sinusoidal", (24,), {"divide": 3.0, "learned_div": True}),
    ("LearnedVocab", (24, 64), {}),
    ("LearnedContinuous", (24,), {}),
    ("LearnedContinuous", (24,), {"depth": 3, "norm": True, "divide": 5.0, "learned_div": True}),
    ("Rotary", (6,), {}),
    ("Rotary", (6,), {"n_dims": 4, "divide": 2.0, "learned_div": True}),
    ("ALiBi", (4,), {}),
    ("ALiBi", (4,), {"use_n_heads": 3, "divide": 2.5}),
    ("ALiBi", (4,), {"asymmetric": True}),
    ("ALiBi", (4,), {"use_n_heads": 2, "asymmetric": True, "divide": 3.0}),
    ("DPB", (16, 4), {}),
    ("DPB", (16, 4), {"depth": 3, "norm": True, "divide": 4.0}),
    ("XL", (24, 4), {}),
    ("XL", (24, 4), {"divide": 3.0}),
]


def scheme_id(case: tuple[str, tuple, dict]) -> str:
    name, args, kwargs = case
    return "-".join([name, *map(str, args), *(f"{k}={v}" for k, v in kwargs.items())])


def pair(name: str, *args: Any, dtype: torch.dtype = torch.float32, **kwargs: Any):
    """(original, legacy) modules of class ``name`` holding the same weights."""
    orig = getattr(original, name)(*args, **kwargs).to(dtype)
    if name == "LearnedContinuous" or name == "DPB":
        _randomise(orig)
    new = getattr(legacy, name)(*args, **kwargs).to(dtype)
    new.load_state_dict(orig.state_dict(), strict=True)
    return orig, new


def _randomise(module: torch.nn.Module) -> None:
    """Give LayerNorms non-trivial affine weights so that they take part in the comparison."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


def assert_same(actual: Tensor, expected: Tensor, atol: float = F32_ATOL, rtol: float = 0.0) -> None:
    """Numbers equal within ``atol`` (after broadcasting); infinities must match exactly."""
    actual, expected = torch.broadcast_tensors(actual, expected.to(actual.dtype))
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite), "infinite entries differ"
    assert torch.equal(actual[~finite], expected[~finite]), "infinite entries differ in sign"
    torch.testing.assert_close(actual[finite], expected[finite], atol=atol, rtol=rtol)


def atol_for(dtype: torch.dtype) -> float:
    return F64_ATOL if dtype == torch.float64 else F32_ATOL


def irregular(*shape: int, integer: bool = False, dtype: torch.dtype = torch.float32) -> Tensor:
    """Sorted irregular positions (*shape): ints in [0, 60) or floats with gaps in (0, 4)."""
    if integer:
        return torch.randint(0, 60, shape).sort(-1).values
    return (torch.rand(*shape, dtype=dtype) * 4).cumsum(-1)
