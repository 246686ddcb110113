"""bio-attention's layer masks turned into flexpos inputs.

bio-attention's ``AttnLayer`` takes a mask of shape (B, *, L'), (B, *, L', L') or
(B, *, NH|1, L', L'), bool (True = attend) or float (added to the scores), with L' <= L: the
first L - L' tokens (CLS and the like) are not covered by the mask. A (B, *, L') mask is a key
padding mask. Here a mask becomes

- ``keep``: a bool tensor of what may be attended, for flexpos (a key padding mask stays
  (B, *, L), so its BlockMask is built in O(L)); tokens not covered by the mask attend and are
  attended to freely, except that padded keys of a key mask stay masked for every query;
- ``bias``: the finite part of a float mask, added by a score_mod (the caller materialised it).
  As in bio-attention, a short float key mask adds nothing to the rows of the uncovered queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from flexpos._checks import check_device, check_tensor
from flexpos.base import Positional, ScoreMod, shared_index
from flexpos.positions import Positions, table_len

from ._layout import additive, broadcasts_to


@dataclass(frozen=True)
class LayerMask:
    """keep: bool (B, *, L), (B, *, L, L) or (B, *, NH, L, L) or None (True = attend);
    bias: float (N, NH|1, L|1, L) or None, added to query rows ``bias_from ..`` only."""

    keep: Optional[Tensor] = None
    bias: Optional[Tensor] = None
    bias_from: int = 0


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
    """A bool mask with ``extra`` trailing dims (see :func:`_as_4d`), padded with True on the
    left to ``length`` tokens in its last dim (and its query dim, where it has one)."""
    return _pad_tokens(keep, min(extra, 2), length, True)


def _check_layer_mask(mask: object, batch: tuple[int, ...], heads: int, device: torch.device) -> int:
    """Check a layer mask's type, shape and device (x's); return how many dims follow the batch
    dims (1-3)."""
    mask = check_tensor("mask", mask)
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(
            f"mask must be bool (True = attend) or floating point (added to the scores), got dtype {mask.dtype}"
        )
    extra = mask.ndim - len(batch)
    if extra not in (1, 2, 3) or not broadcasts_to(mask.shape[: len(batch)], batch) or (
        extra == 3 and mask.shape[-3] not in (1, heads)
    ):
        raise ValueError(
            f"mask must have shape (*batch, L), (*batch, L, L) or (*batch, {heads} or 1, L, L) with "
            f"batch {batch} (or dims of size 1 there), got {tuple(mask.shape)}"
        )
    check_device("mask", mask, device, "x")
    return extra


def layer_mask(
    mask: Optional[Tensor], batch: tuple[int, ...], heads: int, length: int, device: torch.device
) -> LayerMask:
    """Split a bio-attention layer mask into flexpos' keep mask and an additive bias; the mask
    must be on ``device``, x's."""
    if mask is None:
        return LayerMask()
    extra = _check_layer_mask(mask, batch, heads, device)
    if extra == 3 and mask.shape[-3] == 1:  # one mask for every head
        mask, extra = mask.squeeze(-3), 2
    mask = mask.expand(*batch, *mask.shape[len(batch):])
    if mask.dtype == torch.bool:
        return LayerMask(keep=_keep(mask, extra, length))
    blocked = mask == float("-inf")
    keep = _keep(~blocked, extra, length) if bool(blocked.any()) else None
    finite = torch.where(blocked, torch.zeros_like(mask), mask)
    if not bool((finite != 0).any()) and not (mask.requires_grad and torch.is_grad_enabled()):
        return LayerMask(keep=keep)  # adds nothing; a zero mask that is being learned stays
    bias = _as_4d(_pad_tokens(finite, min(extra, 2), length, 0.0), extra)
    bias_from = length - mask.shape[-1] if extra == 1 else 0
    return LayerMask(keep=keep, bias=bias, bias_from=bias_from)


def dense_layer_mask(
    masks: LayerMask, batch: tuple[int, ...], heads: int, length: int, dtype: torch.dtype
) -> Optional[Tensor]:
    """``masks`` as one additive float mask (*batch, NH, L, L) in ``dtype`` (-inf where not
    kept), or None: the mask that plugins' own ``mod_mask`` hooks receive."""
    parts = []
    if masks.bias is not None:
        rows = torch.arange(length, device=masks.bias.device)[:, None] >= masks.bias_from
        parts.append(torch.where(rows, masks.bias.to(dtype), 0.0))
    if masks.keep is not None:
        parts.append(additive(_as_4d(masks.keep, masks.keep.ndim - len(batch)), dtype))
    if not parts:
        return None
    dense = sum(parts[1:], parts[0])  # (N, NH|1, L|1, L)
    return dense.expand(-1, heads, length, length).reshape(*batch, heads, length, length)


class AdditiveMask(Positional):
    """A float mask (N, NH|1, Lq|1, Lk) added to the scores of query rows ``first_query ..``,
    as a flexpos score_mod."""

    modifies_scores = True
    # Its score_mod reads the caller's (L, L) tensor, which Inductor's CPU flex kernel
    # (torch 2.13) fails to build; a failed compiled call would slow every later one.
    cpu_flex_refusal = "a float mask"

    def __init__(self, bias: Tensor, first_query: int = 0) -> None:
        super().__init__()
        self.bias, self.first_query = bias, first_query

    def score_mod(self, positions: Positions, dtype: torch.dtype = torch.float32) -> ScoreMod:
        _, heads, len_q, len_k = self.bias.shape
        # Padded like flexpos' own tables: FlexAttention may read them at padded indices.
        pad_q = table_len(len_q) - len_q if len_q > 1 else 0
        table = F.pad(self.bias, (0, table_len(len_k) - len_k, 0, pad_q))
        first = self.first_query

        def float_mask(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            row = table[b, shared_index(h, heads), shared_index(q_idx, len_q), kv_idx]
            if first:
                row = torch.where(q_idx >= first, row, torch.zeros_like(row))
            return score + row.to(score.dtype)

        return float_mask
