"""``AttentionLayer``: projections + flexpos attention, the entry point for model code."""

from __future__ import annotations

from typing import Optional, Sequence

from einops import rearrange
from torch import Tensor, nn

from ._checks import check_positive_int, check_rank, check_tensor
from .attention import Mask, attention
from .backends import Backend
from .base import Positional


class AttentionLayer(nn.Module):
    """Multi-head self- or cross-attention over x (B, *, L, dim) with positional modules.

    ``positional`` may mix all three stages: input transforms (Sinusoidal, learned) are added
    to the layer's input before projecting (and to ``context`` when ``pos_context`` is given),
    Rotary/XL transform q and k, ALiBi/DPB modify scores.

    Example::

        layer = AttentionLayer(256, 8, positional=[Rotary(32), ALiBi(8)])
        y = layer(x, pos=pos, mask=key_valid)  # x: (B, L, 256), pos: (B, L), key_valid: (B, L)
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        positional: Sequence[Positional] = (),
        bias: bool = True,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        if dim % check_positive_int("n_heads", n_heads):
            raise ValueError(f"dim={dim} must be divisible by n_heads={n_heads}")
        for m in positional:
            if not isinstance(m, Positional):
                raise TypeError(f"positional must hold flexpos positional modules, got {type(m).__name__}")
        self.n_heads = n_heads
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=bias)
        self.to_out = nn.Linear(dim, dim, bias=bias)
        self.positional = nn.ModuleList(positional)
        self.backend = backend

    def forward(
        self,
        x: Tensor,
        context: Optional[Tensor] = None,
        pos: Optional[Tensor] = None,
        pos_context: Optional[Tensor] = None,
        mask: Mask = None,
        causal: bool = False,
    ) -> Tensor:
        """x (B, *, L, dim), context (B, *, Lc, dim) or None -> (B, *, L, dim).

        ``pos`` (B, *, L') positions of x; ``pos_context`` (B, *, Lc') of the context. ``mask``
        as in :func:`flexpos.attention` (bool (B, *, Lk), (B, *, L, Lk), (B, *, H, L, Lk) or a
        BlockMask), True = attend.
        """
        check_tensor("x", x)
        check_rank("x", x, 2, "(B, *, L, dim)")
        inputs = [m for m in self.positional if m.transforms_input]
        for m in inputs:
            x = m(x, pos=pos)
        if context is None:
            context, positions = x, {"pos": pos}
        else:
            check_tensor("context", context)
            if pos_context is not None:
                for m in inputs:
                    context = m(context, pos=pos_context)
            positions = {"pos_q": pos, "pos_k": pos_context}
        heads = lambda t: rearrange(t, "... l (h d) -> ... h l d", h=self.n_heads)  # noqa: E731
        q = heads(self.to_q(x))
        k, v = map(heads, self.to_kv(context).chunk(2, dim=-1))
        others = [m for m in self.positional if not m.transforms_input]
        out = attention(q, k, v, *others, mask=mask, causal=causal, backend=self.backend, **positions)
        return self.to_out(rearrange(out, "... h l d -> ... l (h d)"))
