"""``flexpos.attention``: FlexAttention with positional modules, masks and irregular positions.

Shape legend: B batch (any leading dims ``B, *`` are flattened and restored), H heads,
Hkv key/value heads (H, or a divisor of H for grouped-query attention), Lq/Lk query/key
tokens, D head dim, Dv value head dim.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from ._checks import (
    check_bool,
    check_bool_mask,
    check_both_sides,
    check_device,
    check_float,
    check_module_device,
    check_module_heads,
    check_positive_float,
    check_rank,
    check_tensor,
    shape_text,
)
from ._compile import eager_unless_joining
from ._gqa import groups_heads, share_kv_heads
from ._host import functorch_active, vmapped
from .backends import Backend, check_backend, choose_backend
from .base import Positional, ScoreMod
from .chunked import run_chunked
from .flex import KernelOptions, check_kernel_options, flex_kernel_options, run_flex
from .masks import and_masks, causal_mask, dense_mask, full_mask, tiles_decide
from .positions import BLOCK, IN_QK, Positions

Mask = Union[BlockMask, Tensor, None]


@eager_unless_joining
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *positional: Positional,
    pos: Optional[Tensor] = None,
    pos_q: Optional[Tensor] = None,
    pos_k: Optional[Tensor] = None,
    mask: Mask = None,
    causal: bool = False,
    scale: Optional[float] = None,
    backend: Backend = "auto",
    kernel_options: Optional[KernelOptions] = None,
) -> Tensor:
    """Attention with any mix of Rotary, XL, ALiBi and DPB modules.

    Args:
        q: (B, *, H, Lq, D) queries. k: (B, *, Hkv, Lk, D) keys. v: (B, *, Hkv, Lk, Dv)
            values. Hkv = H, or a divisor of H for grouped-query attention: query head h
            reads key/value head ``h // (H // Hkv)``, as SDPA's ``enable_gqa``.
        positional: Rotary/XL (query/key transforms, applied in the given order) and
            ALiBi/DPB (score_mods, composed into one).
        pos: (B, *, L') positions for self-attention; ``pos_q`` (B, *, Lq') and ``pos_k``
            (B, *, Lk') for cross-attention, both or neither where modules read them. Ints or
            floats; default ``0 .. L-1``. With fewer positions than tokens the first tokens
            have none and get no positional effect.
            Positions on another device are copied to q's.
        mask: a BlockMask of 128x128 blocks (flexpos' builders, ``create_block_mask``'s
            default, or ``BlockMask.from_kv_blocks`` with its default mask_mod; a custom
            mask_mod must be False wherever the block structure leaves a tile empty), or a bool
            tensor (True = attend) of shape (B, *, Lk),
            (B, *, Lq, Lk) or (B, *, H, Lq, Lk), where 1 for every batch dim (one mask for all
            sequences), for H (one for all heads) or for Lq (one for all queries, as SDPA's
            (B, 1, 1, Lk) key padding) broadcasts.
        causal: also mask keys after the query (by index, top-left aligned).
        scale: score scale, default ``1 / sqrt(D)``.
        backend: 'auto' ('chunked' on CPU, fused 'flex' elsewhere unless flex cannot run the
            call: see :func:`flexpos.backends.choose_backend`), 'flex' or 'chunked'.
        kernel_options: FlexAttention ``kernel_options`` for the flex backend (on GPUs Triton
            tile sizes such as ``BLOCK_M``, ``num_stages``; ``fwd_``/``bwd_`` prefixes for one
            pass), over flexpos' own choice. Passed on unchecked, except ``OUTPUT_LOGSUMEXP``
            and ``OUTPUT_MAX``, which flex sets itself: options that change results
            (``ROWS_GUARANTEED_SAFE``) are the caller's responsibility. The chunked backend
            ignores them.

    Returns:
        (B, *, H, Lq, Dv) in q's dtype; under ``torch.autocast`` float32 q, k, v are first
        cast to its dtype, as SDPA's are (biases are still added in float32). Query rows with
        no key to attend to are zeros (also where Lk = 0); any of B, *, H, Lq, Lk and Dv may
        be 0.

    Example::

        out = flexpos.attention(q, k, v, ALiBi(8), Rotary(64), pos=pos, mask=key_valid)
    """
    batch = _check_qkv(q, k, v)
    q, k, v = _autocast_qkv(q, k, v)
    heads, len_q, len_k, head_dim = q.shape[-3], q.shape[-2], k.shape[-2], q.shape[-1]
    modules = _check_positional(positional, heads, head_dim, q.device)
    if q.is_meta:
        raise ValueError(
            "q, k, v are on the meta device, which holds no values, and attention reads some back (mask "
            "tiles, positions): run it on a real device (a model built on the meta device: .to_empty() first)"
        )
    scale = head_dim**-0.5 if scale is None else check_positive_float("scale", scale)
    largest = torch.finfo(q.dtype).max
    if scale > largest:
        raise ValueError(f"scale must be finite in q's dtype {q.dtype} (at most {largest:.3g}), got {scale}")
    causal = check_bool("causal", causal)
    kernel_options = check_kernel_options(kernel_options)
    check_backend(backend)
    if functorch_active():
        _check_not_vmapped(pos=pos, pos_q=pos_q, pos_k=pos_k, mask=mask)
    positions = Positions.resolve(batch, len_q, len_k, q.device, pos, pos_q, pos_k, tokens=IN_QK)
    check_both_sides(modules, pos_q=pos_q, pos_k=pos_k)
    _check_mask(mask, batch, heads, len_q, len_k, q.device)
    if 0 in (*batch, heads, len_q, len_k, v.shape[-1]):
        return _nothing_to_attend(q, k, v, positions, modules)
    block_mask = _build_mask(mask, causal, batch, len_q, len_k, q.device)
    q, k, v = (t.reshape(-1, *t.shape[-3:]) for t in (q, k, v))
    q, k, scale = _transform_qk(modules, q, k, positions, scale)
    needs_grad = torch.is_grad_enabled() and (
        any(t.requires_grad for t in (q, k, v, positions.q, positions.k))
        or any(p.requires_grad for m in modules for p in m.parameters())
    )
    chosen = choose_backend(backend, q, needs_grad, block_mask, modules)
    positions.chunked = chosen == "chunked"
    score_mod = _compose(modules, positions, torch.float64 if q.dtype == torch.float64 else torch.float32)
    if chosen == "flex":
        out = run_flex(q, k, v, score_mod, block_mask, scale, flex_kernel_options(q.device, modules, kernel_options))
    else:
        finite = not any(m.modifies_scores and m.masks_scores for m in modules)
        k, v = share_kv_heads(k, v, heads)
        out = run_chunked(q, k, v, score_mod, block_mask, scale, needs_grad, finite)
    return out.reshape(*batch, heads, len_q, v.shape[-1])


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, ...]:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
        check_rank(name, t, 4, "(B, *, H, L, D)")
        check_float(name, t)
    batch = tuple(q.shape[:-3])
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}/{k.dtype}/{v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}/{k.device}/{v.device}")
    if q.shape[-1] == 0:
        raise ValueError(f"q and k need a head dim D of at least 1, got q {tuple(q.shape)}")
    heads, kv_heads = q.shape[-3], k.shape[-3]
    if tuple(k.shape[:-3]) != batch or k.shape[-1] != q.shape[-1] or not groups_heads(heads, kv_heads):
        raise ValueError(
            f"k must have shape {shape_text(*batch, 'Hkv', 'Lk', q.shape[-1])} to match q {tuple(q.shape)}, "
            f"with Hkv = {heads} or a divisor of it (grouped-query attention), got {tuple(k.shape)}"
        )
    if tuple(v.shape[:-1]) != tuple(k.shape[:-1]):
        raise ValueError(f"v must have shape {shape_text(*k.shape[:-1], 'Dv')} to match k, got {tuple(v.shape)}")
    return batch


def _autocast_qkv(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Under ``torch.autocast`` for q's device, float32 q, k, v in its dtype, as autocast casts
    SDPA's: flex would take them so, and chunked returns the same dtype. Biases stay float32."""
    device = q.device.type
    if q.dtype != torch.float32 or device == "meta" or not torch.is_autocast_enabled(device):
        return q, k, v
    low = torch.get_autocast_dtype(device)
    return q.to(low), k.to(low), v.to(low)


def _check_not_vmapped(**tensors: object) -> None:
    """Under torch.func.vmap, positions and masks are shared by every vmapped call: they
    decide the BlockMask's tiles and DPB's grid, which are read back to the host."""
    for name, t in tensors.items():
        if isinstance(t, Tensor) and vmapped(t):
            raise ValueError(
                f"{name} is batched by torch.func.vmap; flexpos vmaps over q, k, v and module "
                f"parameters only: pass {name} unbatched (or loop over its values)"
            )


def _check_positional(
    modules: Sequence[object], heads: int, head_dim: int, device: torch.device
) -> list[Positional]:
    checked: list[Positional] = []
    for m in modules:
        if not isinstance(m, Positional):
            raise TypeError(f"positional arguments must be flexpos positional modules, got {type(m).__name__}")
        if m.transforms_input:
            raise TypeError(
                f"{type(m).__name__} transforms the input x, not q/k/scores: call it on x before "
                "the projections (flexpos.AttentionLayer does this)"
            )
        check_module_heads(m, heads, head_dim, "q (B, *, H, L, D) has")
        check_module_device(m, device)
        checked.append(m)
    return checked


def _check_mask(
    mask: Mask, batch: tuple[int, ...], heads: int, len_q: int, len_k: int, device: torch.device
) -> None:
    """``mask``'s type, shape and device for inputs with batch dims ``batch``, ``heads`` heads,
    ``len_q`` queries and ``len_k`` keys."""
    flat = math.prod(batch)
    if mask is None:
        return
    if isinstance(mask, BlockMask):
        if tuple(mask.BLOCK_SIZE) != (BLOCK, BLOCK):
            raise ValueError(f"mask (a BlockMask) must use {BLOCK}x{BLOCK} blocks, got {tuple(mask.BLOCK_SIZE)}")
        if tuple(mask.seq_lengths) != (len_q, len_k):
            mask_q, mask_k = mask.seq_lengths
            shorter = mask_q <= len_q and mask_k <= len_k  # as if built from positions alone
            hint = " (with fewer positions than tokens, build masks from positions with len_q=/len_k=)" if shorter else ""
            raise ValueError(
                f"mask (a BlockMask) is for (Lq, Lk)={tuple(mask.seq_lengths)}, inputs have {(len_q, len_k)}{hint}"
            )
        if mask.kv_num_blocks.shape[0] not in (1, flat) or mask.kv_num_blocks.shape[1] not in (1, heads):
            raise ValueError(
                f"mask (a BlockMask) must have batch 1 or {flat} and heads 1 or {heads}, "
                f"got {tuple(mask.kv_num_blocks.shape[:2])}"
            )
        check_device("mask (a BlockMask)", mask.kv_num_blocks, device, "q")
    elif isinstance(mask, Tensor):
        trailing = [(len_k,), (len_q, len_k), (heads, len_q, len_k)]
        broadcast = [*trailing, (1, len_k), (1, len_q, len_k), (heads, 1, len_k), (1, 1, len_k)]  # 1 for H or Lq
        ones = (1,) * len(batch)
        shapes = [(*batch, *t) for t in trailing]
        shared = [(*b, *t) for b in (batch, ones) for t in broadcast]
        check_bool_mask("mask", mask, shapes, device, "q", shared, "or with 1 for all batch dims, for H or for Lq")
    else:
        raise TypeError(f"mask must be a BlockMask, a bool tensor or None, got {type(mask).__name__}")


def _build_mask(
    mask: Mask, causal: bool, batch: tuple[int, ...], len_q: int, len_k: int, device: torch.device
) -> BlockMask:
    """The BlockMask of a checked ``mask`` (see :func:`_check_mask`), and ``causal``."""
    if mask is None:  # both shared, built once per size
        return causal_mask(len_q, len_k, device) if causal else full_mask(len_q, len_k, device)
    if isinstance(mask, BlockMask):
        block_mask = tiles_decide(mask)
    else:
        flat = math.prod(mask.shape[: len(batch)])  # B * ..., or 1 for a mask all sequences share
        block_mask = dense_mask(mask.reshape(flat, *mask.shape[len(batch) :]), len_q, len_k)
    return and_masks(block_mask, causal_mask(len_q, len_k, device)) if causal else block_mask


def _nothing_to_attend(q: Tensor, k: Tensor, v: Tensor, positions: Positions, modules: list[Positional]) -> Tensor:
    """(B, *, H, Lq, Dv) zeros for inputs with a zero-sized dim, with gradients (zeros, not None)
    for q, k, v, the modules' parameters and the positions where modules read them, as where
    every key is masked."""
    out = v.new_zeros(*q.shape[:-1], v.shape[-1])
    read = (positions.q, positions.k) if modules else ()
    leaves = [q, k, v, *read, *(p for m in modules for p in m.parameters())]
    needed = [t.sum().to(out.dtype) for t in leaves if t.requires_grad]
    if not needed or not torch.is_grad_enabled():
        return out
    # where, not a product with 0: an inf or NaN input would make that NaN.
    return torch.where(torch.zeros((), dtype=torch.bool, device=out.device), sum(needed), out)


def _transform_qk(
    modules: list[Positional], q: Tensor, k: Tensor, positions: Positions, scale: float
) -> tuple[Tensor, Tensor, float]:
    """Apply query/key transforms in order; append their features, folding ``scale`` into q."""
    extra_q, extra_k = [], []
    transforms = [m for m in modules if m.transforms_qk]
    for i, m in enumerate(transforms):
        # Later transforms read q and k (XL's features read q): only the last may move the origin.
        last = {"dot_only": True} if i == len(transforms) - 1 and m.takes_dot_only else {}
        out = m.transform_qk(q, k, positions, **last)
        q, k = out.q, out.k
        if out.extra_q is not None:
            if out.extra_k is None:
                raise ValueError(f"{type(m).__name__}.transform_qk returned extra_q without extra_k")
            extra_q.append(out.extra_q)
            extra_k.append(_key_features(m, out.extra_k, k))
    if not extra_q:
        return q, k, scale
    return torch.cat([q * scale, *extra_q], -1), torch.cat([k, *extra_k], -1), 1.0


def _key_features(module: Positional, extra_k: Tensor, k: Tensor) -> Tensor:
    """A transform's key features (B, Hkv|1, Lk, E) for k (B, Hkv, Lk, D), expanded to k's heads."""
    if extra_k.ndim != 4 or extra_k.shape[1] not in (1, k.shape[1]):
        raise ValueError(
            f"{type(module).__name__}.transform_qk returned extra_k of shape {tuple(extra_k.shape)}; expected "
            f"{shape_text(k.shape[0], f'{k.shape[1]} or 1', k.shape[2], 'E')}, for the key heads of k {tuple(k.shape)}"
        )
    return extra_k.expand(k.shape[0], k.shape[1], -1, -1)


def _compose(modules: list[Positional], positions: Positions, dtype: torch.dtype) -> Optional[ScoreMod]:
    """One score_mod adding every module's bias. Modules that gather a table entry per score
    (DPB) come last: Inductor's CPU flex kernel (torch 2.13) reads the positions of keys with a
    wrong stride after such a gather (an index-out-of-bounds error at batch >= 2 and Lk > 128).
    The biases do not depend on the score, so the order changes nothing but rounding."""
    scoring = sorted((m for m in modules if m.modifies_scores), key=lambda m: m.gathers_per_score)
    mods = [m.score_mod(positions, dtype) for m in scoring]
    if len(mods) <= 1:
        return mods[0] if mods else None

    def composed(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        for mod in mods:
            score = mod(score, b, h, q_idx, kv_idx)
        return score

    composed.__name__ = "_".join(m.__name__ for m in mods)
    return composed
