"""Independent float64 references: every scheme materialised densely, straight from its formula.

Nothing here calls flexpos' own math; modules are only read for their parameters.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
from torch import Tensor


def padded_positions(pos: Optional[Tensor], batch: int, length: int) -> tuple[Tensor, Tensor]:
    """(B, L) float64 positions (0 where missing) and (L,) bool: has a position."""
    if pos is None:
        pos = torch.arange(length).expand(batch, length)
    missing = length - pos.shape[-1]
    full = torch.cat([torch.zeros(batch, missing, dtype=torch.float64), pos.double()], -1)
    return full, torch.arange(length) >= missing


def distances(pq: Tensor, pk: Tensor) -> Tensor:
    """(B, 1, Lq, Lk) float64 ``p_q - p_k``; positions near 1e9 are exact in float64."""
    return (pq[:, :, None] - pk[:, None, :])[:, None]


def both_have(hq: Tensor, hk: Tensor) -> Tensor:
    return (hq[:, None] & hk[None, :])[None, None]


def reference_slopes(n_heads: int) -> list[float]:
    """ALiBi slopes: 2^(-8 i / n) for a power of two n; odd multiples of the next for the rest."""
    p = 2 ** math.floor(math.log2(n_heads))
    base = [2 ** (-8 * (i + 1) / p) for i in range(p)]
    return base + [2 ** (-8 * (2 * j + 1) / (2 * p)) for j in range(n_heads - p)]


def alibi_bias(
    n_heads: int, pq: Tensor, pk: Tensor, hq: Tensor, hk: Tensor,
    use_n_heads: Optional[int] = None, asymmetric: bool = False, divide: float = 1.0,
) -> Tensor:
    use = n_heads if use_n_heads is None else use_n_heads
    slopes = reference_slopes(use)
    if asymmetric:
        slopes = [slopes[i - i % 2] for i in range(use)]
    slopes = torch.tensor(slopes + [0.0] * (n_heads - use), dtype=torch.float64).view(1, -1, 1, 1)
    signed = slopes * distances(pq, pk) / divide
    valid = both_have(hq, hk)
    bias = torch.where(valid, -signed.abs(), 0.0)
    if asymmetric:
        even = (torch.arange(n_heads) % 2 == 0).view(1, -1, 1, 1)
        blocked = torch.where(even, signed > 0, signed < 0) & valid
        bias = bias.masked_fill(blocked, float("-inf"))
    return bias


def mlp64(module_list: torch.nn.ModuleList, x: Tensor) -> Tensor:
    layers = copy.deepcopy(module_list).double()
    for layer in layers:
        x = layer(x)
    return x


def dpb_bias(dpb, pq: Tensor, pk: Tensor, hq: Tensor, hk: Tensor, divide: float) -> Tensor:
    """Per-element MLP of ``Delta / divide``: (B, H, Lq, Lk), on a float64 copy of the MLP."""
    out = mlp64(dpb.mlp, (distances(pq, pk)[:, 0] / divide)[..., None])  # (B, Lq, Lk, H)
    return torch.where(both_have(hq, hk), -out.permute(0, 3, 1, 2), 0.0)


def dpb_bias_through(dpb, pq: Tensor, pk: Tensor, hq: Tensor, hk: Tensor, divide: Tensor | float) -> Tensor:
    """As :func:`dpb_bias`, through a float64 module's own layers: gradients reach its
    parameters, the positions and a tensor ``divide``."""
    out = distances(pq, pk)[:, 0, ..., None] / divide  # (B, Lq, Lk, 1)
    for layer in dpb.mlp:
        out = layer(out)
    return torch.where(both_have(hq, hk), -out.permute(0, 3, 1, 2), 0.0)


def sinusoid64(x: Tensor, inv_freq: Tensor) -> Tensor:
    angles = x[..., None] * inv_freq.double()
    out = torch.empty(*angles.shape[:-1], 2 * angles.shape[-1], dtype=torch.float64)
    out[..., 0::2], out[..., 1::2] = angles.sin(), angles.cos()
    return out


def xl_bias(xl, qv: Tensor, pq: Tensor, pk: Tensor, hq: Tensor, hk: Tensor, divide: float) -> Tensor:
    """Dense ``qv_i . r_ij`` with r = embed_lin(sinusoid(Delta / divide)) split by head."""
    s = sinusoid64(distances(pq, pk)[:, 0] / divide, xl.inv_freq)  # (B, Lq, Lk, dim)
    lin = copy.deepcopy(xl.embed_lin).double()
    r = lin(s).unflatten(-1, (xl.n_heads, -1))  # (B, Lq, Lk, H, D)
    bias = torch.einsum("bhqd,bqkhd->bhqk", qv.double(), r)
    return torch.where(both_have(hq, hk), bias, 0.0)


def rotate(x: Tensor, pos: Tensor, has: Tensor, thetas: Tensor, divide: float) -> Tensor:
    """Rotation as complex multiplication: pairs (x0 + i x1) * exp(i p theta / divide)."""
    pairs = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    angles = (pos / divide)[:, None, :, None] * thetas.double() * has[:, None]
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).flatten(-2)


def scheme_attention(scheme: str, module, q: Tensor, k: Tensor, v: Tensor, pos_q: Tensor, pos_k: Tensor,
                     divide: float, keep: Optional[Tensor] = None) -> Tensor:
    """float64 attention of q (N, H, Lq, D) with one module, by name: 'rotary', 'xl', 'alibi',
    'alibi-asymmetric' or 'dpb' (its MLP at every pair); positions (N, ...) of each side, CLS
    tokens first; k and v (N, Hkv, Lk, D) with Hkv dividing H, each key/value head repeated for
    its group of query heads."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
    n, lq, lk = q.shape[0], q.shape[-2], k.shape[-2]
    pq, hq = padded_positions(pos_q.reshape(n, -1), n, lq)
    pk, hk = padded_positions(pos_k.reshape(n, -1), n, lk)
    if scheme == "rotary":
        rq, rk = (rotate(t, p, h, module.thetas, divide) for t, p, h in ((q, pq, hq), (k, pk, hk)))
        return attend(rq, rk, v, keep=keep)
    if scheme == "xl":
        u, w = (b.double()[None, :, None] for b in (module.bias_r_w, module.bias_r_r))
        return attend(q + u, k, v, xl_bias(module, q + w, pq, pk, hq, hk, divide), keep)
    if scheme in ("alibi", "alibi-asymmetric"):
        bias = alibi_bias(q.shape[1], pq, pk, hq, hk, asymmetric=scheme == "alibi-asymmetric", divide=divide)
    else:
        bias = dpb_bias(module, pq, pk, hq, hk, divide)
    return attend(q, k, v, bias, keep)


def attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | float = 0.0,
           keep: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """Materialised float64 softmax attention; rows with nothing to attend to give 0."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale + bias
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    weights = torch.nan_to_num(torch.softmax(scores, -1), nan=0.0)
    return weights @ v.double()
