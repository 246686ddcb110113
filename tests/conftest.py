"""Shared test settings.

Tolerances are stated once, per dtype, as the largest allowed |flexpos - float64 reference|
on attention outputs of unit-scale inputs. Transforms run eagerly unless a test asks for the
compiled path with the ``compiled`` fixture: the numbers are the same and every compiled
variant costs ~15 s on a 2-core CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import flexpos
from flexpos import backends

sys.path.insert(0, str(Path(__file__).parent))

TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 2e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}

flexpos.set_compile(False)

needs_cpu_flex = pytest.mark.skipif(
    backends.torch_version() < backends.CPU_FLEX_MIN_TORCH, reason="no CPU flex kernel in this torch"
)


@pytest.fixture
def compiled():
    """Run flexpos' pre-attention transforms compiled for the duration of a test."""
    previous = flexpos.set_compile(True)
    yield
    flexpos.set_compile(previous)


@pytest.fixture
def dpb_mlp_rows(monkeypatch):
    """A list that gets, per DPB.bias_at call, how many distances its MLP ran on."""
    rows = []
    bias_at = flexpos.DPB.bias_at
    monkeypatch.setattr(flexpos.DPB, "bias_at", lambda self, d, dtype=None: rows.append(d.numel()) or bias_at(self, d, dtype))
    return rows


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
