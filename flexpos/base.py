"""The base class of every positional module, and the divisor they share.

A positional module takes part in up to three stages of attention:

1. input transform, ``forward(x, pos, mask)`` on ``(B, *, L, dim)`` (Sinusoidal, learned);
2. query/key transform, ``transform_qk(q, k, positions)`` on q ``(B, H, Lq, D)`` and k
   ``(B, Hkv, Lk, D)`` (Rotary, XL);
3. score modification, ``score_mod(positions, dtype)`` returning a FlexAttention score_mod
   (ALiBi, DPB).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import Tensor, nn

from ._checks import DIVISOR_RANGE, check_bool, check_divisor
from .positions import Positions

ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def index_grids(
    batch: int, heads: int, len_q: int, len_k: int, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Broadcastable b (B,1,1,1), h (1,H,1,1), q_idx (1,1,Lq,1), kv_idx (1,1,1,Lk) index
    tensors: a score_mod or mask_mod called on them gives its value for every element."""
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, -1, 1, 1)
    q_idx = torch.arange(len_q, device=device).view(1, 1, -1, 1)
    kv_idx = torch.arange(len_k, device=device).view(1, 1, 1, -1)
    return b, h, q_idx, kv_idx


def shared_index(idx: Tensor, size: int) -> Tensor:
    """``idx`` into a table dim of ``size``, or 0 where the dim has size 1 and is shared (a
    BlockMask of batch 1 serves any batch, a mask of one head every head)."""
    return idx if size != 1 else 0 * idx


class QK(NamedTuple):
    """Result of a query/key transform.

    q: (B, H, Lq, D), k: (B, Hkv, Lk, D); extra_q (B, H, Lq, E) and extra_k (B, Hkv|1, Lk, E)
    are features appended to q and k so that ``extra_q @ extra_k.T`` adds to the scores
    unscaled (Hkv: k's heads, H or a divisor of it in grouped-query attention, where query
    head h meets key head ``h // (H // Hkv)``).
    """

    q: Tensor
    k: Tensor
    extra_q: Optional[Tensor] = None
    extra_k: Optional[Tensor] = None


def _place_divisor(module: Positional, incompatible_keys: object) -> None:
    """After ``load_state_dict(..., assign=True)`` into a module built on the meta device, its
    fixed divisor (in no checkpoint) is still meta: build it where the loaded tensors are."""
    if not module.div.is_meta:
        return
    loaded = [t for t in (*module.parameters(), *module.buffers()) if not t.is_meta]
    if loaded:
        module._buffers["div"] = module._constructed_buffer("div", loaded[0].device)


class Positional(nn.Module):
    """Base of all flexpos positional modules.

    ``divide`` scales positions down (``p / divide``); with ``learned_div`` its log is a
    parameter named ``div`` (as in bio-attention), otherwise ``div`` is a non-persistent
    buffer holding the divisor. Either way the divisor is a tensor, never a Python float, so
    compiled graphs do not bake it in.

    Constant buffers (frequencies, slopes, a fixed divisor; see :meth:`constants`) keep their
    dtype when the module is cast (``.half()``, ``.to(torch.bfloat16)``): a rounded frequency
    rounds every angle, by whole turns at large positions. A module built on the meta device
    gets them, with their constructor's values, from ``to_empty``, and a fixed divisor from
    ``load_state_dict(assign=True)`` (no checkpoint holds it).

    Class flags, which steer where :func:`flexpos.attention` and the layer call a module: one
    of ``transforms_input`` (x before the projections), ``transforms_qk`` (:meth:`transform_qk`)
    and ``modifies_scores`` (:meth:`score_mod`); ``takes_dot_only``: its transform may use that
    q and k meet only in their dot product when it is the last one; ``masks_scores``: its
    score_mod may return -inf; ``gathers_per_score``: its score_mod reads a table at an index
    that depends on q and k both; ``cpu_flex_refusal``: what Inductor's CPU flex kernel cannot
    run with it, if anything.
    """

    transforms_input = False
    transforms_qk = False
    takes_dot_only = False
    modifies_scores = False
    divide: Optional[float] = None
    learned = False
    _constant_names: tuple[str, ...] = ()
    _repr_fields: tuple[str, ...] = ()  # constructor arguments shown by repr()
    div: Tensor  # log(divide) as a parameter with learned_div, else the divisor as a buffer
    cpu_flex_refusal: Optional[str] = None  # what Inductor's CPU flex kernel cannot run here, if anything
    gathers_per_score = False  # its score_mod reads a table at an index that depends on q and k both
    masks_scores = True  # its score_mod may return -inf (see score_mod); False where it never does

    def _init_divisor(self, divide: float, learned_div: bool) -> None:
        self.divide = divide = check_divisor("divide", divide)
        self.learned = check_bool("learned_div", learned_div)
        # Built with its value, not filled in later: a module built inside a caller's
        # torch.compile otherwise kept an unfilled divisor (torch 2.13).
        if self.learned:
            self.div = nn.Parameter(torch.tensor(self._initial_div(divide)))
        else:
            self.register_buffer("div", torch.tensor(self._initial_div(divide), dtype=torch.float64), persistent=False)
            self.register_load_state_dict_post_hook(_place_divisor)

    def _initial_div(self, divide: float) -> float:
        """What ``div`` holds when built or reset: ``log(divide)`` when learned, else ``divide``."""
        return math.log(divide) if self.learned else divide

    def _reset_divisor(self) -> None:
        if self.divide is not None:
            with torch.no_grad():
                self.div.fill_(self._initial_div(self.divide))

    def constants(self) -> dict[str, Tensor]:
        """Buffers that are functions of the constructor arguments alone, by name, freshly built
        on the default device (none here; Rotary's ``thetas``, ALiBi's ``slopes`` ...)."""
        return {}

    def _register_constants(self) -> None:
        constants = self.constants()
        for name, value in constants.items():
            # Persistent: bio-attention's checkpoints hold these buffers (inv_freq, thetas ...).
            self.register_buffer(name, value)
        self._constant_names = tuple(constants)

    def _fixed_dtype_buffers(self) -> list[str]:
        return [*self._constant_names, *(["div"] if "div" in self._buffers else [])]

    def _constructed_buffer(self, name: str, device: torch.device) -> Tensor:
        """The constant buffer ``name`` (or a fixed ``div``) as the constructor built it, on ``device``."""
        if name == "div":
            return torch.tensor(self.divide, dtype=torch.float64, device=device)
        with torch.device("cpu"):  # not a caller's meta-device context
            return self.constants()[name].to(device)

    def reset_parameters(self) -> None:
        """Re-initialise this module's own parameters and buffers as its constructor did; child
        modules (MLPs, embeddings) have their own ``reset_parameters``.

        Meta-device initialisation without a checkpoint: build the model under
        ``torch.device("meta")``, call ``model.to_empty(device=...)``, then ``reset_parameters()``
        on every module that has it. With a checkpoint, loading it after ``to_empty`` suffices.
        """
        self._reset_divisor()
        with torch.no_grad():
            for name, value in self.constants().items():
                getattr(self, name).copy_(value)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # Every device move and dtype cast of nn.Module (.to, .half, .cuda, to_empty) goes
        # through _apply: let it run, then put back the constant buffers' dtype and values.
        kept = {name: self._buffers[name] for name in self._fixed_dtype_buffers()}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if after is None:
                continue
            if before.is_meta and not after.is_meta:
                # to_empty from the meta device: the buffer had no values, give it the constructor's
                # (a fixed divisor is in no checkpoint; bio-attention keeps it as a Python float).
                self._buffers[name] = self._constructed_buffer(name, after.device)
            else:
                # Values kept too: to_empty again (a module shared by two parents is visited twice).
                self._buffers[name] = before.to(after.device)
        return self

    def extra_repr(self) -> str:
        fields = [f"{name}={getattr(self, name)!r}" for name in self._repr_fields]
        if self.divide is not None:
            fields.append(f"divide={self.divide!r}" + (", learned_div=True" if self.learned else ""))
        return ", ".join(fields)

    def divisor(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """0-d tensor: the current divisor of positions, in ``dtype``."""
        if self.learned:
            # exp in float64: absolute angles at positions ~1e9 amplify any rounding of it. The
            # clamp keeps a divisor trained past the constructor's range finite and non-zero.
            return self.div.double().exp().clamp(*DIVISOR_RANGE).to(dtype)
        return self.div.to(dtype)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Input transforms and Rotary are called on tensors; the others are not."""
        name = type(self).__name__
        raise TypeError(
            f"{name} is not called on tensors: pass it to flexpos.attention(q, k, v, {name.lower()}, pos=pos) "
            f"or to AttentionLayer(dim, n_heads, positional=[...])"
        )

    def transform_qk(self, q: Tensor, k: Tensor, positions: Positions) -> QK:
        """q (B, H, Lq, D), k (B, Hkv, Lk, D) -> :class:`QK`. A class with ``takes_dot_only``
        also takes ``dot_only=True`` when it is the last transform: its q and k then meet
        nothing but each other's dot products, so it may count positions from any
        per-sequence origin."""
        raise NotImplementedError(f"{type(self).__name__} does not transform queries and keys")

    def score_mod(self, positions: Positions, dtype: torch.dtype = torch.float32) -> ScoreMod:
        """A FlexAttention score_mod for ``positions``, computing in ``dtype``.

        It must return ``score + bias(b, h, q_idx, kv_idx)``, with ``bias`` independent of
        ``score`` (``-inf`` allowed): the chunked backend evaluates it once at ``score = 0`` per
        chunk of queries and adds the result to the scores (inside SDPA, or its own softmax). A
        module whose bias is always finite says so with ``masks_scores = False``: the chunked
        backend then skips its search for queries left without keys, where the mask leaves each
        of them some.
        """
        raise NotImplementedError(f"{type(self).__name__} does not modify scores")
