"""``AttentionLayer``: projections + flexpos attention, the entry point for model code."""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, cast

from einops import rearrange
from torch import Tensor, nn

from ._checks import (
    check_both_sides,
    check_bool,
    check_float,
    check_layer_dtype,
    check_module_device,
    check_module_heads,
    check_positions,
    check_positive_int,
    check_rank,
    check_tensor,
    shape_text,
)
from ._gqa import groups_heads
from .attention import Mask, attention
from .backends import Backend, check_backend
from .flex import KernelOptions, check_kernel_options
from .base import Positional


class AttentionLayer(nn.Module):
    """Multi-head self- or cross-attention over x (B, *, L, dim) with positional modules.

    ``positional`` may mix all three stages: input transforms (Sinusoidal, learned) are added
    to the layer's input before projecting (and to ``context`` when ``pos_context`` is given),
    Rotary/XL transform q and k, ALiBi/DPB modify scores. ``n_kv_heads`` (a divisor of
    ``n_heads``; default ``n_heads``) makes it grouped-query attention: each key/value head
    serves ``n_heads // n_kv_heads`` query heads. ``to_kv`` projects to the keys' features,
    then the values', each ``n_kv_heads`` heads of ``dim // n_heads`` in head order.

    Example::

        layer = AttentionLayer(256, 8, positional=[Rotary(32), ALiBi(8)])
        y = layer(x, pos=pos, mask=key_valid)  # x: (B, L, 256), pos: (B, L), key_valid: (B, L)
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        positional: Optional[Sequence[Positional]] = (),
        bias: bool = True,
        backend: Backend = "auto",
        kernel_options: Optional[KernelOptions] = None,
        n_kv_heads: Optional[int] = None,
    ) -> None:
        """``backend`` and ``kernel_options``: as in :func:`flexpos.attention`, for every call."""
        super().__init__()
        dim, n_heads = check_positive_int("dim", dim), check_positive_int("n_heads", n_heads)
        if dim % n_heads:
            raise ValueError(f"dim={dim} must be divisible by n_heads={n_heads}")
        n_kv_heads = n_heads if n_kv_heads is None else check_positive_int("n_kv_heads", n_kv_heads)
        if not groups_heads(n_heads, n_kv_heads):
            raise ValueError(f"n_kv_heads={n_kv_heads} must divide n_heads={n_heads} (grouped-query attention)")
        if isinstance(positional, nn.Module) and not isinstance(positional, nn.ModuleList):
            raise TypeError(f"positional must be a sequence of modules, got a single {type(positional).__name__}")
        if positional is not None and not isinstance(positional, Iterable):
            raise TypeError(f"positional must be a sequence of modules, got {type(positional).__name__}")
        positional = [] if positional is None else list(positional)  # a generator is read once
        for m in positional:
            _check_fits(m, dim, n_heads)
        check_backend(backend)
        self.dim = dim
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        bias = check_bool("bias", bias)
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_kv = nn.Linear(dim, 2 * n_kv_heads * (dim // n_heads), bias=bias)
        self.to_out = nn.Linear(dim, dim, bias=bias)
        self.positional = nn.ModuleList(positional)
        self.backend = backend
        self.kernel_options = check_kernel_options(kernel_options)

    def _stages(self) -> tuple[list[Positional], list[Positional]]:
        """The input transforms, and the modules that :func:`flexpos.attention` runs (q/k
        transforms and score_mods), each in the given order."""
        modules = cast(Sequence[Positional], self.positional)  # checked by __init__
        return [m for m in modules if m.transforms_input], [m for m in modules if not m.transforms_input]

    def extra_repr(self) -> str:
        options = f", kernel_options={self.kernel_options}" if self.kernel_options else ""
        grouped = f", n_kv_heads={self.n_kv_heads}" if self.n_kv_heads != self.n_heads else ""
        return f"dim={self.dim}, n_heads={self.n_heads}{grouped}, backend={self.backend!r}{options}"

    def forward(
        self,
        x: Tensor,
        context: Optional[Tensor] = None,
        *,
        pos: Optional[Tensor] = None,
        pos_context: Optional[Tensor] = None,
        mask: Mask = None,
        causal: bool = False,
    ) -> Tensor:
        """x (B, *, L, dim), context (B, *, Lc, dim) or None -> (B, *, L, dim).

        ``pos`` (B, *, L') positions of x; ``pos_context`` (B, *, Lc') of the context. With
        Rotary, XL, ALiBi or DPB give both or neither (neither: ``0 .. L-1`` and ``0 .. Lc-1``;
        a (B, *, 0) tensor: a side without positions); input transforms alone leave a context
        without ``pos_context`` as it is. ``mask``
        as in :func:`flexpos.attention` (bool (B, *, Lk), (B, *, L, Lk), (B, *, H, L, Lk), 1 for
        all batch dims or for H shared, or a BlockMask), True = attend.
        """
        encoders, others = self._stages()
        self._check_call(x, context, pos, pos_context, others)
        x = _encode(encoders, x, pos)
        cross = context is not None
        if context is not None and pos_context is not None:
            context = _encode(encoders, context, pos_context)
        q = rearrange(self.to_q(x), "... l (h d) -> ... h l d", h=self.n_heads)
        kv = self.to_kv(context if cross else x)
        k, v = rearrange(kv, "... l (two h d) -> two ... h l d", two=2, h=self.n_kv_heads)
        out = attention(
            q, k, v, *others,
            pos=None if cross else pos, pos_q=pos if cross else None, pos_k=pos_context,
            mask=mask, causal=causal, backend=self.backend, kernel_options=self.kernel_options,
        )  # fmt: skip
        return self.to_out(rearrange(out, "... h l d -> ... l (h d)"))

    def _check_call(
        self,
        x: Tensor,
        context: Optional[Tensor],
        pos: Optional[Tensor],
        pos_context: Optional[Tensor],
        readers: Sequence[Positional],
    ) -> None:
        """Inputs and positions, named as the caller named them (not as attention's pos_q/pos_k);
        ``readers``: the modules attention runs, which read both sides' positions."""
        batch = tuple(self._check_input("x", x).shape[:-2])
        if pos is not None:
            # In self-attention the transforms and attention read the values under this name:
            # reading them here too would be one more read back (a sync on GPUs).
            check_positions("pos", pos, batch, x.shape[-2], x.device, values=context is not None)
        if context is None:
            if pos_context is not None:
                raise ValueError("pos_context is for cross-attention: pass context too")
            return
        if isinstance(context, Tensor) and context.ndim == x.ndim - 1 and _looks_like_positions(context, self.dim):
            raise ValueError(
                f"context must have shape (B, *, Lc, dim), got {tuple(context.shape)}: positions are "
                "keyword-only, pass them as pos=..."
            )
        length = self._check_input("context", context, batch=batch).shape[-2]
        if pos_context is not None:
            check_positions("pos_context", pos_context, batch, length, x.device)
        check_both_sides(readers, pos=pos, pos_context=pos_context)

    def _check_input(self, name: str, t: object, batch: Optional[tuple[int, ...]] = None) -> Tensor:
        """``t`` must be a float (B, *, L, dim) tensor, with batch dims ``batch`` if given, and
        of the layer's dtype (unless autocast casts it)."""
        t = check_tensor(name, t)
        check_rank(name, t, 3, "(B, *, L, dim)")
        check_float(name, t)
        check_module_device(self, t.device)
        check_layer_dtype(name, t, self.to_q.weight)
        batch = tuple(t.shape[:-2]) if batch is None else batch
        if t.shape[-1] != self.dim or tuple(t.shape[:-2]) != batch:
            raise ValueError(f"{name} must have shape {shape_text(*batch, 'L', self.dim)}, got {tuple(t.shape)}")
        return t


def _looks_like_positions(t: Tensor, dim: int) -> bool:
    """A tensor one dim short of x, taken for positions passed as context: integers, or floats
    whose last dim is not the layer's ``dim``."""
    return not t.is_floating_point() or t.shape[-1] != dim


def _check_fits(module: object, dim: int, n_heads: int) -> None:
    """A positional module of a layer with ``dim`` features in ``n_heads`` heads: its own
    ``dim`` (input transforms, XL), heads and head dim, where it has them."""
    if not isinstance(module, Positional):
        raise TypeError(f"positional must hold flexpos positional modules, got {type(module).__name__}")
    own = getattr(module, "dim", dim)
    if own != dim:
        raise ValueError(f"{type(module).__name__} was built for dim={own} but the layer has dim={dim}")
    if not module.transforms_input:
        check_module_heads(module, n_heads, dim // n_heads, "the layer has")


def _encode(encoders: Sequence[nn.Module], x: Tensor, pos: Optional[Tensor]) -> Tensor:
    """Apply the input transforms in order: x (B, *, L, dim) -> (B, *, L, dim)."""
    for m in encoders:
        x = m(x, pos=pos)
    return x
