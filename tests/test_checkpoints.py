"""Native modules load bio-attention 0.1.15 checkpoints with strict=True, and give them back."""

import pytest
import torch
from bio_attention import positional as original

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


@pytest.mark.parametrize("module", ["rotary", "sinusoidal", "continuous"])
def test_learned_div_in_transforms_receives_gradients(module):
    x = torch.randn(2, 4, 20, 8, dtype=torch.float64)
    pos = torch.rand(2, 20, dtype=torch.float64) * 50
    if module == "rotary":
        m = flexpos.Rotary(8, divide=3.0, learned_div=True).double()
        out = m(x, x.flip(-2), pos=pos)[0]
    elif module == "sinusoidal":
        m = flexpos.Sinusoidal(8, divide=3.0, learned_div=True).double()
        out = m(x[:, 0], pos=pos)
    else:
        m = flexpos.LearnedContinuous(8, divide=3.0, learned_div=True).double()
        out = m(x[:, 0], pos=pos)
    out.square().sum().backward()
    assert m.div.grad is not None and m.div.grad.abs().item() > 0
