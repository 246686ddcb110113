"""bio-attention's layer masks turned into flexpos inputs.

bio-attention's ``AttnLayer`` takes a mask of shape (B, *, L'), (B, *, L', L') or
(B, *, NH, L', L'), bool (True = attend) or float (added to the scores), with L' <= L: the
first L - L' tokens (CLS and the like) are not covered by the mask. A (B, *, L') mask is a key
padding mask. Here a mask becomes

- ``keep``: a bool tensor of what may be attended, for flexpos (a key padding mask stays
  (B, *, L), so its BlockMask is built in O(L)); tokens not covered by the mask attend and are
  attended to freely;
- ``bias``: the finite part of a float mask, added by a score_mod (the caller materialised it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from flexpos.base import Positional, ScoreMod
from flexpos.positions import BLOCK, Positions


@dataclass(frozen=True)
class LayerMask:
    """keep: bool (B, *, L), (B, *, L, L) or (B, *, NH, L, L) or None (True = attend);
    bias: float (N, NH|1, L|1, L) or None."""

    keep: Optional[Tensor] = None
    bias: Optional[Tensor] = None


def _whole_blocks(length: int) -> int:
    return max(BLOCK, -(-length // BLOCK) * BLOCK)


def _pad_tokens(mask: Tensor, dims: int, length: int, value: float) -> Tensor:
    """Left-pad the last ``dims`` (1 or 2) dims of ``mask`` to ``length`` with ``value``."""
    short = [length - mask.shape[-1 - i] for i in range(dims)]
    if min(short) < 0:
        raise ValueError(f"mask covers {mask.shape[-1]} tokens but the sequence has {length}")
    if not any(short):
        return mask
    pad = (short[0], 0) if dims == 1 else (short[0], 0, short[1], 0)
    return F.pad(mask, pad, value=value)


def _as_4d(mask: Tensor, extra: int) -> Tensor:
    """(*batch, [NH,] [Lq,] Lk) with ``extra`` trailing dims -> (N, NH|1, Lq|1, Lk)."""
    if extra < 2:
        mask = mask[..., None, :]
    if extra < 3:
        mask = mask[..., None, :, :]
    return mask.reshape(-1, *mask.shape[-3:])


def _keep(keep: Tensor, extra: int, length: int) -> Tensor:
    return _pad_tokens(keep, min(extra, 2), length, True)


def layer_mask(mask: Optional[Tensor], batch: tuple[int, ...], heads: int, length: int) -> LayerMask:
    """Split a bio-attention layer mask into flexpos' keep mask and an additive bias."""
    if mask is None:
        return LayerMask()
    extra = mask.ndim - len(batch)
    if extra not in (1, 2, 3):
        raise ValueError(
            f"mask must have shape (*batch, L), (*batch, L, L) or (*batch, {heads}, L, L) with "
            f"batch {batch}, got {tuple(mask.shape)}"
        )
    mask = mask.expand(*batch, *mask.shape[len(batch):])
    if mask.dtype == torch.bool:
        return LayerMask(keep=_keep(mask, extra, length))
    blocked = mask == float("-inf")
    keep = _keep(~blocked, extra, length) if bool(blocked.any()) else None
    finite = torch.where(blocked, torch.zeros_like(mask), mask)
    if not bool((finite != 0).any()):
        return LayerMask(keep=keep)
    bias = _as_4d(_pad_tokens(finite, min(extra, 2), length, 0.0), extra)
    return LayerMask(keep=keep, bias=bias)


class AdditiveMask(Positional):
    """A float mask (N, NH|1, Lq|1, Lk) added to the scores, as a flexpos score_mod."""

    modifies_scores = True

    def __init__(self, bias: Tensor) -> None:
        super().__init__()
        self.bias = bias

    def score_mod(self, positions: Positions, dtype: torch.dtype = torch.float32) -> ScoreMod:
        _, heads, len_q, len_k = self.bias.shape
        # Whole blocks: FlexAttention may read the table at padded indices.
        pad_q = _whole_blocks(len_q) - len_q if len_q > 1 else 0
        table = F.pad(self.bias, (0, _whole_blocks(len_k) - len_k, 0, pad_q))
        per_head, per_query = heads > 1, len_q > 1

        def float_mask(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            row = table[b, h if per_head else h * 0, q_idx if per_query else q_idx * 0, kv_idx]
            return score + row.to(score.dtype)

        return float_mask
