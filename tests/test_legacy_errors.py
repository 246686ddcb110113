"""Wrong arguments to the legacy adapter fail at the boundary with a clear ValueError/TypeError
naming the argument, never with a torch broadcast error or a silent reinterpretation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bio_attention import attention as original_attention
from bio_attention import positional as original
from bio_attention.attention import Attention

import flexpos
from support import TOLERANCE
from legacy import positional as legacy
from legacy.layers import AttnLayer, TransformerLayer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

NH, H, L = 4, 8, 10
DIM = NH * H


def layers():
    return [AttnLayer(DIM, None, nh=NH, plugin=[legacy.ALiBi(NH)]), TransformerLayer(None, DIM, NH, dropout=0.0)]


# ----------------------------------------------------------------------------- constructors


@pytest.mark.parametrize("nh, error", [(0, ValueError), (-4, ValueError), (4.0, TypeError), (True, TypeError)])
def test_nh_must_be_a_positive_int(nh, error):
    with pytest.raises(error, match="nh"):
        AttnLayer(DIM, None, nh=nh)
    with pytest.raises(error, match="nh"):
        TransformerLayer(None, DIM, nh)


BAD_PLUGINS = {
    "native module": (lambda: flexpos.ALiBi(NH), "legacy.positional"),
    "native in a list": (lambda: [legacy.ALiBi(NH), flexpos.ALiBi(NH)], "legacy.positional"),
    "not a module": (lambda: 5, "plugin must be"),
}


@pytest.mark.parametrize("make, match", list(BAD_PLUGINS.values()), ids=list(BAD_PLUGINS))
def test_plugins_must_come_from_legacy_positional(make, match):
    with pytest.raises(TypeError, match=match):
        AttnLayer(DIM, None, nh=NH, plugin=make())
    with pytest.raises(TypeError, match=match):
        TransformerLayer(None, DIM, NH, plugin=make())


def test_a_native_module_added_to_the_plugins_later_is_refused_at_the_call():
    for layer in layers():
        layer.plugin.append(flexpos.ALiBi(NH))
        with pytest.raises(TypeError, match="legacy.positional"):
            layer(torch.randn(2, L, DIM))


@pytest.mark.parametrize("dim, error", [(0, ValueError), (-32, ValueError), (32.0, TypeError), (30, ValueError)])
def test_dim_must_be_a_positive_int_divisible_by_nh(dim, error):
    with pytest.raises(error, match="dim"):
        AttnLayer(dim, None, nh=NH)
    with pytest.raises(error, match="dim"):
        TransformerLayer(None, dim, NH)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: legacy.ALiBi(2, use_n_heads=3), ValueError, "use_n_heads must be <= n_heads=2, got 3"),
        (lambda: legacy.Sinusoidal(8)(torch.randn(2, 5, 8), pos=torch.tensor([[0.0, 1, float("nan"), 3, 4]] * 2)), ValueError, "pos must be finite"),
        (lambda: legacy.Sinusoidal(8)(torch.randn(2, 5, 8), pos=torch.ones(2, 5, dtype=torch.bool)), TypeError, "pos must hold int or float positions"),
    ],
)
def test_what_the_original_takes_silently_is_refused(call, error, match):
    """bio-attention builds a 3-head bias for a 2-head module, NaN encodings, and bool positions."""
    with pytest.raises(error, match=match):
        call()


FLAGS = [
    ("Base", (), "learned"),
    ("Sinusoidal", (DIM,), "learned_div"),
    ("Rotary", (H,), "learned_div"),
    ("LearnedContinuous", (DIM,), "norm"),
    ("LearnedContinuous", (DIM,), "learned_div"),
    ("ALiBi", (NH,), "asymmetric"),
    ("ALiBi", (NH,), "learned_div"),
    ("DPB", (16, NH), "norm"),
    ("DPB", (16, NH), "learned_div"),
    ("XL", (DIM, NH), "learned_div"),
]


# bio-attention cannot build ALiBi, DPB or XL with a true learned_div (docs/legacy.md)
BUILDS = [
    (name, args, flag, value)
    for name, args, flag in FLAGS
    for value in (0, 1, None, np.bool_(True), np.int64(1))
    if not (value and flag == "learned_div" and name in ("ALiBi", "DPB", "XL"))
]


@pytest.mark.parametrize("name, args, flag, value", BUILDS, ids=[f"{n}-{f}-{v!r}" for n, _, f, v in BUILDS])
def test_on_off_arguments_take_what_the_original_takes(name, args, flag, value):
    """bio-attention tests these arguments for truth only: 0/1 and None from a config build
    there, and build the same module here (same state_dict keys, same numbers)."""
    ours, theirs = getattr(legacy, name)(*args, **{flag: value}), getattr(original, name)(*args, **{flag: value})
    assert list(ours.state_dict()) == list(theirs.state_dict())
    if flag == "asymmetric":
        ours.load_state_dict(theirs.state_dict())
        q, k, v = (torch.randn(2, L, NH, H) for _ in range(3))
        pos = torch.arange(L).expand(2, L)
        assert torch.allclose(ours.mod_mask(None, q, k, v, pos_q_k=pos), theirs.mod_mask(None, q, k, v, pos_q_k=pos))


@pytest.mark.parametrize("name, args, flag", FLAGS, ids=[f"{n}-{f}" for n, _, f in FLAGS])
def test_on_off_arguments_refuse_strings_and_floats(name, args, flag):
    """"False" is true in bio-attention: refused here, naming the argument."""
    for value in ("False", 1.0):
        with pytest.raises(TypeError, match=rf"{flag} must be a bool, an integer or None, got"):
            getattr(legacy, name)(*args, **{flag: value})


def test_a_refused_float_nh_leaves_later_layers_working():
    """einops caches recipes by value (4.0 == 4): a float nh reaching it broke later layers."""
    with pytest.raises(TypeError):
        AttnLayer(DIM, None, nh=4.0)
    x = torch.randn(2, L, DIM)
    assert AttnLayer(DIM, None, nh=NH)(x).shape == x.shape


@pytest.mark.parametrize("activation, error", [(None, TypeError), (1, TypeError), ("tanh", ValueError)])
def test_activation_must_be_a_known_name(activation, error):
    with pytest.raises(error, match="activation"):
        TransformerLayer(None, DIM, NH, activation=activation)


@pytest.mark.parametrize("attn", [5, "Attention", Attention], ids=["int", "str", "class"])
def test_attn_must_be_an_attention_module_or_none(attn):
    """bio-attention stores any attn and fails at the first call (an int is not callable)."""
    with pytest.raises(TypeError, match="attn must be a bio_attention.attention.Attention or None"):
        AttnLayer(DIM, attn, nh=NH)
    with pytest.raises(TypeError, match="attn must be"):
        TransformerLayer(attn, DIM, NH)
    assert AttnLayer(DIM, Attention(dropout=0.1), nh=NH).dropout == 0.1


@pytest.mark.parametrize(
    "dropout, error", [("x", TypeError), (None, TypeError), (torch.ones(2), TypeError), (-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError)]
)
def test_dropout_must_be_a_rate(dropout, error):
    with pytest.raises(error, match="dropout must"):
        TransformerLayer(None, DIM, NH, dropout=dropout)


@pytest.mark.parametrize("dropout, rate", [(False, 0.0), (torch.tensor(0.25), 0.25), (np.float32(0.5), 0.5)])
def test_dropout_takes_what_nn_dropout_takes(dropout, rate):
    """bio-attention passes dropout to nn.Dropout, which takes bools and one-element tensors."""
    assert TransformerLayer(None, DIM, NH, dropout=dropout).ff.fn[2].p == rate


def test_backend_is_checked_at_construction():
    with pytest.raises(ValueError, match="backend must be"):
        AttnLayer(DIM, None, nh=NH, backend="fast")
    with pytest.raises(ValueError, match="backend must be"):
        TransformerLayer(None, DIM, NH, backend="fast")


# ----------------------------------------------------------------------------- layer calls


def test_cpu_flex_refuses_a_float_mask_before_compiling():
    """Its score_mod reads the caller's tensor, which the CPU flex kernel fails to build."""
    layer = AttnLayer(DIM, None, nh=NH, backend="flex").eval()
    with torch.no_grad(), pytest.raises(ValueError, match="cannot run a float mask on CPU"):
        layer(torch.randn(2, L, DIM), mask=torch.randn(2, L, L))


@pytest.mark.parametrize("shape", [(2, L), (2, L, L), (2, NH, L, L)], ids=str)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_integer_masks_are_refused(shape, dtype):
    """bio-attention refuses integer masks too; a 0/1 int mask is neither bool nor additive."""
    keep = torch.ones(shape, dtype=dtype)
    for layer in layers():
        with pytest.raises(TypeError, match=r"mask .*bool.*dtype torch\.(int|uint)"):
            layer(torch.randn(2, L, DIM), mask=keep)


def test_original_refuses_integer_masks():
    layer = original_attention.AttnLayer(DIM, Attention(), nh=NH)
    with pytest.raises(RuntimeError):
        layer(torch.randn(2, L, DIM), mask=torch.ones(2, L, L, dtype=torch.int64))


BAD_CALLS = {
    "x-list": ({"x": [[1.0]]}, TypeError, "x must be a torch.Tensor"),
    "x-unbatched": ({"x": torch.randn(L, DIM)}, ValueError, r"x must have shape \(B, \*, L, 32\)"),
    "x-width": ({"x": torch.randn(2, L, 16)}, ValueError, r"x must have shape \(B, \*, L, 32\)"),
    "x-int": ({"x": torch.ones(2, L, DIM, dtype=torch.long)}, TypeError, "x must be a floating point"),
    "pos-list": ({"pos": [0.0] * L}, TypeError, "pos must be a torch.Tensor"),
    "pos-batch": ({"pos": torch.rand(3, L)}, ValueError, r"pos must have shape \(\*batch, L'\) with batch \(2,\)"),
    "pos-extra-dim": ({"pos": torch.rand(2, 2, L)}, ValueError, "pos must have shape"),
    "mask-list": ({"mask": [[True] * L] * 2}, TypeError, "mask must be a torch.Tensor"),
    "mask-key-batch": ({"mask": torch.ones(3, L, dtype=torch.bool)}, ValueError, r"mask must .* batch \(2,\)"),
    "mask-pair-batch": ({"mask": torch.ones(3, L, L, dtype=torch.bool)}, ValueError, "mask must have shape"),
    "mask-bool-heads": ({"mask": torch.ones(2, 3, L, L, dtype=torch.bool)}, ValueError, r"\(\*batch, 4 or 1, L, L\)"),
    "mask-float-heads": ({"mask": torch.zeros(2, 3, L, L)}, ValueError, r"\(\*batch, 4 or 1, L, L\)"),
    "mask-too-long": ({"mask": torch.ones(2, L + 1, dtype=torch.bool)}, ValueError, "mask covers 11 tokens"),
    "x-float64": ({"x": torch.randn(2, L, DIM, dtype=torch.float64)}, TypeError, "x must have the layer's dtype torch.float32, got torch.float64"),
    "x-float16": ({"x": torch.randn(2, L, DIM, dtype=torch.float16)}, TypeError, "x must have the layer's dtype"),
    "x-meta": ({"x": torch.randn(2, L, DIM, device="meta")}, ValueError, "x is on meta, the layer on cpu"),
    "mask-float-meta": ({"mask": torch.zeros(2, L, L, device="meta")}, ValueError, "mask is on meta, x on cpu"),
    "mask-bool-meta": ({"mask": torch.ones(2, NH, L, L, dtype=torch.bool, device="meta")}, ValueError, "mask is on meta, x on cpu"),
    "mask-key-meta": ({"mask": torch.ones(2, L, dtype=torch.bool, device="meta")}, ValueError, "mask is on meta, x on cpu"),
}


@pytest.mark.parametrize("call, error, match", list(BAD_CALLS.values()), ids=list(BAD_CALLS))
def test_bad_layer_inputs_name_the_argument(call, error, match):
    call = dict(call)
    x = call.pop("x", torch.randn(2, L, DIM))
    for layer in layers():
        with pytest.raises(error, match=match):
            layer(x, **call)


def test_a_plugin_on_another_device_is_named():
    for layer in layers():
        layer.plugin.append(legacy.DPB(8, NH).to("meta"))
        with pytest.raises(ValueError, match=r"DPB is on meta but its input is on cpu \(mlp\.0\.0\.weight\)"):
            layer(torch.randn(2, L, DIM))


def test_masks_and_positions_of_size_one_broadcast_over_the_batch():
    layer = AttnLayer(DIM, None, nh=NH, plugin=[legacy.ALiBi(NH)])
    x, pos = torch.randn(2, L, DIM), torch.rand(1, L).cumsum(-1)
    keep = (torch.rand(1, L, L) > 0.3) | torch.eye(L, dtype=torch.bool)
    assert torch.equal(layer(x, pos=pos, mask=keep), layer(x, pos=pos.expand(2, L), mask=keep.expand(2, L, L)))


# ----------------------------------------------------------------------------- plugin methods


def qkv(heads=NH):
    return tuple(torch.randn(2, L, heads, H) for _ in range(3))


@pytest.mark.parametrize("name, args", [("ALiBi", (NH,)), ("DPB", (16, NH)), ("XL", (DIM, NH))])
def test_mod_mask_checks_heads_and_mask_shape(name, args):
    module = getattr(legacy, name)(*args)
    q, k, v = qkv()
    with pytest.raises(ValueError, match=rf"{name}\(n_heads=4\).mod_mask expects q of shape \(B, \*, L, 4, H\)"):
        module.mod_mask(None, *qkv(heads=2))
    with pytest.raises(ValueError, match=r"mask must have shape \(\*batch, 4 or 1, L1', L2'\)"):
        module.mod_mask(torch.zeros(2, 3, L, L), q, k, v)
    with pytest.raises(ValueError, match=r"L1' <= 10"):
        module.mod_mask(torch.zeros(2, NH, L + 1, L), q, k, v)
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        module.mod_mask([[0.0]], q, k, v)
    assert module.mod_mask(torch.zeros(2, 1, L, L), q, k, v).shape == (2, NH, L, L)


@pytest.mark.parametrize("name", ["Sinusoidal", "LearnedContinuous"])
def test_mod_x_checks_positions_and_mask(name):
    module = getattr(legacy, name)(DIM)
    x = torch.randn(2, L, DIM)
    with pytest.raises(ValueError, match=r"pos must have shape \(\*batch, L'\) with batch \(2,\)"):
        module.mod_x(x, pos=torch.rand(3, L))
    with pytest.raises(ValueError, match=r"mask must have shape \(\*batch, L'\) with batch \(2,\)"):
        module.mod_x(x, mask=torch.ones(3, L, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        module.mod_x(x, mask=[True] * L)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        module.mod_x([[0.0] * DIM])
    with pytest.raises(ValueError, match=r"mask must have shape \(\*batch, L'\) \(at least 1 dims\), got \(\)"):
        module.mod_x(x, mask=torch.tensor(True))


def test_xl_mod_mask_checks_the_head_dim_of_q():
    """XL's bias reads q's features: another head dim failed inside torch's matmul."""
    q, k, v = (torch.randn(2, L, NH, H + 2) for _ in range(3))
    with pytest.raises(ValueError, match=rf"XL\(n_heads={NH}\).mod_mask expects q of shape \(B, \*, L, {NH}, {H}\)"):
        legacy.XL(DIM, NH).mod_mask(None, q, k, v)


def test_xl_mod_qkv_checks_the_heads_of_q():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=rf"q must have shape \(B, \*, L1, {NH}, {H}\)"):
        legacy.XL(DIM, NH).mod_qkv(q[..., :2, :], k, v)


def test_mod_qkv_positions_name_the_argument():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="pos_q_k must have shape"):
        legacy.Rotary(H).mod_qkv(q, k, v, pos_q_k=torch.rand(3, L))
    with pytest.raises(ValueError, match="pos_k must have shape"):
        legacy.Rotary(H).mod_qkv(q, k, v, pos_k=torch.rand(3, L), self_attn_mode=False)


def mod_qkv(module, q, k, self_attn_mode):
    return module.mod_qkv(q, k, k, self_attn_mode=self_attn_mode)


BAD_QK = {
    "q-none": (lambda q, k: (None, k), TypeError, "q must be a torch.Tensor, got NoneType"),
    "k-list": (lambda q, k: (q, [0.0]), TypeError, "k must be a torch.Tensor, got list"),
    "q-2d": (lambda q, k: (q[0, :, 0], k[0, :, 0]), ValueError, r"q must have shape \(B, \*, L, NH, H\) \(at least 3 dims\), got \(10, 8\)"),
    "k-batch": (lambda q, k: (q, torch.randn(3, L, NH, H)), ValueError, r"k must have shape \(\*batch, L2, NH, H\) with q's batch \(2,\)"),
    "k-extra-dim": (lambda q, k: (q, k[None]), ValueError, r"k must have shape .* got \(1, 2, 10, 4, 8\)"),
    "q-batch-1": (lambda q, k: (q[:1], k), ValueError, r"k must have shape .* q's batch \(1,\)"),
    "qk-bool": (lambda q, k: (q > 0, k > 0), TypeError, "q must be a floating point tensor .* got dtype torch.bool"),
    "qk-int": (lambda q, k: (q.long(), k.long()), TypeError, "q must be a floating point tensor .* got dtype torch.int64"),
    "k-int": (lambda q, k: (q, k.int()), TypeError, "k must be a floating point tensor .* got dtype torch.int32"),
    "q-meta": (lambda q, k: (q.to("meta"), k), ValueError, "k is on cpu, q on meta"),
    "qk-meta": (lambda q, k: (q.to("meta"), k.to("meta")), ValueError, "Rotary is on cpu but its input is on meta"),
}


@pytest.mark.parametrize("self_attn_mode", [True, False])
@pytest.mark.parametrize("make, error, match", list(BAD_QK.values()), ids=list(BAD_QK))
def test_rotary_mod_qkv_checks_q_and_k(make, error, match, self_attn_mode):
    """bio-attention raises deep inside torch here, or returns integer (truncated) or bool q, k."""
    q, k, _ = qkv()
    with pytest.raises(error, match=match):
        mod_qkv(legacy.Rotary(H), *make(q, k), self_attn_mode)


@pytest.mark.parametrize("self_attn_mode", [True, False])
@pytest.mark.parametrize(
    "make",
    [lambda q, k: (q[0], k[0]), lambda q, k: (q, k[:1]), lambda q, k: (q, k[..., :1, :]), lambda q, k: (q, k.double())],
    ids=["unbatched", "k-batch-1", "k-one-head", "k-float64"],
)
def test_rotary_mod_qkv_keeps_what_the_original_takes(make, self_attn_mode):
    q, k, _ = qkv()
    q, k = make(q, k)
    ours, theirs = legacy.Rotary(H), original.Rotary(H)
    for a, b in zip(mod_qkv(ours, q, k, self_attn_mode)[:2], mod_qkv(theirs, q, k, self_attn_mode)[:2]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b.expand_as(a), atol=1e-6, rtol=0)


def test_xl_mod_qkv_checks_the_device_of_q():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"XL is on cpu but its input is on meta \(bias_r_w\)"):
        legacy.XL(DIM, NH).mod_qkv(q.to("meta"), k, v)


BIAS_PLUGINS = [("ALiBi", (NH,)), ("DPB", (16, NH)), ("XL", (DIM, NH))]
BAD_MOD_MASK = {
    "k-batch": (lambda m, q, k: (m, q, torch.randn(3, L, NH, H)), ValueError, r"k must have shape \(\*batch, L2, NH, H\) with q's batch \(2,\)"),
    "k-extra-dim": (lambda m, q, k: (m, q, k[None]), ValueError, r"k must have shape .* got \(1, 2, 10, 4, 8\)"),
    "q-batch-1": (lambda m, q, k: (m, q[:1], k), ValueError, r"k must have shape .* q's batch \(1,\)"),
    "k-meta": (lambda m, q, k: (m, q, k.to("meta")), ValueError, "k is on meta, q on cpu"),
    "qk-meta": (lambda m, q, k: (m, q.to("meta"), k.to("meta")), ValueError, "is on cpu but its input is on meta"),
    "mask-meta": (lambda m, q, k: (torch.zeros(2, NH, L, L, device="meta"), q, k), ValueError, "mask is on meta, q on cpu"),
}


@pytest.mark.parametrize("make, error, match", list(BAD_MOD_MASK.values()), ids=list(BAD_MOD_MASK))
@pytest.mark.parametrize("name, args", BIAS_PLUGINS, ids=[n for n, _ in BIAS_PLUGINS])
def test_mod_mask_checks_k_against_q(name, args, make, error, match):
    """bio-attention broadcasts k's batch dims into its result ((1, 2, NH, L, L) for k[None])
    or fails deep inside torch."""
    q, k, v = qkv()
    mask, q, k = make(None, q, k)
    with pytest.raises(error, match=match):
        getattr(legacy, name)(*args).mod_mask(mask, q, k, v)


@pytest.mark.parametrize("name, args", BIAS_PLUGINS, ids=[n for n, _ in BIAS_PLUGINS])
def test_mod_mask_keeps_a_key_batch_of_one(name, args):
    theirs = getattr(original, name)(*args)
    ours = getattr(legacy, name)(*args)
    ours.load_state_dict(theirs.state_dict())
    q, k, v = qkv()
    torch.testing.assert_close(ours.mod_mask(None, q, k[:1], v), theirs.mod_mask(None, q, k[:1], v), atol=TOLERANCE[torch.float32], rtol=0)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_dpb_mod_mask_refuses_a_non_float_q(dtype):
    """Its bias takes q's dtype: an int64 bias was truncated (bio-attention's MLP raises)."""
    q, k, v = qkv()
    with pytest.raises(TypeError, match=rf"q must be a floating point tensor .* got dtype {dtype}"):
        legacy.DPB(16, NH).mod_mask(None, q.to(dtype), k, v)


@pytest.mark.parametrize("name, args", [("ALiBi", (NH,)), ("XL", (DIM, NH))])
def test_alibi_and_xl_mod_mask_take_an_integer_q_as_the_original(name, args):
    """They read only q's shape (ALiBi) or add a float parameter to it (XL)."""
    theirs = getattr(original, name)(*args)
    ours = getattr(legacy, name)(*args)
    ours.load_state_dict(theirs.state_dict())
    q, k, v = qkv()
    q = (q * 3).long()
    torch.testing.assert_close(ours.mod_mask(None, q, k, v), theirs.mod_mask(None, q, k, v), atol=TOLERANCE[torch.float32], rtol=0)


@pytest.mark.parametrize("name", ["Sinusoidal", "LearnedContinuous", "LearnedVocab"])
def test_mod_x_checks_the_device_of_the_mask(name):
    module = getattr(legacy, name)(*((DIM, 16) if name == "LearnedVocab" else (DIM,)))
    with pytest.raises(ValueError, match="mask is on meta, x on cpu"):
        module.mod_x(torch.randn(2, L, DIM), mask=torch.ones(2, L, dtype=torch.bool, device="meta"))
