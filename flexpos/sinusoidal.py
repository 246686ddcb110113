"""Sinusoidal absolute encoding (Vaswani et al. 2017) at arbitrary positions."""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_even
from ._compile import lazy_compile
from ._trig import cos_sin
from .inputs import InputTransform, masked_add


def inverse_frequencies(dim: int) -> Tensor:
    """(dim // 2,) float32: ``10000 ** (-2m / dim)``, the frequencies of sin/cos pairs."""
    return 1 / (10000 ** (torch.arange(0.0, dim, 2) / dim))


@lazy_compile
def _sinusoidal_add(x: Tensor, pos: Tensor, keep: Tensor, inv_freq: Tensor, div: Tensor, dtype: torch.dtype) -> Tensor:
    """x (N, L, dim) + keep (N, L) * enc -> (N, L, dim), enc interleaving ``[sin a0, cos a0, sin
    a1, ...]`` of the angles ``pos (N, L) / div * inv_freq (dim/2,)``, computed in ``dtype``
    (float32, or float64 for float64 x; see :func:`flexpos._trig.cos_sin`)."""
    # Angles in float64: absolute positions near 1e9 would be meaningless in float32.
    cos, sin = cos_sin((pos / div)[..., None] * inv_freq.double(), dtype)
    return masked_add(x, torch.stack((sin, cos), dim=-1).flatten(-2), keep)


class Sinusoidal(InputTransform):
    """Adds ``[sin(p w_m / divide), cos(p w_m / divide)]`` pairs to x (B, *, L, dim).

    Example::

        enc = Sinusoidal(64)
        x = enc(torch.randn(2, 100, 64), pos=torch.rand(2, 100).cumsum(-1) * 1e3)
    """

    inv_freq: Tensor

    def __init__(self, dim: int, divide: float = 1.0, learned_div: bool = False) -> None:
        super().__init__()
        self.dim = check_even("dim", dim)
        self._init_divisor(divide, learned_div)
        self._register_constants()

    def constants(self) -> dict[str, Tensor]:
        return {"inv_freq": inverse_frequencies(self.dim)}

    def encode_add(self, x: Tensor, pos: Tensor, keep: Tensor) -> Tensor:
        # pos cast here: one compiled variant for int and float positions
        work = torch.promote_types(x.dtype, torch.float32)
        return _sinusoidal_add(x, pos.double(), keep, self.inv_freq, self.divisor(torch.float64), work)
