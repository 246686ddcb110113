"""Candidate Rotary kernel for CUDA, not used by flexpos yet: timed by gpu_variants.py.

flexpos' rotation kernel (Inductor, one pointwise kernel for q and k) reads a float32 cos/sin
table of (B, 1, L, D/2, 2) for every head: at L=131072 the table no longer stays in L2 and the
kernel moves half as many bytes again as q and k themselves (benchmarks/README.md, "GPU
results"). Here each program takes one tile of positions of one sequence, forms the tile's cos
and sin once (as flexpos.rotary.cos_sin: a float64 reduction to [-pi, pi], float32 trig with a
first-order correction) and rotates that tile of q and k for every head: q and k are read and
written once, and there is no table. Backward is the rotation by minus the angle. Positions and
the divisor get no gradient (flexpos would keep its compiled path where they need one).

Checked on CPU with Triton's interpreter (tests/test_rotary_heads.py, where Triton is
installed); `gpu_variants.py` prints its bandwidth and its largest difference from flexpos.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from flexpos.rotary import _TAU


@triton.jit
def _rotate_heads_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, theta_ptr, div_ptr, consts_ptr,
    length, sqb, sqh, sql, skb, skh, skl, sign,
    N_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr,
    SPLIT_PAIRS: tl.constexpr,
):
    # q, k: (B, H, L, 2 * HALF) with unit stride in the last dim; outputs contiguous; pos (B, L)
    # float64; consts: float64 2*pi in three parts, 2*pi and 1 / (2*pi).
    tile, b = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64 offsets throughout
    rows = (tile * BLOCK_L + tl.arange(0, BLOCK_L)).to(tl.int64)
    pairs = tl.arange(0, BLOCK_M)
    row_ok = rows < length
    ok = row_ok[:, None] & (pairs < HALF)[None, :]

    p = tl.load(pos_ptr + b * length + rows, mask=row_ok, other=0.0) / tl.load(div_ptr)
    theta = tl.load(theta_ptr + pairs, mask=pairs < HALF, other=0.0).to(tl.float64)
    angle = p[:, None] * theta[None, :]
    turns = tl.floor(angle * tl.load(consts_ptr + 4) + 0.5)
    exact = angle - turns * tl.load(consts_ptr)
    exact = (exact - turns * tl.load(consts_ptr + 1)) - turns * tl.load(consts_ptr + 2)
    # past 2**32 turns in one step with float64's 2*pi; past 2**53 radians no phase: angle 0
    wide = tl.where(tl.abs(angle) < 2.0**53, angle - turns * tl.load(consts_ptr + 3), 0.0)
    reduced = tl.where(tl.abs(turns) < 2.0**32, exact, wide)
    near = reduced.to(tl.float32)
    rest = (reduced - near.to(tl.float64)).to(tl.float32)
    c, s = tl.cos(near), tl.sin(near)  # as Inductor's kernels (tl.math)
    cos = c - s * rest
    sin = (s + c * rest) * sign

    for head in range(N_HEADS):
        h = tl.cast(head, tl.int64)
        out = (b * N_HEADS + h) * length * (2 * HALF)
        if SPLIT_PAIRS:
            _rotate_rows(q_ptr + b * sqb + h * sqh, sql, q_out_ptr + out, rows, row_ok, cos, sin, HALF, BLOCK_L, BLOCK_M)
            _rotate_rows(k_ptr + b * skb + h * skh, skl, k_out_ptr + out, rows, row_ok, cos, sin, HALF, BLOCK_L, BLOCK_M)
        else:
            _rotate_pairs(q_ptr + b * sqb + h * sqh, sql, q_out_ptr + out, rows, pairs, ok, cos, sin, HALF)
            _rotate_pairs(k_ptr + b * skb + h * skh, skl, k_out_ptr + out, rows, pairs, ok, cos, sin, HALF)


@triton.jit
def _rotate_pairs(x_ptr, stride_l, out_ptr, rows, pairs, ok, cos, sin, HALF: tl.constexpr):
    # x_2m and x_2m+1 loaded and stored as two strided accesses
    at = rows[:, None] * stride_l + 2 * pairs[None, :]
    to = rows[:, None] * (2 * HALF) + 2 * pairs[None, :]
    x0 = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32)
    x1 = tl.load(x_ptr + at + 1, mask=ok, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + to, (x0 * cos - x1 * sin).to(dtype), mask=ok)
    tl.store(out_ptr + to + 1, (x1 * cos + x0 * sin).to(dtype), mask=ok)


@triton.jit
def _rotate_rows(x_ptr, stride_l, out_ptr, rows, row_ok, cos, sin,
                 HALF: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr):
    # whole rows loaded and stored contiguously, the pairs split and joined in registers
    cols = tl.arange(0, 2 * BLOCK_M)
    ok = row_ok[:, None] & (cols < 2 * HALF)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_l + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    x0, x1 = tl.split(tl.reshape(x, (BLOCK_L, BLOCK_M, 2)))
    y = tl.reshape(tl.join(x0 * cos - x1 * sin, x1 * cos + x0 * sin), (BLOCK_L, 2 * BLOCK_M))
    tl.store(out_ptr + rows[:, None] * (2 * HALF) + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)


Tiles = tuple[int, int, bool]
"""Positions per program, warps per program, and whether to split the pairs in registers
(whole rows loaded and stored contiguously) instead of two strided accesses."""


def _launch(q: Tensor, k: Tensor, pos: Tensor, thetas: Tensor, div: Tensor, sign: float,
            tiles: Tiles) -> tuple[Tensor, Tensor]:
    q, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k))
    batch, heads, length, dim = q.shape
    q_out, k_out = torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(k, memory_format=torch.contiguous_format)
    block_l, warps, split_pairs = tiles
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _rotate_heads_kernel[(triton.cdiv(length, block_l), batch)](
            q, k, q_out, k_out, pos.double().contiguous(), thetas.float().contiguous(),
            div.double().reshape(1), _constants(q.device),
            length, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), sign,
            N_HEADS=heads, HALF=dim // 2, BLOCK_L=block_l, BLOCK_M=triton.next_power_of_2(dim // 2),
            SPLIT_PAIRS=split_pairs, num_warps=warps,
        )
    return q_out, k_out


@functools.lru_cache(maxsize=None)
def _constants(device: torch.device) -> Tensor:
    # made once per device: copying a new host tensor in would wait for the queued GPU work
    return torch.tensor([*_TAU, math.tau, 1 / math.tau], dtype=torch.float64, device=device)


class _RotateHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, pos: Tensor, thetas: Tensor, div: Tensor, tiles: Tiles) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(pos, thetas, div)
        ctx.tiles = tiles
        return _launch(q, k, pos, thetas, div, 1.0, tiles)

    @staticmethod
    def backward(ctx, grad_q: Tensor, grad_k: Tensor):
        pos, thetas, div = ctx.saved_tensors
        return (*_launch(grad_q, grad_k, pos, thetas, div, -1.0, ctx.tiles), None, None, None, None)


def rotate_heads(q: Tensor, k: Tensor, pos: Tensor, thetas: Tensor, div: Tensor,
                 tiles: Tiles = (64, 4, False)) -> tuple[Tensor, Tensor]:
    """q and k (B, H, L, D) at the same positions pos (B, L) (0 for tokens without one), rotated
    by ``pos / div * theta`` (thetas (D/2,), div 0-d): flexpos.rotary's rotation, one kernel.
    ``tiles``: see :data:`Tiles`."""
    if q.shape != k.shape or pos.shape != (q.shape[0], q.shape[2]) or q.shape[-1] % 2:
        raise ValueError(f"expected q, k (B, H, L, D) with even D and pos (B, L), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(pos.shape)}")
    if thetas.shape != (q.shape[-1] // 2,) or div.numel() != 1:
        raise ValueError(f"expected thetas ({q.shape[-1] // 2},) and a one-element div, got "
                         f"{tuple(thetas.shape)} and {tuple(div.shape)}")
    return _RotateHeads.apply(q, k, pos, thetas, div, tiles)
