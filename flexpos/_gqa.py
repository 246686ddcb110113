"""Grouped-query attention: H query heads share Hkv key/value heads, query head h reading
key/value head ``h // (H // Hkv)`` (SDPA's and FlexAttention's ``enable_gqa`` convention)."""

from __future__ import annotations

from torch import Tensor


def groups_heads(heads: int, kv_heads: int) -> bool:
    """Whether ``kv_heads`` key/value heads can serve ``heads`` query heads: as many, or a divisor."""
    return kv_heads == heads or (kv_heads > 0 and heads % kv_heads == 0)


def share_kv_heads(k: Tensor, v: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """k (N, Hkv, Lk, D), v (N, Hkv, Lk, Dv) -> each key/value head repeated for its group of
    queries: (N, heads, Lk, D), (N, heads, Lk, Dv). Unchanged where Hkv = heads; gradients of
    the repeats sum back into each key/value head."""
    kv_heads = k.shape[1]
    if kv_heads == heads:
        return k, v
    return _repeat_heads(k, heads), _repeat_heads(v, heads)


def _repeat_heads(t: Tensor, heads: int) -> Tensor:
    """(N, Hkv, L, E) -> (N, heads, L, E), each head repeated for its group, in order."""
    n, kv_heads, length, features = t.shape
    return t[:, :, None].expand(n, kv_heads, heads // kv_heads, length, features).reshape(n, heads, length, features)
