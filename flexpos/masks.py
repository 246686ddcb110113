"""BlockMask builders: full, padding, causal, windows by index or by position distance (both
ways, or causal in position), segments, a caller's dense bool mask, and their intersection
(``and_masks``).

Every builder decides per (query block, key block) tile whether it is empty, full or partial
from cheap per-block summaries (O(L/128) values per sequence, never an L x L tensor except the
one a caller passes to ``dense_mask``), and
gives FlexAttention a ``mask_mod`` for the partial tiles. Empty tiles are skipped by the
kernel, so compute falls with sparsity (a narrow window over sorted positions, say).

Every ``mask_mod`` uses only tensor ops on its index arguments, so it can also be evaluated on
broadcast index grids (the chunked backend and the tests do this).
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import flex_attention as flex_attention_module
from torch.nn.attention.flex_attention import BlockMask

from ._checks import check_bool, check_device, check_length, check_rank, check_tensor, shape_text
from ._compile import CPU_FLEX_MIN_TORCH, torch_version
from ._host import capturing_cuda_graph, functorch_active, tracing
from .base import shared_index
from .positions import BLOCK, Positions, n_blocks, table_len

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
EMPTY, PARTIAL, FULL = 0, 1, 2


def _named(fn: MaskMod, name: str) -> MaskMod:
    fn.__name__ = name
    return fn


def _flex_cpu_ok(fn: MaskMod) -> MaskMod:
    """Mark a mask_mod that Inductor's CPU flex kernel is known to build (see backends).

    The mark only matters where CPU flex runs at all; older Dynamo cannot set a function's
    attribute while tracing a caller's compile (an error under ``fullgraph=True``).
    """
    if torch_version() >= CPU_FLEX_MIN_TORCH or not tracing():
        fn.cpu_flex_safe = True  # type: ignore[attr-defined]
    return fn


def cpu_flex_safe(block_mask: BlockMask) -> bool:
    """Whether compiled flex on CPU can run this mask: mask_mods of indices only (full, causal,
    sliding window). Ones that read a captured table (padding, dense, windows by position,
    segments) are mis-indexed or fail to build in Inductor's CPU flex kernel (torch 2.13)."""
    return bool(getattr(block_mask.mask_mod, "cpu_flex_safe", False))


def _listing(states: Tensor, value: int) -> tuple[Tensor, Tensor]:
    """Per row of tiles ``states`` (..., rows, n): how many hold ``value`` (int32 (..., rows)),
    and their columns first, in order, then the others (int32 (..., rows, n))."""
    chosen = states == value
    count = chosen.sum(-1, dtype=torch.int32)
    order = torch.argsort(chosen.to(torch.int8), dim=-1, descending=True, stable=True)
    return count, order.to(torch.int32)


def from_states(states: Tensor, mask_mod: MaskMod, len_q: int, len_k: int) -> BlockMask:
    """BlockMask from tile states (B|1, H|1, nq, nk) with values EMPTY/PARTIAL/FULL.

    The query-side lists (flex's backward reads them) come from the states' columns, as the
    key-side lists from their rows. ``BlockMask.from_kv_blocks`` would derive them from the
    key-side lists through a dense copy under vmap: 80% of building a small mask on CPU."""
    columns = states.transpose(-2, -1).contiguous()
    kv_num, kv_idx = _listing(states, PARTIAL)
    full_kv_num, full_kv_idx = _listing(states, FULL)
    q_num, q_idx = _listing(columns, PARTIAL)
    full_q_num, full_q_idx = _listing(columns, FULL)
    mask = BlockMask(
        seq_lengths=(len_q, len_k),
        kv_num_blocks=kv_num,
        kv_indices=kv_idx,
        full_kv_num_blocks=full_kv_num,
        full_kv_indices=full_kv_idx,
        q_num_blocks=q_num,
        q_indices=q_idx,
        full_q_num_blocks=full_q_num,
        full_q_indices=full_q_idx,
        BLOCK_SIZE=(BLOCK, BLOCK),
        mask_mod=mask_mod,
    )
    if not (tracing() or functorch_active()):
        # kept for states_of (the shared masks are read every call); BlockMask's own methods
        # (to, slicing, pytree rebuilds) return new masks, without them
        mask._flexpos_states = states  # type: ignore[attr-defined]
    return mask


def states_of(block_mask: BlockMask) -> Tensor:
    """Tile states (B|1, H|1, nq, nk) of any BlockMask with 128 x 128 tiles."""
    if tuple(block_mask.BLOCK_SIZE) != (BLOCK, BLOCK):
        raise ValueError(f"block_mask must use {BLOCK}x{BLOCK} blocks, got {block_mask.BLOCK_SIZE}")
    kept = getattr(block_mask, "_flexpos_states", None)
    if kept is not None:
        return kept
    len_q, len_k = block_mask.seq_lengths
    nq, nk = n_blocks(len_q), n_blocks(len_k)

    def scatter(num: Optional[Tensor], idx: Optional[Tensor], value: int, out: Tensor) -> None:
        if num is None or idx is None:
            return
        idx, num = idx[..., :nq, :], num[..., :nq]
        used = torch.arange(idx.shape[-1], device=idx.device) < num[..., None]
        target = torch.where(used, idx.long(), nk)
        out.scatter_(-1, target, torch.full_like(target, value, dtype=out.dtype))

    b, h = block_mask.kv_num_blocks.shape[:2]
    out = torch.zeros(b, h, nq, nk + 1, dtype=torch.int8, device=block_mask.kv_num_blocks.device)
    scatter(block_mask.kv_num_blocks, block_mask.kv_indices, PARTIAL, out)
    scatter(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, FULL, out)
    return out[..., :nk]


def _blocks(values: Tensor, length: int, fill: float | int | bool) -> Tensor:
    """(B, L) -> (B, n_blocks, BLOCK), padding the tail with ``fill``."""
    # Not F.pad: its fill goes through a double, which turns int64's max into its min.
    tail = values.new_full((*values.shape[:-1], n_blocks(length) * BLOCK - values.shape[-1]), fill)
    return torch.cat((values, tail), -1).unflatten(-1, (-1, BLOCK))


def _ranges(values: Tensor, present: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Per-block min and max of ``values`` (B, L) over tokens where ``present``: (B, n) each,
    in ``values``' dtype (int64 ids stay exact). A block with no such token gets (max, min)."""
    if values.is_floating_point():
        top, bottom = torch.inf, -torch.inf
    else:
        top, bottom = torch.iinfo(values.dtype).max, torch.iinfo(values.dtype).min
    lo = _blocks(torch.where(present, values, top), length, top).amin(-1)
    hi = _blocks(torch.where(present, values, bottom), length, bottom).amax(-1)
    return lo, hi


def _tile_states(full: Tensor, empty: Tensor) -> Tensor:
    """(B, nq, nk) bool tiles -> (B, 1, nq, nk) int8 states; full wins over empty."""
    partial = torch.full_like(full, PARTIAL, dtype=torch.int8)
    states = torch.where(empty, torch.tensor(EMPTY, dtype=torch.int8), partial)
    return torch.where(full, torch.tensor(FULL, dtype=torch.int8), states)[:, None]


def _memoised(build: Callable[..., BlockMask]) -> Callable[..., BlockMask]:
    """``build`` memoised on its (hashable) arguments, except while torch.compile traces a
    caller's code (Dynamo traces through caches, and warns about them), for symbolic lengths
    (``torch.SymInt``, unhashable), while a CUDA graph is captured (a mask built then is
    only filled when the graph replays) and inside torch.func transforms (nested ones, as
    ``jvp`` of ``grad``, build it from tensors wrapped for their level, which later calls
    must not see). Masks built under ``torch.inference_mode`` are kept apart: their inference
    tensors cannot be saved for a later backward pass, which flex's autograd does."""

    @functools.lru_cache(maxsize=16)  # an entry at L=131072 holds ~17 MiB of indices
    def cached(inference: bool, *args: object) -> BlockMask:
        return build(*args)

    def get(*args: object) -> BlockMask:
        symbolic = any(isinstance(a, torch.SymInt) for a in args)
        fresh = symbolic or tracing() or capturing_cuda_graph() or functorch_active()
        return build(*args) if fresh else cached(torch.is_inference_mode_enabled(), *args)

    return get


def _indexed(device: object) -> torch.device:
    """``device`` (a torch.device or its name) checked, with its index where it has one
    ('cuda' -> 'cuda:0'): masks are memoised per device, and 'cuda' names another GPU after
    ``torch.cuda.set_device``."""
    if not isinstance(device, (torch.device, str)):
        raise TypeError(f"device must be a torch.device or a device name, got {type(device).__name__}")
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device must name a torch device, got {device!r}") from error
    if device.index is None and device.type not in ("cpu", "meta"):
        return torch.empty(0, device=device).device
    return device


def full_mask(len_q: int, len_k: int, device: torch.device | str = "cpu") -> BlockMask:
    """Every query attends to every key (a BlockMask still bounds FlexAttention's scratch).

    Built once per (Lq, Lk, device) and shared: it is what every unmasked call uses.
    """
    return _full_mask(check_length("len_q", len_q), check_length("len_k", len_k), _indexed(device))


@_memoised
def _full_mask(len_q: int, len_k: int, device: torch.device) -> BlockMask:
    states = torch.full((1, 1, n_blocks(len_q), n_blocks(len_k)), FULL, dtype=torch.int8, device=device)

    @_flex_cpu_ok
    def everything(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return q_idx >= 0

    return from_states(states, everything, len_q, len_k)


def padding_mask(key_valid: Tensor, len_q: int) -> BlockMask:
    """Key padding: ``key_valid`` (B, *, Lk) bool, True = real token; any query length Lq.

    Example::

        mask = padding_mask(lengths[:, None] > torch.arange(L), L)  # lengths (B,) -> (B, L) valid
        out = flexpos.attention(q, k, v, ALiBi(H), pos=pos, mask=mask)
    """
    check_tensor("key_valid", key_valid)
    if key_valid.dtype != torch.bool:
        raise TypeError(f"key_valid must be a bool tensor (True = real token), got dtype {key_valid.dtype}")
    check_rank("key_valid", key_valid, 2, "(B, *, Lk)")
    key_valid = key_valid.flatten(0, -2)  # the mask's batch: the product of the batch dims
    len_q = check_length("len_q", len_q)
    len_k = key_valid.shape[-1]
    tiles = _blocks(key_valid, len_k, True)
    full = tiles.all(-1)[:, None, :].expand(-1, n_blocks(len_q), -1)
    empty = ~_blocks(key_valid, len_k, False).any(-1)[:, None, :].expand_as(full)
    table = F.pad(key_valid, (0, table_len(len_k) - len_k))

    def key_padding(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return table[shared_index(b, table.shape[0]), kv_idx]

    return from_states(_tile_states(full, empty), key_padding, len_q, len_k)


def _index_ranges(length: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """Per-block (min, max) token index, float64 (1, n_blocks(length)) each (see :func:`_ranges`)."""
    idx = torch.arange(length, device=device, dtype=torch.float64)[None]
    return _ranges(idx, torch.ones_like(idx, dtype=torch.bool), length)


def causal_mask(len_q: int, len_k: Optional[int] = None, device: torch.device | str = "cpu") -> BlockMask:
    """Query i attends to keys j <= i (indices, top-left aligned like SDPA's ``is_causal``).

    Built once per (Lq, Lk, device) and shared.
    """
    len_q = check_length("len_q", len_q)
    len_k = len_q if len_k is None else check_length("len_k", len_k)
    return _causal_mask(len_q, len_k, _indexed(device))


@_memoised
def _causal_mask(len_q: int, len_k: int, device: torch.device) -> BlockMask:
    q_lo, q_hi = _index_ranges(len_q, device)
    k_lo, k_hi = _index_ranges(len_k, device)
    full = k_hi[:, None, :] <= q_lo[:, :, None]
    empty = k_lo[:, None, :] > q_hi[:, :, None]

    @_flex_cpu_ok
    def causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return q_idx >= kv_idx

    return from_states(_tile_states(full, empty), causal, len_q, len_k)


def _window_states(
    q: tuple[Tensor, Tensor], k: tuple[Tensor, Tensor], window: float, margin: float | Tensor = 0.0
) -> tuple[Tensor, Tensor]:
    """Full/empty tiles for ``|x_q - x_k| <= window`` from per-block (min, max) of x; tiles
    with a pair within ``margin`` of the window are neither."""
    (q_lo, q_hi), (k_lo, k_hi) = q, k
    q_lo, q_hi = q_lo[:, :, None], q_hi[:, :, None]
    k_lo, k_hi = k_lo[:, None, :], k_hi[:, None, :]
    farthest = torch.maximum(q_hi - k_lo, k_hi - q_lo)
    nearest = torch.maximum(torch.maximum(k_lo - q_hi, q_lo - k_hi), torch.zeros_like(farthest))
    return farthest <= window - margin, nearest > window + margin


def _past_window_states(
    q: tuple[Tensor, Tensor], k: tuple[Tensor, Tensor], window: float, margin: float | Tensor, at_zero: Tensor
) -> tuple[Tensor, Tensor]:
    """Full/empty tiles for ``0 <= x_q - x_k <= window`` from per-block (min, max) of x; tiles
    with a pair within ``margin`` of the window or ``at_zero`` of 0 are neither."""
    (q_lo, q_hi), (k_lo, k_hi) = q, k
    least = q_lo[:, :, None] - k_hi[:, None, :]
    most = q_hi[:, :, None] - k_lo[:, None, :]
    full = (least >= at_zero) & (most <= window - margin)
    return full, (most < -at_zero) | (least > window + margin)


def _check_window(window: object) -> float:
    """A window half-width: an int or float >= 0; ``inf`` keeps every pair (no window)."""
    if isinstance(window, bool) or not isinstance(window, numbers.Real):
        raise TypeError(f"window must be a number >= 0, got {type(window).__name__}")
    if math.isnan(window) or window < 0:
        raise ValueError(f"window must be a number >= 0 (inf for no window), got {window}")
    return float(window)


def sliding_window_mask(
    len_q: int, window: float, len_k: Optional[int] = None, device: torch.device | str = "cpu"
) -> BlockMask:
    """Query i attends to keys j with ``|i - j| <= window`` (token indices): a BlockMask for
    (len_q, len_k) tokens (``len_k`` defaults to ``len_q``), batch 1 and one head, which serve
    any batch and head count."""
    len_q = check_length("len_q", len_q)
    len_k = len_q if len_k is None else check_length("len_k", len_k)
    # Index distances are integers: compare them with the whole part of the window, exactly.
    reach = math.floor(min(_check_window(window), 2.0**62))
    device = _indexed(device)
    full, empty = _window_states(_index_ranges(len_q, device), _index_ranges(len_k, device), reach)
    w_t = torch.full((), reach, dtype=torch.int64, device=device)

    @_flex_cpu_ok
    def sliding_window(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (q_idx - kv_idx).abs() <= w_t

    return from_states(_tile_states(full, empty), sliding_window, len_q, len_k)


def _length(name: str, value: Optional[int], count: int) -> int:
    """``value`` checked, or by default ``count``, the number of positions given."""
    return count if value is None else check_length(name, value)


def distance_window_mask(
    window: float,
    pos: Optional[Tensor] = None,
    pos_q: Optional[Tensor] = None,
    pos_k: Optional[Tensor] = None,
    len_q: Optional[int] = None,
    len_k: Optional[int] = None,
    causal: bool = False,
) -> BlockMask:
    """Attend where ``|p_q - p_k| <= window`` in *position* units, not token indices; with
    ``causal``, only to keys at or before the query's position: ``0 <= p_q - p_k <= window``
    (``window=inf``: every such key), the causal mask of irregular or cross-attention positions,
    where token order says nothing (keys at the query's own position count as past; tokens
    without a position, such as CLS, attend and are attended both ways).

    ``pos`` (B, *, L) for self-attention or ``pos_q`` (B, *, Lq') / ``pos_k`` (B, *, Lk'); the
    mask's batch is the product of the batch dims. Sequences may be longer than their
    positions (``len_q``/``len_k``); leading tokens without a position are not windowed. Any
    positions work; sorted ones make the mask block-sparse. Distances are those of
    :mod:`flexpos.positions`, rounded to float32: integer distances below 2**24 are exact, and
    a pair within a float32 rounding of the window (about 1e-7 of it; for float positions also
    about 2**-48 of their spread) may fall on either side, the same way in any tile.

    Example::

        window = distance_window_mask(5_000, pos=pos)  # genomic pos (B, L): |p_q - p_k| <= 5 kb
        out = flexpos.attention(q, k, v, ALiBi(H), pos=pos, mask=window)
        past = distance_window_mask(math.inf, pos_q=t_query, pos_k=t_observed, causal=True)
    """
    w = _check_window(window)
    causal = check_bool("causal", causal)
    given = pos if pos is not None else pos_q
    if given is None or (pos is None and pos_k is None):
        raise ValueError("distance_window_mask needs pos, or pos_q and pos_k")
    for name, p in (("pos", pos), ("pos_q", pos_q), ("pos_k", pos_k)):
        if p is not None:
            check_rank(name, check_tensor(name, p), 2, "(B, *, L')")
    len_q = _length("len_q", len_q, given.shape[-1])
    if len_k is None and pos is not None:
        len_k = len_q
    len_k = _length("len_k", len_k, 0 if pos_k is None else pos_k.shape[-1])
    positions = Positions.resolve(tuple(given.shape[:-1]), len_q, len_k, given.device, pos, pos_q, pos_k)
    rel = positions.relative(torch.float32)
    has_q, has_k = positions.has_position("q")[None], positions.has_position("k")[None]
    q_ranges = _ranges(positions.absolute("q", centred=True), has_q, len_q)
    k_ranges = _ranges(positions.absolute("k", centred=True), has_k, len_k)
    # The mask_mod compares float32 distances: relative error below 2**-22, plus a few 2**-46
    # of |p - offset| (at most twice the span) for float positions. Tiles whose pairs come
    # within that of the window are left to it, so each pair is decided alike in any tile; at 0
    # (causal) only the float positions' part applies.
    at_zero = positions.span_tensor() * 2.0**-39
    margin = 0.0 if math.isinf(w) else w * 2.0**-20 + at_zero
    if causal:
        full, empty = _past_window_states(q_ranges, k_ranges, w, margin, at_zero)
    else:
        full, empty = _window_states(q_ranges, k_ranges, w, margin)
    unpositioned_q = _blocks(~has_q, len_q, False).any(-1)
    unpositioned_k = _blocks(~has_k, len_k, False).any(-1)
    empty = empty & ~(unpositioned_q[:, :, None] | unpositioned_k[:, None, :])
    w_t = torch.full((), w, dtype=torch.float32, device=given.device)
    zero = torch.zeros((), dtype=torch.float32, device=given.device)
    batch = positions.batch

    def distance_window(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        delta, valid = rel.distance(shared_index(b, batch), q_idx, kv_idx)
        return (delta.abs() <= w_t) | ~valid

    def past_distance_window(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        delta, valid = rel.distance(shared_index(b, batch), q_idx, kv_idx)
        return ((delta >= zero) & (delta <= w_t)) | ~valid

    mask_mod = past_distance_window if causal else distance_window
    return from_states(_tile_states(full, empty), mask_mod, len_q, len_k)


def segment_mask(segments_q: Tensor, segments_k: Optional[Tensor] = None) -> BlockMask:
    """Packed sequences: attend only within the same segment/document id.

    ``segments_q`` (B, *, Lq) and ``segments_k`` (B, *, Lk) integer ids (defaults to segments_q).

    Example::

        ids = torch.repeat_interleave(torch.arange(3), torch.tensor([100, 60, 96]))[None]
        mask = and_masks(segment_mask(ids), causal_mask(256))  # three packed documents
    """
    seg_k = segments_q if segments_k is None else segments_k
    for name, s, shape_doc in (("segments_q", segments_q, "(B, *, Lq)"), ("segments_k", seg_k, "(B, *, Lk)")):
        check_tensor(name, s)
        if s.is_floating_point() or s.is_complex() or s.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor of segment ids, got dtype {s.dtype}")
        check_rank(name, s, 2, shape_doc)
    check_device("segments_k", seg_k, segments_q.device, "segments_q")
    if seg_k.shape[:-1] != segments_q.shape[:-1]:
        raise ValueError(
            f"segments_k must have shape {shape_text(*segments_q.shape[:-1], 'Lk')} to match segments_q, "
            f"got {tuple(seg_k.shape)}"
        )
    # One batch dim (their product), int64: exact for any id; unsigned ids pad with -1.
    segments_q, seg_k = segments_q.flatten(0, -2).long(), seg_k.flatten(0, -2).long()
    len_q, len_k = segments_q.shape[-1], seg_k.shape[-1]
    q_lo, q_hi = _ranges(segments_q, torch.ones_like(segments_q, dtype=torch.bool), len_q)
    k_lo, k_hi = _ranges(seg_k, torch.ones_like(seg_k, dtype=torch.bool), len_k)
    q_lo, q_hi, k_lo, k_hi = q_lo[:, :, None], q_hi[:, :, None], k_lo[:, None, :], k_hi[:, None, :]
    full = (q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo)
    empty = (k_lo > q_hi) | (k_hi < q_lo)
    ids_q = F.pad(segments_q, (0, table_len(len_q) - len_q), value=-1)
    ids_k = F.pad(seg_k, (0, table_len(len_k) - len_k), value=-2)

    def same_segment(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return ids_q[shared_index(b, ids_q.shape[0]), q_idx] == ids_k[shared_index(b, ids_k.shape[0]), kv_idx]

    return from_states(_tile_states(full, empty), same_segment, len_q, len_k)


def _check_dense_shape(mask: Tensor, len_q: int, len_k: int) -> None:
    """``mask`` must be (B, Lk), (B, Lq, Lk) or (B, H, Lq, Lk) for these lengths, or 1 for Lq."""
    pairs: list[tuple[int, ...]] = [(len_q, len_k), (1, len_k)]
    accepted: dict[int, list[tuple[int, ...]]] = {2: [(len_k,)], 3: pairs, 4: pairs}
    if not any(tuple(mask.shape[-len(t) :]) == t for t in accepted.get(mask.ndim, [])):
        raise ValueError(
            f"mask must have shape (B, Lk), (B, Lq, Lk) or (B, H, Lq, Lk) with Lq={len_q} (or 1, "
            f"shared by every query), Lk={len_k}, got {tuple(mask.shape)}"
        )


def _pad_to(x: Tensor, rows: int, cols: int) -> Tensor:
    """x (..., r, c) padded with False/0 at the end to (..., rows, cols). Not F.pad: torch 2.6
    refuses to pad an empty dim by 0."""
    out = x.new_zeros(*x.shape[:-2], rows, cols)
    out[..., : x.shape[-2], : x.shape[-1]] = x
    return out


def dense_mask(mask: Tensor, len_q: int, len_k: int) -> BlockMask:
    """BlockMask from a bool tensor (B, Lk), (B, Lq, Lk) or (B, H, Lq, Lk); True = attend. An
    Lq of 1 serves every query (SDPA's (B, 1, 1, Lk) key padding): without heads, a
    :func:`padding_mask`."""
    check_tensor("mask", mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = attend), got dtype {mask.dtype}")
    len_q, len_k = check_length("len_q", len_q), check_length("len_k", len_k)
    _check_dense_shape(mask, len_q, len_k)
    if mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim == 4 and mask.shape[1] == 1 and mask.shape[2] == 1:
        mask = mask[:, 0, 0]
    if mask.ndim == 2:
        return padding_mask(mask, len_q)
    mask = mask.expand(-1, -1, len_q, -1)
    nq, nk = n_blocks(len_q), n_blocks(len_k)
    padded = _pad_to(mask, nq * BLOCK, nk * BLOCK)
    tiles = padded.unflatten(-1, (nk, BLOCK)).unflatten(-3, (nq, BLOCK))  # b h nq 128 nk 128
    any_ = tiles.any(-1).any(-2)
    in_range = _pad_to(torch.ones_like(mask[:1, :1]), nq * BLOCK, nk * BLOCK)
    out_of_range = ~in_range.unflatten(-1, (nk, BLOCK)).unflatten(-3, (nq, BLOCK))
    all_ = (tiles | out_of_range).all(-1).all(-2)
    states = torch.where(any_, PARTIAL, EMPTY)
    states = torch.where(all_, FULL, states).to(torch.int8)
    table = F.pad(mask, (0, table_len(len_k) - len_k, 0, table_len(len_q) - len_q))

    def dense(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return table[shared_index(b, table.shape[0]), shared_index(h, table.shape[1]), q_idx, kv_idx]

    return from_states(states, dense, len_q, len_k)


def tiles_decide(block_mask: BlockMask) -> BlockMask:
    """``block_mask`` as it is, unless its sparsity lies in its tiles alone: with torch's default
    mask_mod (``noop_mask``, e.g. from ``BlockMask.from_kv_blocks``), whose True would also keep
    pairs in EMPTY tiles wherever the mask_mod is evaluated over whole key spans (the chunked
    backend, and_masks' partial tiles). That mask_mod becomes "the pair's tile is not EMPTY"."""
    if block_mask.mask_mod is not getattr(flex_attention_module, "noop_mask", None):
        return block_mask
    states = states_of(block_mask)
    kept = states != EMPTY

    def in_kept_tile(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return kept[shared_index(b, kept.shape[0]), shared_index(h, kept.shape[1]), q_idx // BLOCK, kv_idx // BLOCK]

    len_q, len_k = block_mask.seq_lengths
    return from_states(states, in_kept_tile, len_q, len_k)


def _check_combinable(masks: Sequence[BlockMask]) -> None:
    """Masks to intersect must use 128x128 blocks, and batch and head counts that broadcast:
    each count either 1 or the same as the other masks'."""
    sizes = [tuple(m.BLOCK_SIZE) for m in masks]
    if any(size != (BLOCK, BLOCK) for size in sizes):
        raise ValueError(f"and_masks needs masks with {BLOCK}x{BLOCK} blocks, got block sizes {sizes}")
    devices = {str(m.kv_num_blocks.device) for m in masks}
    if len(devices) > 1:
        raise ValueError(f"and_masks needs masks on one device, got {' and '.join(sorted(devices))}")
    shapes = [tuple(m.kv_num_blocks.shape[:2]) for m in masks]
    for dim, what in ((0, "batch"), (1, "head")):
        if len({shape[dim] for shape in shapes} - {1}) > 1:
            raise ValueError(
                f"and_masks needs {what} counts that are equal or 1, got (batch, heads) "
                f"{' and '.join(map(str, shapes))}"
            )


def and_masks(*masks: BlockMask) -> BlockMask:
    """Intersection of BlockMasks with the same sequence lengths (True where all are True).

    Batch and head dims of size 1 broadcast. Example::

        mask = and_masks(distance_window_mask(5_000, pos=pos), padding_mask(key_valid, L))
    """
    if not masks:
        raise ValueError("and_masks needs at least one BlockMask")
    for m in masks:
        if not isinstance(m, BlockMask):
            raise TypeError(f"and_masks takes BlockMasks, got {type(m).__name__}")
    lengths = {tuple(m.seq_lengths) for m in masks}
    if len(lengths) != 1:
        raise ValueError(f"and_masks needs masks of equal (Lq, Lk), got {sorted(lengths)}")
    _check_combinable(masks)
    if len(masks) == 1:
        return masks[0]
    masks = tuple(tiles_decide(m) for m in masks)
    states = torch.broadcast_tensors(*[states_of(m) for m in masks])
    combined = torch.stack(states).amin(0)
    mods = [m.mask_mod for m in masks]

    def both(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        result = mods[0](b, h, q_idx, kv_idx)
        for mod in mods[1:]:
            result = result & mod(b, h, q_idx, kv_idx)
        return result

    len_q, len_k = lengths.pop()
    mask_mod = _named(both, "and_" + "_".join(f.__name__ for f in mods))
    if all(getattr(f, "cpu_flex_safe", False) for f in mods):
        mask_mod = _flex_cpu_ok(mask_mod)
    return from_states(combined, mask_mod, len_q, len_k)
