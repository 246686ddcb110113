"""Native modules build bio-attention 0.1.15's buffers, load its checkpoints with strict=True and
give them back; learned divisors give the fixed ones' numbers and correct gradients."""

import math

import pytest
import torch
from bio_attention import positional as original
from torch.func import functional_call

import flexpos

CASES = [
    ("Sinusoidal", dict(dim=16)),
    ("Sinusoidal", dict(dim=16, divide=3.0, learned_div=True)),
    ("LearnedVocab", dict(dim=16, max_seq_len=50)),
    ("LearnedContinuous", dict(dim=16, depth=3, norm=True, learned_div=True)),
    ("Rotary", dict(head_dim=16, n_dims=8, learned_div=True)),
    ("ALiBi", dict(n_heads=6, use_n_heads=4, asymmetric=True)),
    ("DPB", dict(dim=16, n_heads=4, depth=2, norm=True)),
    ("XL", dict(dim=32, n_heads=4, divide=2.0)),
]


@pytest.mark.parametrize("name, kwargs", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_state_dict_round_trip(name, kwargs):
    theirs = getattr(original, name)(**kwargs)
    ours = getattr(flexpos, name)(**kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    theirs.load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.parametrize("name, kwargs", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_fresh_modules_build_the_originals_buffers(name, kwargs):
    """Before any checkpoint is loaded: frequencies and slopes as bio-attention computes them."""
    theirs = dict(getattr(original, name)(**kwargs).named_buffers())
    ours = dict(getattr(flexpos, name)(**kwargs).named_buffers())
    assert theirs.keys() <= ours.keys()
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key


@pytest.mark.parametrize("module", ["rotary", "sinusoidal", "continuous"])
def test_learned_div_gradients_in_transforms(module):
    """float64 gradcheck of the input/q-k transforms in x and their learned divisor, with a
    token without a position."""
    pos = torch.tensor([[0.5, 3.0, 4.25, 9.0, 12.5]], dtype=torch.float64)
    make = {"rotary": flexpos.Rotary, "sinusoidal": flexpos.Sinusoidal, "continuous": flexpos.LearnedContinuous}
    m = make[module](4, divide=3.0, learned_div=True).double()

    def f(x, div):
        if module == "rotary":
            return functional_call(m, {"div": div}, (x, x.flip(-2)), {"pos": pos})
        return functional_call(m, {"div": div}, (x[:, 0],), {"pos": pos})

    x = torch.randn(1, 2, 6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x, m.div))


DIVIDED = {
    "Sinusoidal": lambda **kw: flexpos.Sinusoidal(8, **kw),
    "LearnedContinuous": lambda **kw: flexpos.LearnedContinuous(8, depth=2, **kw),
    "Rotary": lambda **kw: flexpos.Rotary(4, **kw),
    "ALiBi": lambda **kw: flexpos.ALiBi(2, **kw),
    "DPB": lambda **kw: flexpos.DPB(8, 2, depth=2, **kw),
    "XL": lambda **kw: flexpos.XL(8, 2, **kw),
}


@pytest.mark.parametrize("divide", [1e-9, 1e-30])
@pytest.mark.parametrize("name", DIVIDED)
def test_tiny_learned_divisors_equal_fixed_ones_and_learn(name, divide):
    """Any divide the constructors accept: a learned divisor gives the fixed one's numbers and a
    non-zero gradient (positions on its scale)."""
    fixed = DIVIDED[name](divide=divide).double()
    learned = DIVIDED[name](divide=divide, learned_div=True).double()
    learned.load_state_dict(fixed.state_dict(), strict=False)
    with torch.no_grad():
        learned.div.fill_(math.log(divide))  # float64: the float32 parameter was rounded
    pos = torch.tensor([[0.0, 1.5, 2.25, 6.0, 7.5]], dtype=torch.float64) * divide
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64)

    def run(m):
        if isinstance(m, (flexpos.Sinusoidal, flexpos.LearnedContinuous)):
            return m(x.transpose(1, 2).flatten(-2), pos=pos)
        if isinstance(m, flexpos.Rotary):
            return torch.cat(m(x, x.flip(-2), pos=pos), -1)
        return flexpos.attention(x, x.flip(-2), x, m, pos=pos)

    want, got = run(fixed), run(learned)
    assert (got - want).abs().max() <= 1e-9 * want.abs().max()
    got.square().sum().backward()
    assert torch.isfinite(learned.div.grad) and learned.div.grad != 0
