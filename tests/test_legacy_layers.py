"""legacy.layers (flex-backed AttnLayer / TransformerLayer) vs bio-attention 0.1.15's layers.

On CPU flexpos runs its chunked backend; most tests run it eagerly (cheap), a few with the
``compiled`` fixture (each distinct score_mod/mask_mod combination costs one compile).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from bio_attention import attention as original_attention
from bio_attention import positional as original_positional
from bio_attention.attention import Attention
from torch import nn

import flexpos

from legacy import positional as legacy
from legacy._masks import layer_mask
from legacy.layers import AttnLayer, TransformerLayer
from legacy_support import assert_same, irregular, pair, scheme_id

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

# Head dim 12: compiled CPU flex in torch 2.13 is wrong for head dims 8 and 16 at some lengths.
NH, H = 4, 12
DIM = NH * H
L = 20
BATCHES = [(2,), (2, 3)]

PLUGINS = [
    ("Base", (), {}),
    ("Sinusoidal", (DIM,), {"divide": 2.0}),
    ("LearnedVocab", (DIM, 64), {}),
    ("LearnedContinuous", (DIM,), {"depth": 2, "norm": True}),
    ("Rotary", (H,), {"n_dims": 8}),
    ("ALiBi", (NH,), {"asymmetric": True}),
    ("ALiBi", (NH,), {"use_n_heads": 3, "divide": 2.0}),
    ("DPB", (16, NH), {"depth": 2, "norm": True}),
    ("XL", (DIM, NH), {"divide": 2.0}),
    ("DPB", (16, NH), {"divide": 3.0}),  # the default MLP: affine, a rate and a shift per head
]


def plugin_pairs(cases):
    pairs = [pair(name, *args, **kwargs) for name, args, kwargs in cases]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def layer_pair(cases, **kwargs):
    """(original TransformerLayer, flex TransformerLayer) with the same weights."""
    orig_plugins, new_plugins = plugin_pairs(cases)
    orig = original_attention.TransformerLayer(Attention(), DIM, NH, plugin=orig_plugins, dropout=0.0, **kwargs)
    new = TransformerLayer(Attention(), DIM, NH, plugin=new_plugins, dropout=0.0, **kwargs)
    new.load_state_dict(orig.state_dict(), strict=True)
    return orig, new


def positions_for(cases, batch, n=L):
    integer = any(name == "LearnedVocab" for name, _, _ in cases)
    return irregular(*batch, n, integer=integer)


def pair_mask(*shape):
    """Random bool (.., L, L) mask that keeps the diagonal (no row without keys)."""
    return (torch.rand(*shape) > 0.3) | torch.eye(shape[-1], dtype=torch.bool)


def key_mask(*shape):
    """Random bool key mask keeping the first and last token, so that every query of an
    asymmetric ALiBi head has a key on its side (see test_rows_blocked_by_asymmetric_alibi)."""
    mask = torch.rand(*shape) > 0.3
    mask[..., 0] = mask[..., -1] = True
    return mask


def compare(orig, new, x, grads=True, **call):
    """Outputs (and gradients into x and every parameter) of two layers on the same call."""
    x_orig, x_new = x.clone().requires_grad_(grads), x.clone().requires_grad_(grads)
    out_orig, out_new = orig(x_orig, **_original_call(call, x.shape[:-2])), new(x_new, **call)
    assert_same(out_new, out_orig)
    if not grads:
        return
    out_orig.tanh().sum().backward()
    out_new.tanh().sum().backward()
    assert_same(x_new.grad, x_orig.grad, rtol=1e-5)
    grads_orig = dict(orig.named_parameters())
    for key, p in new.named_parameters():
        if grads_orig[key].grad is None:  # XL's bias_r_r, unused by the original
            assert p.grad is None, key
        else:
            assert_same(p.grad, grads_orig[key].grad, rtol=1e-5)


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(
    "cases", [[], [PLUGINS[5]], [PLUGINS[1], PLUGINS[4], PLUGINS[8]], [PLUGINS[7], PLUGINS[3]]], ids=str
)
@pytest.mark.parametrize("glu_ff, activation", [(True, "swish"), (False, "gelu"), (False, "relu")])
def test_transformer_layer_state_dict_loads_strict_both_ways(cases, glu_ff, activation):
    orig, new = layer_pair(cases or None, glu_ff=glu_ff, activation=activation) if cases else (
        original_attention.TransformerLayer(Attention(), DIM, NH, glu_ff=glu_ff, activation=activation),
        TransformerLayer(Attention(), DIM, NH, glu_ff=glu_ff, activation=activation),
    )
    assert list(new.state_dict()) == list(orig.state_dict())
    assert [n for n, _ in new.named_parameters()] == [n for n, _ in orig.named_parameters()]
    new.load_state_dict(orig.state_dict(), strict=True)
    orig.load_state_dict(new.state_dict(), strict=True)


def test_attn_layer_state_dict_loads_strict_both_ways():
    orig_plugins, new_plugins = plugin_pairs([PLUGINS[4], PLUGINS[8]])
    orig = original_attention.AttnLayer(DIM, Attention(), nh=NH, plugin=nn.ModuleList(orig_plugins))
    new = AttnLayer(DIM, Attention(), nh=NH, plugin=nn.ModuleList(new_plugins))
    assert list(new.state_dict()) == list(orig.state_dict())
    new.load_state_dict(orig.state_dict(), strict=True)
    orig.load_state_dict(new.state_dict(), strict=True)
    default = AttnLayer(DIM, None, nh=NH)
    default.load_state_dict(original_attention.AttnLayer(DIM, Attention(), nh=NH).state_dict(), strict=True)


# ----------------------------------------------------------------------------- same outputs, same gradients


def _inputs(kind, cases, batch):
    pos = positions_for(cases, batch)
    return {
        "plain": {},
        "positions": {"pos": pos},
        "key_mask": {"pos": pos, "mask": key_mask(*batch, L)},
        "pair_mask": {"pos": pos, "mask": pair_mask(*batch, L, L)},
        "head_float_mask": {
            "pos": pos,
            "mask": torch.randn(*batch, NH, L, L).masked_fill(~pair_mask(*batch, NH, L, L), -math.inf),
        },
        "causal": {"pos": pos, "causal": True},
    }[kind]


def _original_call(call, batch):
    """The original layer's arguments for the same attention pattern: with a mask or a bias
    plugin the original masks the diagonal under ``causal`` (see
    test_causal_with_a_mask_keeps_the_diagonal), so causality is given to it as part of an
    explicit (B, *, L, L) bool mask."""
    if not call.get("causal"):
        return call
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    mask = call.get("mask")
    if mask is not None:
        assert mask.dtype == torch.bool and mask.ndim == len(batch) + 1, "helper handles key masks"
        mask = torch.cat([torch.ones(*batch, L - mask.shape[-1], dtype=torch.bool), mask], -1)
        causal = causal & mask[..., None, :]
    return {**call, "causal": False, "mask": causal.expand(*batch, L, L)}


@pytest.mark.parametrize("case", PLUGINS, ids=scheme_id)
@pytest.mark.parametrize("batch", BATCHES, ids=str)
@pytest.mark.parametrize("kind", ["plain", "positions", "key_mask", "pair_mask", "head_float_mask", "causal"])
def test_flex_layer_matches_the_original_layer(case, batch, kind):
    orig, new = layer_pair([case])
    compare(orig, new, torch.randn(*batch, L, DIM), **_inputs(kind, [case], batch))


@pytest.mark.parametrize("shape", [(0, L), (2, 0), (2, 3, 0)], ids=str)
def test_empty_batches_and_sequences_match_the_original_layer(shape):
    """Every plugin at once on an empty batch or sequence, with positions and a key mask: the
    original's output shape, and a backward that reaches every parameter."""
    cases = [c for c in PLUGINS if c[0] != "Base"]
    orig, new = layer_pair(cases)
    x = torch.randn(*shape, DIM)
    call = {"pos": positions_for(cases, shape[:-1], shape[-1]), "mask": torch.rand(shape) > 0.3}
    out = new(x, **call)
    assert out.shape == orig(x, **call).shape == (*shape, DIM)
    out.sum().backward()
    assert all(p.grad is not None for p in new.parameters())


@pytest.mark.parametrize("batch", BATCHES, ids=str)
def test_plugin_list_with_cls_tokens_matches(batch):
    """Positions and key mask shorter than L (2 CLS tokens), several plugins at once."""
    cases = [PLUGINS[1], PLUGINS[4], PLUGINS[8], PLUGINS[3]]
    orig, new = layer_pair(cases)
    pos = irregular(*batch, L - 2)
    mask = torch.rand(*batch, L - 2) > 0.3
    compare(orig, new, torch.randn(*batch, L, DIM), pos=pos, mask=mask)


@pytest.mark.parametrize("mask_shape", ["pair", "heads", "one_head"])
def test_short_float_masks_match(mask_shape):
    """Float masks shorter than L are left-padded: CLS tokens attend and are attended freely."""
    orig, new = layer_pair([PLUGINS[4], PLUGINS[6]])
    heads = {"pair": (), "heads": (NH,), "one_head": (1,)}[mask_shape]
    shape = (2, *heads, L - 3, L - 3)
    mask = torch.randn(*shape).masked_fill(torch.rand(*shape) > 0.8, -math.inf)
    mask = mask.masked_fill(torch.eye(L - 3, dtype=torch.bool), 0.0)
    compare(orig, new, torch.randn(2, L, DIM), mask=mask)


@pytest.mark.parametrize("kind", ["bool", "float", "float_with_inf"])
@pytest.mark.parametrize("batch", BATCHES, ids=str)
def test_masks_broadcast_over_heads_match(kind, batch):
    """(B, *, 1, L, L) masks (one mask for every head), as bio-attention accepts them."""
    orig, new = layer_pair([PLUGINS[5]])
    keep = pair_mask(*batch, 1, L, L)
    scores = torch.randn(*batch, 1, L, L)
    mask = {"bool": keep, "float": scores, "float_with_inf": scores.masked_fill(~keep, -math.inf)}[kind]
    compare(orig, new, torch.randn(*batch, L, DIM), pos=positions_for([], batch), mask=mask)


def test_short_float_key_mask_adds_nothing_to_cls_rows():
    """A float (B, L') key mask given to AttnLayer: like bio-attention, its finite values bias
    only the queries it covers; its -inf keys stay masked for the CLS queries too (see
    test_short_key_mask_in_attn_layer_also_masks_cls_queries)."""
    orig_plugins, new_plugins = plugin_pairs([PLUGINS[6]])
    orig = original_attention.AttnLayer(DIM, Attention(), nh=NH, plugin=nn.ModuleList(orig_plugins))
    new = AttnLayer(DIM, None, nh=NH, plugin=nn.ModuleList(new_plugins))
    new.load_state_dict(orig.state_dict(), strict=True)
    c, x = 2, torch.randn(2, L, DIM)
    scores = torch.randn(2, L - c) * 3
    compare(orig, new, x, mask=scores)
    padded = torch.rand(2, L - c) > 0.7
    padded[:, -1] = False
    with_inf = scores.masked_fill(padded, -math.inf)
    cls_rows = torch.zeros(2, c, L - c).masked_fill(padded[:, None], -math.inf)
    pair_scores = torch.cat([cls_rows, with_inf[:, None].expand(2, L - c, L - c)], 1)  # (2, L, L')
    explicit = torch.cat([torch.zeros(2, L, c), pair_scores], -1)
    assert_same(new(x, mask=with_inf), orig(x, mask=explicit))


def test_attn_layer_matches_with_unbatched_positions():
    """(L,) positions broadcast over the batch; asymmetric ALiBi then alternates per query.
    (Without a mask the original crashes here, its bias lacking the batch dims; the flex layer
    works.)"""
    orig_plugins, new_plugins = plugin_pairs([PLUGINS[5], PLUGINS[4]])
    orig = original_attention.AttnLayer(DIM, Attention(), nh=NH, plugin=nn.ModuleList(orig_plugins))
    new = AttnLayer(DIM, None, nh=NH, plugin=nn.ModuleList(new_plugins))
    new.load_state_dict(orig.state_dict(), strict=True)
    x, pos = torch.randn(2, 3, L, DIM), irregular(L)
    compare(orig, new, x, pos=pos, mask=key_mask(2, 3, L))
    assert_same(new(x, pos=pos), orig(x, pos=pos, mask=torch.ones(2, 3, L, dtype=torch.bool)))


# ----------------------------------------------------------------------------- legacy dense path <-> flex


def dense_and_flex(cases):
    """Original TransformerLayer running the legacy plugins densely (mod_qkv/mod_mask), and the
    flex layer sharing the very same plugin modules and weights."""
    plugins = [getattr(legacy, name)(*args, **kwargs) for name, args, kwargs in cases]
    dense = original_attention.TransformerLayer(Attention(), DIM, NH, plugin=plugins, dropout=0.0)
    flex = TransformerLayer(Attention(), DIM, NH, plugin=plugins, dropout=0.0)
    flex.load_state_dict(dense.state_dict(), strict=True)
    return dense, flex


@pytest.mark.parametrize("case", [c for c in PLUGINS if c[0] in ("ALiBi", "DPB")], ids=scheme_id)
@pytest.mark.parametrize("with_mask", [False, True])
def test_short_positions_for_alibi_and_dpb_dense_equals_flex(case, with_mask):
    """The original crashes here; legacy plugins work in both layers and agree."""
    orig, _ = layer_pair([case])
    x = torch.randn(2, 3, L, DIM)
    call = {"pos": irregular(2, 3, L - 3), "mask": (torch.rand(2, 3, L - 3) > 0.3) if with_mask else None}
    with pytest.raises(RuntimeError):
        orig(x, **call)
    dense, flex = dense_and_flex([case])
    compare(dense, flex, x, **call)


@pytest.mark.parametrize("name, args", [("ALiBi", (NH,)), ("DPB", (16, NH)), ("XL", (DIM, NH))])
def test_learned_div_dense_equals_flex_with_gradients(name, args):
    dense, flex = dense_and_flex([(name, args, {"learned_div": True, "divide": 3.0})])
    compare(dense, flex, torch.randn(2, L, DIM), pos=irregular(2, L), mask=torch.rand(2, L) > 0.2)
    div = flex.plugin[0].div
    assert div.grad is not None and div.grad.abs() > 0


@pytest.mark.parametrize("case", PLUGINS, ids=scheme_id)
def test_dense_path_equals_flex_with_cls_tokens(case):
    """Every plugin, positions and key mask shorter than L, extra batch dims: the legacy dense
    path (inside the original layer) and the flex layer agree, gradients included."""
    dense, flex = dense_and_flex([case])
    call = {"pos": positions_for([case], (2, 3), L - 2), "mask": key_mask(2, 3, L - 2)}
    compare(dense, flex, torch.randn(2, 3, L, DIM), **call)


def test_unbatched_short_positions_with_asymmetric_alibi_dense_equals_flex():
    """(L',) positions after an odd number of CLS tokens: the per-query alternation counts from
    the first positioned query in both paths."""
    dense, flex = dense_and_flex([PLUGINS[5]])
    call = {"pos": irregular(L - 3), "mask": key_mask(2, L - 3)}
    compare(dense, flex, torch.randn(2, L, DIM), **call)


def test_rows_blocked_by_asymmetric_alibi():
    """A query whose keys all lie the wrong way: bio-attention's finite -finfo.max makes it
    average those keys uniformly, and so does flexpos. On CPU (the chunked path: SDPA with an
    additive bias, as bio-attention) the gradients of that row are bio-attention's too."""
    orig, new = pair("ALiBi", 2, asymmetric=True)
    q, k, v = (torch.randn(2, L, 2, H, requires_grad=True) for _ in range(3))
    keep = torch.ones(2, L, dtype=torch.bool)
    keep[:, -1] = False  # the last query: nothing after it, itself masked, head 0 looks forward
    additive = torch.zeros(2, 2, L, L).masked_fill(~keep[:, None, None, :], -math.inf)
    scores = orig.mod_mask(additive, q, k, v)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=scores
    )
    out = flexpos.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), new, mask=keep)
    assert_same(out, expected)
    assert_same(out[:, 0, -1], v[:, :-1, 0].mean(1))
    got = torch.autograd.grad(out[:, 0, -1].sum(), (q, k, v))
    want = torch.autograd.grad(expected[:, 0, -1].sum(), (q, k, v))
    for g, w in zip(got, want):
        assert_same(g, w)


def test_flex_layer_never_builds_the_dense_mask(monkeypatch):
    dense, flex = dense_and_flex([PLUGINS[4], PLUGINS[5], PLUGINS[7], PLUGINS[8]])

    def refuse(*args, **kwargs):
        raise AssertionError("the flex layer must not call mod_qkv/mod_mask")

    for plugin in flex.plugin:
        monkeypatch.setattr(plugin, "mod_qkv", refuse)
        monkeypatch.setattr(plugin, "mod_mask", refuse)
    out = flex(torch.randn(2, L, DIM), pos=irregular(2, L), mask=torch.rand(2, L) > 0.2)
    assert out.shape == (2, L, DIM) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- compiled FlexAttention


@pytest.mark.usefixtures("compiled")
def test_compiled_layer_matches_the_original_with_key_mask_and_extra_dims():
    orig, new = layer_pair([PLUGINS[1], PLUGINS[4], PLUGINS[5]])
    batch = (2, 3)
    with torch.no_grad():
        compare(orig, new, torch.randn(*batch, L, DIM), grads=False, **_inputs("key_mask", [], batch))


@pytest.mark.usefixtures("compiled")
def test_compiled_layer_matches_the_original_with_xl_cls_tokens_and_causal():
    orig, new = layer_pair([PLUGINS[8], PLUGINS[2]])
    call = {"pos": positions_for([PLUGINS[2]], (2,), L - 2), "causal": True}
    with torch.no_grad():
        compare(orig, new, torch.randn(2, L, DIM), grads=False, **call)


@pytest.mark.parametrize(
    "cases",
    [
        [PLUGINS[5], ("ALiBi", (NH,), {"asymmetric": True, "divide": 4.0})],  # blocked twice: -inf
        [PLUGINS[7], PLUGINS[5]],  # DPB's bias, then blocked: its gradient passes through
        [PLUGINS[5], PLUGINS[7]],
    ],
    ids=["alibi_alibi", "dpb_alibi", "alibi_dpb"],
)
def test_rows_blocked_by_asymmetric_alibi_in_plugin_chains(cases):
    """Query 10 keeps only the keys before it, which even heads block: bio-attention adds
    -finfo.max per asymmetric ALiBi, so one gives a uniform row whose gradients still reach q, k
    and earlier plugins' biases, and two overflow to -inf (the query attends to nothing)."""
    orig, new = layer_pair(cases)
    mask = torch.ones(2, L, L, dtype=torch.bool).tril()
    mask[:, 10, 10] = False
    compare(orig, new, torch.randn(2, L, DIM), pos=positions_for(cases, (2,)), mask=mask)


@pytest.mark.parametrize("blocked", [False, True], ids=["zeros", "zeros_and_-inf"])
def test_a_zero_float_mask_being_learned_gets_its_gradient(blocked):
    """A learned additive mask initialised to zero adds nothing yet must receive gradients."""
    orig, new = layer_pair([])
    start = torch.zeros(2, NH, L, L)
    if blocked:
        start = start.masked_fill(~pair_mask(2, NH, L, L), -math.inf)
    x = torch.randn(2, L, DIM)
    grads = []
    for layer in (orig, new):
        mask = start.clone().requires_grad_()
        layer(x, mask=mask).tanh().sum().backward()
        grads.append(mask.grad)
    assert grads[0].abs().max() > 0
    assert_same(grads[1], grads[0])


def test_float_masks_that_need_gradients_use_the_chunked_backend():
    layer = AttnLayer(DIM, None, nh=NH)
    learned = torch.randn(2, L, requires_grad=True)
    assert layer._backend(layer_mask(torch.rand(2, L) > 0.5, (2,), NH, L, torch.device("cpu"))) == "auto"
    assert layer._backend(layer_mask(pair_mask(2, L, L), (2,), NH, L, torch.device("cpu"))) == "auto"
    assert layer._backend(layer_mask(learned.detach(), (2,), NH, L, torch.device("cpu"))) == "auto"
    assert layer._backend(layer_mask(learned, (2,), NH, L, torch.device("cpu"))) == "chunked"
    with torch.no_grad():
        assert layer._backend(layer_mask(learned, (2,), NH, L, torch.device("cpu"))) == "auto"


def test_layer_matches_the_dense_path_for_short_alibi_positions():
    dense, flex = dense_and_flex([PLUGINS[6]])
    call = {"pos": irregular(2, L - 3), "mask": torch.rand(2, L - 3) > 0.3, "causal": True}
    with torch.no_grad():
        compare(dense, flex, torch.randn(2, L, DIM), grads=False, **call)


# ----------------------------------------------------------------------------- deliberate differences


def test_causal_with_a_mask_keeps_the_diagonal():
    """The original masks the diagonal when causal and a mask are combined."""
    orig, new = layer_pair([PLUGINS[4]])
    x = torch.randn(2, L, DIM)
    mask = pair_mask(2, L, L)
    strictly_lower = mask & torch.ones(L, L, dtype=torch.bool).tril(-1)
    assert_same(orig(x, mask=mask, causal=True), orig(x, mask=strictly_lower))
    assert_same(new(x, mask=mask, causal=True), orig(x, mask=mask & torch.ones(L, L, dtype=torch.bool).tril()))


def test_the_documented_strict_causal_recipe_with_a_key_mask():
    """docs/legacy.md: ``causal=False`` and ``strict & key_mask[..., None, :]`` give bio-attention's
    causal-with-mask numbers at unpadded tokens; its input encodings (given no key mask then)
    also encode padded tokens, so only the rows of padded tokens may differ."""
    cases = [PLUGINS[3], PLUGINS[8]]
    orig, new = layer_pair(cases)
    x, pos = torch.randn(2, L, DIM), positions_for(cases, (2,))
    keys = key_mask(2, L)
    strict = torch.ones(L, L, dtype=torch.bool).tril(-1)
    want = orig(x, pos=pos, mask=keys, causal=True)
    got = new(x, pos=pos, mask=strict & keys[..., None, :], causal=False)
    assert_same(got[keys], want[keys])
    assert (got[~keys] - want[~keys]).abs().max() > 0.1


def test_attn_layer_registers_a_plain_list_of_plugins():
    """bio-attention's AttnLayer keeps a plain list unregistered (no plugin.* keys); legacy
    registers it, so such checkpoints load with strict=False, missing exactly the plugins."""
    orig_plugins, new_plugins = plugin_pairs([PLUGINS[8]])
    orig = original_attention.AttnLayer(DIM, Attention(), nh=NH, plugin=orig_plugins)
    new = AttnLayer(DIM, None, nh=NH, plugin=new_plugins)
    assert not any(key.startswith("plugin.") for key in orig.state_dict())
    result = new.load_state_dict(orig.state_dict(), strict=False)
    assert sorted(result.missing_keys) == sorted(f"plugin.0.{key}" for key in new_plugins[0].state_dict())
    assert not result.unexpected_keys


def test_queries_with_nothing_to_attend_give_zeros():
    orig, new = layer_pair([PLUGINS[6]])
    x = torch.randn(2, L, DIM)
    mask = pair_mask(2, L, L)
    mask[:, 3] = False
    out_new = new.attn(new.norm(x), mask=mask)
    assert_same(out_new[:, 3], new.attn.to_out.bias.expand(2, DIM))  # attention output 0
    assert_same(out_new, orig.attn(orig.norm(x), mask=mask))  # as SDPA in torch 2.13 (others: NaN)


def test_short_key_mask_in_attn_layer_also_masks_cls_queries():
    """The original AttnLayer lets CLS queries attend padded keys; the flex layer does not."""
    orig_plugins, new_plugins = plugin_pairs([PLUGINS[6]])
    orig = original_attention.AttnLayer(DIM, Attention(), nh=NH, plugin=nn.ModuleList(orig_plugins))
    new = AttnLayer(DIM, None, nh=NH, plugin=nn.ModuleList(new_plugins))
    new.load_state_dict(orig.state_dict(), strict=True)
    x = torch.randn(2, L, DIM)
    short = torch.rand(2, L - 2) > 0.3
    padded = torch.cat([torch.ones(2, 2, dtype=torch.bool), short], -1)
    assert_same(new(x, mask=short), orig(x, mask=padded))
    assert_same(new(x, mask=short)[:, 2:], orig(x, mask=short)[:, 2:])


# ----------------------------------------------------------------------------- arguments


def test_attention_dropout_is_read_and_warned_about_once():
    layer = TransformerLayer(Attention(dropout=0.1), DIM, NH)
    assert layer.attn.dropout == 0.1
    import legacy.layers as layers

    layers._dropout_warned = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer.train()(torch.randn(2, L, DIM))
        layer(torch.randn(2, L, DIM))
        layer.eval()(torch.randn(2, L, DIM))
    assert len([w for w in caught if "dropout" in str(w.message)]) == 1


def test_layers_show_the_hint_once():
    from legacy import _hint

    _hint.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TransformerLayer(None, DIM, NH)
        AttnLayer(DIM, None, nh=NH, plugin=legacy.ALiBi(NH))
    hints = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert len(hints) == 1
    assert "legacy.layers.TransformerLayer" in hints[0] and "flexpos.AttentionLayer" in hints[0]


def test_unsupported_arguments_raise_clear_errors():
    with pytest.raises(TypeError, match="full attention"):
        TransformerLayer(original_attention.RandomAttention(), DIM, NH)
    with pytest.raises(TypeError, match="legacy.positional"):
        TransformerLayer(Attention(), DIM, NH, plugin=original_attention.positional.ALiBi(NH))
    layer = TransformerLayer(None, DIM, NH)
    with pytest.raises(TypeError, match="must be bool"):
        layer(torch.randn(2, L, DIM), mask=torch.zeros(2, L))
    with pytest.raises(TypeError, match="keyword"):
        layer(torch.randn(2, L, DIM), pos_q=torch.arange(L))
    with pytest.raises(ValueError, match="activation"):
        TransformerLayer(None, DIM, NH, activation="tanh")


# ----------------------------------------------------------------------------- user-written plugins


def hook_plugins(positional):
    """User plugins written against the hook API of ``positional`` (bio-attention's or legacy's):
    a local bias through ``mod_mask`` alone, a Rotary that also scales q, an ALiBi whose bias
    is doubled."""

    class LocalBias(positional.Base):
        def mod_mask(self, mask, q, k, v, **kwargs):
            i = torch.arange(q.shape[-3])[:, None]
            j = torch.arange(k.shape[-3])[None, :]
            local = (-0.3 * (i - j).abs().float()).masked_fill((i - j).abs() > 3, -math.inf)
            local = local.expand(*q.shape[:-3], q.shape[-2], *local.shape)
            return local if mask is None else mask + local

    class ScaledRotary(positional.Rotary):
        def mod_qkv(self, q, k, v, **kwargs):
            q, k, v = super().mod_qkv(q, k, v, **kwargs)
            return 0.5 * q, k, v

    class DoubledALiBi(positional.ALiBi):
        def mod_mask(self, mask, q, k, v, **kwargs):
            return 2 * super().mod_mask(mask, q, k, v, **kwargs)

    return LocalBias(), ScaledRotary(H, n_dims=8), DoubledALiBi(NH, asymmetric=True)


@pytest.mark.parametrize("kind", ["plain", "positions", "pair_mask", "head_float_mask", "causal"])
def test_user_plugins_overriding_hooks_run_their_hooks(kind):
    """Plugins that override mod_qkv/mod_mask run through their hooks (with built-in plugins
    around them, in order), as in bio-attention's layers."""
    plugins = hook_plugins(legacy)
    assert all(p.runs_hooks() for p in plugins)
    orig_plugins = hook_plugins(original_positional)
    orig_xl, new_xl = pair("XL", DIM, NH, divide=2.0)
    orig = original_attention.TransformerLayer(Attention(), DIM, NH, plugin=[*orig_plugins, orig_xl], dropout=0.0)
    new = TransformerLayer(Attention(), DIM, NH, plugin=[*plugins, new_xl], dropout=0.0)
    new.load_state_dict(orig.state_dict(), strict=True)
    compare(orig, new, torch.randn(2, L, DIM), **_inputs(kind, [], (2,)))


def test_only_overridden_hooks_run_as_hooks():
    class Renamed(legacy.ALiBi):
        pass

    class OwnModule(legacy.ALiBi):
        def mod_mask(self, mask, q, k, v, **kwargs):
            return super().mod_mask(mask, q, k, v, **kwargs)

        def flex_module(self, batch, pos):
            return super().flex_module(batch, pos)

    assert not any(p.runs_hooks() for p in (legacy.Base(), legacy.ALiBi(NH), Renamed(NH), OwnModule(NH)))


@pytest.mark.parametrize("kind", ["key_mask", "short_key_mask", "short_float_key_mask", "pair_mask", "head_float_mask"])
def test_hooks_receive_the_mask_the_flex_path_applies(kind):
    """A hook plugin that returns the mask unchanged gives the plugin-free layer's output: the
    materialised mask holds legacy's semantics (CLS rows, padded keys, float parts)."""

    class Unchanged(legacy.Base):
        def mod_mask(self, mask, q, k, v, **kwargs):
            return mask

    mask = {
        "key_mask": key_mask(2, L),
        "short_key_mask": key_mask(2, L - 3),
        "short_float_key_mask": torch.randn(2, L - 3).masked_fill(~key_mask(2, L - 3), -math.inf),
        "pair_mask": pair_mask(2, L, L),
        "head_float_mask": torch.randn(2, NH, L, L).masked_fill(~pair_mask(2, NH, L, L), -math.inf),
    }[kind]
    plain = AttnLayer(DIM, None, nh=NH)
    hooked = AttnLayer(DIM, None, nh=NH, plugin=[Unchanged()])
    hooked.load_state_dict(plain.state_dict())
    x = torch.randn(2, L, DIM)
    assert_same(hooked(x, mask=mask), plain(x, mask=mask))


def test_original_cross_transformer_layer_takes_legacy_plugins():
    """bio-attention's layers that legacy does not provide call the plugins' hooks."""
    cases = [PLUGINS[4], PLUGINS[8], PLUGINS[5]]
    orig_plugins, new_plugins = plugin_pairs(cases)
    orig = original_attention.CrossTransformerLayer(Attention(), DIM, NH, plugin=orig_plugins, dropout=0.0)
    new = original_attention.CrossTransformerLayer(Attention(), DIM, NH, plugin=new_plugins, dropout=0.0)
    new.load_state_dict(orig.state_dict(), strict=True)
    x, context, pos = torch.randn(2, L, DIM), torch.randn(2, 7, DIM), irregular(2, L)
    keep = key_mask(2, L)
    assert_same(new(x, context, pos=pos, mask_x=keep), orig(x, context, pos=pos, mask_x=keep))
