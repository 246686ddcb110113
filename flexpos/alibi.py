"""ALiBi (Press et al. 2022) as a FlexAttention score_mod, at arbitrary positions."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ._checks import check_bool, check_positive_int
from .base import Positional, ScoreMod
from .positions import Positions


def alibi_slopes(n_heads: int) -> list[float]:
    """Geometric head slopes of the ALiBi paper, for any head count.

    For a power of two ``n`` the slopes are ``r, r^2, ..., r^n`` with ``r = 2^(-8/n)``; other
    counts take the slopes of the power of two below and every other slope of the one above.
    """

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        return power_of_two(n_heads)
    below = 2 ** math.floor(math.log2(n_heads))
    return power_of_two(below) + power_of_two(2 * below)[0::2][: n_heads - below]


def head_slopes(n_heads: int, use_n_heads: int, asymmetric: bool) -> Tensor:
    """(n_heads, 1, 1) float32; heads past ``use_n_heads`` get slope 0 (no bias).

    With ``asymmetric`` heads come in pairs sharing one slope: the even head of a pair looks
    only at keys at or after the query, the odd head only at keys at or before it.
    """
    slopes = alibi_slopes(use_n_heads)
    if asymmetric:
        slopes = [slopes[(i // 2) * 2] for i in range(use_n_heads)]
    padded = slopes + [0.0] * (n_heads - use_n_heads)
    return torch.tensor(padded, dtype=torch.float32).view(n_heads, 1, 1)


class ALiBi(Positional):
    """Linear distance penalty ``score - |slope_h * (p_q - p_k) / divide|``.

    Slopes follow the paper for any head count; ``use_n_heads`` applies them to the first heads
    only; ``asymmetric`` splits head pairs into forward- and backward-looking heads (the other
    direction is masked to -inf). Tokens without a position get no bias.

    A score_mod, passed to :func:`flexpos.attention` with q (B, *, n_heads, Lq, D) and positions
    ``pos`` (B, *, L') or ``pos_q`` (B, *, Lq') / ``pos_k`` (B, *, Lk').

    Example::

        alibi = ALiBi(n_heads=8)
        out = flexpos.attention(q, k, v, alibi, pos=pos)
    """

    modifies_scores = True
    _repr_fields = ("n_heads", "use_n_heads", "asymmetric")
    slopes: Tensor

    def __init__(
        self,
        n_heads: int,
        use_n_heads: Optional[int] = None,
        asymmetric: bool = False,
        divide: float = 1.0,
        learned_div: bool = False,
    ) -> None:
        super().__init__()
        self.n_heads = check_positive_int("n_heads", n_heads)
        use = self.n_heads if use_n_heads is None else check_positive_int("use_n_heads", use_n_heads)
        if use > n_heads:
            raise ValueError(f"use_n_heads must be <= n_heads={n_heads}, got {use}")
        self.use_n_heads = use
        self.asymmetric = check_bool("asymmetric", asymmetric)
        self._init_divisor(divide, learned_div)
        self._register_constants()

    @property
    def masks_scores(self) -> bool:  # type: ignore[override]
        """Asymmetric ALiBi rules out keys on each head's wrong side (-inf)."""
        return self.asymmetric

    def constants(self) -> dict[str, Tensor]:
        return {"slopes": head_slopes(self.n_heads, self.use_n_heads, self.asymmetric)}

    def score_mod(self, positions: Positions, dtype: torch.dtype = torch.float32) -> ScoreMod:
        return self.penalty_mod(positions, dtype, self.asymmetric)

    def rates(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """(n_heads,) penalty per position unit, ``slope_h / divide``, formed in float64."""
        return (self.slopes.reshape(-1).double() / self.divisor(torch.float64)).to(dtype)

    def penalty_mod(self, positions: Positions, dtype: torch.dtype, asymmetric: bool) -> ScoreMod:
        """The score_mod for ``positions``, with or without the asymmetric heads' masking."""
        rel = positions.relative(dtype)
        rates = self.rates(dtype)  # >= 0: slopes >= 0, divisors > 0

        def alibi(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            delta, valid = rel.distance(b, q_idx, kv_idx)
            rate = rates[h]  # read once: flex's GPU backward allows one read of a learned tensor
            # rate * |distance|, not |rate * distance| (equal for rates >= 0): a GPU subtracts it
            # in one fused multiply-add (one rounding fewer)
            out = score - (rate * torch.where(valid, delta, 0.0).abs()).to(score.dtype)
            if asymmetric:
                bias = rate * delta
                wrong_way = torch.where(h % 2 == 0, bias > 0, bias < 0) & valid
                out = torch.where(wrong_way, float("-inf"), out)
            return out

        return alibi
