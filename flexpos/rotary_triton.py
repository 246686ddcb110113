"""Rotary's rotation on CUDA as one Triton kernel that forms the angles itself.

Each program takes a tile of positions of one sequence, forms the tile's cos and sin once (as
:func:`flexpos._trig.cos_sin`: float64 angles reduced to [-pi, pi], float32 trig with a
first-order correction for the reduction's rounding) and rotates that tile of q and k for every
head. q and k are read and written once and no cos/sin table goes through memory: on an H200,
q and k of (4, 16, 131072, 64) bf16 moved 3.8 TB/s (79% of peak) against 2.1 TB/s for the
compiled table + rotation (benchmarks/results/gpu-2026-11-29.txt).

Backward is the rotation by minus the angle. Positions and the divisor get no gradient here:
:mod:`flexpos.rotary` keeps its compiled path where they need one. Needs Triton (installed with
CUDA builds of torch); runs on CPU only under Triton's interpreter (``TRITON_INTERPRET=1``), as
the tests do.

Shape legend: N batch (all leading dims flattened), H query heads, Hkv key heads, L length,
D head dim.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._trig import TAU_PARTS


@triton.jit  # type: ignore[misc]
def _rotate_kernel(  # type: ignore[no-untyped-def]  # Triton's argument types
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, theta_ptr, div_ptr, consts_ptr,
    length, tiles, spb, spl, sqb, sqh, sql, skb, skh, skl, sign,
    Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # q (N, Q_HEADS, L, 2*HALF), k (N, K_HEADS, L, 2*HALF), unit stride in the last dim; outputs
    # contiguous; pos (N or 1, L) float64 (strides spb, spl); consts: 2*pi in three parts, 2*pi
    # and 1/(2*pi), float64. Offsets in int64 throughout. A one-dimensional grid of N * tiles
    # programs: a grid's second dimension would stop at 65535 sequences.
    program = tl.program_id(0).to(tl.int64)
    tile, b = program % tiles, program // tiles
    rows = (tile * BLOCK_L + tl.arange(0, BLOCK_L)).to(tl.int64)
    pairs = tl.arange(0, BLOCK_M)
    row_ok = rows < length

    p = tl.load(pos_ptr + b * spb + rows * spl, mask=row_ok, other=0.0) / tl.load(div_ptr)
    theta = tl.load(theta_ptr + pairs, mask=pairs < HALF, other=0.0).to(tl.float64)
    angle = p[:, None] * theta[None, :]  # (BLOCK_L, BLOCK_M) float64
    turns = tl.floor(angle * tl.load(consts_ptr + 4) + 0.5)
    exact = angle - turns * tl.load(consts_ptr)
    exact = (exact - turns * tl.load(consts_ptr + 1)) - turns * tl.load(consts_ptr + 2)
    # past 2**32 turns in one step with float64's 2*pi; past 2**53 radians no phase: angle 0
    wide = tl.where(tl.abs(angle) < 2.0**53, angle - turns * tl.load(consts_ptr + 3), 0.0)
    reduced = tl.where(tl.abs(turns) < 2.0**32, exact, wide)
    near = reduced.to(tl.float32)
    rest = (reduced - near.to(tl.float64)).to(tl.float32)
    c, s = tl.cos(near), tl.sin(near)
    cos = c - s * rest
    sin = (s + c * rest) * sign

    for head in range(Q_HEADS):
        h = tl.cast(head, tl.int64)
        _rotate_rows(q_ptr + b * sqb + h * sqh, sql, q_out_ptr + (b * Q_HEADS + h) * length * (2 * HALF),
                     rows, row_ok, cos, sin, HALF, BLOCK_L, BLOCK_M)
    for head in range(K_HEADS):
        h = tl.cast(head, tl.int64)
        _rotate_rows(k_ptr + b * skb + h * skh, skl, k_out_ptr + (b * K_HEADS + h) * length * (2 * HALF),
                     rows, row_ok, cos, sin, HALF, BLOCK_L, BLOCK_M)


@triton.jit  # type: ignore[misc]
def _rotate_rows(x_ptr, stride_l, out_ptr, rows, row_ok, cos, sin,  # type: ignore[no-untyped-def]
                 HALF: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr):
    # Whole rows loaded and stored contiguously, the pairs split and joined in registers: two
    # strided accesses, one per element of a pair, ran 15x slower on an H200.
    cols = tl.arange(0, 2 * BLOCK_M)
    ok = row_ok[:, None] & (cols < 2 * HALF)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_l + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    x0, x1 = tl.split(tl.reshape(x, (BLOCK_L, BLOCK_M, 2)))
    y = tl.reshape(tl.join(x0 * cos - x1 * sin, x1 * cos + x0 * sin), (BLOCK_L, 2 * BLOCK_M))
    tl.store(out_ptr + rows[:, None] * (2 * HALF) + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)


def block_rows(head_dim: int) -> int:
    """Positions per program: 32 at D=64 (level with 64 on an H200; 16 was 6% faster in one
    run, gpu-2026-11-29-c.txt), fewer for wide heads so that a tile stays at 4096 elements."""
    return max(1, min(32, 4096 // triton.next_power_of_2(head_dim)))


def _launch(pos: Tensor, thetas: Tensor, div: Tensor, sign: float, q: Tensor, k: Tensor | None,
            rows: int | None) -> tuple[Tensor, ...]:
    """Rotated copies of q (and k), contiguous, in their dtype."""
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = None if k is None else (k if k.stride(-1) == 1 else k.contiguous())
    batch, q_heads, length, dim = q.shape
    q_out = torch.empty_like(q, memory_format=torch.contiguous_format)
    k_out = q_out if k is None else torch.empty_like(k, memory_format=torch.contiguous_format)
    other = q if k is None else k
    block = rows or block_rows(dim)
    tiles = triton.cdiv(length, block)
    if tiles * batch == 0:
        return (q_out,) if k is None else (q_out, k_out)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _rotate_kernel[(tiles * batch,)](
            q, other, q_out, k_out, pos, thetas, div.reshape(1), _constants(q.device),
            length, tiles, pos.stride(0) if pos.shape[0] > 1 else 0, pos.stride(1),
            q.stride(0), q.stride(1), q.stride(2), other.stride(0), other.stride(1), other.stride(2), sign,
            Q_HEADS=q_heads, K_HEADS=0 if k is None else k.shape[1], HALF=dim // 2,
            BLOCK_L=block, BLOCK_M=triton.next_power_of_2(dim // 2), num_warps=4,
        )
    return (q_out,) if k is None else (q_out, k_out)


_CONSTANTS: dict[torch.device, Tensor] = {}


def _constants(device: torch.device) -> Tensor:
    # Made once per device: copying a host tensor in per call would wait for queued GPU work.
    if device not in _CONSTANTS:
        _CONSTANTS[device] = torch.tensor([*TAU_PARTS, math.tau, 1 / math.tau], dtype=torch.float64, device=device)
    return _CONSTANTS[device]


def has_constants(device: torch.device) -> bool:
    """Whether the kernel's constants are on ``device`` already (a CUDA graph capture cannot
    copy them in)."""
    return device in _CONSTANTS


class _Rotate(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, pos: Tensor, thetas: Tensor, div: Tensor, sign: float, rows: int | None,  # type: ignore[override]
                q: Tensor, k: Tensor | None) -> tuple[Tensor, ...]:
        ctx.save_for_backward(pos, thetas, div)
        ctx.sign, ctx.rows, ctx.pair = sign, rows, k is not None
        return _launch(pos, thetas, div, sign, q, k, rows)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        # The transpose of a rotation is the rotation back; applied as this Function again, so
        # that double backward works too.
        pos, thetas, div = ctx.saved_tensors
        back = _Rotate.apply(pos, thetas, div, -ctx.sign, ctx.rows, *grads[: 2 if ctx.pair else 1],
                             *(() if ctx.pair else (None,)))
        return (None, None, None, None, None, *back, *(() if ctx.pair else (None,)))


def rotate(pos: Tensor, thetas: Tensor, div: Tensor, q: Tensor, k: Tensor | None = None,
           rows: int | None = None) -> tuple[Tensor, ...]:
    """q (N, H, L, D) (and k (N, Hkv, L, D), at the same positions) rotated by the angles
    ``pos / div * thetas``: (q,) or (q, k), contiguous, in their dtype, computed in float32.

    pos (N or 1, L) float64 (0 for tokens without a position: identity); thetas (D/2,) float32;
    div a 0-d float64 tensor. ``rows``: positions per program (default :func:`block_rows`).
    No gradient reaches pos, thetas or div.
    """
    batch, _, length, dim = q.shape
    if dim % 2 or (k is not None and (k.shape[0] != batch or k.shape[2:] != q.shape[2:])):
        raise ValueError(f"expected q (N, H, L, D) with even D and k (N, Hkv, L, D), got {tuple(q.shape)}"
                         f" and {None if k is None else tuple(k.shape)}")
    if pos.dtype != torch.float64 or pos.dim() != 2 or pos.shape[0] not in (1, batch) or pos.shape[1] != length:
        raise ValueError(f"expected float64 pos ({batch} or 1, {length}), got {pos.dtype} {tuple(pos.shape)}")
    if thetas.shape != (dim // 2,) or thetas.dtype != torch.float32 or div.numel() != 1 or div.dtype != torch.float64:
        raise ValueError(f"expected float32 thetas ({dim // 2},) and a one-element float64 div, got "
                         f"{thetas.dtype} {tuple(thetas.shape)} and {div.dtype} {tuple(div.shape)}")
    return _Rotate.apply(pos, thetas.contiguous(), div, 1.0, rows, q, k)
