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
    """A list that gets, per run of DPB's MLP, how many inputs it ran on."""
    rows = []
    run_mlp = flexpos.dpb.run_mlp
    monkeypatch.setattr(flexpos.dpb, "run_mlp", lambda mlp, x, dtype=None: rows.append(x.shape[:-1].numel()) or run_mlp(mlp, x, dtype))
    return rows


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
