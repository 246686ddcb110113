"""Module state: constant buffers keep their dtype and values through dtype casts, and
meta-device initialisation (``to_empty`` then a checkpoint, with or without
``reset_parameters``, or ``load_state_dict(assign=True)``) rebuilds every module exactly,
non-persistent buffers included."""

from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
from torch import nn

import flexpos
import reference as R
import legacy
from flexpos import ALiBi, DPB, XL, AttentionLayer, LearnedContinuous, LearnedVocab, Rotary, Sinusoidal
from legacy import positional as lp

DIVIDE = 3.3  # not a bfloat16 number: a cast divisor would change

FACTORIES: dict[str, Callable[[], nn.Module]] = {
    "Sinusoidal": lambda: Sinusoidal(16, divide=DIVIDE),
    "Sinusoidal-learned": lambda: Sinusoidal(16, divide=DIVIDE, learned_div=True),
    "LearnedVocab": lambda: LearnedVocab(16, 64),
    "LearnedContinuous": lambda: LearnedContinuous(16, depth=2, norm=True, divide=DIVIDE),
    "Rotary": lambda: Rotary(16, n_dims=12, divide=DIVIDE),
    "ALiBi": lambda: ALiBi(4, use_n_heads=3, asymmetric=True, divide=DIVIDE),
    "DPB": lambda: DPB(16, 4, depth=2, divide=DIVIDE, learned_div=True),
    "XL": lambda: XL(64, 4, divide=DIVIDE),
    "AttentionLayer": lambda: AttentionLayer(
        64, 4, positional=[Sinusoidal(64, divide=DIVIDE), Rotary(16, divide=DIVIDE), ALiBi(4), DPB(8, 4)]
    ),
    "legacy.TransformerLayer": lambda: legacy.TransformerLayer(
        None, 64, 4, plugin=[lp.Rotary(16, divide=DIVIDE), lp.XL(64, 4, divide=DIVIDE), lp.DPB(8, 4)]
    ),
    "legacy.AttnLayer": lambda: legacy.AttnLayer(64, nh=4, plugin=nn.ModuleList([lp.ALiBi(4, divide=DIVIDE)])),
}


ROUTES = ("to_empty, reset_parameters, load", "to_empty, load", "load with assign=True")


def materialised(factory: Callable[[], nn.Module], checkpoint: dict, route: str = ROUTES[0]) -> nn.Module:
    """``factory()`` built on the meta device, then given the checkpoint's values by ``route``:
    materialised on CPU (reset or not) and loaded, or loaded in place of its meta tensors."""
    with torch.device("meta"):
        module = factory()
    assert all(t.is_meta for t in [*module.parameters(), *module.buffers()])
    if route == "load with assign=True":
        module.load_state_dict(checkpoint, strict=True, assign=True)
        return module
    module.to_empty(device="cpu")
    if route == "to_empty, reset_parameters, load":
        for m in module.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    module.load_state_dict(checkpoint, strict=True)
    return module


def fixed_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every constant buffer (frequencies, slopes, fixed divisors) of ``module`` and its children."""
    found = {}
    for prefix, m in module.named_modules():
        if isinstance(m, flexpos.Positional):
            for name in m._fixed_dtype_buffers():
                found[f"{prefix}.{name}"] = getattr(m, name)
    return found


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", FACTORIES)
def test_casts_keep_constant_buffers(name, dtype):
    module = FACTORIES[name]()
    before = {k: v.clone() for k, v in fixed_buffers(module).items()}
    assert before or name in ("LearnedVocab", "DPB")  # no constants: a table, a learned divisor
    cast = module.to(dtype)
    after = fixed_buffers(cast)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    # Parameters are the caller's to cast.
    assert all(p.dtype == dtype for p in cast.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_encodings_give_the_numbers_of_the_float32_module(dtype):
    """Inputs in ``dtype`` at positions near 1e6: a module cast to ``dtype`` computes what the
    float32 module computes on the same inputs (angles in float64 from float32 frequencies)."""
    pos = 1e6 + torch.rand(2, 40, dtype=torch.float64).cumsum(-1) * 7
    q, k, v = (torch.randn(2, 4, 40, 16).to(dtype) for _ in range(3))
    x = torch.randn(2, 40, 16).to(dtype)
    for module in (Rotary(16, divide=DIVIDE), Sinusoidal(16, divide=DIVIDE), ALiBi(4, divide=DIVIDE)):
        cast = copy.deepcopy(module).to(dtype)
        if isinstance(module, Rotary):
            expected, got = module(q, k, pos=pos), cast(q, k, pos=pos)
        elif isinstance(module, Sinusoidal):
            expected, got = module(x, pos=pos), cast(x, pos=pos)
        else:
            expected = flexpos.attention(q, k, v, module, pos=pos)
            got = flexpos.attention(q, k, v, cast, pos=pos)
        for e, g in zip(torch.atleast_1d(expected), torch.atleast_1d(got)):
            assert torch.equal(e, g), type(module).__name__


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name", FACTORIES)
def test_meta_device_initialisation_rebuilds_every_module(name, route):
    """Fixed divisors are in no checkpoint (bio-attention keeps them as Python floats): every
    route gives them their constructor's value, on the device of the loaded tensors."""
    trained = FACTORIES[name]()
    with torch.no_grad():  # a checkpoint unlike a fresh module
        for p in trained.parameters():
            p.add_(torch.randn_like(p))
    module = materialised(FACTORIES[name], copy.deepcopy(trained.state_dict()), route)
    ours = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    theirs = {**dict(trained.named_parameters()), **dict(trained.named_buffers())}
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key


def test_meta_initialised_layer_computes_like_the_original():
    layer = FACTORIES["AttentionLayer"]()
    rebuilt = materialised(FACTORIES["AttentionLayer"], layer.state_dict())
    x, pos = torch.randn(2, 50, 64), torch.rand(2, 50).cumsum(-1) * 100
    assert torch.equal(rebuilt(x, pos=pos), layer(x, pos=pos))


def test_reset_parameters_restores_the_constructor_state():
    xl = XL(64, 4, divide=DIVIDE, learned_div=True)
    state = copy.deepcopy(xl.state_dict())
    with torch.no_grad():
        for t in [*xl.parameters(), *xl.buffers()]:
            t.fill_(float("nan"))
    xl.reset_parameters()
    assert torch.equal(xl.inv_freq, state["inv_freq"])
    assert torch.equal(xl.div, state["div"])  # log(divide)
    for name in ("bias_r_w", "bias_r_r"):
        bound = 16**-0.5
        assert xl.get_parameter(name).abs().max() <= bound and not xl.get_parameter(name).isnan().any()


def test_constant_buffers_follow_their_formulas():
    """Frequencies 10000^(-2m/dim) (RoFormer, Vaswani et al.) and the ALiBi paper's slopes,
    to float32 rounding, straight from the constructor."""
    expected = 10000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    for buffer in (Rotary(16).thetas, Sinusoidal(16).inv_freq, XL(16, 2).inv_freq):
        assert torch.allclose(buffer.double(), expected, rtol=1e-6, atol=0)
    partial = Rotary(16, n_dims=8).thetas.double()
    assert torch.allclose(partial[:4], expected[:4], rtol=1e-6, atol=0) and partial[4:].eq(0).all()
    slopes = ALiBi(6, use_n_heads=5).slopes.reshape(-1).double()
    assert torch.allclose(slopes, torch.tensor(R.reference_slopes(5) + [0.0], dtype=torch.float64), rtol=1e-6)


def test_repr_shows_the_constructor_arguments():
    layer = AttentionLayer(64, 4, positional=[Rotary(16, n_dims=8), ALiBi(4, asymmetric=True, divide=3.0, learned_div=True)])
    lines = repr(layer).splitlines()
    assert lines[0] == "AttentionLayer("
    assert "  dim=64, n_heads=4, backend='auto'" in lines
    assert "    (0): Rotary(head_dim=16, n_dims=8, divide=1.0)" in lines
    assert "    (1): ALiBi(n_heads=4, use_n_heads=4, asymmetric=True, divide=3.0, learned_div=True)" in lines
    assert repr(DPB(8, 4, table_size=99)).startswith("DPB(\n  n_heads=4, table_size=99, divide=1.0\n")
    tuned = AttentionLayer(64, 4, backend="flex", kernel_options={"BLOCK_M": 64})
    assert repr(tuned).splitlines()[1] == "  dim=64, n_heads=4, backend='flex', kernel_options={'BLOCK_M': 64}"
