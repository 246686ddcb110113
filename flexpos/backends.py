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
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.fx.experimental import _config as fx_config
from torch.utils.checkpoint import checkpoint

from .base import ScoreMod
from .masks import EMPTY, FULL, PARTIAL, cpu_flex_safe, states_of
from .positions import BLOCK

Backend = Literal["auto", "flex", "chunked"]
_compiled_flex = None


def _flex():
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    return _compiled_flex


def choose_backend(requested: Backend, q: Tensor, needs_grad: bool, block_mask: Optional[BlockMask] = None) -> str:
    """'flex' or 'chunked' for inputs like ``q``; ``needs_grad`` if autograd must flow.

    On CPU, 'auto' also takes 'chunked' for masks whose mask_mod reads a captured table
    (padding, dense, distance-window, segment masks): Inductor's CPU flex kernel (torch 2.13)
    fails to build them ("'cur_kvSplitSize2' was not declared") or indexes them with a wrong
    stride. On CUDA every mask runs on flex.
    """
    if requested not in ("auto", "flex", "chunked"):
        raise ValueError(f"backend must be 'auto', 'flex' or 'chunked', got {requested!r}")
    cpu_only = q.device.type == "cpu" and (needs_grad or q.dtype == torch.float64)
    if requested == "flex" and cpu_only:
        why = "gradients" if needs_grad else "float64"
        raise ValueError(f"backend='flex' cannot run {why} on CPU; use backend='auto' or 'chunked'")
    if requested != "auto":
        return requested
    cpu_unsafe_mask = q.device.type == "cpu" and block_mask is not None and not cpu_flex_safe(block_mask)
    return "chunked" if cpu_only or cpu_unsafe_mask else "flex"


def run_flex(
    q: Tensor, k: Tensor, v: Tensor, score_mod: Optional[ScoreMod], block_mask: BlockMask, scale: float
) -> Tensor:
    """q (B, H, Lq, E), k (B, H, Lk, E), v (B, H, Lk, Dv) -> (B, H, Lq, Dv)."""
    if not torch.is_grad_enabled():
        # CPU flex refuses inputs that require grad even under no_grad; nothing flows back here.
        q, k, v = q.detach(), k.detach(), v.detach()
    dv = v.shape[-1]
    if q.device.type == "cpu":
        q, k, v, score_mod, restore = _cpu_batch_of_one(q, k, v, score_mod)
        q, k, v = _cpu_safe(q, k, v)
    default = q.shape[-1] ** -0.5
    if scale != default:
        # A Python float scale becomes a symbolic float under dynamic=True, which the CPU
        # kernel cannot lower; fold it into q and let flex apply its default 1/sqrt(E).
        q = q * (scale / default)
    # Without duck sizing, equal sizes (batch 2 and 2 query blocks, say) do not become one
    # symbol, so a later call where they differ does not recompile.
    with fx_config.patch(use_duck_shape=False):
        out = _flex()(q, k, v, score_mod=score_mod, block_mask=block_mask)
    if q.device.type == "cpu":
        out = restore(out)
    return out[..., :dv]


MIN_CPU_HEAD_DIM = 32


def _cpu_batch_of_one(q: Tensor, k: Tensor, v: Tensor, score_mod: Optional[ScoreMod]):
    """Inductor's CPU flex kernel fails to build for batch 1 (torch 2.13, 'cur_qSplitSize7' was
    not declared): run the heads as the batch (or a lone head twice) and map indices back.

    Only reached with masks that ignore b and h (see ``cpu_flex_safe``). Returns q, k, v, the
    score_mod to use and a function that restores the output's (B, H, Lq, Dv) layout.
    """
    if q.shape[0] != 1:
        return q, k, v, score_mod, lambda out: out
    heads = q.shape[1]
    if heads > 1:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        restore = lambda out: out.transpose(0, 1)  # noqa: E731
    else:
        q, k, v = (torch.cat((t, t)) for t in (q, k, v))
        restore = lambda out: out[:1]  # noqa: E731
    if score_mod is None:
        return q, k, v, None, restore
    inner = score_mod

    def batch_of_one(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        zero = torch.zeros_like(b)
        return inner(score, zero, b if heads > 1 else h, q_idx, kv_idx)

    batch_of_one.__name__ = f"{getattr(inner, '__name__', 'score_mod')}_batch_of_one"
    return q, k, v, batch_of_one, restore


def _cpu_safe(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Work around two faults of Inductor's CPU flex kernel (torch 2.13), same numbers:

    - view inputs with a score_mod fail to build ('cur_kvSplitSize1' was not declared): copy;
    - head dims 8 and 16 give wrong rows for some lengths < 128: zero-pad q, k, v to 32.
    """
    q, k, v = (t.clone(memory_format=torch.contiguous_format) if t._base is not None else t for t in (q, k, v))
    if q.shape[-1] < MIN_CPU_HEAD_DIM:
        q, k = (F.pad(t, (0, MIN_CPU_HEAD_DIM - t.shape[-1])) for t in (q, k))
    if v.shape[-1] < MIN_CPU_HEAD_DIM:
        v = F.pad(v, (0, MIN_CPU_HEAD_DIM - v.shape[-1]))
    return q, k, v


def _tile_mask(states: Tensor, mask_mod, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """Dense keep-mask (B|1, H|1, C, n) of one query block at keys ``kv_idx`` (n,).

    ``states`` (B|1, H|1, nk) are the block's tile states; tiles are 128 keys wide.
    """
    tile = states[..., kv_idx // BLOCK][..., None, :]  # (B, H, 1, n)
    b = torch.arange(states.shape[0], device=q_idx.device).view(-1, 1, 1, 1)
    h = torch.arange(states.shape[1], device=q_idx.device).view(1, -1, 1, 1)
    inside = mask_mod(b, h, q_idx.view(1, 1, -1, 1), kv_idx.view(1, 1, 1, -1))
    return (tile == FULL) | ((tile == PARTIAL) & inside)


def _attend_block(
    q: Tensor, k: Tensor, v: Tensor, q_idx: Tensor, kv_idx: Tensor, score_mod, keep: Tensor, scale: float
) -> Tensor:
    """Attention of one query block over keys ``kv_idx``: q (B, H, C, E) -> (B, H, C, Dv).

    k (B, H, n, E) and v (B, H, n, Dv) hold only those keys; fully masked rows give 0.
    """
    work = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(work) @ k.to(work).transpose(-1, -2)) * scale
    if score_mod is not None:
        b = torch.arange(scores.shape[0], device=q.device).view(-1, 1, 1, 1)
        h = torch.arange(scores.shape[1], device=q.device).view(1, -1, 1, 1)
        scores = score_mod(scores, b, h, q_idx.view(1, 1, -1, 1), kv_idx.view(1, 1, 1, -1)).to(work)
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
    """Same contract as :func:`run_flex`, on any device and dtype, with autograd.

    Key tiles that the BlockMask marks empty for every batch and head of a query block are
    skipped, so block-sparse masks (windows, segments) save compute here too.
    """
    states = states_of(block_mask)
    len_q, len_k = q.shape[-2], k.shape[-2]
    offsets = torch.arange(BLOCK, device=q.device)
    outputs = []
    for block, start in enumerate(range(0, len_q, BLOCK)):
        q_idx = torch.arange(start, min(start + BLOCK, len_q), device=q.device)
        tiles = states[:, :, block].ne(EMPTY).flatten(0, 1).any(0).nonzero().flatten()
        kv_idx = (tiles[:, None] * BLOCK + offsets).flatten()
        kv_idx = kv_idx[kv_idx < len_k]
        if kv_idx.numel() == 0:
            outputs.append(q.new_zeros(*q.shape[:2], q_idx.numel(), v.shape[-1]).to(v.dtype))
            continue
        keep = _tile_mask(states[:, :, block], block_mask.mask_mod, q_idx, kv_idx)
        k_used, v_used = (t if kv_idx.numel() == len_k else t[:, :, kv_idx] for t in (k, v))
        args = (q[:, :, q_idx[0] : q_idx[-1] + 1], k_used, v_used, q_idx, kv_idx, score_mod, keep, scale)
        if torch.is_grad_enabled():
            outputs.append(checkpoint(_attend_block, *args, use_reentrant=False))
        else:
            outputs.append(_attend_block(*args))
    return torch.cat(outputs, dim=-2)
