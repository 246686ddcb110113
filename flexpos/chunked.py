"""The chunked backend: attention under a bias built chunk by chunk.

Queries go in chunks; per chunk one compiled kernel evaluates the score_mod and mask_mod on the
chunk's grid of (query, key) indices, and SDPA attends with that bias (or, on CPU where SDPA
would run its math kernel, flexpos' own softmax, :func:`_attend_math`): O(chunk * Lk) memory,
autograd for everything, float64 included. The default on CPU, where Inductor's flex kernel has
no backward (the choice between backends: :mod:`flexpos.backends`).
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# sdpa_kernel's own record of the enabled kernels, the only one that includes their priority order
from torch.nn.attention import SDPBackend, _cur_sdpa_kernel_backends, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask
from torch.utils.checkpoint import checkpoint

from ._compile import compile_enabled, compile_settings, compiling, lazy_compile
from ._host import blind, exporting, forward_ad_active, functorch_active, on_host, tracing, without_grad_wrappers
from .base import ScoreMod, index_grids
from .masks import EMPTY, FULL, MaskMod, states_of
from .positions import BLOCK, n_blocks

CHUNK_BYTES = {"cpu": 16 * 2**20, "default": 128 * 2**20}
"""Bias buffer per chunk of queries. On CPU below glibc's 32 MiB mmap ceiling, so freed chunks
are reused from the heap instead of page-faulted in anew for every chunk; on accelerators
(caching allocators) larger, for fewer launches and host syncs."""


@torch.compiler.disable  # a caller's torch.compile would pin a symbolic len_k to its value
def chunk_rows(batch_heads: int, len_k: int, device: torch.device = torch.device("cpu")) -> int:
    """Queries per chunk: a power of two in [16, 1024] whose float32 bias (B*H, rows, Lk) fits
    :data:`CHUNK_BYTES` where it can. Powers of two up to 128 tile FlexAttention's 128-blocks."""
    budget = CHUNK_BYTES.get(device.type, CHUNK_BYTES["default"])
    fit = budget // (4 * max(batch_heads * len_k, 1))
    return 1 << min(max(fit, 16).bit_length() - 1, 10)


def _chunk_bias(
    score_mod: Optional[ScoreMod],
    mask_mod: Optional[MaskMod],
    batch: int,
    heads: int,
    q_start: int,
    rows: int,
    k_start: int,
    cols: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """Additive bias (B|1, H|1, rows, cols) of queries ``q_start + i`` over keys
    ``k_start + j``: the score_mod's bias where the mask keeps a pair, -inf elsewhere.

    Indices are built from the starts (never passed as index tensors) so that Inductor sees
    affine indices and emits contiguous vector loads from the score_mod's tables.
    """
    torch._check(q_start >= 0)
    torch._check(k_start >= 0)
    b, h, q_idx, kv_idx = index_grids(batch, heads, rows, cols, device)
    q_idx, kv_idx = q_idx + q_start, kv_idx + k_start
    bias = torch.zeros((), dtype=dtype, device=device)
    if score_mod is not None:
        bias = score_mod(bias, b, h, q_idx, kv_idx)
    if mask_mod is not None:
        bias = torch.where(mask_mod(b, h, q_idx, kv_idx), bias, float("-inf"))
    return bias.expand(*bias.shape[:2], rows, cols)


# Two bugs of Inductor's CPU code generator use an index before declaring it ("'tmp1' was not
# declared in this scope"):
# - torch 2.11 places its bounds checks of gathered indices first. The indices here lie in
#   range by construction (aranges within the sequence lengths the tables were built for), and
#   the eager path keeps PyTorch's own checks.
# - torch 2.13 with one thread, where a backward gathers from a table (DPB's slopes, for
#   position gradients) and scatter-adds into the same table's gradient: it shares the index
#   buffer of the store, emitted later. Kernels sized for any thread count use atomic adds.
_compiled_bias = lazy_compile(
    _chunk_bias, options={"assert_indirect_indexing": False, "cpp.dynamic_threads": True}
)


def _attend_chunk(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_start: int,
    k_start: int,
    score_mod: Optional[ScoreMod],
    mask_mod: Optional[MaskMod],
    scale: float,
    unread: bool = False,
    rows_may_die: bool = True,
) -> Tensor:
    """Attention of queries ``q_start ..`` (B, H, C, E) over keys ``k_start ..`` (B, H, n, E);
    ``unread``: values may not be read back to the host (:func:`flexpos._host.blind`), decided
    by the caller, so that checkpoint's recomputation in backward takes the same branches;
    ``rows_may_die``: some query may have no key left (-inf everywhere), to be found and zeroed.
    """
    functional = functorch_active()
    unread = unread or functional  # then which rows are alive is not read back
    # Under torch.func, SDPA's math kernel: differentiable in every input (vmap may otherwise
    # pick a kernel that is not, for a bias that needs gradients), and twice; in forward mode too.
    math_only = functional or forward_ad_active()
    bias_free = score_mod is None and mask_mod is None
    # No bias to keep in float32 (none, or a mask's 0 and -inf, exact in any dtype): SDPA's
    # fused kernels take bf16/f16 as they are and accumulate in float32 (2.2x faster on CPU at
    # L=512-2048, the same error). Not for gradients: in bf16 dk and dv were 1.5x further from
    # float64 (9.5e-3 vs 6.3e-3); nor where flexpos' own softmax would run, in q's dtype.
    as_given = (
        score_mod is None
        and not math_only
        and not _needs_grad(q, k, v)
        and (bias_free or not _runs_own_math(q, v, False, math_only))
    )
    work = q.dtype if as_given else torch.promote_types(q.dtype, torch.float32)
    q, k, v_work = q.to(work), k.to(work), v.to(work)
    kernel = sdpa_kernel(SDPBackend.MATH) if math_only else contextlib.nullcontext()
    if bias_free:
        with kernel:
            return F.scaled_dot_product_attention(q, k, v_work, scale=scale).to(v.dtype)
    bias, alive = _live_bias(q, k, q_start, k_start, score_mod, mask_mod, unread, rows_may_die)
    # Outside autocast, which would round the bias to bf16 (by up to 0.4% of its size: whole
    # units of score for ALiBi and DPB at large distances) before adding it to the scores.
    with torch.autocast(q.device.type, enabled=False), kernel:
        if _runs_own_math(q, v, bias.requires_grad, math_only):
            out = _attend_math(q, k, v_work, bias, scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v_work, attn_mask=bias, scale=scale)
    return (out if alive is None else torch.where(alive, out, 0.0)).to(v.dtype)


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _runs_own_math(q: Tensor, v: Tensor, bias_needs_grad: bool, math_only: bool) -> bool:
    """Whether a chunk runs :func:`_attend_math` rather than SDPA: on CPU, where SDPA would run
    its math kernel, except where that kernel is asked for (``math_only``) or traced. SDPA's
    CPU flash kernel takes no bias that needs a gradient, no q and k head dim other than v's
    (XL's), and no bias at all where its ops have no bias argument (benchmarks/chunked_backward.py,
    part 3)."""
    if q.device.type != "cpu" or math_only or tracing():
        return False
    return bias_needs_grad or q.shape[-1] != v.shape[-1] or not _flash_cpu_takes_a_bias()


def _attend_math(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float) -> Tensor:
    """``softmax(q k^T * scale + bias) v``: q (B, H, C, E), k (B, H, n, E), v (B, H, n, Dv),
    bias (B|1, H|1, C, n) -> (B, H, C, Dv), on CPU where SDPA would run its math kernel (see
    :func:`_runs_own_math`).

    The same computation, with the bias added inside the matrix product and without SDPA's pass
    for rows that have no key (the caller zeroes those). Weights with ``exp(logit - row max)``
    below ``n * tiny`` (tiny: the smallest normal float) are 0 instead, so that every weight
    left is at least ``tiny``: as subnormal floats they slowed every product that reads the
    weights or their gradient several times (ALiBi's far keys), and each changes an output or
    gradient term by less than ``n * tiny`` times its other factors (1.2e-38 * n in float32).
    ALiBi with a learned divisor and a learned DPB, forward + backward at L=1024-2048: 2.1-2.8x
    faster than SDPA's math kernel (benchmarks/chunked_backward.py, part 3)."""
    batch, heads, rows, _ = q.shape
    n = k.shape[-2]
    logits = torch.baddbmm(
        bias.expand(batch, heads, rows, n).reshape(batch * heads, rows, n),
        q.reshape(batch * heads, rows, -1),
        k.reshape(batch * heads, n, -1).transpose(1, 2),
        alpha=scale,
    )
    with torch.no_grad():
        underflows = logits < logits.amax(-1, keepdim=True) + math.log(torch.finfo(logits.dtype).tiny * n)
    logits = logits.masked_fill_(underflows, float("-inf"))  # in place: baddbmm saved q and k, not its output
    return torch.bmm(logits.softmax(-1), v.reshape(batch * heads, n, -1)).view(batch, heads, rows, -1)


def _live_bias(
    q: Tensor,
    k: Tensor,
    q_start: int,
    k_start: int,
    score_mod: Optional[ScoreMod],
    mask_mod: Optional[MaskMod],
    unread: bool,
    rows_may_die: bool,
) -> tuple[Tensor, Optional[Tensor]]:
    """The chunk's bias (B|1, H|1, C, n) in q's dtype (see :func:`_chunk_bias`), with rows that
    have no key (-inf everywhere) set to 0 so that SDPA stays finite in forward and backward, and
    the (.., C, 1) bool of rows that have one; None where no row can lack one (every bias finite)
    or none does."""
    shape = (q.shape[0], q.shape[1], q_start, q.shape[2], k_start, k.shape[2], q.dtype, q.device)
    bias = _compiled_bias(score_mod, mask_mod, *shape)
    if not rows_may_die:  # no pass over the bias, no host read
        return bias, None
    alive = bias.amax(-1, keepdim=True) != float("-inf")  # a NaN row stays alive: NaN, not 0
    # Inside a caller's torch.compile the read would break the graph at every chunk.
    if not unread and not tracing() and bool(alive.all()):
        return bias, None
    return torch.where(alive, bias, 0.0), alive


def run_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    score_mod: Optional[ScoreMod],
    block_mask: BlockMask,
    scale: float,
    needs_grad: bool = True,
    finite_scores: bool = False,
) -> Tensor:
    """Same contract as :func:`flexpos.flex.run_flex` for k and v with q's H heads (grouped
    heads are repeated before: :func:`flexpos._gqa.share_kv_heads`), on any device and dtype, with
    autograd (``needs_grad``: whether q, k, v or the score_mod's parameters need gradients;
    ``finite_scores``: the score_mod never returns -inf, so only chunks that evaluate the
    mask_mod can leave a query without keys).

    Queries go in chunks of :func:`chunk_rows`; each chunk attends, with SDPA or
    :func:`_attend_math`, to the span of
    key tiles that the BlockMask leaves non-empty for it, under a bias that one compiled kernel
    evaluates from the score_mod and mask_mod (score_mods add a bias to the score, which every
    flexpos score_mod does). Memory is O(rows * Lk) per head; under autograd each chunk is
    recomputed in the backward pass rather than stored: its bias alone where that needs no
    gradient (see :class:`_SavedChunk`), else the whole chunk (checkpoint). Inside torch.func
    transforms, which refuse checkpoint's hooks, it is stored. Without a score_mod and with every tile
    full there is no bias to build: one SDPA call over all queries.

    A chunk whose key span is not entirely FULL evaluates the mask_mod on all of it, where
    FlexAttention would trust FULL tiles without calling it and skip EMPTY ones: the two agree
    for masks whose tiles match their mask_mod, as for every flexpos builder, for
    ``create_block_mask`` and for masks with torch's default mask_mod (``from_kv_blocks``), which
    :func:`flexpos.masks.tiles_decide` gives one that matches.
    """
    functional = functorch_active()
    states = without_grad_wrappers(states_of(block_mask)) if functional else states_of(block_mask)
    # Where tile states may not be read (no_host_reads, CUDA graph capture, torch.export, which
    # traces no data-dependent plan) every chunk takes every key and evaluates the mask_mod.
    unread = blind() or exporting()
    if score_mod is None and not unread and on_host(functional, _all_full, states):  # no bias: one SDPA call
        return _attend_chunk(q, k, v, 0, 0, None, None, scale)
    len_q, len_k = q.shape[-2], k.shape[-2]
    rows = chunk_rows(q.shape[0] * q.shape[1], len_k, q.device)
    plan = _blind_plan(len_q, len_k, rows) if unread else on_host(functional, _plan, states, len_q, len_k, rows)
    # One output buffer, filled chunk by chunk: a list of chunk outputs would interleave small
    # long-lived blocks with the freed bias buffers and fragment the heap.
    out = v.new_zeros(*q.shape[:2], len_q, v.shape[-1])
    pieces: list[tuple[int, int, Tensor]] = []  # stored chunks: (start, stop, chunk output)
    call = _ChunkCall(_chunk_mode(q, k, v, score_mod, needs_grad, functional), q, v)
    with compile_settings():  # entered once, not per chunk
        for c in plan:
            args = (q[:, :, c.start : c.stop], k[:, :, c.k0 : c.k1], v[:, :, c.k0 : c.k1], c.start, c.k0, score_mod,
                    block_mask.mask_mod if c.partial else None, scale, unread, c.partial or not finite_scores)
            if call.mode == "stored":
                pieces.append((c.start, c.stop, _attend_chunk(*args)))
            else:
                out[:, :, c.start : c.stop] = call(args, c.start, c.stop)
    if call.mode == "stored":
        out = _concatenate(out, pieces)
    if not plan and needs_grad and torch.is_grad_enabled():
        out = _keep_graph(out, q, k, v, score_mod, block_mask.mask_mod, scale)
    return out


def _chunk_mode(
    q: Tensor, k: Tensor, v: Tensor, score_mod: Optional[ScoreMod], needs_grad: bool, functional: bool
) -> str:
    """How the chunks of a call run:

    - 'stored' inside torch.func transforms, which take neither in-place writes of batched
      chunks nor checkpoint's hooks: chunk outputs are concatenated and kept for backward
      (memory O(Lq * Lk), as the dense path);
    - 'kept' (:class:`_SavedChunk`) where autograd needs them and :func:`_keeps_outputs`;
    - 'checkpoint' where autograd needs them otherwise, except in forward-mode AD: checkpoint
      would recompute a chunk in backward, outside the dual level, where it takes other
      kernels and saves other tensors;
    - 'plain' else, also in grad mode where q, k, v, positions and parameters need no
      gradient (still a graph if the score_mod captured a tensor that needs one).
    """
    autograd = needs_grad and torch.is_grad_enabled()
    if functional:
        return "stored"
    if autograd and _keeps_outputs(q, k, v, score_mod):
        return "kept"
    return "checkpoint" if autograd and not forward_ad_active() else "plain"


class _ChunkCall:
    """One chunk's output in a call's mode (see :func:`_chunk_mode`; 'stored' chunks run plain),
    from :func:`_attend_chunk`'s arguments for query rows ``start:stop`` of q (B, H, Lq, E)."""

    def __init__(self, mode: str, q: Tensor, v: Tensor) -> None:
        self.mode = mode
        if mode == "kept":  # what kept chunks keep, in two buffers (one per call, as the output)
            work = torch.promote_types(q.dtype, torch.float32)
            self.kept = (q.new_empty(*q.shape[:3], v.shape[-1], dtype=work), q.new_empty(*q.shape[:3], dtype=work))
            self.settings = _settings_now()
        self.recompute = _recompute_options() if mode == "checkpoint" else {}

    def __call__(self, args: tuple[Any, ...], start: int, stop: int) -> Tensor:
        if self.mode == "kept":
            # .data: each chunk's view gets a version counter of its own, so it can be saved
            into = tuple(t.data[:, :, start:stop] for t in self.kept)
            return _SavedChunk.apply(*args[:3], (*args[3:], self.settings, into))
        if self.mode == "checkpoint":
            return checkpoint(_attend_chunk, *args, use_reentrant=False, **self.recompute)
        return _attend_chunk(*args)


class _SavedChunk(torch.autograd.Function):
    """:func:`_attend_chunk` for a bias that needs no gradient, on CPU, where SDPA runs its flash
    kernel: forward keeps that kernel's output and log-sum-exp ((B, H, C, Dv) and (B, H, C)),
    backward recomputes the bias alone (without subnormal weights, see
    :func:`_without_subnormal_weights`) and calls the kernel's backward. Checkpoint runs the whole
    forward again: ALiBi forward + backward was 2.2-2.5x slower that way at L=1024-2048, about
    1.1x of it from the recomputation (benchmarks/chunked_backward.py).
    A backward that must itself be differentiable (``create_graph``) recomputes the chunk with
    autograd instead, under the SDPA kernels and compile setting of the forward pass. Memory
    kept per chunk: the output in float32 and the log-sum-exp, copied into views of the
    caller's buffers (``into``), besides views of q, k, v."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, rest: tuple[Any, ...]) -> Tensor:
        q_start, k_start, score_mod, mask_mod, scale, unread, rows_may_die, settings, into = rest
        work = torch.promote_types(q.dtype, torch.float32)
        qw, kw, vw = q.to(work), k.to(work), v.to(work)
        bias, alive = _live_bias(qw, kw, q_start, k_start, score_mod, mask_mod, unread, rows_may_die)
        with torch.autocast("cpu", enabled=False):
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                qw, kw, vw, 0.0, False, attn_mask=bias, scale=scale
            )
        ctx.save_for_backward(q, k, v, into[0].copy_(out), into[1].copy_(lse))
        ctx.rest = rest
        return (out if alive is None else torch.where(alive, out, 0.0)).to(v.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        q, k, v, out, lse = ctx.saved_tensors
        q_start, k_start, score_mod, mask_mod, scale, unread, rows_may_die, settings, _ = ctx.rest
        if torch.is_grad_enabled():  # create_graph: differentiable, as checkpoint's recomputation
            with torch.enable_grad(), settings:
                again = _attend_chunk(q, k, v, q_start, k_start, score_mod, mask_mod, scale, unread, rows_may_die)
            wanted = [t for t, needed in zip((q, k, v), ctx.needs_input_grad) if needed]
            grads = iter(torch.autograd.grad(again, wanted, grad, create_graph=True, allow_unused=True))
            return (*(next(grads) if needed else None for needed in ctx.needs_input_grad[:3]), None)
        work = out.dtype
        qw, kw, vw = q.to(work), k.to(work), v.to(work)
        # Not under the caller's autocast (a backward inside its block), whose bf16 matmul
        # would round the rebuilt bias that the forward's float32 log-sum-exp is matched with.
        with torch.autocast("cpu", enabled=False), settings:
            bias, alive = _live_bias(qw, kw, q_start, k_start, score_mod, mask_mod, unread, rows_may_die)
            if score_mod is not None:  # a mask alone (0 or -inf) leaves weights near exp(score - lse)
                bias = _without_subnormal_weights(bias, qw, kw, lse, scale)
            grad = grad.to(work) if alive is None else torch.where(alive, grad.to(work), 0.0)
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad, qw, kw, vw, out, lse, 0.0, False, attn_mask=bias, scale=scale
            )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def _without_subnormal_weights(bias: Tensor, q: Tensor, k: Tensor, lse: Tensor, scale: float) -> Tensor:
    """``bias`` (B|1, H|1, C, n) with -inf where the attention weight ``exp(score + bias - lse)``
    lies below the dtype's smallest normal number: q (B, H, C, E), k (B, H, n, E), lse (B, H, C).

    The flash kernel's backward computes such weights as subnormal floats, several times slower
    than normal ones (ALiBi at long distances; benchmarks/chunked_backward.py); with -inf they
    are 0, as flushing subnormals to zero would make them. Each changes a gradient term by less
    than ``tiny * |dO| * (|V| + |out|) * |K| * scale`` (tiny: 1.2e-38 in float32). Costs one
    (C, n) product per head, a fifth of the backward's."""
    logits = torch.matmul(q, k.transpose(-1, -2)).mul_(scale).add_(bias).sub_(lse.unsqueeze(-1))
    subnormal = logits < math.log(torch.finfo(bias.dtype).tiny)
    return logits.copy_(bias).masked_fill_(subnormal, float("-inf"))  # in the logits' memory


def _keeps_outputs(q: Tensor, k: Tensor, v: Tensor, score_mod: Optional[ScoreMod]) -> bool:
    """Whether chunks of this call go through :class:`_SavedChunk`: eager CPU calls whose bias
    needs no gradient (probed on one score per head: a score_mod may capture any tensor) and
    where SDPA would pick its flash kernel for a float bias (not in forward-mode AD, whose
    tangents the flash kernel does not carry)."""
    if q.device.type != "cpu" or tracing() or forward_ad_active() or not _flash_cpu_takes_a_bias():
        return False
    work = torch.promote_types(q.dtype, torch.float32)
    if score_mod is not None:
        probe = _chunk_bias(score_mod, None, q.shape[0], q.shape[1], 0, 1, 0, 1, work, q.device)
        if probe.requires_grad:
            return False
    q1, k1, v1 = (t[:, :, :1].to(work) for t in (q, k, v))
    # Not an expanded scalar: for a bias with every stride 0, torch 2.6 picks the math kernel.
    bias = torch.zeros(q.shape[0], q.shape[1], 1, 1, dtype=work, device=q.device)
    try:  # a private function: any torch that lacks it or changed it checkpoints instead
        choice = torch._fused_sdp_choice(q1, k1, v1, bias, 0.0, False, scale=None)
    except (AttributeError, TypeError, RuntimeError):
        return False
    return choice == SDPBackend.FLASH_ATTENTION.value


@functools.lru_cache(maxsize=None)
def _flash_cpu_takes_a_bias() -> bool:
    """Whether this torch has the CPU flash kernel's forward and backward ops with a bias."""
    ops = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward")
    return all(hasattr(torch.ops.aten, op) and "attn_mask" in str(getattr(torch.ops.aten, op).default._schema)
               for op in ops)


class _Chunk(NamedTuple):
    """Query rows ``start:stop`` attend to keys ``k0:k1``; ``partial``: some tile of that span
    is not FULL, so the mask_mod is evaluated."""

    start: int
    stop: int
    k0: int
    k1: int
    partial: bool


def chunk_bounds(len_q: int, rows: int) -> list[tuple[int, int]]:
    """(start, stop) of each chunk of ``rows`` queries; a last chunk of one row joins the one
    before it. Compiled with symbolic sizes, the bias kernel assumes at least two rows (Dynamo
    specialises sizes 0 and 1): a chunk of one would compile it again (0.7-4 s on CPU, once per
    process, at lengths such as 513)."""
    starts = list(range(0, len_q, rows))
    if len(starts) > 1 and len_q - starts[-1] == 1:
        starts.pop()
    return list(zip(starts, [*starts[1:], len_q]))


def _plan(states: Tensor, len_q: int, len_k: int, rows: int) -> list[_Chunk]:
    """The chunks of ``rows`` queries (:func:`chunk_bounds`) that the tile ``states`` (B, H, Lq
    blocks, Lk blocks) leave any key: each spans its keys from its first to its last non-EMPTY
    tile."""
    plan = []
    for start, stop in chunk_bounds(len_q, rows):
        tiles = states[:, :, start // BLOCK : n_blocks(stop)]
        used = tiles.ne(EMPTY).flatten(0, 2).any(0).nonzero().flatten().tolist()
        if used:
            first, last = used[0], used[-1] + 1
            partial = not bool(tiles[..., first:last].eq(FULL).all())
            plan.append(_Chunk(start, stop, first * BLOCK, min(last * BLOCK, len_k), partial))
    return plan


def _blind_plan(len_q: int, len_k: int, rows: int) -> list[_Chunk]:
    """The chunks of ``rows`` queries without reading tile states: every key, mask_mod evaluated."""
    return [_Chunk(start, stop, 0, len_k, True) for start, stop in chunk_bounds(len_q, rows)]


def _concatenate(zeros: Tensor, pieces: list[tuple[int, int, Tensor]]) -> Tensor:
    """(B, H, Lq, Dv) from chunk outputs of query rows ``start:stop``; ``zeros`` elsewhere."""
    parts, done = [], 0
    for start, stop, chunk in pieces:
        parts += [zeros[:, :, done:start], chunk]
        done = stop
    return torch.cat([*parts, zeros[:, :, done:]], dim=2)


def _all_full(states: Tensor) -> bool:
    # tolist, not bool: inside a caller's torch.compile both break the graph here, as
    # :func:`_plan`'s read does, but bool() made Dynamo warn about Tensor.item() at every call.
    return bool(states.eq(FULL).all().tolist())


class _ForwardSettings(contextlib.AbstractContextManager[None]):
    """The forward pass's SDPA kernels (``sdpa_kernel(enabled, set_priority)``) and
    :func:`flexpos.set_compile` setting, entered again where a chunk is recomputed in backward:
    a caller's ``sdpa_kernel`` block may have ended before backward, or the setting changed, and
    another kernel or an uncompiled bias saves other tensors (checkpoint's metadata check fails).
    Re-entrant: a chunk is recomputed once per backward pass through it (``retain_graph``,
    double backward)."""

    def __init__(self, enabled: list[SDPBackend], set_priority: bool) -> None:
        self.enabled, self.set_priority = enabled, set_priority
        self.compile = compile_enabled()
        self._open: list[contextlib.ExitStack] = []

    def __enter__(self) -> None:
        kernels = sdpa_kernel(self.enabled, set_priority=True) if self.set_priority else sdpa_kernel(self.enabled)
        stack = contextlib.ExitStack()
        stack.enter_context(kernels)
        stack.enter_context(compiling(self.compile))
        self._open.append(stack)

    def __exit__(self, *exc: Any) -> Optional[bool]:
        return self._open.pop().__exit__(*exc)


def _recompute_options() -> dict[str, Any]:
    """checkpoint's ``context_fn``: recompute chunks in backward under the forward pass's
    settings (:class:`_ForwardSettings`). No options inside a caller's torch.compile, which
    traces checkpoint itself and takes no ``context_fn``."""
    if tracing():
        return {}
    recompute = _settings_now()
    return {"context_fn": lambda: (contextlib.nullcontext(), recompute)}


def _settings_now() -> _ForwardSettings:
    """The SDPA kernels enabled now (and their priority order) and the compile setting, to
    enter again later."""
    try:
        return _ForwardSettings(_cur_sdpa_kernel_backends(with_priority=True), set_priority=True)
    except TypeError:  # torch 2.6: no priority order
        return _ForwardSettings(_cur_sdpa_kernel_backends(), set_priority=False)


def _keep_graph(
    zeros: Tensor, q: Tensor, k: Tensor, v: Tensor, score_mod: Optional[ScoreMod], mask_mod: MaskMod, scale: float
) -> Tensor:
    """Where no query has a key: ``zeros`` (B, H, Lq, Dv) with the graph of one discarded chunk.
    As with flex, the output then depends on q, k, v and the score_mod's parameters, whose
    gradients are zeros rather than None (and ``out.backward()`` works). Out of place, for vmap."""
    rows, cols = min(BLOCK, q.shape[-2]), min(BLOCK, k.shape[-2])
    chunk = _attend_chunk(q[:, :, :rows], k[:, :, :cols], v[:, :, :cols], 0, 0, score_mod, mask_mod, scale)
    kept = torch.where(torch.zeros((), dtype=torch.bool, device=zeros.device), chunk, 0.0)
    return torch.cat([kept, zeros[:, :, rows:]], dim=2)
