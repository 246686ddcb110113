"""Rotary position embedding (RoFormer) at arbitrary positions, as a query/key transform."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ._checks import check_even, check_float, check_rank, check_tensor
from ._compile import lazy_compile
from .base import QK, Positional
from .positions import Positions


def rotary_frequencies(head_dim: int, n_dims: Optional[int]) -> Tensor:
    """(head_dim // 2,) float32 rotation frequencies; pairs past ``n_dims`` get 0 (no rotation)."""
    thetas = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    if n_dims is not None:
        thetas[check_even("n_dims", n_dims) // 2 :] = 0
    return thetas


def _three_part_tau() -> tuple[float, float, float]:
    """2*pi as c1 + c2 + c3, c1 and c2 of 21 significant bits: for whole turns n < 2^32,
    ``n * c1`` and ``n * c2`` are exact in float64 (Cody-Waite reduction)."""
    tail = 2.4492935982947064e-16  # 2*pi minus its float64 value
    c1 = math.ldexp(round(math.ldexp(math.tau, 18)), -18)
    rest = math.tau - c1
    exponent = math.frexp(rest)[1]
    c2 = math.ldexp(round(math.ldexp(rest, 21 - exponent)), exponent - 21)
    return c1, c2, (rest - c2) + tail


_TAU = _three_part_tau()


def rotary_angles(pos: Tensor, keep: Tensor, thetas: Tensor, div: Tensor) -> Tensor:
    """(N, 1, L, D/2) float64 angles ``pos / div * theta``; pos (N, L), keep (L,): tokens
    without a position get angle 0 (identity), thetas (D/2,)."""
    return (pos.double() / div)[:, None, :, None] * thetas.double() * keep[:, None]


def cos_sin(angles: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin of float64 ``angles`` in ``dtype`` (float32 or float64).

    For float32 each angle is reduced to [-pi, pi] in float64 (exactly, for angles below
    2.7e10) and evaluated in float32, with a first-order correction for the reduced angle's
    rounding: within an ulp of float64 trig rounded to float32, at float32 cost (the fused GPU
    kernels evaluate it for every head).
    """
    if dtype == torch.float64:
        return angles.cos(), angles.sin()
    turns = torch.round(angles / math.tau)
    reduced = ((angles - turns * _TAU[0]) - turns * _TAU[1]) - turns * _TAU[2]
    near = reduced.to(dtype)
    rest = (reduced - near.double()).to(dtype)
    cos, sin = near.cos(), near.sin()
    return cos - sin * rest, sin + cos * rest


def cos_sin_table(pos: Tensor, keep: Tensor, thetas: Tensor, div: Tensor, dtype: torch.dtype) -> Tensor:
    """(N, 1, L, D/2, 2) cos and sin, in ``dtype``, of :func:`rotary_angles`."""
    return torch.stack(cos_sin(rotary_angles(pos, keep, thetas, div), dtype), -1)


rotation = lazy_compile(cos_sin_table)


def rotate_complex(x: Tensor, cos_sin: Tensor) -> Tensor:
    """x (N, H, L, D) with pairs ``(x_2m, x_2m+1)`` multiplied, as complex numbers, by
    ``cos + i sin`` (N, 1, L, D/2, 2): ATen's vectorised complex product."""
    pairs = torch.view_as_complex(x.to(cos_sin.dtype).contiguous().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * torch.view_as_complex(cos_sin)).flatten(-2).to(x.dtype)


def rotate_real(x: Tensor, cos_sin: Tensor) -> Tensor:
    """Same as :func:`rotate_complex` in real arithmetic, which compiles to one fused kernel."""
    return _rotate_pairs(x, *cos_sin.unbind(-1))


def _rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x0, x1 = x.to(cos.dtype).unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), -1).flatten(-2).to(x.dtype)


def rotate_at(x: Tensor, pos: Tensor, keep: Tensor, thetas: Tensor, div: Tensor) -> Tensor:
    """x (N, H, L, D) rotated by :func:`rotary_angles` (pos (N, L)); compiled, one kernel
    that forms each angle where it is used: no table in memory."""
    return _rotate_pairs(x, *cos_sin(rotary_angles(pos, keep, thetas, div), _work_dtype(x)))


def rotate_pair_at(q: Tensor, k: Tensor, pos: Tensor, keep: Tensor, thetas: Tensor, div: Tensor) -> tuple[Tensor, Tensor]:
    """q and k (N, H, L, D) at the same positions, in one kernel (each angle formed once for
    both). A table of float32 cos and sin, read again for every head, moved as many bytes as
    q and k themselves at L=131072, where it no longer stays in cache."""
    cos, sin = cos_sin(rotary_angles(pos, keep, thetas, div), _work_dtype(q))
    return _rotate_pairs(q, cos, sin), _rotate_pairs(k, cos, sin)


def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


# Sizes static until a second shape shows up: on an H200, q and k of (4, 16, 131072, 64) bf16,
# a rotation kernel compiled with symbolic sizes moved 477 GB/s, with static sizes 1695 GB/s
# (benchmarks/results/gpu-2026-11-27-b.txt). With symbolic sizes each element finds its
# sequence and position by integer division by those sizes.
_rotate_at = lazy_compile(rotate_at, dynamic=None)
_rotate_pair_at = lazy_compile(rotate_pair_at, dynamic=None)


def _eager_cpu(x: Tensor) -> bool:
    # Inductor's CPU code for interleaved pairs is scalar, while ATen's complex product is one
    # vectorised kernel already (compiling it gains nothing): on CPU one table per call, then
    # the complex product. On GPUs (and inside a caller's torch.compile, as Inductor has no
    # code for complex operators) the real form, with the angles formed in the same kernel.
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


class Rotary(Positional):
    """Rotates query/key pairs ``(x_2m, x_2m+1)`` by angle ``p * theta_m / divide``.

    ``n_dims`` limits rotation to the first ``n_dims`` features of each head. Angles are formed
    in float64 from absolute positions (in :func:`flexpos.attention`, from positions minus a
    per-sequence offset when every token has one: same scores). Tokens without a position are
    left unrotated.

    Example::

        rot = Rotary(head_dim=64)
        q, k = rot(q, k, pos=pos)  # q, k: (B, H, L, 64), pos: (B, L)
    """

    transforms_qk = True
    takes_dot_only = True
    _repr_fields = ("head_dim", "n_dims")
    thetas: Tensor

    def __init__(
        self, head_dim: int, n_dims: Optional[int] = None, divide: float = 1.0, learned_div: bool = False
    ) -> None:
        super().__init__()
        self.head_dim = check_even("head_dim", head_dim)
        if n_dims is not None and check_even("n_dims", n_dims) > head_dim:
            raise ValueError(f"n_dims must be <= head_dim={head_dim}, got {n_dims}")
        self.n_dims = n_dims
        self._init_divisor(divide, learned_div)
        self._register_constants()

    def constants(self) -> dict[str, Tensor]:
        return {"thetas": rotary_frequencies(self.head_dim, self.n_dims)}

    def _angle_inputs(self, positions: Positions, side: str, centred: bool) -> tuple[Tensor, ...]:
        """(pos, keep, thetas, div) of :func:`rotary_angles` for ``side``'s positions."""
        pos = positions.absolute(side, centred)
        return pos, positions.has_position(side), self.thetas, self.divisor(torch.float64)

    def _check_dim(self, name: str, x: Tensor) -> None:
        if x.shape[-1] != self.head_dim:
            raise ValueError(
                f"{name} must have head dim {self.head_dim} (Rotary(head_dim={self.head_dim})), "
                f"got shape {tuple(x.shape)}"
            )

    def rotate(self, x: Tensor, positions: Positions, side: str, centred: bool = False) -> Tensor:
        """x (B, H, L, head_dim) with ``side``'s positions ('q' or 'k') -> rotated x; ``centred``:
        by positions minus the per-sequence offset (see :meth:`transform_qk`)."""
        self._check_dim(side, x)
        inputs = self._angle_inputs(positions, side, centred)
        if _eager_cpu(x):
            return rotate_complex(x, rotation(*inputs, _work_dtype(x)))
        return _rotate_at(x, *inputs)

    def rotate_qk(self, q: Tensor, k: Tensor, positions: Positions, centred: bool = False) -> QK:
        """q (B, H, Lq, head_dim) and k (B, H, Lk, head_dim) rotated, see :meth:`rotate`."""
        if positions.q is positions.k and q.shape[-2] == k.shape[-2]:  # self-attention: share angles
            self._check_dim("q", q)
            self._check_dim("k", k)
            inputs = self._angle_inputs(positions, "q", centred)
            if _eager_cpu(q):
                cos_sin = rotation(*inputs, _work_dtype(q))
                return QK(rotate_complex(q, cos_sin), rotate_complex(k, cos_sin))
            return QK(*_rotate_pair_at(q, k, *inputs))
        return QK(self.rotate(q, positions, "q", centred), self.rotate(k, positions, "k", centred))

    def transform_qk(self, q: Tensor, k: Tensor, positions: Positions, *, dot_only: bool = False) -> QK:
        """Inside attention. When q and k meet only in their dot product (``dot_only``) and every
        token has a position, the scores depend on ``p_q - p_k`` only, so angles are counted
        from the per-sequence offset: at positions near 1e9 the absolute angles' gradients with
        respect to a learned divisor cancel in float32 (up to 37% off, measured). Otherwise
        (a later transform such as XL reads the rotated q; tokens without a position score
        against the others by absolute angle) angles stay absolute, as in :meth:`forward`."""
        centred = dot_only and positions.off_q == 0 and positions.off_k == 0
        return self.rotate_qk(q, k, positions, centred=centred)

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        pos: Optional[Tensor] = None,
        pos_q: Optional[Tensor] = None,
        pos_k: Optional[Tensor] = None,
    ) -> tuple[Tensor, Tensor]:
        """Rotate q (B, *, H, Lq, D) and k (B, *, H, Lk, D); pos (B, *, L') or pos_q/pos_k."""
        for name, t in (("q", q), ("k", k)):
            check_tensor(name, t)
            check_rank(name, t, 4, "(B, *, H, L, D)")
            check_float(name, t)
        if k.shape[:-2] != q.shape[:-2]:
            raise ValueError(
                f"k must have shape (*{tuple(q.shape[:-2])}, Lk, D) like q {tuple(q.shape)}, got {tuple(k.shape)}"
            )
        batch = tuple(q.shape[:-3])
        positions = Positions.resolve(batch, q.shape[-2], k.shape[-2], q.device, pos, pos_q, pos_k)
        flat_q, flat_k = q.flatten(0, -4), k.flatten(0, -4)
        out = self.rotate_qk(flat_q, flat_k, positions)
        return out.q.reshape(q.shape), out.k.reshape(k.shape)
