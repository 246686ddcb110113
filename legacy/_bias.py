"""Dense biases for ``mod_mask``, evaluated from flexpos' own score_mods and modules.

bio-attention materialises every bias as a (B, *, NH, L1, L2) tensor. The adapter gets the
same tensor from the flexpos implementation: a score_mod evaluated on broadcast index grids
(ALiBi), or the module's own per-distance function on the dense distance matrix (DPB, exact for
any positions). Two parts of ALiBi's numbers differ in bio-attention 0.1.15 and are reproduced
here (docs/legacy.md):

- asymmetric ALiBi blocks the wrong direction with a finite ``-finfo.max`` instead of -inf, so
  a query whose every key lies the wrong way attends to those keys uniformly (two asymmetric
  ALiBi overflow to -inf there: that query attends to nothing);
- the even/odd alternation runs over dim 1 of its bias tensor (*P, NH, L1, L2), P the batch
  dims of the positions: the heads for (B, L) positions, but the first extra batch dim for
  (B, X, L) positions and the query index for unbatched (L,) positions (counted from the first
  query with a position, so that positions shorter than L give the sub-sequence's bias).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from flexpos import ALiBi as NativeALiBi
from flexpos import DPB as NativeDPB
from flexpos.base import ScoreMod, index_grids
from flexpos.positions import Positions

from ._layout import Batch

Parity = Callable[[Tensor, Tensor, Tensor], Tensor]


def dense_bias(score_mod: ScoreMod, positions: Positions, heads: int, dtype: torch.dtype) -> Tensor:
    """(N, NH, L1, L2): what ``score_mod`` adds to a zero score at every (b, h, q, kv)."""
    n, len_q, len_k = positions.batch, positions.len_q, positions.len_k
    grids = index_grids(n, heads, len_q, len_k, positions.q.device)
    zero = torch.zeros((), dtype=dtype, device=positions.q.device)
    return score_mod(zero, *grids).expand(n, heads, len_q, len_k)


def dpb_dense_bias(dpb: NativeDPB, positions: Positions) -> Tensor:
    """(N, NH, L1, L2) ``-MLP(Delta / divide)`` per element (no table), 0 without a position."""
    b, _, q, kv = index_grids(positions.batch, 1, positions.len_q, positions.len_k, positions.q.device)
    delta, valid = positions.relative(torch.float64).distance(b[:, 0], q[:, 0], kv[:, 0])  # (N, L1, L2)
    bias = dpb.bias_at(delta)  # (N, L1, L2, NH)
    # Default positions give one (1, L1, L2) distance grid for every sequence.
    bias = -torch.where(valid[..., None], bias, torch.zeros_like(bias)).permute(0, 3, 1, 2)
    return bias.expand(positions.batch, -1, -1, -1)


def head_parity(b: Tensor, h: Tensor, q_idx: Tensor) -> Tensor:
    return h


def legacy_parity(batch: Batch, bias_batch: Batch, device: torch.device) -> Parity:
    """The index bio-attention 0.1.15 alternates asymmetric heads on: dim 1 of its bias tensor.

    ``batch`` are the leading dims of q (flattened into b); ``bias_batch`` the leading dims of the
    positions (see :func:`legacy._layout.bias_batch_shape`).
    """
    if len(bias_batch) == 1:
        return head_parity
    if len(bias_batch) == 0:
        return lambda b, h, q_idx: q_idx
    if bias_batch[1] == 1:
        return lambda b, h, q_idx: b * 0
    axis = len(batch) - len(bias_batch) + 1
    stride = torch.full((), math.prod(batch[axis + 1 :]), dtype=torch.int64, device=device)
    size = torch.full((), batch[axis], dtype=torch.int64, device=device)
    return lambda b, h, q_idx: (b // stride) % size


def legacy_alibi(
    alibi: NativeALiBi, positions: Positions, dtype: torch.dtype, parity: Parity, penalty: float
) -> ScoreMod:
    """ALiBi score_mod with bio-attention 0.1.15's numbers.

    Symmetric ALiBi is flexpos' own. Asymmetric: where the signed bias points the wrong way for
    the parity of ``parity(b, h, q_idx)`` (even: keys before the query, odd: keys after it),
    ``penalty`` is subtracted from the score instead of masking it with -inf. ``parity`` sees
    query indices counted from the first query with a position.
    """
    symmetric = alibi.penalty_mod(positions, dtype, asymmetric=False)  # score - |bias|
    if not alibi.asymmetric:
        return symmetric
    rel = positions.relative(dtype)
    slopes = alibi.slopes.reshape(-1).to(dtype)
    big = torch.full((), penalty, dtype=dtype, device=slopes.device)
    first_q = positions.off_q

    def alibi_legacy(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        delta, valid = rel.distance(b, q_idx, kv_idx)
        signed = slopes[h] * delta
        wrong = torch.where(parity(b, h, q_idx - first_q) % 2 == 0, signed > 0, signed < 0) & valid
        # Subtracted, as bio-attention adds -finfo.max to its bias: ``s - finfo.max`` rounds to
        # -finfo.max for any moderate s, yet a row blocked entirely still passes gradients to s
        # (and so to q, k and to the biases of earlier plugins). A score an earlier asymmetric
        # ALiBi already blocked becomes -inf: bio-attention's two -finfo.max overflow to it (a
        # penalty below finfo.max, kept clear of overflow in exp2 kernels, would not).
        blocked = torch.where(score <= -big, -math.inf, score - big)
        return torch.where(wrong, blocked, symmetric(score, b, h, q_idx, kv_idx))

    return alibi_legacy
