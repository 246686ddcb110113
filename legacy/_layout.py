"""Conversions between bio-attention's tensor layouts and flexpos'.

bio-attention keeps heads after the sequence: q, k, v are (B, *, L, NH, H) and masks or biases
(B, *, NH, L1, L2). flexpos works on (N, NH, L, H) with the leading batch dims flattened into N.
Positions follow bio-attention's rules: ``pos_q_k`` serves both sides (self-attention),
``pos_q``/``pos_k`` serve cross-attention, a missing side counts ``0 .. L-1``, and positions may
broadcast over leading batch dims.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from flexpos._checks import check_tensor
from flexpos.positions import Positions

Batch = tuple[int, ...]


def heads_first(t: Tensor) -> Tensor:
    """(B, *, L, NH, H) -> (N, NH, L, H), N the product of the leading batch dims."""
    return t.movedim(-2, -3).reshape(math.prod(t.shape[:-3]), t.shape[-2], t.shape[-3], t.shape[-1])


def heads_last(t: Tensor, batch: Sequence[int]) -> Tensor:
    """(N, NH, L, H) -> (*batch, L, NH, H)."""
    return t.reshape(*batch, *t.shape[1:]).movedim(-3, -2)


def broadcasts_to(shape: Sequence[int], batch: Sequence[int]) -> bool:
    """Whether leading dims ``shape`` broadcast to ``batch`` (same rank or fewer, sizes 1 or equal)."""
    if len(shape) > len(batch):
        return False
    return all(s in (1, b) for s, b in zip(reversed(tuple(shape)), reversed(tuple(batch))))


def expand_batch(t: Optional[Tensor], batch: Sequence[int], name: str = "pos") -> Optional[Tensor]:
    """(*P, L) with P broadcastable to ``batch`` -> (*batch, L); None stays None.

    Raises ``TypeError``/``ValueError`` naming ``name`` for a non-tensor or a shape that does not
    broadcast.
    """
    if t is None:
        return None
    check_tensor(name, t)
    if t.ndim == 0 or not broadcasts_to(t.shape[:-1], batch):
        raise ValueError(
            f"{name} must have shape (*batch, L') with batch {tuple(batch)} (or dims of size 1 "
            f"there), got {tuple(t.shape)}"
        )
    if tuple(t.shape[:-1]) == tuple(batch):
        return t
    return t.expand(*batch, t.shape[-1])


def positions_for(
    q: Tensor,
    k: Tensor,
    pos_q_k: Optional[Tensor] = None,
    pos_q: Optional[Tensor] = None,
    pos_k: Optional[Tensor] = None,
) -> Positions:
    """Resolve bio-attention style positions for q (B, *, L1, NH, H) and k (B, *, L2, NH, H).

    ``pos_q_k`` (B, *, L') wins over ``pos_q``/``pos_k``; either side may be missing.
    """
    batch = tuple(q.shape[:-3])
    len_q, len_k = q.shape[-3], k.shape[-3]
    if pos_q_k is not None:
        return Positions.resolve(batch, len_q, len_k, q.device, pos=expand_batch(pos_q_k, batch, "pos_q_k"))
    return Positions.resolve(
        batch,
        len_q,
        len_k,
        q.device,
        pos_q=expand_batch(pos_q, batch, "pos_q"),
        pos_k=expand_batch(pos_k, batch, "pos_k"),
    )


def bias_batch_shape(
    batch: Batch, pos_q_k: Optional[Tensor], pos_q: Optional[Tensor], pos_k: Optional[Tensor]
) -> Batch:
    """Leading dims of the bias bio-attention builds from these positions (before broadcasting
    against the mask): those of ``pos_q_k``, or of ``pos_q`` and ``pos_k`` broadcast; a side
    counted by default has the full batch shape of q."""
    if pos_q_k is not None:
        return tuple(pos_q_k.shape[:-1])
    if pos_q is None or pos_k is None:
        return tuple(batch)
    return tuple(torch.broadcast_shapes(pos_q.shape[:-1], pos_k.shape[:-1]))


def pad_mask_left(mask: Tensor, len_q: int, len_k: int) -> Tensor:
    """Pad (or crop) the last two dims of a mask on the left/top to (len_q, len_k) with 0."""
    m_q, m_k = mask.shape[-2], mask.shape[-1]
    if (m_q, m_k) == (len_q, len_k):
        return mask
    return F.pad(mask, (len_k - m_k, 0, len_q - m_q, 0))


def additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Bool mask (True = attend) -> additive float mask (0 / -inf); float masks pass through."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def add_to_mask(mask: Optional[Tensor], bias: Tensor, batch: Sequence[int]) -> Tensor:
    """bio-attention's ``mask + bias``: bias (N, NH, L1, L2) -> (*batch, NH, L1, L2).

    ``mask`` (B, *, NH|1, L1', L2') is left-padded with 0 to (L1, L2) first (tokens without a
    position, such as CLS, are at the start); a bool mask becomes 0 / -inf.
    """
    bias = bias.reshape(*batch, *bias.shape[1:])
    if mask is None:
        return bias
    mask = pad_mask_left(additive(mask, bias.dtype), bias.shape[-2], bias.shape[-1])
    return mask + bias
