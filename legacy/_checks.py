"""Checks of the adapter that flexpos' own (:mod:`flexpos._checks`) do not cover: the devices
of tensors that meet in one call and bio-attention's q, k (B, *, L, NH, H) pairs. Shapes and
devices only: nothing is read back."""

from __future__ import annotations

import torch
from torch import Tensor

from ._layout import broadcasts_to


def check_device(name: str, t: Tensor, device: torch.device, other: str) -> None:
    """``t`` must be on ``device``, the device of ``other`` (worded as flexpos' check_bool_mask)."""
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, {other} on {device}")


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
