"""The two ways flexpos runs attention, and the rule that picks one *before* running.

- ``flex``: ``torch.compile(flex_attention, dynamic=True)``; fused, forward and backward on
  CUDA, forward only on CPU.
- ``chunked``: the same ``score_mod`` and ``BlockMask`` evaluated on index grids, one block of
  128 queries at a time under activation checkpointing: O(128 * Lk) memory per head, autograd
  for everything, float64 included. FlexAttention has no CPU backward, so this is the CPU
  training path.

The choice is made up front because a compiled flex call that fails leaves later compiled
calls in the process on a slow path.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.fx.experimental import _config as fx_config
from torch.utils.checkpoint import checkpoint

from .base import ScoreMod
from .masks import FULL, PARTIAL, states_of
from .positions import BLOCK

Backend = Literal["auto", "flex", "chunked"]
_compiled_flex = None


def _flex():
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    return _compiled_flex


def choose_backend(requested: Backend, q: Tensor, needs_grad: bool) -> str:
    """'flex' or 'chunked' for inputs like ``q``; ``needs_grad`` if autograd must flow."""
    if requested not in ("auto", "flex", "chunked"):
        raise ValueError(f"backend must be 'auto', 'flex' or 'chunked', got {requested!r}")
    cpu_only = q.device.type == "cpu" and (needs_grad or q.dtype == torch.float64)
    if requested == "flex" and cpu_only:
        why = "gradients" if needs_grad else "float64"
        raise ValueError(f"backend='flex' cannot run {why} on CPU; use backend='auto' or 'chunked'")
    if requested != "auto":
        return requested
    return "chunked" if cpu_only else "flex"


def run_flex(
    q: Tensor, k: Tensor, v: Tensor, score_mod: Optional[ScoreMod], block_mask: BlockMask, scale: float
) -> Tensor:
    """q (B, H, Lq, E), k (B, H, Lk, E), v (B, H, Lk, Dv) -> (B, H, Lq, Dv)."""
    if not torch.is_grad_enabled():
        # CPU flex refuses inputs that require grad even under no_grad; nothing flows back here.
        q, k, v = q.detach(), k.detach(), v.detach()
    if q.device.type == "cpu":
        # Inductor's CPU flex kernel fails to build for view inputs combined with a score_mod
        # (torch 2.13: 'cur_kvSplitSize1' was not declared); fresh tensors build fine.
        q, k, v = (t.clone(memory_format=torch.contiguous_format) if t._base is not None else t for t in (q, k, v))
    default = q.shape[-1] ** -0.5
    if scale != default:
        # A Python float scale becomes a symbolic float under dynamic=True, which the CPU
        # kernel cannot lower; fold it into q and let flex apply its default 1/sqrt(E).
        q = q * (scale / default)
    # Without duck sizing, equal sizes (batch 2 and 2 query blocks, say) do not become one
    # symbol, so a later call where they differ does not recompile.
    with fx_config.patch(use_duck_shape=False):
        return _flex()(q, k, v, score_mod=score_mod, block_mask=block_mask)


def _tile_mask(states: Tensor, mask_mod, q_idx: Tensor, len_k: int) -> Tensor:
    """Dense keep-mask (B|1, H|1, C, Lk) of one query block from its tile states (B|1, H|1, nk)."""
    kv_idx = torch.arange(len_k, device=q_idx.device)
    tile = states.repeat_interleave(BLOCK, dim=-1)[..., None, :len_k]  # (B, H, 1, Lk)
    b = torch.arange(states.shape[0], device=q_idx.device).view(-1, 1, 1, 1)
    h = torch.arange(states.shape[1], device=q_idx.device).view(1, -1, 1, 1)
    inside = mask_mod(b, h, q_idx.view(1, 1, -1, 1), kv_idx.view(1, 1, 1, -1))
    return (tile == FULL) | ((tile == PARTIAL) & inside)


def _attend_block(
    q: Tensor, k: Tensor, v: Tensor, q_start: Tensor, score_mod, keep: Tensor, scale: float
) -> Tensor:
    """Attention of one query block: q (B, H, C, E) -> (B, H, C, Dv), fully masked rows 0."""
    work = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(work) @ k.to(work).transpose(-1, -2)) * scale
    if score_mod is not None:
        B, H, C, Lk = scores.shape
        b = torch.arange(B, device=q.device).view(-1, 1, 1, 1)
        h = torch.arange(H, device=q.device).view(1, -1, 1, 1)
        q_idx = (q_start + torch.arange(C, device=q.device)).view(1, 1, -1, 1)
        kv_idx = torch.arange(Lk, device=q.device).view(1, 1, 1, -1)
        scores = score_mod(scores, b, h, q_idx, kv_idx).to(work)
    scores = scores.masked_fill(~keep, float("-inf"))
    top = scores.amax(-1, keepdim=True).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp(scores - top)
    total = weights.sum(-1, keepdim=True)
    out = (weights @ v.to(work)) / torch.where(total > 0, total, torch.ones_like(total))
    return out.to(v.dtype)


def run_chunked(
    q: Tensor, k: Tensor, v: Tensor, score_mod: Optional[ScoreMod], block_mask: BlockMask, scale: float
) -> Tensor:
    """Same contract as :func:`run_flex`, on any device and dtype, with autograd."""
    states = states_of(block_mask)
    len_q, len_k = q.shape[-2], k.shape[-2]
    outputs = []
    for block, start in enumerate(range(0, len_q, BLOCK)):
        stop = min(start + BLOCK, len_q)
        q_idx = torch.arange(start, stop, device=q.device)
        keep = _tile_mask(states[:, :, block], block_mask.mask_mod, q_idx, len_k)
        q_start = torch.tensor(start, device=q.device)
        args = (q[:, :, start:stop], k, v, q_start, score_mod, keep, scale)
        if torch.is_grad_enabled():
            outputs.append(checkpoint(_attend_block, *args, use_reentrant=False))
        else:
            outputs.append(_attend_block(*args))
    return torch.cat(outputs, dim=-2)
