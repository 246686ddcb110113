"""Rotary position embedding (RoFormer) at arbitrary positions, as a query/key transform."""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from ._checks import (
    check_both_sides,
    check_even,
    check_float,
    check_module_device,
    check_rank,
    check_tensor,
    shape_text,
)
from ._compile import compile_enabled, lazy_compile
from ._host import capturing_cuda_graph, forward_ad_active, functorch_active, tracing
from ._trig import cos_sin
from .base import QK, Positional
from .positions import IN_QK, Positions


def rotary_frequencies(head_dim: int, n_dims: Optional[int]) -> Tensor:
    """(head_dim // 2,) float32 rotation frequencies; pairs past ``n_dims`` get 0 (no rotation)."""
    thetas = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    if n_dims is not None:
        thetas[check_even("n_dims", n_dims) // 2 :] = 0
    return thetas


@lazy_compile
def rotation(pos: Tensor, keep: Tensor, thetas: Tensor, div: Tensor, dtype: torch.dtype) -> Tensor:
    """(N, 1, L, D/2, 2) cos and sin, in ``dtype`` (float32 or float64), of the angles
    ``pos / div * theta`` formed in float64 (one compiled kernel; see :func:`flexpos._trig.cos_sin`).

    pos (N, L); keep (L,): tokens without a position get angle 0 (identity).
    """
    angles = (pos.double() / div)[:, None, :, None] * thetas.double() * keep[:, None]
    return torch.stack(cos_sin(angles, dtype), -1)


def rotate_complex(x: Tensor, cos_sin: Tensor) -> Tensor:
    """x (N, H, L, D) with pairs ``(x_2m, x_2m+1)`` multiplied, as complex numbers, by
    ``cos + i sin`` (N, 1, L, D/2, 2): ATen's vectorised complex product."""
    pairs = torch.view_as_complex(x.to(cos_sin.dtype).contiguous().unflatten(-1, (-1, 2)))
    # Strides recomputed from the shape: torch 2.6's view_as_complex rejects the odd stride its
    # Inductor may give the table's size-1 head dim.
    table = torch.view_as_complex(cos_sin.reshape(-1).view(cos_sin.shape))
    return torch.view_as_real(pairs * table).flatten(-2).to(x.dtype)


def rotate_real(x: Tensor, cos_sin: Tensor) -> Tensor:
    """Same as :func:`rotate_complex` in real arithmetic, which compiles to one fused kernel."""
    cos, sin = cos_sin.unbind(-1)
    x0, x1 = x.to(cos_sin.dtype).unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), -1).flatten(-2).to(x.dtype)


def rotate_real_pair(q: Tensor, k: Tensor, cos_sin: Tensor) -> tuple[Tensor, Tensor]:
    """q (N, H, L, D) and k (N, Hkv, L, D) rotated by one table: compiled, one kernel that reads each table
    entry once for both (the table is re-read for every head: at L=131072 a sequence's
    float32 table is 33.5 MB and does not stay in cache, so the table adds half as many bytes
    again as q and k)."""
    return rotate_real(q, cos_sin), rotate_real(k, cos_sin)


# Sizes static until a second shape shows up: on an H200, q and k of (4, 16, 131072, 64) bf16,
# the kernel compiled with symbolic sizes moved 477 GB/s, with static sizes 1695 GB/s
# (benchmarks/results/gpu-2026-11-27-b.txt). With symbolic sizes each element finds its
# sequence and position by integer division by those sizes. Forming the angles in the
# rotation kernel instead of reading a table took 2.5x longer there (float64 work for every
# head; gpu-2026-11-27-d.txt).
_rotate_real = lazy_compile(rotate_real, dynamic=None)
_rotate_real_pair = lazy_compile(rotate_real_pair, dynamic=None)


def _eager_cpu(x: Tensor) -> bool:
    # Inductor's CPU code for interleaved pairs is scalar, while ATen's complex product is one
    # vectorised kernel already (compiling it gains nothing); on GPUs the compiled real form
    # fuses into one kernel with no float32 round trip. Inside a caller's torch.compile the
    # real form, which Inductor generates code for (it has none for complex operators).
    return x.device.type == "cpu" and not tracing()


def _rotate(x: Tensor, cos_sin: Tensor) -> Tensor:
    return rotate_complex(x, cos_sin) if _eager_cpu(x) else _rotate_real(x, cos_sin)


def _rotate_both(q: Tensor, k: Tensor, cos_sin: Tensor) -> tuple[Tensor, Tensor]:
    if _eager_cpu(q):
        return rotate_complex(q, cos_sin), rotate_complex(k, cos_sin)
    return _rotate_real_pair(q, k, cos_sin)


@functools.cache
def _triton_kernel() -> Optional[ModuleType]:
    """:mod:`flexpos.rotary_triton` where Triton imports, else None."""
    try:
        from . import rotary_triton
    except ImportError:
        return None
    return rotary_triton


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _kernel_for(x: Tensor, pos: Tensor, div: Tensor) -> Optional[ModuleType]:
    """The Triton rotation kernel (:mod:`flexpos.rotary_triton`) where it takes this call, else
    None: eager calls on CUDA with compiling on (:func:`flexpos.set_compile`), x in float32 or
    half precision, neither positions nor divisor needing a gradient, no torch.func transform
    or forward-mode AD, and not the first call on this GPU inside a CUDA graph capture (its
    constants are copied in once). Elsewhere the compiled table and rotation, which a caller's
    torch.compile traces like any other code."""
    if tracing() or not (x.is_cuda and x.dtype in _KERNEL_DTYPES and x.numel() and compile_enabled()):
        return None
    if functorch_active() or forward_ad_active():
        return None
    if torch.is_grad_enabled() and (pos.requires_grad or div.requires_grad):
        return None
    kernel = _triton_kernel()
    if kernel is None or (capturing_cuda_graph() and not kernel.has_constants(x.device)):
        return None
    return kernel


class Rotary(Positional):
    """Rotates query/key pairs ``(x_2m, x_2m+1)`` by angle ``p * theta_m / divide``.

    ``n_dims`` limits rotation to the first ``n_dims`` features of each head. Angles are formed
    in float64 from absolute positions (in :func:`flexpos.attention`, from positions minus a
    per-sequence offset when every token has one and Rotary is the last q/k transform: same
    scores). Tokens without a position are
    left unrotated. Angles of 2**53 radians or more, where float64 keeps no phase, rotate by 0
    in float32 and half-precision models (see :func:`flexpos._trig.cos_sin`).

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
        n_dims = None if n_dims is None else check_even("n_dims", n_dims)
        if n_dims is not None and n_dims > head_dim:
            raise ValueError(f"n_dims must be <= head_dim={head_dim}, got {n_dims}")
        self.n_dims = n_dims
        self._init_divisor(divide, learned_div)
        self._register_constants()

    def constants(self) -> dict[str, Tensor]:
        return {"thetas": rotary_frequencies(self.head_dim, self.n_dims)}

    def _rotated(self, positions: Positions, side: str, centred: bool, div: Tensor, *xs: Tensor) -> tuple[Tensor, ...]:
        """xs (one tensor, or q and k sharing ``side``'s positions), each (N, H, L, head_dim),
        rotated by the angles of ``side``'s positions ('q' or 'k'); see :func:`rotation`."""
        pos = positions.absolute(side, centred)
        kernel = _kernel_for(xs[0], pos, div)
        if kernel is not None:
            return kernel.rotate(pos, self.thetas.float(), div, *xs)
        work = torch.promote_types(xs[0].dtype, torch.float32)
        cos_sin = rotation(pos, positions.has_position(side), self.thetas, div, work)
        return (_rotate(xs[0], cos_sin),) if len(xs) == 1 else _rotate_both(xs[0], xs[1], cos_sin)

    def _check_dim(self, name: str, x: Tensor) -> None:
        if x.shape[-1] != self.head_dim:
            raise ValueError(
                f"{name} must have head dim {self.head_dim} (Rotary(head_dim={self.head_dim})), "
                f"got shape {tuple(x.shape)}"
            )

    def rotate(
        self, x: Tensor, positions: Positions, side: str, centred: bool = False, div: Optional[Tensor] = None
    ) -> Tensor:
        """x (B, H, L, head_dim) with ``side``'s positions ('q' or 'k') -> rotated x; ``centred``:
        by positions minus the per-sequence offset (see :meth:`transform_qk`). ``div``: the
        float64 divisor, where a caller shares one between q and k (see :meth:`rotate_qk`)."""
        self._check_dim(side, x)
        return self._rotated(positions, side, centred, self.divisor(torch.float64) if div is None else div, x)[0]

    def rotate_qk(self, q: Tensor, k: Tensor, positions: Positions, centred: bool = False) -> QK:
        """q (B, H, Lq, head_dim) and k (B, Hkv, Lk, head_dim) rotated, see :meth:`rotate`."""
        if positions.q is positions.k and q.shape[-2] == k.shape[-2]:  # self-attention: share angles
            self._check_dim("q", q)
            self._check_dim("k", k)
            return QK(*self._rotated(positions, "q", centred, self.divisor(torch.float64), q, k))
        # One divisor for both sides: a learned float16 one would otherwise get two float16
        # partial gradients, which overflow or round before they cancel.
        div = self.divisor(torch.float64)
        return QK(self.rotate(q, positions, "q", centred, div), self.rotate(k, positions, "k", centred, div))

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
        """Rotate q (B, *, H, Lq, D) and k (B, *, Hkv, Lk, D) (any head counts: the angles
        depend on positions only); pos (B, *, L') or pos_q and pos_k."""
        for name, t in (("q", q), ("k", k)):
            check_tensor(name, t)
            check_rank(name, t, 4, "(B, *, H, L, D)")
            check_float(name, t)
        if k.shape[:-3] != q.shape[:-3]:
            raise ValueError(
                f"k must have shape {shape_text(*q.shape[:-3], 'Hkv', 'Lk', 'D')} like q {tuple(q.shape)}, got {tuple(k.shape)}"
            )
        if k.dtype != q.dtype:
            raise TypeError(f"q and k must share one dtype, got {q.dtype}/{k.dtype}")
        if k.device != q.device:
            raise ValueError(f"q and k must be on one device, got {q.device}/{k.device}")
        check_module_device(self, q.device)
        batch = tuple(q.shape[:-3])
        positions = Positions.resolve(batch, q.shape[-2], k.shape[-2], q.device, pos, pos_q, pos_k, tokens=IN_QK)
        check_both_sides([self], pos_q=pos_q, pos_k=pos_k)
        flat_q, flat_k = q.flatten(0, -4), k.flatten(0, -4)
        out = self.rotate_qk(flat_q, flat_k, positions)
        return out.q.reshape(q.shape), out.k.reshape(k.shape)
