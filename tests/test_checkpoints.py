"""Native modules build bio-attention 0.1.15's buffers, load its checkpoints with strict=True and
give them back; learned divisors of the transforms have correct gradients."""

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
