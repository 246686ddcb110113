"""Shared test settings: transforms run eagerly unless a test asks for the compiled path with
the ``compiled`` fixture (the numbers are the same and every compiled variant costs ~15 s on
a 2-core CPU). Tolerances live in ``support.py``: test modules import them from there, not
from ``conftest`` (a name benchmarks/ has too).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import flexpos

sys.path.insert(0, str(Path(__file__).parent))

flexpos.set_compile(False)


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
