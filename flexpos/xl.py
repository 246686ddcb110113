"""Transformer-XL relative position bias (Dai et al. 2019) without an (Lq, Lk, dim) tensor.

Scores are ``(q + u) . k / sqrt(D) + (q + v) . r_ij`` with ``r_ij`` head h's slice of
``embed_lin(sinusoid((p_i - p_j) / divide))``. Since ``sinusoid`` is made of ``sin`` and
``cos`` of ``w_m (p_i - p_j)``, the angle-difference identities split the bias into a dot
product of a query-side and a key-side feature vector::

    (q_i + v) . r_ij = sum_m  a_i,2m   (S_i C_j - C_i S_j) + a_i,2m+1 (C_i C_j + S_i S_j) + c_i
                     = f_i . g_j

with ``a_i = W_h^T (q_i + v)``, ``c_i = (q_i + v) . b_h``, ``S_i, C_i = sin, cos(w_m p_i / div)``,
``f_i = [a_2m S_i + a_2m+1 C_i, a_2m+1 S_i - a_2m C_i, c_i]`` and ``g_j = [C_j, S_j, 1]``.
Appending ``f`` to q and ``g`` to k lets FlexAttention compute the bias exactly at the cost
of ``dim + 1`` extra features per head; angles are taken in float64 from positions minus a
per-sequence offset (which the differences do not see), so that they and their gradients stay
small at genomic coordinates.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ._checks import check_even, check_positive_int
from .base import QK, Positional
from .positions import Positions
from .sinusoidal import inverse_frequencies


class XL(Positional):
    """Transformer-XL relative bias; ``dim`` is the model width, ``dim // n_heads`` the head dim.

    Parameters keep bio-attention's names: ``embed_lin``, ``bias_r_w`` (u, content bias) and
    ``bias_r_r`` (v, position bias), buffer ``inv_freq``. Tokens without a position get no
    relative term.

    Example::

        xl = XL(dim=512, n_heads=8)
        out = flexpos.attention(q, k, v, xl, pos=pos)  # q: (B, 8, L, 64)
    """

    transforms_qk = True
    _repr_fields = ("dim", "n_heads")
    inv_freq: Tensor

    def __init__(self, dim: int, n_heads: int, divide: float = 1.0, learned_div: bool = False) -> None:
        super().__init__()
        self.dim = check_even("dim", dim)
        self.n_heads = check_positive_int("n_heads", n_heads)
        if dim % n_heads:
            raise ValueError(f"dim={dim} must be divisible by n_heads={n_heads}")
        self._init_divisor(divide, learned_div)
        head_dim = dim // n_heads
        self.embed_lin = nn.Linear(dim, dim)
        self.bias_r_w = nn.Parameter(torch.empty(n_heads, head_dim))
        self.bias_r_r = nn.Parameter(torch.empty(n_heads, head_dim))
        self._register_constants()
        self.reset_parameters()

    def constants(self) -> dict[str, Tensor]:
        return {"inv_freq": inverse_frequencies(self.dim)}

    def reset_parameters(self) -> None:
        """u and v ~ U(-1/sqrt(head_dim), 1/sqrt(head_dim)); ``embed_lin`` resets itself."""
        super().reset_parameters()
        bound = (self.dim // self.n_heads) ** -0.5
        nn.init.uniform_(self.bias_r_w, -bound, bound)
        nn.init.uniform_(self.bias_r_r, -bound, bound)

    def _angles(self, positions: Positions, side: str, div: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """sin and cos of ``w_m p / div``: (B, 1, L, dim / 2) float64 each; ``p`` counted from
        the per-sequence offset, which the bias, a function of ``p_i - p_j``, does not see.
        ``div``: the float64 divisor, shared by both sides of a call (see :meth:`transform_qk`)."""
        div = self.divisor(torch.float64) if div is None else div
        angles = (positions.absolute(side, centred=True) / div)[..., None]
        angles = angles * self.inv_freq.double()
        return angles.sin()[:, None], angles.cos()[:, None]

    def _embedding(self) -> tuple[Tensor, Optional[Tensor]]:
        """``embed_lin``'s weight (dim, dim) and bias (dim,) or None. They are folded into the
        query features and the layer is never called: it must compute ``nn.Linear``'s forward
        (parametrizations of its weight are fine), without forward hooks (which would not run)."""
        lin = self.embed_lin
        plain = isinstance(lin, nn.Linear) and type(lin).forward is nn.Linear.forward
        if not plain or tuple(lin.weight.shape) != (self.dim, self.dim):
            raise TypeError(
                f"XL.embed_lin must be an nn.Linear({self.dim}, {self.dim}), got {lin!r}: XL folds its weight "
                "and bias into the queries and never calls it"
            )
        if lin._forward_hooks or lin._forward_pre_hooks:
            raise TypeError("XL.embed_lin has forward hooks, which would not run: XL folds its weight and bias into the queries")
        return lin.weight, lin.bias

    def query_features(self, qv: Tensor, positions: Positions, div: Optional[Tensor] = None) -> Tensor:
        """qv (B, H, Lq, D), the queries plus v -> f (B, H, Lq, dim + 1) in qv's dtype."""
        work = torch.promote_types(qv.dtype, torch.float32)
        weight, bias = self._embedding()
        a = torch.einsum("bhld,hde->bhle", qv.to(work), weight.to(work).view(self.n_heads, -1, self.dim))
        if bias is None:
            c = a.new_zeros(a.shape[:-1])
        else:
            c = torch.einsum("bhld,hd->bhl", qv.to(work), bias.to(work).view(self.n_heads, -1))
        sin, cos = (t.to(work) for t in self._angles(positions, "q", div))
        a0, a1 = a[..., 0::2], a[..., 1::2]
        f = torch.cat((a0 * sin + a1 * cos, a1 * sin - a0 * cos, c[..., None]), dim=-1)
        keep = positions.has_position("q")[:, None].to(work)  # (Lq, 1)
        return (f * keep).to(qv.dtype)

    def key_features(self, positions: Positions, dtype: torch.dtype, div: Optional[Tensor] = None) -> Tensor:
        """g (B, 1, Lk, dim + 1) in ``dtype``: ``[cos, sin, 1]``, zero for keys without a position."""
        sin, cos = self._angles(positions, "k", div)
        g = torch.cat((cos, sin, torch.ones_like(cos[..., :1])), dim=-1)
        keep = positions.has_position("k")[:, None].to(g.dtype)
        return (g * keep).to(dtype)

    def check_heads(self, q: Tensor) -> None:
        if q.shape[1] != self.n_heads or q.shape[-1] * self.n_heads != self.dim:
            raise ValueError(
                f"XL(dim={self.dim}, n_heads={self.n_heads}) expects q of shape "
                f"(B, {self.n_heads}, L, {self.dim // self.n_heads}), got {tuple(q.shape)}"
            )

    def relative_bias(self, qv: Tensor, positions: Positions) -> Tensor:
        """Dense ``qv_i . r_ij``: (B, H, Lq, Lk) from qv (B, H, Lq, D)."""
        self.check_heads(qv)
        div = self.divisor(torch.float64)
        f = self.query_features(qv, positions, div)
        return f @ self.key_features(positions, f.dtype, div).transpose(-1, -2)

    def transform_qk(self, q: Tensor, k: Tensor, positions: Positions) -> QK:
        self.check_heads(q)
        u = self.bias_r_w.to(q.dtype)[None, :, None]
        v = self.bias_r_r.to(q.dtype)[None, :, None]
        # One divisor for both sides: a learned float16 one would otherwise get two float16
        # partial gradients, which overflow or round before they cancel.
        div = self.divisor(torch.float64)
        f = self.query_features(q + v, positions, div)
        return QK(q + u, k, f, self.key_features(positions, f.dtype, div))
