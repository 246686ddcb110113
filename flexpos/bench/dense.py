"""The dense baselines written out from their definitions, for machines without bio-attention:
every bias materialised as a (B, H, L, L) float32 tensor, as bio-attention does; the input
encodings computed eagerly in float32, as bio-attention computes them."""

from __future__ import annotations

import torch
from torch import Tensor

import flexpos


def distances(pos_q: Tensor, pos_k: Tensor) -> Tensor:
    """(B, Lq, Lk) float32 ``p_q - p_k``, the difference formed before rounding."""
    return (pos_q[:, :, None] - pos_k[:, None, :]).to(torch.float32)


def dense_alibi_bias(alibi: flexpos.ALiBi, pos: Tensor) -> Tensor:
    """(B, H, L, L) ``-|slope_h (p_q - p_k) / divide|``."""
    slopes = alibi.slopes.to(device=pos.device, dtype=torch.float32).view(1, -1, 1, 1)
    return -(slopes * distances(pos, pos)[:, None] / alibi.divisor(torch.float32)).abs()


def dense_dpb_bias(dpb: flexpos.DPB, pos: Tensor) -> Tensor:
    """(B, H, L, L) ``-MLP((p_q - p_k) / divide)``, the MLP run on every element."""
    x = (distances(pos, pos) / dpb.divisor(torch.float32))[..., None]
    for layer in dpb.mlp:
        x = layer(x)
    return -x.permute(0, 3, 1, 2)


def dense_xl_bias(xl: flexpos.XL, q: Tensor, pos: Tensor) -> Tensor:
    """(B, H, L, L) ``(q_i + v) . r_ij``, r = embed_lin(sinusoid((p_i - p_j) / divide)) per head."""
    angles = (distances(pos, pos) / xl.divisor(torch.float32))[..., None] * xl.inv_freq
    r = xl.embed_lin(torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2))
    r = r.unflatten(-1, (xl.n_heads, -1))  # (B, L, L, H, D)
    qv = q.float() + xl.bias_r_r.view(1, xl.n_heads, 1, -1)
    return torch.einsum("bhqd,bqkhd->bhqk", qv, r)


def dense_rotate(rot: flexpos.Rotary, x: Tensor, pos: Tensor) -> Tensor:
    """Eager rotation of pairs (x_2m, x_2m+1) by ``p theta_m / divide``; x (B, H, L, D)."""
    angles = (pos.to(torch.float32) / rot.divisor(torch.float32))[:, None, :, None] * rot.thetas
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)


def dense_encoding(fx: flexpos.Positional, x: Tensor, pos: Tensor) -> Tensor:
    """x (B, L, dim) plus the encoding of ``fx`` (Sinusoidal, LearnedVocab or LearnedContinuous)
    at positions (B, L), eager and in float32; the sum in x's dtype."""
    if isinstance(fx, flexpos.LearnedVocab):
        return (x + fx.emb(pos)).to(x.dtype)
    scaled = (pos.to(torch.float32) / fx.divisor(torch.float32))[..., None]
    if isinstance(fx, flexpos.Sinusoidal):
        angles = scaled * fx.inv_freq
        enc = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)
    elif isinstance(fx, flexpos.LearnedContinuous):
        enc = scaled
        for layer in fx.mlp:
            enc = layer(enc)
    else:
        raise TypeError(f"fx must be Sinusoidal, LearnedVocab or LearnedContinuous, got {type(fx).__name__}")
    return (x + enc).to(x.dtype)


def window_keep(pos: Tensor, window: float) -> Tensor:
    """(B, 1, L, L) bool: ``|p_q - p_k| <= window``."""
    return (distances(pos, pos).abs() <= window)[:, None]
