"""Checks of the adapter that flexpos' own (:mod:`flexpos._checks`) do not cover:
bio-attention's q, k (B, *, L, NH, H) pairs. Shapes and devices only: nothing is read back."""

from __future__ import annotations

from torch import Tensor

from flexpos._checks import check_device

from ._layout import broadcasts_to


def check_key_batch(q: Tensor, k: Tensor) -> None:
    """k (B, *, L2, NH, H) must have the batch dims (B, *) of q (B, *, L1, NH, H), or 1 there,
    and q's device. bio-attention broadcasts other batch dims into a result of another shape
    (or fails deep inside torch)."""
    batch = tuple(q.shape[:-3])
    if k.ndim != q.ndim or not broadcasts_to(k.shape[:-3], batch):
        raise ValueError(
            f"k must have shape (*batch, L2, NH, H) with q's batch {batch} (or dims of size 1 there), "
            f"got {tuple(k.shape)} for q of shape {tuple(q.shape)}"
        )
    check_device("k", k, q.device, "q")
