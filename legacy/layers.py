"""bio-attention's ``AttnLayer`` and ``TransformerLayer`` on FlexAttention.

Same constructor and call signatures, same submodule names (an original layer's state_dict
loads with ``strict=True``, except an ``AttnLayer`` whose plugins came as a plain list, which
bio-attention leaves unregistered), same outputs for the same weights: plugins from
:mod:`legacy.positional` run inside :func:`flexpos.attention` as query/key transforms and
score_mods, masks become BlockMasks, and no (L, L) tensor is built unless the caller passes
one. On CPU flexpos runs its chunked backend (SDPA per query chunk), on CUDA FlexAttention.

Behaviour that differs from bio-attention 0.1.15 on purpose (docs/legacy.md): ``causal`` with
a mask (or with an ALiBi/DPB/XL plugin) keeps the diagonal; a (B, *, L') key mask shorter than
x keeps its padded keys masked for the CLS queries too; a query with nothing to attend to
returns zeros whatever the kernel; attention dropout is not applied; integer masks are
refused.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

import flexpos
from flexpos._checks import check_device, check_float, check_layer_dtype, check_positive_int, check_tensor
from flexpos.backends import Backend, check_backend
from flexpos.base import Positional

from ._hint import hint_once
from ._layout import expand_batch
from ._masks import AdditiveMask, LayerMask, dense_layer_mask, layer_mask
from .positional import Base

Plugins = Union[Base, Sequence[Base], nn.ModuleList, None]
_dropout_warned = False


class Residual(nn.Module):
    """``fn(x) + x`` (bio-attention's module name ``fn`` kept for checkpoints)."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x) + x


class GLU(nn.Module):
    """Gated linear unit: (..., dim) -> (..., ff_dim), ``a * act(gate)`` from one projection."""

    def __init__(self, dim: int, ff_dim: int, activation: nn.Module) -> None:
        super().__init__()
        self.act = activation
        self.proj = nn.Linear(dim, ff_dim * 2)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * self.act(gate)


def attention_dropout(attn: Any) -> float:
    """The dropout rate of a bio-attention ``Attention`` (0 for None). bio-attention stores any
    ``attn`` and fails at the first call where it is not an attention module."""
    if attn is None:
        return 0.0
    if not isinstance(attn, nn.Module):
        raise TypeError(f"attn must be a bio_attention.attention.Attention or None, got {type(attn).__name__}")
    if type(attn).__name__ in ("RandomAttention", "WindowAttention"):
        raise TypeError(
            f"{type(attn).__name__} is not full attention; the flex-backed layers replace "
            "bio_attention.attention.Attention only"
        )
    return float(getattr(attn, "dropout", 0.0))


def plugin_list(plugin: Plugins) -> nn.ModuleList:
    """None -> [Base()]; a plugin -> [plugin]; a ModuleList is shared, a list wrapped."""
    if plugin is None:
        plugins = nn.ModuleList([Base()])
    elif isinstance(plugin, nn.ModuleList):
        plugins = plugin
    elif isinstance(plugin, nn.Module):
        plugins = nn.ModuleList([plugin])
    elif isinstance(plugin, (list, tuple)):
        plugins = nn.ModuleList(plugin)
    else:
        raise TypeError(f"plugin must be a legacy.positional plugin, a list of them or None, got {type(plugin).__name__}")
    as_plugins(plugins)
    return plugins


def as_plugins(modules: nn.ModuleList) -> list[Base]:
    """The modules of a plugin list, each checked to be a :mod:`legacy.positional` plugin."""
    plugins = []
    for p in modules:
        if not isinstance(p, Base):
            raise TypeError(
                f"plugins must come from legacy.positional, got {type(p).__module__}.{type(p).__name__}; "
                "use flexpos.AttentionLayer for native flexpos modules"
            )
        plugins.append(p)
    return plugins


def activation_module(name: object) -> nn.Module:
    """'relu', 'gelu' or 'swish' (any case) -> the activation module."""
    choices = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU}
    if not isinstance(name, str):
        raise TypeError(f"activation must be 'relu', 'gelu' or 'swish', got {type(name).__name__}")
    if name.lower() not in choices:
        raise ValueError(f"activation must be 'relu', 'gelu' or 'swish', got {name!r}")
    return choices[name.lower()]()


def check_width(dim: object, nh: object) -> tuple[int, int]:
    """``dim`` and ``nh`` positive ints, ``dim`` divisible by ``nh``; returned as ints."""
    dim, nh = check_positive_int("dim", dim), check_positive_int("nh", nh)
    if dim % nh:
        raise ValueError(f"dim={dim} must be divisible by nh={nh}")
    return dim, nh


def check_dropout(value: object) -> float:
    """A dropout rate in [0, 1], returned as a float: what ``nn.Dropout`` takes (a Python or numpy
    number, a bool, a one-element tensor)."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise TypeError(f"dropout must be a float in [0, 1], got {type(value).__name__}")
    rate = float(value)
    if not 0.0 <= rate <= 1.0:  # NaN too
        raise ValueError(f"dropout must be in [0, 1], got {rate}")
    return rate


def check_input(x: object, weight: Tensor) -> Tensor:
    """x must be a floating point (B, *, L, dim) tensor, dim = ``weight.shape[-1]``, on the
    device of the layer's ``weight`` and of its dtype unless autocast casts it."""
    x = check_tensor("x", x)
    check_float("x", x)
    dim = weight.shape[-1]
    if x.ndim < 3 or x.shape[-1] != dim:
        raise ValueError(f"x must have shape (B, *, L, {dim}) (at least 3 dims), got {tuple(x.shape)}")
    # Plugins check their own device where they run (flexpos.attention, mod_x, mod_qkv, mod_mask).
    check_device("x", x, weight.device, "the layer")
    check_layer_dtype("x", x, weight)
    return x


def _no_mod_kwargs(mod_kwargs: dict[str, Any]) -> None:
    if mod_kwargs:
        raise TypeError(f"extra plugin keyword arguments are not supported here: {sorted(mod_kwargs)}")


class AttnLayer(nn.Module):
    """Self-attention over x (B, *, L, dim): projection to q, k, v, attention, output projection.

    Args:
        dim: model width, divisible by ``nh``.
        attn: a bio-attention ``Attention`` (only its dropout is read) or None.
        nh: number of heads.
        plugin: ``nn.ModuleList`` of :mod:`legacy.positional` plugins (default ``[Base()]``).
        backend: flexpos backend ('auto', 'flex' or 'chunked').
    """

    def __init__(
        self, dim: int, attn: Any = None, nh: int = 4, plugin: Plugins = None, *, backend: Backend = "auto"
    ) -> None:
        super().__init__()
        dim, nh = check_width(dim, nh)
        self.lin = nn.Linear(dim, 3 * dim)
        self.dropout = attention_dropout(attn)
        self.nh = nh
        self.to_out = nn.Linear(dim, dim)
        self.plugin = plugin_list(plugin)
        check_backend(backend)
        self.backend = backend
        hint_once("layers.AttnLayer")

    def forward(
        self,
        x: Tensor,
        pos: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
        causal: bool = False,
        **mod_kwargs: Any,
    ) -> Tensor:
        """x (B, *, L, dim) -> (B, *, L, dim).

        ``pos`` (B, *, L'), L' <= L: the first L - L' tokens have no position. ``mask``: bool or
        floating point, (B, *, L') key padding, (B, *, L', L') or (B, *, NH|1, L', L'); bool
        True = attend, float is added to the scores; tokens before the mask's L' are not masked
        (padded keys of a key mask excepted). Batch dims of ``pos`` and ``mask`` may be 1.
        ``causal``: query i attends keys j <= i (combined with ``mask``).
        """
        _no_mod_kwargs(mod_kwargs)
        self._warn_dropout()
        batch, length = tuple(check_input(x, self.lin.weight).shape[:-2]), x.shape[-2]
        q, k, v = (
            rearrange(t, "... l (n h) -> ... n l h", n=self.nh) for t in self.lin(x).split(x.size(-1), dim=-1)
        )
        masks = layer_mask(mask, batch, self.nh, length, x.device)
        pos_batch = expand_batch(pos, batch)
        if any(p.runs_hooks() for p in as_plugins(self.plugin)):
            q, k, v, masks = self._run_hooks(q, k, v, masks, pos, batch, length)
            modules, pos_batch = [], None
        else:
            modules = self.flex_modules(batch, pos)  # the plugins see pos as given (ALiBi's alternation)
        if masks.bias is not None:
            modules.append(AdditiveMask(masks.bias, masks.bias_from))
        out = flexpos.attention(
            q, k, v, *modules, pos=pos_batch, mask=masks.keep, causal=causal, backend=self._backend(masks)
        )
        return self.to_out(rearrange(out, "... n l h -> ... l (n h)"))

    def _run_hooks(
        self, q: Tensor, k: Tensor, v: Tensor, masks: LayerMask, pos: Optional[Tensor], batch: tuple[int, ...], length: int
    ) -> tuple[Tensor, Tensor, Tensor, LayerMask]:
        """bio-attention's plugin loop, for plugins whose own hooks must run (see
        :meth:`legacy.positional.Base.runs_hooks`): each plugin's ``mod_qkv`` then ``mod_mask``
        on q, k, v (B, *, L, NH, H) and a materialised (B, *, NH, L, L) float mask. Returns
        q, k, v (B, *, NH, L, H) and the final mask, split again for flexpos."""
        q, k, v = (t.transpose(-2, -3) for t in (q, k, v))
        dense = dense_layer_mask(masks, batch, self.nh, length, q.dtype)
        for plug in as_plugins(self.plugin):
            q, k, v = plug.mod_qkv(q, k, v, pos_q_k=pos)
            dense = plug.mod_mask(dense, q, k, v, pos_q_k=pos)
        q, k, v = (t.transpose(-2, -3) for t in (q, k, v))
        return q, k, v, layer_mask(dense, batch, self.nh, length, q.device)

    def flex_modules(self, batch: tuple[int, ...], pos: Optional[Tensor]) -> list[Positional]:
        """The plugins as flexpos modules for one call (identity plugins dropped)."""
        modules = (p.flex_module(batch, pos) for p in as_plugins(self.plugin))
        return [m for m in modules if m is not None]

    def _backend(self, masks: LayerMask) -> Backend:
        """'auto' becomes 'chunked' for float masks that need gradients (flexpos only looks at
        q, k, v and module parameters to decide)."""
        if self.backend != "auto":
            return self.backend
        if masks.bias is not None and masks.bias.requires_grad and torch.is_grad_enabled():
            return "chunked"
        return "auto"

    def _warn_dropout(self) -> None:
        global _dropout_warned
        if self.training and self.dropout > 0 and not _dropout_warned:
            _dropout_warned = True
            warnings.warn(
                f"attention dropout ({self.dropout}) is not applied by the flex-backed "
                "legacy.layers.AttnLayer",
                UserWarning,
                stacklevel=3,
            )


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(norm(x)), then x + ff(norm(x)).

    Args:
        attn: a bio-attention ``Attention`` (only its dropout is read) or None.
        dim: model width. nh: number of heads.
        plugin: a :mod:`legacy.positional` plugin or a list of them (default ``Base()``).
        dropout: feed-forward dropout. glu_ff: gated feed-forward. activation: 'relu', 'gelu'
            or 'swish'.
        backend: flexpos backend ('auto', 'flex' or 'chunked').
    """

    def __init__(
        self,
        attn: Any,
        dim: int,
        nh: int,
        plugin: Plugins = None,
        dropout: float = 0.2,
        glu_ff: bool = True,
        activation: str = "swish",
        *,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        dim, nh = check_width(dim, nh)
        act = activation_module(activation)
        hint_once("layers.TransformerLayer")
        self.norm = nn.LayerNorm(dim)
        self.plugin = plugin_list(plugin)
        self.attn = AttnLayer(dim, attn, nh=nh, plugin=self.plugin, backend=backend)
        project_in = GLU(dim, 4 * dim, act) if glu_ff else nn.Sequential(nn.Linear(dim, 4 * dim), act)
        dropout_layer = nn.Dropout(check_dropout(dropout))
        self.ff = Residual(nn.Sequential(nn.LayerNorm(dim), project_in, dropout_layer, nn.Linear(4 * dim, dim)))

    def forward(
        self,
        x: Tensor,
        pos: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
        causal: bool = False,
        **mod_kwargs: Any,
    ) -> Tensor:
        """x (B, *, L, dim) -> (B, *, L, dim); arguments as in :meth:`AttnLayer.forward`.

        A (B, *, L') key mask must be bool; it is also passed to the input encodings (False =
        no encoding added), as in bio-attention.
        """
        _no_mod_kwargs(mod_kwargs)
        check_input(x, self.norm.weight)
        key_mask = None
        if mask is not None and check_tensor("mask", mask).ndim == x.ndim - 1:
            if mask.dtype != torch.bool:
                raise TypeError(f"mask of shape (B, *, L) (key padding) must be bool, got dtype {mask.dtype}")
            mask = F.pad(mask, (max(x.shape[-2] - mask.shape[-1], 0), 0), value=True)
            key_mask = mask
        for plug in as_plugins(self.plugin):
            x = plug.mod_x(x, pos=pos, mask=key_mask)
        x = self.attn(self.norm(x), pos=pos, mask=mask, causal=causal) + x
        return self.ff(x)
