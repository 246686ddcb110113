"""bio-attention 0.1.15's ``positional`` module, backed by flexpos.

Each class is the flexpos module of the same name (same parameters, buffers and state_dict
keys, so bio-attention checkpoints load with ``strict=True``) plus bio-attention's interface:

- ``mod_x(x, pos=None, mask=None)`` on x (B, *, L, H); ``forward`` is ``mod_x``;
- ``mod_qkv(q, k, v, pos_q_k=None, pos_q=None, pos_k=None, self_attn_mode=True)`` on
  q (B, *, L1, NH, H) and k, v (B, *, L2, NH, H);
- ``mod_mask(mask, q, k, v, pos_q_k=None, pos_q=None, pos_k=None)`` returning the additive
  mask (B, *, NH, L1, L2).

They give bio-attention's numbers, quirks included (docs/legacy.md), and plug into code written
for bio-attention as well as into :class:`legacy.layers.TransformerLayer`, which runs them
through FlexAttention without materialising (L1, L2) tensors.

Migration: ``from bio_attention import positional`` -> ``from legacy import positional``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import flexpos
from flexpos._checks import check_device, check_float, check_module_device, check_rank, check_tensor
from flexpos.alibi import alibi_slopes
from flexpos.base import QK, Positional, ScoreMod
from flexpos.inputs import InputTransform
from flexpos.positions import Positions

from ._bias import Parity, dense_bias, dpb_dense_bias, head_parity, legacy_alibi, legacy_parity
from ._checks import check_flag, check_key_batch
from ._hint import hint_once
from ._layout import (
    add_to_mask,
    bias_batch_shape,
    broadcasts_to,
    expand_batch,
    heads_first,
    heads_last,
    positions_for,
)

__all__ = ["ALiBi", "Base", "DPB", "LearnedContinuous", "LearnedVocab", "Rotary", "Sinusoidal", "XL"]

QKV = tuple[Tensor, Tensor, Tensor]


class Base(Positional):
    """bio-attention's plugin base: every stage is the identity.

    ``divide`` scales positions down; with ``learned`` its log is the parameter ``div``.
    """

    def __init__(self, divide: float = 1.0, learned: bool = False) -> None:
        super().__init__()
        self._init_divisor(divide, check_flag("learned", learned))
        hint_once(f"positional.{type(self).__name__}")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Same as :meth:`mod_x`."""
        return self.mod_x(*args, **kwargs)

    def mod_x(self, x: Tensor, pos: Optional[Tensor] = None, mask: Optional[Tensor] = None, **kwargs: Any) -> Tensor:
        """x (B, *, L, H) -> (B, *, L, H)."""
        return x

    def mod_qkv(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        pos_q_k: Optional[Tensor] = None,
        pos_q: Optional[Tensor] = None,
        pos_k: Optional[Tensor] = None,
        self_attn_mode: bool = True,
        **kwargs: Any,
    ) -> QKV:
        """q (B, *, L1, NH, H), k and v (B, *, L2, NH, H) -> the same shapes."""
        return q, k, v

    def mod_mask(
        self,
        mask: Optional[Tensor],
        q: Tensor,
        k: Tensor,
        v: Tensor,
        pos_q_k: Optional[Tensor] = None,
        pos_q: Optional[Tensor] = None,
        pos_k: Optional[Tensor] = None,
        **kwargs: Any,
    ) -> Optional[Tensor]:
        """mask (B, *, NH, L1, L2) or None -> (B, *, NH, L1, L2) or None."""
        return mask

    def flex_module(self, batch: tuple[int, ...], pos: Optional[Tensor]) -> Optional[Positional]:
        """The flexpos module that reproduces this plugin inside flexpos.attention, or None if the
        plugin does nothing there. ``batch``: leading dims of x; ``pos``: positions as given."""
        return self if (self.transforms_qk or self.modifies_scores) else None

    def runs_hooks(self) -> bool:
        """Whether the layers must call this plugin's own ``mod_qkv``/``mod_mask``: a subclass
        (written by a user) overrides them but not :meth:`flex_module`, which would ignore them."""
        cls = type(self)
        builtin = next(c for c in cls.__mro__ if c.__module__ == __name__)  # nearest legacy class
        overrides = lambda name: getattr(cls, name) is not getattr(builtin, name)  # noqa: E731
        return (overrides("mod_qkv") or overrides("mod_mask")) and not overrides("flex_module")

    def apply_pos_division(self, x: Tensor) -> Tensor:
        """Positions divided by the (possibly learned) divisor."""
        return x / self.divisor(torch.promote_types(x.dtype, torch.float32))

    @staticmethod
    def default_pos_x(x: Tensor) -> Tensor:
        """(B, *, L, H) -> (B, *, L) positions ``0 .. L-1``."""
        return torch.arange(x.size(-2), device=x.device).expand(*x.shape[:-1])


class _InputMixin(Base, InputTransform):
    """mod_x of the input encodings: flexpos' forward with bio-attention's broadcasting."""

    def mod_x(self, x: Tensor, pos: Optional[Tensor] = None, mask: Optional[Tensor] = None, **kwargs: Any) -> Tensor:
        """x (B, *, L, H) plus the encoding of ``pos`` (B, *, L'), L' <= L (the first L - L' tokens,
        e.g. CLS, get nothing). ``mask`` bool (B, *, M), False = add nothing, aligned to the end
        of the positions: if M is shorter, the first positioned tokens get their encoding."""
        batch = tuple(check_tensor("x", x).shape[:-2])
        pos = expand_batch(pos, batch)
        if mask is not None:
            covered = x.shape[-2] if pos is None else pos.shape[-1]
            check_rank("mask", check_tensor("mask", mask), 1, "(*batch, L')")
            mask = F.pad(mask, (covered - mask.shape[-1], 0), value=True)  # pads or crops
        return InputTransform.forward(self, x, pos, expand_batch(mask, batch, "mask"))


class Sinusoidal(_InputMixin, flexpos.Sinusoidal):
    """Sinusoidal encoding added to x; see :class:`flexpos.Sinusoidal`."""

    def __init__(self, dim: int, divide: float = 1.0, learned_div: bool = False) -> None:
        flexpos.Sinusoidal.__init__(self, dim, divide, check_flag("learned_div", learned_div))
        hint_once("positional.Sinusoidal")


class LearnedVocab(_InputMixin, flexpos.LearnedVocab):
    """Learned lookup table of integer positions; see :class:`flexpos.LearnedVocab`."""

    def __init__(self, dim: int, max_seq_len: int) -> None:
        flexpos.LearnedVocab.__init__(self, dim, max_seq_len)
        self._init_divisor(1.0, False)
        hint_once("positional.LearnedVocab")


class LearnedContinuous(_InputMixin, flexpos.LearnedContinuous):
    """MLP of continuous positions added to x; see :class:`flexpos.LearnedContinuous`."""

    def __init__(
        self, dim: int, depth: int = 1, norm: bool = False, divide: float = 1.0, learned_div: bool = False
    ) -> None:
        norm, learned_div = check_flag("norm", norm), check_flag("learned_div", learned_div)
        flexpos.LearnedContinuous.__init__(self, dim, depth, norm, divide, learned_div)
        hint_once("positional.LearnedContinuous")


class Rotary(Base, flexpos.Rotary):
    """Rotary embedding of q and k; see :class:`flexpos.Rotary`.

    As in bio-attention 0.1.15, tokens without a position (when positions are shorter than the
    sequence) get q and k set to zero, where flexpos leaves them unrotated.
    """

    def __init__(
        self, head_dim: int, n_dims: Optional[int] = None, divide: float = 1.0, learned_div: bool = False
    ) -> None:
        flexpos.Rotary.__init__(self, head_dim, n_dims, divide, check_flag("learned_div", learned_div))
        hint_once("positional.Rotary")

    def _rotate_or_zero(self, x: Tensor, positions: Positions, side: str, div: Tensor) -> Tensor:
        keep = positions.has_position(side).to(x.dtype)[:, None]  # (L, 1)
        return self.rotate(x, positions, side, div=div) * keep

    def _check_qk(self, q: Tensor, k: Tensor) -> None:
        """q (B, *, L1, NH, H) and k (*, L2, NH, H): float tensors on the module's device, k with
        q's batch dims or 1 there."""
        for name, t in (("q", q), ("k", k)):
            check_rank(name, check_tensor(name, t), 3, "(B, *, L, NH, H)")
            check_float(name, t)
        check_key_batch(q, k)
        check_module_device(self, q.device)

    def transform_qk(self, q: Tensor, k: Tensor, positions: Positions, *, dot_only: bool = False) -> QK:
        # dot_only is not used: bio-attention rotates by absolute angles (and zeroes CLS tokens)
        div = self.divisor(torch.float64)  # one for both sides, as flexpos.Rotary.rotate_qk
        return QK(self._rotate_or_zero(q, positions, "q", div), self._rotate_or_zero(k, positions, "k", div))

    def mod_qkv(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        pos_q_k: Optional[Tensor] = None,
        pos_q: Optional[Tensor] = None,
        pos_k: Optional[Tensor] = None,
        self_attn_mode: bool = True,
        **kwargs: Any,
    ) -> QKV:
        """Rotate q (B, *, L1, NH, H) and k (B, *, L2, NH, H); v is returned as is.

        ``self_attn_mode``: positions ``pos_q_k`` (B, *, L') for both; otherwise ``pos_q`` and
        ``pos_k``. Missing positions count ``0 .. L-1``. k's batch dims may be 1 where q's are
        not (an unbatched (L, NH, H) pair works too), as in bio-attention.
        """
        self._check_qk(q, k)
        if self_attn_mode:
            positions = positions_for(q, k, pos_q_k=pos_q_k)
        else:
            positions = positions_for(q, k, pos_q=pos_q, pos_k=pos_k)
        out = self.transform_qk(heads_first(q), heads_first(k), positions)
        batch = tuple(q.shape[:-3])
        return heads_last(out.q, batch), heads_last(out.k, batch), v


class _BiasMixin(Base):
    """mod_mask of the score biases: bio-attention's ``mask + bias`` with flexpos' bias."""

    n_heads: int

    def _check_bias_inputs(self, mask: Optional[Tensor], q: Tensor, k: Tensor) -> tuple[int, ...]:
        """Check q (B, *, L1, NH, H), k (B, *, L2, NH, H) (batch dims q's or 1) and mask
        (B, *, NH|1, L1', L2'), all on the module's device; return the batch dims (B, *)."""
        name, heads = type(self).__name__, self.n_heads
        for side, t in (("q", check_tensor("q", q)), ("k", check_tensor("k", k))):
            if t.ndim < 4 or t.shape[-2] != heads:
                raise ValueError(
                    f"{name}(n_heads={heads}).mod_mask expects {side} of shape (B, *, L, {heads}, H), "
                    f"got {tuple(t.shape)}"
                )
        head_dim = self._query_head_dim()
        if head_dim is not None and q.shape[-1] != head_dim:
            raise ValueError(
                f"{name}(n_heads={heads}).mod_mask expects q of shape (B, *, L, {heads}, {head_dim}), got {tuple(q.shape)}"
            )
        check_key_batch(q, k)
        check_module_device(self, q.device)
        batch = tuple(q.shape[:-3])
        if mask is None:
            return batch
        check_device("mask", check_tensor("mask", mask), q.device, "q")
        len_q, len_k = q.shape[-3], k.shape[-3]
        if (
            mask.ndim < 2
            or not broadcasts_to(mask.shape[:-2], (*batch, heads))
            or mask.shape[-2] > len_q
            or mask.shape[-1] > len_k
        ):
            raise ValueError(
                f"mask must have shape (*batch, {heads} or 1, L1', L2') with batch {batch} (or dims of "
                f"size 1 there), L1' <= {len_q} and L2' <= {len_k}, got {tuple(mask.shape)}"
            )
        return batch

    def _query_head_dim(self) -> Optional[int]:
        """The head dim H that q must have, where the bias reads q's features (XL)."""
        return None

    def dense(self, q: Tensor, positions: Positions, bias_batch: tuple[int, ...]) -> Tensor:
        """(N, NH, L1, L2) bias for q (B, *, L1, NH, H)."""
        raise NotImplementedError

    def mod_mask(
        self,
        mask: Optional[Tensor],
        q: Tensor,
        k: Tensor,
        v: Tensor,
        pos_q_k: Optional[Tensor] = None,
        pos_q: Optional[Tensor] = None,
        pos_k: Optional[Tensor] = None,
        **kwargs: Any,
    ) -> Tensor:
        """Add the bias to ``mask`` (B, *, NH|1, L1', L2') (left-padded with 0 to (L1, L2); bool:
        True = 0, False = -inf) or None.

        Positions: ``pos_q_k`` (B, *, L') for self-attention, else ``pos_q`` (B, *, L1') and
        ``pos_k`` (B, *, L2'); a missing side counts ``0 .. L-1``; tokens without a position get
        no bias. Returns (B, *, NH, L1, L2).
        """
        batch = self._check_bias_inputs(mask, q, k)
        positions = positions_for(q, k, pos_q_k, pos_q, pos_k)
        bias = self.dense(q, positions, bias_batch_shape(batch, pos_q_k, pos_q, pos_k))
        return add_to_mask(mask, bias, batch)


def _work_dtype(q: Tensor) -> torch.dtype:
    return torch.promote_types(q.dtype, torch.float32)


class ALiBi(_BiasMixin, flexpos.ALiBi):
    """ALiBi; see :class:`flexpos.ALiBi`. ``learned_div`` works (it crashes in bio-attention).

    Asymmetric heads block the wrong direction with ``-finfo.max`` (bio-attention's number)
    rather than -inf; see docs/legacy.md for the head alternation with extra batch dims.
    """

    _get_slopes = staticmethod(alibi_slopes)

    def __init__(
        self,
        n_heads: int,
        use_n_heads: Optional[int] = None,
        asymmetric: bool = False,
        divide: float = 1.0,
        learned_div: bool = False,
    ) -> None:
        asymmetric, learned_div = check_flag("asymmetric", asymmetric), check_flag("learned_div", learned_div)
        flexpos.ALiBi.__init__(self, n_heads, use_n_heads, asymmetric, divide, learned_div)
        hint_once("positional.ALiBi")

    def legacy_score_mod(self, positions: Positions, dtype: torch.dtype, parity: Parity, penalty: float) -> ScoreMod:
        return legacy_alibi(self, positions, dtype, parity, penalty)

    def score_mod(self, positions: Positions, dtype: torch.dtype = torch.float32) -> ScoreMod:
        # A quarter of finfo.max: as absorbing as finfo.max, but safe from overflow in kernels
        # that rescale scores (exp2).
        return self.legacy_score_mod(positions, dtype, head_parity, torch.finfo(dtype).max / 4)

    def dense(self, q: Tensor, positions: Positions, bias_batch: tuple[int, ...]) -> Tensor:
        dtype = _work_dtype(q)
        parity = legacy_parity(tuple(q.shape[:-3]), bias_batch, q.device)
        score_mod = self.legacy_score_mod(positions, dtype, parity, torch.finfo(dtype).max)
        return dense_bias(score_mod, positions, self.n_heads, dtype)

    def flex_module(self, batch: tuple[int, ...], pos: Optional[Tensor]) -> Optional[Positional]:
        bias_batch = batch if pos is None else tuple(pos.shape[:-1])
        parity = legacy_parity(batch, bias_batch, self.slopes.device)
        if not self.asymmetric or parity is head_parity:
            return self
        return _BoundALiBi(self, parity)


class _BoundALiBi(Positional):
    """A legacy ALiBi with the head alternation of one layer call (see legacy._bias)."""

    modifies_scores = True

    def __init__(self, alibi: ALiBi, parity: Parity) -> None:
        super().__init__()
        self.alibi, self.parity, self.n_heads = alibi, parity, alibi.n_heads

    def score_mod(self, positions: Positions, dtype: torch.dtype = torch.float32) -> ScoreMod:
        return self.alibi.legacy_score_mod(positions, dtype, self.parity, torch.finfo(dtype).max / 4)


class DPB(_BiasMixin, flexpos.DPB):
    """Dynamic positional bias; see :class:`flexpos.DPB`. ``learned_div`` works (it crashes in
    bio-attention). ``mod_mask`` runs the MLP on every distance like bio-attention; inside
    flexpos.attention an affine MLP (the default) is a rate and a shift per head, others are
    tabulated (exact for integer positions, see flexpos.dpb)."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        depth: int = 1,
        norm: bool = False,
        divide: float = 1.0,
        learned_div: bool = False,
        *,
        table_size: int = 65537,
    ) -> None:
        norm, learned_div = check_flag("norm", norm), check_flag("learned_div", learned_div)
        flexpos.DPB.__init__(self, dim, n_heads, depth, norm, divide, learned_div, table_size=table_size)
        hint_once("positional.DPB")

    def dense(self, q: Tensor, positions: Positions, bias_batch: tuple[int, ...]) -> Tensor:
        # The bias takes q's dtype (an integer q would truncate it; bio-attention's MLP refuses
        # one). ALiBi and XL read only q's shape or promote it, as bio-attention does.
        check_float("q", q)
        return dpb_dense_bias(self, positions).to(q.dtype)


class XL(_BiasMixin, flexpos.XL):
    """Transformer-XL relative bias; see :class:`flexpos.XL`. ``learned_div`` works (it crashes
    in bio-attention).

    bio-attention 0.1.15's numbers: ``mod_qkv`` adds ``bias_r_w`` (u) to q and ``mod_mask`` adds
    it again before the relative term, so scores are ``(q + u).k / sqrt(H) + (q + 2u).r`` and
    ``bias_r_r`` is never used; flexpos.XL computes ``(q + u).k / sqrt(H) + (q + v).r``.
    """

    def __init__(self, dim: int, n_heads: int, divide: float = 1.0, learned_div: bool = False) -> None:
        flexpos.XL.__init__(self, dim, n_heads, divide, check_flag("learned_div", learned_div))
        hint_once("positional.XL")

    def _query_head_dim(self) -> Optional[int]:
        return self.dim // self.n_heads

    def transform_qk(self, q: Tensor, k: Tensor, positions: Positions) -> QK:
        self.check_heads(q)
        u = self.bias_r_w.to(q.dtype)[None, :, None]
        q_u = q + u
        div = self.divisor(torch.float64)  # one for both sides, as flexpos.XL.transform_qk
        f = self.query_features(q_u + u, positions, div)
        return QK(q_u, k, f, self.key_features(positions, f.dtype, div))

    def mod_qkv(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        pos_q_k: Optional[Tensor] = None,
        pos_q: Optional[Tensor] = None,
        pos_k: Optional[Tensor] = None,
        self_attn_mode: bool = True,
        **kwargs: Any,
    ) -> QKV:
        """q (B, *, L1, NH, H) -> q + bias_r_w; k and v unchanged."""
        head_dim = self.dim // self.n_heads
        if check_tensor("q", q).ndim < 4 or tuple(q.shape[-2:]) != (self.n_heads, head_dim):
            raise ValueError(f"q must have shape (B, *, L1, {self.n_heads}, {head_dim}), got {tuple(q.shape)}")
        check_module_device(self, q.device)
        return q + self.bias_r_w, k, v

    def dense(self, q: Tensor, positions: Positions, bias_batch: tuple[int, ...]) -> Tensor:
        return self.relative_bias(heads_first(q + self.bias_r_w), positions)
