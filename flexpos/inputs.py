"""Shared plumbing of the input transforms (stage 1): ``x (B, *, L, dim) -> x + enc``.

A subclass only says how to encode positions; this base resolves positions and the mask:

- ``pos`` (B, *, L') with L' <= L: the last L' tokens have these positions, the first L - L'
  (CLS and the like) get nothing added. ``None`` means ``0 .. L-1``.
- ``mask`` (B, *, L) or (B, *, L') bool, aligned to the end of the sequence: True = add the
  encoding, False = leave the token as it is.
"""

from __future__ import annotations

import math
from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from ._checks import check_bool_mask, check_float, check_module_device, check_rank, check_tensor
from .base import Positional
from .positions import Positions


class InputTransform(Positional):
    """Base of Sinusoidal, LearnedVocab and LearnedContinuous."""

    transforms_input = True
    dim: int
    _repr_fields = ("dim",)

    def forward(self, x: Tensor, pos: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> Tensor:
        """Add the positional encoding: x (*, L, dim) -> (*, L, dim), batch dims optional;
        ``pos`` (*, L') and ``mask`` (*, L) or (*, L') with the same batch dims."""
        check_tensor("x", x)
        check_rank("x", x, 2, "(*, L, dim)")
        check_float("x", x)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (*, L, {self.dim}), got {tuple(x.shape)}")
        check_module_device(self, x.device)
        batch, length = tuple(x.shape[:-2]), x.shape[-2]
        positions = Positions.resolve(batch, length, length, x.device, pos=pos)
        keep = positions.has_position("q").expand(positions.batch, length)
        if mask is not None:
            check_bool_mask("mask", mask, [(*batch, length), (*batch, positions.q.shape[-1])], x.device, "x")
            keep = keep & _align_mask(mask, batch, length)
        keep = keep.contiguous()  # one compiled variant with and without a mask
        flat = x.reshape(positions.batch, length, self.dim)
        padded = F.pad(positions.q, (length - positions.q.shape[-1], 0))
        return self.encode_add(flat, padded, keep).reshape(x.shape)

    def encode_add(self, x: Tensor, pos: Tensor, keep: Tensor) -> Tensor:
        """x (N, L, dim), pos (N, L) (0 where missing), keep (N, L) bool -> x + keep * enc."""
        raise NotImplementedError


def masked_add(x: Tensor, enc: Tensor, keep: Tensor) -> Tensor:
    """x (N, L, dim) + keep (N, L) * enc (N, L, dim) -> (N, L, dim) in x's dtype: the last step
    of every input transform, inside its compiled kernel."""
    return x + (enc * keep[..., None]).to(x.dtype)


def _align_mask(mask: Tensor, batch: tuple[int, ...], length: int) -> Tensor:
    """A checked (*batch, L) or (*batch, L') mask -> (N, L), True before the last L'."""
    flat = mask.reshape(math.prod(batch), mask.shape[-1])  # -1 is ambiguous when L' = 0
    return F.pad(flat, (length - flat.shape[-1], 0), value=True)
