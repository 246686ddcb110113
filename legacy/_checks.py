"""Checks of the adapter that flexpos' own (:mod:`flexpos._checks`) do not cover:
bio-attention's q, k (B, *, L, NH, H) pairs (shapes and devices only: nothing is read back),
and its on/off constructor arguments."""

from __future__ import annotations

import numbers

from torch import Tensor

from flexpos._checks import check_bool, check_device

from ._layout import broadcasts_to


def check_flag(name: str, value: object) -> bool:
    """An on/off argument of a bio-attention constructor (``learned_div``, ``norm``,
    ``asymmetric`` ...) as a bool. bio-attention only tests its truth, so configs that pass 0/1
    (JSON, argparse ``type=int``) or None build there: integers and None are taken too. Anything
    else but a bool raises a TypeError (a string such as "False" would be true there)."""
    if value is None:
        return False
    if isinstance(value, numbers.Integral):
        return bool(value)
    try:
        return check_bool(name, value)
    except TypeError:
        raise TypeError(f"{name} must be a bool, an integer or None, got {type(value).__name__}") from None


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
