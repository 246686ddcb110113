"""One benchmark case: the same inputs and positions handed to flexpos, to the dense path and
to plain SDPA (the floor), as zero-argument callables returning (B, H, L, D).

Attention schemes (ALiBi, DPB, XL, Rotary, and ALiBi under a position window) act on q, k and
v; the dense path materialises their bias. Input encodings (Sinusoidal, LearnedVocab,
LearnedContinuous) act on x (B, L, H*D) before attention; their three paths differ only in
the encoding added to x (none for the floor), then normalise x, project it to q, k and v and
run SDPA.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, cast

import torch
import torch.nn.functional as F
from torch import Tensor

import flexpos
from flexpos.backends import Backend

from .dense import (
    dense_alibi_bias,
    dense_dpb_bias,
    dense_encoding,
    dense_rotate,
    dense_xl_bias,
    window_keep,
)
from .memory import MIB

ATTENTION_SCHEMES = ("alibi", "dpb", "xl", "rotary", "window")
INPUT_SCHEMES = ("sinusoidal", "learned_vocab", "learned_continuous")
SCHEMES = ATTENTION_SCHEMES + INPUT_SCHEMES
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DPB_DIM, DPB_DEPTH = 32, 2
# LearnedContinuous: a nonlinear MLP (bio-attention's default depth 1 is affine), on p / 1000,
# inputs of order 1 for these positions (up to 3 L).
CONTINUOUS_DEPTH, CONTINUOUS_DIVIDE = 2, 1000.0
BIO_NEEDS = "--dense bio needs bio-attention (pip install bio-attention==0.1.15)"


@dataclass
class Setup:
    scheme: str
    length: int
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    backward: bool = False
    dense: str = "auto"
    window: float = 512.0
    backend: Backend = "auto"
    seed: int = 0


@dataclass
class Case:
    """Three zero-argument callables on the same inputs, each returning (B, H, L, D)."""

    flexpos: Callable[[], Tensor]
    dense: Callable[[], Tensor]
    floor: Callable[[], Tensor]
    dense_bytes: int
    leaves: list[Tensor]
    dense_label: str
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    flex_floor: Optional[Callable[[], Tensor]] = None  # flexpos with no positional module
    pos: Optional[Tensor] = None  # (B, L) positions of every path


def bio_available() -> bool:
    try:
        importlib.import_module("bio_attention.positional")
    except Exception:
        return False
    return True


def resolve_dense(kind: str) -> str:
    """``auto`` -> ``bio`` when bio-attention is importable, else ``formula``."""
    if kind == "auto":
        return "bio" if bio_available() else "formula"
    if kind == "bio" and not bio_available():
        raise SystemExit(BIO_NEEDS)
    return kind


def irregular_positions(batch: int, length: int, generator: torch.Generator) -> Tensor:
    """(B, L) sorted int64 positions with gaps of 1-3: irregular, like genomic coordinates."""
    return torch.randint(1, 4, (batch, length), generator=generator).cumsum(-1)


def vocab_size(length: int) -> int:
    """LearnedVocab's ``max_seq_len`` for :func:`irregular_positions` of ``length``: up to 3 L."""
    return 3 * length + 1


def estimate_dense_bytes(s: Setup) -> int:
    """Upper estimate of the dense path's peak extra memory (calibrated on CPU, float32)."""
    n = s.batch * s.length * s.length  # elements of one (B, L, L) tensor
    per_head = n * s.heads * 4  # one float32 (B, NH, L, L) bias
    if s.scheme in ("alibi", "window"):
        extra = n * 12 + 2 * per_head + (n * 9 + per_head if s.scheme == "window" else 0)
    elif s.scheme == "dpb":
        extra = n * 12 + 3 * n * DPB_DIM * 4 + 2 * per_head
    elif s.scheme == "xl":
        dim = s.heads * s.head_dim
        extra = n * 12 + 4 * n * dim * 4 + 2 * per_head
    elif s.scheme in INPUT_SCHEMES:  # no L x L tensor: the encoding, the MLP's activations
        extra = 4 * s.batch * s.length * s.heads * s.head_dim * 4
    else:  # rotary: no L x L tensor
        extra = 0
    activations = 8 * s.batch * s.heads * s.length * s.head_dim * 4  # q, k, v copies, output, SDPA
    return int((extra + activations) * (2 if s.backward else 1)) + 32 * MIB


def flexpos_module(scheme: str, heads: int, head_dim: int) -> flexpos.Positional:
    """The flexpos module of ``scheme`` (``window`` is ALiBi plus a position-distance window)."""
    if scheme in ("alibi", "window"):
        return flexpos.ALiBi(heads)
    if scheme == "dpb":
        return flexpos.DPB(DPB_DIM, heads, depth=DPB_DEPTH)
    if scheme == "xl":
        return flexpos.XL(heads * head_dim, heads)
    if scheme == "rotary":
        return flexpos.Rotary(head_dim)
    raise ValueError(f"unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")


def sdpa(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """SDPA with an optional float bias (B, H, L, L), cast to q's dtype as a user's would be."""
    mask = None if bias is None else bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def bio_dense(
    s: Setup, fx: flexpos.Positional, q: Tensor, k: Tensor, v: Tensor, pos: Tensor
) -> tuple[Callable[[], Tensor], torch.nn.Module]:
    """bio-attention's plugin for ``s.scheme`` with ``fx``'s parameters, and its dense path."""
    from bio_attention import positional as bio

    H, D = s.heads, s.head_dim
    # bio-attention's layout is (B, L, NH, H): views, as its layer would hand them over. Its
    # float32 plugins fail on float16/bfloat16 q and k (and under autocast would compute DPB's
    # MLP in bfloat16, off by ~1 at distances of hundreds): they get float32 copies, made
    # outside the timed call, and SDPA runs in q's dtype, as flexpos computes its biases.
    qb, kb, vb = (t.transpose(1, 2).float() if t.itemsize < 4 else t.transpose(1, 2) for t in (q, k, v))
    bm: Any
    if s.scheme in ("alibi", "window"):
        bm = bio.ALiBi(H)

        def dense() -> Tensor:
            window_mask = None
            if s.scheme == "window":  # a bio-attention user passes it as an additive float mask
                far = ~window_keep(pos, s.window)
                window_mask = torch.zeros(far.shape, device=q.device).masked_fill(far, float("-inf"))
            return sdpa(q, k, v, bm.mod_mask(window_mask, qb, kb, vb, pos_q_k=pos))

    elif s.scheme == "dpb":
        bm = bio.DPB(DPB_DIM, H, depth=DPB_DEPTH)
        bm.load_state_dict(fx.state_dict())

        def dense() -> Tensor:
            return sdpa(q, k, v, bm.mod_mask(None, qb, kb, vb, pos_q_k=pos))

    elif s.scheme == "xl":
        bm = bio.XL(H * D, H)
        xl = cast(flexpos.XL, fx)
        with torch.no_grad():
            xl.embed_lin.load_state_dict(bm.embed_lin.state_dict())
            xl.bias_r_w.copy_(bm.bias_r_w)
            # bio-attention's layer adds bias_r_w in mod_qkv and again inside mod_mask, so
            # its position term reads (q + 2u) . r: flexpos' v is set to 2u to match.
            xl.bias_r_r.copy_(2 * bm.bias_r_w)

        def dense() -> Tensor:
            q2, k2, v2 = bm.mod_qkv(qb, kb, vb, pos_q_k=pos)
            return _sdpa_bio(q2, k2, v2, bm.mod_mask(None, q2, k2, v2, pos_q_k=pos), q.dtype)

    else:
        bm = bio.Rotary(D)

        def dense() -> Tensor:
            q2, k2, v2 = bm.mod_qkv(qb, kb, vb, pos_q_k=pos)
            return _sdpa_bio(q2, k2, v2, None, q.dtype)

    return dense, bm.to(q.device)


def _sdpa_bio(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """SDPA in ``dtype`` on q, k, v in bio-attention's layout (B, L, NH, H)."""
    q, k, v = (t.transpose(1, 2).to(dtype) for t in (q, k, v))
    return sdpa(q, k, v, bias)


def formula_dense(s: Setup, fx: Any, q: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Callable[[], Tensor]:
    """The dense path of ``s.scheme`` from the formulas in :mod:`flexpos.bench.dense`."""
    if s.scheme in ("alibi", "window"):

        def dense() -> Tensor:
            bias = dense_alibi_bias(fx, pos)
            if s.scheme == "window":
                bias = bias.masked_fill(~window_keep(pos, s.window), float("-inf"))
            return sdpa(q, k, v, bias)

    elif s.scheme == "dpb":

        def dense() -> Tensor:
            return sdpa(q, k, v, dense_dpb_bias(fx, pos))

    elif s.scheme == "xl":

        def dense() -> Tensor:
            u = fx.bias_r_w.to(q.dtype).view(1, s.heads, 1, s.head_dim)
            return sdpa(q + u, k, v, dense_xl_bias(fx, q, pos))

    else:

        def dense() -> Tensor:
            return sdpa(dense_rotate(fx, q, pos), dense_rotate(fx, k, pos), v)

    return dense


def build_case(s: Setup) -> Case:
    """Inputs drawn from ``s.seed``; the dense path per ``s.dense`` (see :func:`resolve_dense`)."""
    if s.scheme in INPUT_SCHEMES:
        return build_input_case(s)
    device, dtype = torch.device(s.device), DTYPES[s.dtype]
    gen = torch.Generator().manual_seed(s.seed)
    torch.manual_seed(s.seed)
    shape = (s.batch, s.heads, s.length, s.head_dim)
    q, k, v = (torch.randn(shape, generator=gen).to(device, dtype).requires_grad_(s.backward) for _ in range(3))
    pos = irregular_positions(s.batch, s.length, gen).to(device)

    fx = flexpos_module(s.scheme, s.heads, s.head_dim)
    modules: dict[str, torch.nn.Module] = {}
    if resolve_dense(s.dense) == "bio":
        dense, modules["dense"] = bio_dense(s, fx, q, k, v, pos)
        label = "bio-attention mod_qkv/mod_mask + SDPA"
    else:
        dense = formula_dense(s, fx, q, k, v, pos)
        label = "dense formula (flexpos.bench) + SDPA"
    modules["flexpos"] = fx.to(device)

    def run_flexpos() -> Tensor:
        mask = flexpos.distance_window_mask(s.window, pos=pos) if s.scheme == "window" else None
        return flexpos.attention(q, k, v, fx, pos=pos, mask=mask, backend=s.backend)

    def floor() -> Tensor:
        return sdpa(q, k, v)

    def flex_floor() -> Tensor:
        return flexpos.attention(q, k, v, backend=s.backend)

    return Case(run_flexpos, dense, floor, estimate_dense_bytes(s), [q, k, v], label, modules, flex_floor, pos)


def input_module(scheme: str, dim: int, length: int) -> flexpos.Positional:
    """The flexpos input encoding of ``scheme`` for x (B, L, dim)."""
    if scheme == "sinusoidal":
        return flexpos.Sinusoidal(dim)
    if scheme == "learned_vocab":
        return flexpos.LearnedVocab(dim, vocab_size(length))
    if scheme == "learned_continuous":
        return flexpos.LearnedContinuous(dim, depth=CONTINUOUS_DEPTH, divide=CONTINUOUS_DIVIDE)
    raise ValueError(f"unknown input scheme {scheme!r}; choose from {', '.join(INPUT_SCHEMES)}")


def bio_input_module(scheme: str, fx: flexpos.Positional) -> torch.nn.Module:
    """bio-attention's plugin for the input ``scheme``, with ``fx``'s parameters and buffers."""
    from bio_attention import positional as bio

    bm: torch.nn.Module
    if scheme == "sinusoidal":
        bm = bio.Sinusoidal(cast(flexpos.Sinusoidal, fx).dim)
    elif scheme == "learned_vocab":
        emb = cast(flexpos.LearnedVocab, fx).emb
        bm = bio.LearnedVocab(emb.embedding_dim, emb.num_embeddings)
    else:
        bm = bio.LearnedContinuous(cast(flexpos.LearnedContinuous, fx).dim, depth=CONTINUOUS_DEPTH,
                                   divide=CONTINUOUS_DIVIDE)
    bm.load_state_dict(fx.state_dict())
    return bm


def build_input_case(s: Setup) -> Case:
    """x (B, L, H*D) drawn from ``s.seed``, encoded by flexpos (its compiled transform), by the
    dense path (bio-attention's ``mod_x``, or the eager formula of :func:`dense_encoding`) or
    not at all (the floor), then, as in a pre-norm layer, normalised, projected to q, k and v
    (B, H, L, D) by one fixed random weight, the same in every path, and attended with SDPA."""
    device, dtype = torch.device(s.device), DTYPES[s.dtype]
    gen = torch.Generator().manual_seed(s.seed)
    torch.manual_seed(s.seed)
    dim = s.heads * s.head_dim
    x = torch.randn(s.batch, s.length, dim, generator=gen).to(device, dtype).requires_grad_(s.backward)
    pos = irregular_positions(s.batch, s.length, gen).to(device)
    weight = (torch.randn(dim, 3 * dim, generator=gen) * dim**-0.5).to(device, dtype)
    fx = input_module(s.scheme, dim, s.length).to(device)
    modules: dict[str, torch.nn.Module] = {"flexpos": fx}

    def attend(encoded: Tensor) -> Tensor:
        # bio-attention's float32 encodings promote a bfloat16 x to float32: project in x's dtype
        normed = F.layer_norm(encoded.to(dtype), (dim,))
        q, k, v = (normed @ weight).unflatten(-1, (3, s.heads, s.head_dim)).permute(2, 0, 3, 1, 4)
        return sdpa(q, k, v)

    if resolve_dense(s.dense) == "bio":
        bm = modules["dense"] = bio_input_module(s.scheme, fx).to(device)
        dense, label = (lambda: attend(bm(x, pos=pos))), "bio-attention mod_x + SDPA"
    else:
        dense, label = (lambda: attend(dense_encoding(fx, x, pos))), "eager formula (flexpos.bench) + SDPA"
    return Case(lambda: attend(fx(x, pos=pos)), dense, lambda: attend(x), estimate_dense_bytes(s), [x], label,
                modules, None, pos)
