"""Wrong arguments to the legacy adapter fail at the boundary with a clear ValueError/TypeError
naming the argument, never with a torch broadcast error or a silent reinterpretation."""

from __future__ import annotations

import pytest
import torch
from bio_attention import attention as original_attention
from bio_attention.attention import Attention

import flexpos
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
}


@pytest.mark.parametrize("call, error, match", list(BAD_CALLS.values()), ids=list(BAD_CALLS))
def test_bad_layer_inputs_name_the_argument(call, error, match):
    call = dict(call)
    x = call.pop("x", torch.randn(2, L, DIM))
    for layer in layers():
        with pytest.raises(error, match=match):
            layer(x, **call)


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
