"""legacy.positional vs bio-attention 0.1.15: checkpoints, numbers, quirks and crash fixes.

The dense paths (mod_x, mod_qkv, mod_mask) are compared with the original on the same inputs
and weights; tests/test_legacy_layers.py covers the flex-backed layers.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from bio_attention import positional as original
from bio_attention.attention import Attention
from bio_attention.attention import TransformerLayer as OriginalTransformerLayer

import flexpos
from flexpos.base import index_grids
from legacy import _hint
from legacy import positional as legacy
from support import TOLERANCE
from legacy_support import SCHEMES, assert_same, atol_for, irregular, pair, scheme_id

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

NH, H = 4, 6
DIM = NH * H
L = 12
BATCHES = [(2,), (2, 3)]
F64 = torch.float64


def qkv(batch, lq=L, lk=L, dtype=torch.float32):
    q = torch.randn(*batch, lq, NH, H, dtype=dtype)
    k = torch.randn(*batch, lk, NH, H, dtype=dtype)
    v = torch.randn(*batch, lk, NH, H, dtype=dtype)
    return q, k, v


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("case", SCHEMES, ids=scheme_id)
def test_state_dict_keys_and_strict_load_both_ways(case):
    name, args, kwargs = case
    orig, new = pair(name, *args, **kwargs)
    assert list(new.state_dict()) == list(orig.state_dict())
    assert [n for n, _ in new.named_parameters()] == [n for n, _ in orig.named_parameters()]
    for key, value in new.state_dict().items():
        assert torch.equal(value, orig.state_dict()[key]), key
    fresh = getattr(original, name)(*args, **kwargs)
    fresh.load_state_dict(new.state_dict(), strict=True)
    native = getattr(flexpos, name)(*args, **kwargs)
    native.load_state_dict(orig.state_dict(), strict=True)


@pytest.mark.parametrize("name, args", [("ALiBi", (4,)), ("DPB", (16, 4)), ("XL", (24, 4))])
def test_learned_div_checkpoint_loads_into_native_and_legacy(name, args):
    new = getattr(legacy, name)(*args, learned_div=True, divide=3.0)
    assert list(new.state_dict())[0] == "div" and new.div.item() == pytest.approx(math.log(3.0))
    native = getattr(flexpos, name)(*args, learned_div=True)
    native.load_state_dict(new.state_dict(), strict=True)
    again = getattr(legacy, name)(*args, learned_div=True)
    again.load_state_dict(native.state_dict(), strict=True)


def test_every_class_is_a_base_and_a_native_module():
    for name, args, kwargs in SCHEMES:
        module = getattr(legacy, name)(*args, **kwargs)
        assert isinstance(module, legacy.Base)
        assert isinstance(module, getattr(flexpos, name))


# ----------------------------------------------------------------------------- mod_x

INPUT_SCHEMES = [c for c in SCHEMES if c[0] in ("Sinusoidal", "LearnedVocab", "LearnedContinuous")]


def _x_positions(name, batch, n, dtype=torch.float32):
    return irregular(*batch, n, integer=True) if name == "LearnedVocab" else irregular(*batch, n, dtype=dtype)


@pytest.mark.parametrize("case", INPUT_SCHEMES, ids=scheme_id)
@pytest.mark.parametrize("batch", BATCHES, ids=str)
@pytest.mark.parametrize(
    "n_pos, mask_len",
    [(None, None), (L, None), (L - 3, None), (L, L), (L - 3, L), (L - 3, L - 3), (L - 3, L - 5)],
    ids=lambda v: str(v),
)
def test_mod_x_matches(case, batch, n_pos, mask_len):
    name, args, kwargs = case
    orig, new = pair(name, *args, **kwargs)
    x = torch.randn(*batch, L, DIM)
    pos = None if n_pos is None else _x_positions(name, batch, n_pos)
    mask = None if mask_len is None else torch.rand(*batch, mask_len) > 0.4
    assert_same(new.mod_x(x, pos=pos, mask=mask), orig.mod_x(x, pos=pos, mask=mask))
    assert_same(new(x, pos=pos, mask=mask), orig(x, pos=pos, mask=mask))


@pytest.mark.parametrize("case", [c for c in INPUT_SCHEMES if c[0] != "LearnedVocab"], ids=scheme_id)
def test_mod_x_matches_in_float64(case):
    name, args, kwargs = case
    orig, new = pair(name, *args, dtype=F64, **kwargs)
    x = torch.randn(2, L, DIM, dtype=F64)
    pos = irregular(2, L - 2, dtype=F64)
    assert_same(new.mod_x(x, pos=pos), orig.mod_x(x, pos=pos), atol=atol_for(F64))


def test_mod_x_gradients_match():
    orig, new = pair("LearnedContinuous", DIM, depth=2, norm=True, divide=2.0, learned_div=True)
    x = torch.randn(2, L, DIM)
    pos = irregular(2, L)
    (orig(x, pos=pos) ** 2).sum().backward()
    (new(x, pos=pos) ** 2).sum().backward()
    for (name, p), (_, q) in zip(orig.named_parameters(), new.named_parameters()):
        assert_same(q.grad, p.grad, rtol=1e-5), name


# ----------------------------------------------------------------------------- Rotary


ROTARY = [c for c in SCHEMES if c[0] == "Rotary"]


@pytest.mark.parametrize("case", ROTARY, ids=scheme_id)
@pytest.mark.parametrize("batch", BATCHES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize("positions", ["default", "irregular", "integer", "short"])
def test_rotary_self_attention_matches(case, batch, dtype, positions):
    name, args, kwargs = case
    orig, new = pair(name, *args, dtype=dtype, **kwargs)
    q, k, v = qkv(batch, dtype=dtype)
    pos = {
        "default": None,
        "irregular": irregular(*batch, L, dtype=dtype),
        "integer": irregular(*batch, L, integer=True),
        "short": irregular(*batch, L - 3, dtype=dtype),
    }[positions]
    for got, want in zip(new.mod_qkv(q, k, v, pos_q_k=pos), orig.mod_qkv(q, k, v, pos_q_k=pos)):
        assert_same(got, want, atol=atol_for(dtype))


@pytest.mark.parametrize("case", ROTARY, ids=scheme_id)
@pytest.mark.parametrize("batch", BATCHES, ids=str)
@pytest.mark.parametrize("lq, lk, nq, nk", [(L, 7, None, None), (L, 7, L, 7), (L, 9, L - 2, 5)])
def test_rotary_cross_attention_matches(case, batch, lq, lk, nq, nk):
    name, args, kwargs = case
    orig, new = pair(name, *args, **kwargs)
    q, k, v = qkv(batch, lq, lk)
    pos_q = None if nq is None else irregular(*batch, nq)
    pos_k = None if nk is None else irregular(*batch, nk)
    got = new.mod_qkv(q, k, v, pos_q=pos_q, pos_k=pos_k, self_attn_mode=False)
    want = orig.mod_qkv(q, k, v, pos_q=pos_q, pos_k=pos_k, self_attn_mode=False)
    for a, b in zip(got, want):
        assert_same(a, b)


def test_rotary_quirk_zeroes_tokens_without_positions():
    _, new = pair("Rotary", H)
    q, k, v = qkv((2,))
    pos = irregular(2, L - 2)
    q2, k2, _ = new.mod_qkv(q, k, v, pos_q_k=pos)
    assert q2[:, :2].abs().max() == 0 and k2[:, :2].abs().max() == 0
    native_q, _ = flexpos.Rotary(H)(q.movedim(-2, -3), k.movedim(-2, -3), pos=pos)
    assert torch.equal(native_q[:, :, :2], q.movedim(-2, -3)[:, :, :2])  # native: unrotated


# ----------------------------------------------------------------------------- mod_mask

BIAS = [c for c in SCHEMES if c[0] in ("ALiBi", "DPB", "XL")]


def _bias_call(module, mask, q, k, v, kind, pos):
    """mod_mask with default positions, self-attention ``pos_q_k`` or cross ``pos_q``/``pos_k``."""
    if kind == "default":
        return module.mod_mask(mask, q, k, v)
    if kind == "self":
        return module.mod_mask(mask, q, k, v, pos_q_k=pos["self"])
    return module.mod_mask(mask, q, k, v, pos_q=pos["q"], pos_k=pos["k"])


@pytest.mark.parametrize("case", BIAS, ids=scheme_id)
@pytest.mark.parametrize("batch", BATCHES, ids=str)
@pytest.mark.parametrize("kind", ["default", "self", "cross"])
@pytest.mark.parametrize("mask", ["none", "full", "short"])
@pytest.mark.parametrize("tables", ["cpu", "accelerator"])
def test_mod_mask_matches(case, batch, kind, mask, tables, monkeypatch):
    """Also with the relative tables built as on accelerators (none for default positions)."""
    monkeypatch.setattr(flexpos.positions, "fewer_tables", lambda device: tables == "accelerator")
    name, args, kwargs = case
    orig, new = pair(name, *args, **kwargs)
    lk = 7 if kind == "cross" else L
    q, k, v = qkv(batch, L, lk)
    pos = {"self": irregular(*batch, L), "q": irregular(*batch, L), "k": irregular(*batch, lk) + 5}
    existing = {
        "none": None,
        "full": torch.randn(*batch, NH, L, lk).masked_fill(torch.rand(*batch, NH, L, lk) > 0.8, -math.inf),
        "short": torch.randn(*batch, NH, L - 2, lk - 3),
    }[mask]
    got = _bias_call(new, existing, q, k, v, kind, pos)
    want = _bias_call(orig, existing, q, k, v, kind, pos)
    assert got.shape[-3:] == (NH, L, lk)
    assert_same(got, want)


@pytest.mark.parametrize("case", BIAS, ids=scheme_id)
@pytest.mark.parametrize("kind", ["self", "cross"])
def test_mod_mask_matches_in_float64(case, kind):
    name, args, kwargs = case
    orig, new = pair(name, *args, dtype=F64, **kwargs)
    lk = 7 if kind == "cross" else L
    q, k, v = qkv((2,), L, lk, dtype=F64)
    pos = {"self": irregular(2, L, dtype=F64), "q": irregular(2, L, dtype=F64), "k": irregular(2, lk, dtype=F64)}
    existing = torch.randn(2, NH, L, lk, dtype=F64)
    got = _bias_call(new, existing, q, k, v, kind, pos)
    assert got.dtype == F64
    assert_same(got, _bias_call(orig, existing, q, k, v, kind, pos), atol=atol_for(F64))


@pytest.mark.parametrize("integer", [False, True])
def test_xl_short_positions_match(integer):
    orig, new = pair("XL", DIM, NH, divide=2.0)
    q, k, v = qkv((2, 3))
    pos = irregular(2, 3, L - 3, integer=integer)
    mask = torch.randn(2, 3, NH, L, L)
    for m in (None, mask):
        assert_same(new.mod_mask(m, q, k, v, pos_q_k=pos), orig.mod_mask(m, q, k, v, pos_q_k=pos))


@pytest.mark.parametrize("case", BIAS, ids=scheme_id)
def test_mod_qkv_and_mod_mask_in_the_original_call_order(case):
    """The original layers call mod_qkv, then mod_mask with the modified q (XL adds u twice)."""
    name, args, kwargs = case
    orig, new = pair(name, *args, **kwargs)
    q, k, v = qkv((2, 3))
    pos = irregular(2, 3, L)
    q_o, k_o, v_o = orig.mod_qkv(q, k, v, pos_q_k=pos)
    q_n, k_n, v_n = new.mod_qkv(q, k, v, pos_q_k=pos)
    for a, b in ((q_n, q_o), (k_n, k_o), (v_n, v_o)):
        assert_same(a, b)
    assert_same(new.mod_mask(None, q_n, k_n, v_n, pos_q_k=pos), orig.mod_mask(None, q_o, k_o, v_o, pos_q_k=pos))


@pytest.mark.parametrize("case", SCHEMES, ids=scheme_id)
@pytest.mark.parametrize("batch, length", [((0,), L), ((2,), 0), ((2, 0), L), ((2, 3), 0)], ids=str)
def test_empty_batches_and_sequences_pass_through_like_the_original(case, batch, length):
    """mod_x, or mod_qkv then mod_mask, on an empty batch or sequence: the original's shapes."""
    name, args, kwargs = case
    orig, new = pair(name, *args, **kwargs)
    pos = _x_positions(name, batch, length)
    if name in ("Sinusoidal", "LearnedVocab", "LearnedContinuous"):
        x = torch.randn(*batch, length, DIM)
        assert_same(new.mod_x(x, pos=pos), orig.mod_x(x, pos=pos))
        return
    q, k, v = qkv(batch, length, length)
    outs_o = orig.mod_qkv(q, k, v, pos_q_k=pos)
    outs_n = new.mod_qkv(q, k, v, pos_q_k=pos)
    mask_n, mask_o = new.mod_mask(None, *outs_n, pos_q_k=pos), orig.mod_mask(None, *outs_o, pos_q_k=pos)
    assert (mask_n is None) == (mask_o is None)  # Rotary leaves the mask alone
    for a, b in zip((*outs_n, *([mask_n] if mask_n is not None else [])), (*outs_o, mask_o)):
        assert a.shape == b.shape
        assert_same(a, b)


def test_xl_quirk_adds_u_twice_and_never_uses_v():
    _, new = pair("XL", DIM, NH)
    q, k, v = qkv((2,))
    pos = irregular(2, L)
    q1, k1, _ = new.mod_qkv(q, k, v, pos_q_k=pos)
    bias = new.mod_mask(None, q1, k1, v, pos_q_k=pos)
    u = new.bias_r_w
    q_heads = (q + 2 * u).movedim(-2, -3)
    positions = flexpos.Positions.resolve((2,), L, L, q.device, pos=pos)
    assert_same(bias, new.relative_bias(q_heads, positions), atol=1e-5)
    bias.sum().backward()
    assert new.bias_r_r.grad is None and new.bias_r_w.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- asymmetric ALiBi


def _asymmetric_pair():
    return pair("ALiBi", NH, asymmetric=True, divide=1.5)


def test_asymmetric_blocks_with_finfo_max_like_the_original():
    orig, new = _asymmetric_pair()
    q, k, v = qkv((2,))
    pos = irregular(2, L)
    got = new.mod_mask(None, q, k, v, pos_q_k=pos)
    assert (got == -torch.finfo(torch.float32).max).any() and torch.isfinite(got).all()
    mask = torch.zeros(2, NH, L, L).masked_fill(torch.rand(2, NH, L, L) > 0.7, -math.inf)
    assert_same(new.mod_mask(mask, q, k, v, pos_q_k=pos), orig.mod_mask(mask, q, k, v, pos_q_k=pos))


@pytest.mark.parametrize("pos_shape", [(2, 3, L), (2, 1, L), (L,), (3, L)], ids=str)
def test_asymmetric_alternation_follows_the_original_bias_layout(pos_shape):
    orig, new = _asymmetric_pair()
    q, k, v = qkv((2, 3))
    pos = irregular(*pos_shape)
    want = orig.mod_mask(torch.zeros(2, 3, NH, L, L), q, k, v, pos_q_k=pos)
    assert_same(new.mod_mask(None, q, k, v, pos_q_k=pos), want)


@pytest.mark.parametrize("c", [1, 2, 3])
def test_asymmetric_unbatched_short_positions_give_the_subsequence_bias(c):
    """Unbatched (L',) positions after c tokens without a position (bio-attention's layers crash
    there): the positioned rows get the original's bias of the positioned sub-sequence, whose
    per-query alternation starts at the first positioned query, for odd c too."""
    orig, new = _asymmetric_pair()
    q, k, v = qkv((2,))
    pos = irregular(L - c)
    got = new.mod_mask(None, q, k, v, pos_q_k=pos)
    assert_same(got[..., c:, c:], orig.mod_mask(None, q[:, c:], k[:, c:], v[:, c:], pos_q_k=pos))
    assert not got[..., :c, :].any() and not got[..., :, :c].any()


def test_asymmetric_alternation_over_heads_is_the_native_pattern():
    _, new = _asymmetric_pair()
    q, k, v = qkv((2,))
    pos = irregular(2, L)
    legacy_bias = new.mod_mask(None, q, k, v, pos_q_k=pos)
    native = flexpos.ALiBi(NH, asymmetric=True, divide=1.5)
    positions = flexpos.Positions.resolve((2,), L, L, q.device, pos=pos)
    native_bias = native.score_mod(positions)(torch.zeros(()), *index_grids(2, NH, L, L))
    blocked = torch.isinf(native_bias)
    assert torch.equal(legacy_bias == -torch.finfo(torch.float32).max, blocked)
    assert_same(legacy_bias[~blocked], native_bias[~blocked])


# ----------------------------------------------------------------------------- crash cases


@pytest.mark.parametrize("name, args", [("ALiBi", (NH,)), ("DPB", (16, NH)), ("XL", (DIM, NH))])
def test_learned_div_works_where_the_original_crashes(name, args):
    with pytest.raises(TypeError):
        getattr(original, name)(*args, learned_div=True)
    fixed = getattr(legacy, name)(*args, divide=2.5)
    learned = getattr(legacy, name)(*args, divide=2.5, learned_div=True)
    learned.load_state_dict({**fixed.state_dict(), "div": learned.div.detach()}, strict=True)
    q, k, v = qkv((2, 3))
    pos = irregular(2, 3, L)
    q1, k1, v1 = learned.mod_qkv(q, k, v, pos_q_k=pos)
    out = learned.mod_mask(None, q1, k1, v1, pos_q_k=pos)
    q2, k2, v2 = fixed.mod_qkv(q, k, v, pos_q_k=pos)
    assert_same(out, fixed.mod_mask(None, q2, k2, v2, pos_q_k=pos), atol=1e-5)
    (out.sin().sum()).backward()
    assert learned.div.grad is not None and learned.div.grad.abs() > 0


@pytest.mark.parametrize("case", [c for c in BIAS if c[0] != "XL"], ids=scheme_id)
@pytest.mark.parametrize("with_mask", [False, True])
def test_short_positions_work_where_the_original_crashes(case, with_mask):
    """ALiBi/DPB with positions shorter than L: tokens without a position get no bias."""
    name, args, kwargs = case
    orig, new = pair(name, *args, **kwargs)
    c = 3  # leading tokens without a position (CLS and the like)
    q, k, v = qkv((2, 3))
    pos = irregular(2, 3, L - c)
    mask = torch.randn(2, 3, NH, L, L) if with_mask else None
    with pytest.raises(RuntimeError):
        original_out = orig.mod_mask(mask, q, k, v, pos_q_k=pos)
        original_out + torch.zeros(2, 3, NH, L, L)  # what the original layers do with it
    got = new.mod_mask(mask, q, k, v, pos_q_k=pos)
    base = torch.zeros(2, 3, NH, L, L) if mask is None else mask
    assert torch.equal(got[..., :c, :], base[..., :c, :].expand_as(got[..., :c, :]))
    assert torch.equal(got[..., :, :c], base[..., :, :c].expand_as(got[..., :, :c]))
    inner = orig.mod_mask(None if mask is None else mask[..., c:, c:], q[..., c:, :, :], k[..., c:, :, :],
                          v[..., c:, :, :], pos_q_k=pos)
    assert_same(got[..., c:, c:], inner)


@pytest.mark.parametrize(
    "model, given", [(F64, torch.int64), (F64, torch.float32), (torch.float32, F64)], ids=str
)
def test_learned_continuous_takes_positions_of_another_precision_where_the_original_crashes(model, given):
    """The original feeds integer positions divided to float32, and float positions as given,
    to layers of the model's dtype, which refuse them."""
    orig, new = pair("LearnedContinuous", DIM, dtype=model)
    x = torch.randn(2, L, DIM, dtype=model)
    pos = irregular(2, L - 2, integer=given == torch.int64).to(given)
    with pytest.raises(RuntimeError, match="same dtype"):
        orig.mod_x(x, pos=pos)
    assert_same(new.mod_x(x, pos=pos), orig.mod_x(x, pos=pos.to(model)), atol=atol_for(model))


def test_rotary_self_mode_with_other_key_length_is_the_originals_cross_mode():
    """With default positions and L1 != L2 the original's self mode fails an assert; legacy
    rotates as its cross mode does."""
    orig, new = pair("Rotary", H)
    q, k, v = qkv((2,), L, L - 4)
    with pytest.raises(AssertionError):
        orig.mod_qkv(q, k, v)
    for a, b in zip(new.mod_qkv(q, k, v), orig.mod_qkv(q, k, v, self_attn_mode=False)):
        assert_same(a, b)


def test_float32_positions_in_a_float64_model_are_taken_in_float64():
    """The original divides and subtracts float32 positions in float32; legacy equals the
    original given the same values as float64."""
    pos = (1e6 + torch.rand(2, L) * 100).sort(-1).values  # float32
    for name, args in [("Rotary", (H,)), ("ALiBi", (NH,)), ("DPB", (16, NH)), ("XL", (DIM, NH))]:
        orig, new = pair(name, *args, divide=3.0, dtype=F64)
        q, k, v = qkv((2,), dtype=F64)
        got = new.mod_qkv(q, k, v, pos_q_k=pos)
        want = orig.mod_qkv(q, k, v, pos_q_k=pos.double())
        for a, b in zip((*got, new.mod_mask(None, *got, pos_q_k=pos)), (*want, orig.mod_mask(None, *want, pos_q_k=pos.double()))):
            if b is not None:
                assert_same(a, b, atol=1e-9 * b.abs().max().item() + atol_for(F64))


def test_one_positioned_token_gets_the_subsequence_bias_where_the_original_broadcasts():
    """DPB with one position and L - 1 CLS tokens: bio-attention's (B, *, NH, 1, 1) bias
    broadcasts MLP(0) over every pair, which softmax ignores (docs/legacy.md); legacy biases only
    the positioned token's pair, as for longer positions."""
    orig, new = pair("DPB", 16, NH, depth=2, norm=True)
    q, k, v = qkv((2, 3))
    pos = irregular(2, 3, 1)
    broadcast = orig.mod_mask(None, q, k, v, pos_q_k=pos)
    assert broadcast.shape == (2, 3, NH, 1, 1)
    got = new.mod_mask(None, q, k, v, pos_q_k=pos)
    assert_same(got[..., -1:, -1:], broadcast)
    assert torch.equal(got[..., :-1, :], torch.zeros_like(got[..., :-1, :]))
    assert torch.equal(got[..., :, :-1], torch.zeros_like(got[..., :, :-1]))


@pytest.mark.parametrize("name, args", [("ALiBi", (NH,)), ("DPB", (16, NH)), ("XL", (DIM, NH))])
def test_bool_masks_are_accepted_by_mod_mask(name, args):
    """True = attend, False = -inf. bio-attention's ALiBi and DPB refuse bool masks; its XL adds
    them to the scores as 1 / 0."""
    orig, new = pair(name, *args)
    q, k, v = qkv((2,))
    keep = torch.rand(2, NH, L, L) > 0.3
    additive = torch.zeros(2, NH, L, L).masked_fill(~keep, -math.inf)
    assert_same(new.mod_mask(keep, q, k, v), new.mod_mask(additive, q, k, v))
    if name == "XL":
        assert_same(orig.mod_mask(keep, q, k, v), new.mod_mask(keep.float(), q, k, v))
    else:
        with pytest.raises(RuntimeError):
            orig.mod_mask(keep, q, k, v)


def test_output_dtypes_that_differ_from_the_original():
    """Half-precision x keeps its dtype in LearnedVocab/LearnedContinuous.mod_x (the original
    promotes to float32); ALiBi.mod_mask of float64 q on a float32 module works in float64, so
    asymmetric heads block with -finfo(float64).max (the original: float32)."""
    for name, args, pos in [("LearnedVocab", (DIM, 64), irregular(2, L, integer=True)),
                            ("LearnedContinuous", (DIM,), irregular(2, L))]:
        orig, new = pair(name, *args)
        x = torch.randn(2, L, DIM, dtype=torch.float16)
        want, got = orig.mod_x(x, pos=pos), new.mod_x(x, pos=pos)
        assert want.dtype == torch.float32 and got.dtype == torch.float16
        assert_same(got.float(), want, atol=1e-3, rtol=1e-3)  # float16 rounding of the sum
    orig, new = _asymmetric_pair()
    q, k, v = qkv((2,), dtype=F64)
    got, want = new.mod_mask(None, q, k, v), orig.mod_mask(None, q, k, v)
    assert got.dtype == F64 and want.dtype == torch.float32
    assert got.min() == -torch.finfo(F64).max and want.min() == -torch.finfo(torch.float32).max
    blocked = want == want.min()
    assert torch.equal(got == got.min(), blocked)
    assert_same(got[~blocked].float(), want[~blocked])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_modules_keep_their_frequencies_in_float32(dtype):
    """``.to(float16/bfloat16)`` leaves Sinusoidal's and Rotary's frequencies in float32 (the
    original rounds them, and misses at positions near 1e4 the tolerance legacy meets): outputs
    match the float64 module on the same rounded inputs within the dtype's tolerance.
    (A checkpoint saved in half precision holds rounded frequencies, which load as they are.)"""
    pos = irregular(2, L) + 10_000
    x = torch.randn(2, L, DIM).to(dtype)
    q, k, _ = (t.to(dtype) for t in qkv((2,)))
    for name, args in [("Sinusoidal", (DIM,)), ("Rotary", (H,))]:
        runs = [(getattr(m, name)(*args).to(t), t) for m, t in ((legacy, dtype), (legacy, F64), (original, dtype))]
        (new, _), _, (orig, _) = runs
        table = "inv_freq" if name == "Sinusoidal" else "thetas"
        assert getattr(new, table).dtype == torch.float32 and getattr(orig, table).dtype == dtype
        if name == "Sinusoidal":
            got, want, originals = (m.mod_x(x.to(t), pos=pos) for m, t in runs)
        else:
            got, want, originals = (torch.cat(m.mod_qkv(q.to(t), k.to(t), None, pos_q_k=pos)[:2], -1) for m, t in runs)
        assert got.dtype == dtype
        assert_same(got.double(), want, atol=TOLERANCE[dtype], rtol=0)
        assert (originals.double() - want).abs().max() > TOLERANCE[dtype]  # what legacy keeps


def test_one_sided_positions_default_the_other_side():
    orig, new = pair("ALiBi", NH)
    q, k, v = qkv((2,), L, 7)
    pos_q = irregular(2, L)
    got = new.mod_mask(None, q, k, v, pos_q=pos_q)
    assert_same(got, orig.mod_mask(None, q, k, v, pos_q=pos_q, pos_k=torch.arange(7).expand(2, 7)))


# ----------------------------------------------------------------------------- inside the original layer


LAYER_CASES = [
    ("Sinusoidal", (DIM,), {"divide": 2.0}),
    ("LearnedVocab", (DIM, 64), {}),
    ("LearnedContinuous", (DIM,), {"depth": 2, "norm": True}),
    ("Rotary", (H,), {"n_dims": 4}),
    ("ALiBi", (NH,), {"asymmetric": True}),
    ("ALiBi", (NH,), {"use_n_heads": 3}),
    ("DPB", (16, NH), {"depth": 2, "norm": True}),
    ("XL", (DIM, NH), {"divide": 2.0}),
]


def _layer_pair(plugins_orig, plugins_new):
    layer_orig = OriginalTransformerLayer(Attention(), DIM, NH, plugin=plugins_orig, dropout=0.0)
    layer_new = OriginalTransformerLayer(Attention(), DIM, NH, plugin=plugins_new, dropout=0.0)
    layer_new.load_state_dict(layer_orig.state_dict(), strict=True)
    return layer_orig, layer_new


@pytest.mark.parametrize("case", LAYER_CASES, ids=scheme_id)
@pytest.mark.parametrize("batch", BATCHES, ids=str)
@pytest.mark.parametrize("inputs", ["plain", "positions+key_mask", "causal+pair_mask"])
def test_plugged_into_the_original_transformer_layer(case, batch, inputs):
    name, args, kwargs = case
    orig, new = pair(name, *args, **kwargs)
    layer_orig, layer_new = _layer_pair([orig], [new])
    x = torch.randn(*batch, L, DIM)
    pos = irregular(*batch, L, integer=True) if name == "LearnedVocab" else irregular(*batch, L)
    call = {
        "plain": {},
        "positions+key_mask": {"pos": pos, "mask": torch.rand(*batch, L) > 0.3},
        "causal+pair_mask": {"pos": pos, "mask": torch.randn(*batch, L, L), "causal": True},
    }[inputs]
    out_orig, out_new = layer_orig(x, **call), layer_new(x, **call)
    assert_same(out_new, out_orig)
    (out_orig.tanh().sum()).backward()
    (out_new.tanh().sum()).backward()
    grads_orig = dict(layer_orig.named_parameters())
    for key, p in layer_new.named_parameters():
        if grads_orig[key].grad is None:  # XL's bias_r_r, unused by the original
            assert p.grad is None, key
            continue
        assert_same(p.grad, grads_orig[key].grad, rtol=1e-5)


def test_plugin_list_with_cls_positions_in_the_original_layer():
    """Several plugins at once, positions shorter than L (XL and Rotary support this)."""
    pairs = [pair("Sinusoidal", DIM), pair("Rotary", H), pair("XL", DIM, NH)]
    layer_orig, layer_new = _layer_pair([p[0] for p in pairs], [p[1] for p in pairs])
    x = torch.randn(2, 3, L, DIM)
    pos = irregular(2, 3, L - 2)
    mask = torch.rand(2, 3, L - 2) > 0.3
    assert_same(layer_new(x, pos=pos, mask=mask), layer_orig(x, pos=pos, mask=mask))


# ----------------------------------------------------------------------------- small API


def test_base_is_identity_and_forward_is_mod_x():
    base = legacy.Base(divide=2.0, learned=True)
    assert list(base.state_dict()) == list(original.Base(divide=2.0, learned=True).state_dict())
    q, k, v = qkv((2,))
    x = torch.randn(2, L, DIM)
    assert base(x) is x and base.mod_x(x, pos=None, mask=None) is x
    assert base.mod_qkv(q, k, v) == (q, k, v)
    assert base.mod_mask(None, q, k, v) is None
    rot = legacy.Rotary(H)
    assert rot(x) is x  # forward is mod_x, the identity for q/k schemes
    assert legacy.ALiBi._get_slopes(6) == original.ALiBi._get_slopes(6)


def test_hint_is_shown_once_and_points_to_flexpos():
    _hint.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        legacy.ALiBi(4)
        legacy.Rotary(8)
        legacy.Base()
    hints = [w for w in caught if issubclass(w.category, FutureWarning)]
    assert len(hints) == 1
    assert "flexpos.ALiBi" in str(hints[0].message) and "\n" not in str(hints[0].message)


@pytest.mark.parametrize("learned_div", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_base_helpers_match(learned_div, dtype):
    """The plugin base's public helpers: positions over the divisor, and default positions."""
    orig, new = pair("Sinusoidal", DIM, divide=2.5, learned_div=learned_div, dtype=dtype)
    pos = torch.rand(2, 3, L, dtype=dtype) * 1e4
    torch.testing.assert_close(new.apply_pos_division(pos), orig.apply_pos_division(pos), rtol=1e-6, atol=0)
    x = torch.randn(2, 3, L, DIM)
    assert torch.equal(new.default_pos_x(x), orig.default_pos_x(x))
    assert new.default_pos_x(x).shape == (2, 3, L)
