"""Rotary and the input transforms vs float64 formulas."""

import math

import pytest
import torch

import flexpos
import reference as R
from support import TOLERANCE
from flexpos import LearnedContinuous, LearnedVocab, Rotary, Sinusoidal

F64 = torch.float64


@pytest.mark.parametrize("n_dims", [None, 4])
@pytest.mark.parametrize("divide", [1.0, 2.5])
def test_rotary_is_a_complex_rotation(n_dims, divide):
    q, k = torch.randn(2, 3, 50, 8, dtype=F64), torch.randn(2, 3, 50, 8, dtype=F64)
    pos = torch.randint(0, 10**6, (2, 47)) + 2_000_000_000
    rot = Rotary(8, n_dims=n_dims, divide=divide)
    rq, rk = rot(q, k, pos=pos)
    p, has = R.padded_positions(pos, 2, 50)
    assert torch.allclose(rq, R.rotate(q, p, has, rot.thetas, divide), atol=1e-12, rtol=0)
    assert torch.allclose(rk, R.rotate(k, p, has, rot.thetas, divide), atol=1e-12, rtol=0)
    assert torch.equal(rq[:, :, :3], q[:, :, :3])  # no position: identity
    if n_dims is not None:
        assert torch.equal(rq[..., n_dims:][:, :, 3:], q[..., n_dims:][:, :, 3:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_real_form_equals_the_complex_form(dtype):
    """CPU runs the complex product, CUDA the real form: the same numbers, both near float64."""
    from flexpos.rotary import rotate_complex, rotate_real, rotate_real_pair, rotation

    x = torch.randn(2, 3, 40, 16, dtype=F64)
    pos = torch.randint(0, 10**6, (2, 38)) + 2_000_000_000
    rot = Rotary(16, divide=7.0)
    p, has = R.padded_positions(pos, 2, 40)
    cos_sin = rotation(p, has, rot.thetas, rot.divisor(F64), torch.promote_types(dtype, torch.float32))
    low = x.to(dtype)
    real, complex_ = rotate_real(low, cos_sin), rotate_complex(low, cos_sin)
    assert real.dtype == complex_.dtype == dtype
    assert (real.double() - complex_.double()).abs().max() <= TOLERANCE[dtype] / 100
    want = R.rotate(low.double(), p, has, rot.thetas, 7.0)
    assert (real.double() - want).abs().max() <= TOLERANCE[dtype]
    other = torch.randn_like(x).to(dtype)
    pair = rotate_real_pair(low, other, cos_sin)
    assert torch.equal(pair[0], real) and torch.equal(pair[1], rotate_real(other, cos_sin))


@pytest.mark.parametrize("compile_table", [False, True])
def test_rotary_float32_table_as_accurate_as_float32_trig(request, compile_table):
    """Angles reduced in float64, then evaluated in float32 (Inductor's float32 trig is accurate
    to 2 ulps): within 1.2e-7 of float64 trig of the same angles, also at angles near 1e10."""
    from flexpos.rotary import rotation

    pos = torch.cat([torch.linspace(-20, 20, 4000, dtype=F64), torch.rand(20000, dtype=F64) * 1e10]).reshape(3, -1)
    keep = torch.ones(pos.shape[1], dtype=torch.bool)
    thetas, div = torch.tensor([1.0, 0.37, 1e-4]), torch.tensor(1.0, dtype=F64)
    angles = pos[:, None, :, None] * thetas.double()
    if compile_table:
        request.getfixturevalue("compiled")
    table = rotation(pos, keep, thetas, div, torch.float32)
    exact = rotation(pos, keep, thetas, div, F64)
    assert table.dtype == torch.float32
    for i, want in enumerate((angles.cos(), angles.sin())):
        assert (table[..., i].double() - want).abs().max() <= torch.finfo(torch.float32).eps
        assert (exact[..., i] - want).abs().max() <= 1e-15


@pytest.mark.parametrize("compile_table", [False, True])
def test_rotary_float32_table_at_huge_angles_is_a_rotation(request, compile_table):
    """Past 2**32 turns the float64 angle is reduced in one step: within about an ulp of it
    (|angle| * 2.3e-16) of its exact cos and sin up to 2**53, a rotation by 0 beyond (it once
    grew q's norm by 4e5 at 1e30, and gave inf and NaN above)."""
    from flexpos.rotary import rotation

    magnitudes = 10.0 ** torch.linspace(10, 300, 600, dtype=F64)
    pos = (magnitudes * (1 + torch.rand(600, dtype=F64))).reshape(1, -1)
    keep = torch.ones(pos.shape[1], dtype=torch.bool)
    thetas, div = torch.tensor([1.0, 0.37]), torch.tensor(1.0, dtype=F64)
    if compile_table:
        request.getfixturevalue("compiled")
    table = rotation(pos, keep, thetas, div, torch.float32).double()[0, 0]  # (L, 2, 2)
    assert ((table[..., 0].square() + table[..., 1].square()) - 1).abs().max() <= 4e-7
    angles = pos[0, :, None] * thetas.double()
    exact = torch.tensor([[[math.cos(a), math.sin(a)] for a in row] for row in angles.tolist()], dtype=F64)
    bound = angles[..., None] * 2.3e-16 + torch.finfo(torch.float32).eps
    sane = angles < 1e15  # beyond, float64's rounding of the angle exceeds a tenth of a radian
    assert ((table - exact).abs() <= bound)[sane].all()
    no_phase = angles >= 2.0**53
    assert no_phase.any() and table[no_phase].eq(torch.tensor([1.0, 0.0], dtype=F64)).all()


def test_rotary_scores_depend_only_on_distance():
    q, k = torch.randn(1, 1, 2, 16, dtype=F64), torch.randn(1, 1, 2, 16, dtype=F64)
    rot = Rotary(16)
    near = rot(q, k, pos=torch.tensor([[10.5, 3.25]], dtype=F64))
    far = rot(q, k, pos=torch.tensor([[1e9 + 10.5, 1e9 + 3.25]], dtype=F64))
    score = lambda qk: qk[0][0, 0, 0] @ qk[1][0, 0, 1]  # noqa: E731
    assert math.isclose(score(near), score(far), abs_tol=1e-6)


def test_rotary_cross_positions_and_extra_batch_dims():
    q, k = torch.randn(2, 2, 4, 30, 8, dtype=F64), torch.randn(2, 2, 4, 45, 8, dtype=F64)
    pos_q, pos_k = torch.rand(2, 2, 30, dtype=F64) * 100, torch.rand(2, 2, 40, dtype=F64) * 100
    rot = Rotary(8)
    rq, rk = rot(q, k, pos_q=pos_q, pos_k=pos_k)
    pq, hq = R.padded_positions(pos_q.reshape(4, 30), 4, 30)
    pk, hk = R.padded_positions(pos_k.reshape(4, 40), 4, 45)
    expected_q = R.rotate(q.reshape(4, 4, 30, 8), pq, hq, rot.thetas, 1.0)
    expected_k = R.rotate(k.reshape(4, 4, 45, 8), pk, hk, rot.thetas, 1.0)
    assert torch.allclose(rq.reshape(4, 4, 30, 8), expected_q, atol=1e-12, rtol=0)
    assert torch.allclose(rk.reshape(4, 4, 45, 8), expected_k, atol=1e-12, rtol=0)


def test_sinusoidal_mask_and_missing_positions():
    x = torch.randn(2, 3, 20, 16, dtype=F64)
    pos = torch.rand(2, 3, 18, dtype=F64) * 1e3
    mask = torch.rand(2, 3, 18) > 0.4
    enc = Sinusoidal(16, divide=3.0)
    out = enc(x, pos=pos, mask=mask)
    expected = R.sinusoid64(pos / 3.0, enc.inv_freq) * mask[..., None]
    assert torch.allclose(out[..., 2:, :], x[..., 2:, :] + expected, atol=1e-12, rtol=0)
    assert torch.equal(out[..., :2, :], x[..., :2, :])


def test_sinusoidal_in_float32_at_genomic_positions():
    """float32 x: angles up to 1.2e9 radians, reduced in float64 before float32 trig
    (flexpos._trig.cos_sin), within float32's rounding of a float64 reference."""
    x = torch.randn(2, 50, 16)
    pos = 1_200_000_000 + torch.randint(0, 10**6, (2, 50))
    enc = Sinusoidal(16, divide=0.7)
    expected = x.double() + R.sinusoid64(pos.double() / 0.7, enc.inv_freq)
    assert (enc(x, pos=pos).double() - expected).abs().max() <= TOLERANCE[torch.float32]


def test_learned_vocab_and_continuous():
    x = torch.randn(2, 12, 8, dtype=F64)
    pos = torch.randint(0, 30, (2, 10))
    vocab = LearnedVocab(8, 30).double()
    out = vocab(x, pos=pos)
    assert torch.equal(out[:, 2:], x[:, 2:] + vocab.emb.weight[pos])
    assert torch.equal(out[:, :2], x[:, :2])
    cont = LearnedContinuous(8, depth=2, norm=True, divide=4.0).double()
    fpos = torch.rand(2, 12, dtype=F64) * 100
    expected = x + R.mlp64(cont.mlp, (fpos / 4.0)[..., None])
    assert torch.allclose(cont(x, pos=fpos), expected, atol=1e-12, rtol=0)


def test_learned_continuous_runs_a_float32_mlp_in_float64_for_float64_x():
    cont = LearnedContinuous(8, depth=2, norm=True, divide=4.0)
    x = torch.randn(2, 12, 8, dtype=F64)
    fpos = torch.rand(2, 12, dtype=F64) * 1e4
    expected = x + R.mlp64(cont.mlp, (fpos / 4.0)[..., None])
    assert (cont(x, pos=fpos) - expected).abs().max() <= TOLERANCE[F64] * expected.abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_learned_continuous_in_a_half_precision_model(dtype):
    """A ``.half()`` model runs the MLP in float32 on its (rounded) weights: in float16 the
    first layer's outputs at positions / divide ~ 1e5 would overflow (65504) to NaN."""
    cont = LearnedContinuous(16, depth=2, norm=True, divide=0.05).to(dtype)
    x = torch.randn(2, 30, 16).to(dtype)
    pos = torch.randint(0, 6000, (2, 30))
    out = cont(x, pos=pos)
    want = x.double() + R.mlp64(cont.mlp, (pos.double() / 0.05)[..., None])
    assert out.dtype == dtype
    assert (out.double() - want).abs().max() <= TOLERANCE[dtype] * want.abs().max()


@pytest.mark.parametrize("enc", [Sinusoidal(8), LearnedContinuous(8), LearnedVocab(8, 5)], ids=lambda m: type(m).__name__)
def test_all_tokens_without_positions_are_left_as_they_are(enc):
    """Zero positions (every token a CLS token), with or without a mask of the positions."""
    x = torch.randn(2, 3, 4, 8)
    pos = torch.zeros(2, 3, 0, dtype=torch.long)
    for mask in (None, torch.zeros(2, 3, 0, dtype=torch.bool), torch.ones(2, 3, 4, dtype=torch.bool)):
        assert torch.equal(enc(x, pos=pos, mask=mask), x)


def test_default_positions_are_indices():
    x = torch.randn(1, 6, 8, dtype=F64)
    enc = Sinusoidal(8)
    assert torch.equal(enc(x), enc(x, pos=torch.arange(6)[None]))


@pytest.mark.parametrize("vocab_lookup", ["as on CPU", "compiled, as on GPUs"])
def test_compiled_transforms_match_eager(compiled, vocab_lookup, monkeypatch):
    """One compiled call per transform, float32, against the eager numbers. LearnedVocab: its
    compiled lookup without gradients, and in training its table's gradient too: an eager
    lookup then the compiled add on CPU, the lookup compiled with the add on GPUs."""
    if vocab_lookup != "as on CPU":
        monkeypatch.setattr(flexpos.learned, "_trains_on_cpu", lambda emb: False)
    q, k = torch.randn(2, 4, 70, 16), torch.randn(2, 4, 70, 16)
    pos = torch.rand(2, 70) * 500
    x = torch.randn(2, 70, 16)
    rot, sin, cont = Rotary(16), Sinusoidal(16), LearnedContinuous(16, depth=2)
    vocab = LearnedVocab(16, 100)
    ipos = torch.randint(0, 100, (2, 70))

    def outputs():
        with torch.no_grad():
            inference = vocab(x, pos=ipos)
        vocab.emb.weight.grad = None
        vocab(x, pos=ipos).square().sum().backward()
        return [*rot(q, k, pos=pos), sin(x, pos=pos), cont(x, pos=pos), inference, vocab.emb.weight.grad]

    got = outputs()
    flexpos.set_compile(False)
    want = outputs()
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_compiled_transforms_run_hooks_added_after_a_call(compiled):
    """The compiled learned transforms are shared by every instance: a forward hook registered
    on a child after a first call (of this instance or another) still runs."""
    x, pos, ipos = torch.randn(2, 30, 16), torch.rand(2, 30) * 50, torch.randint(0, 40, (2, 30))
    cont, vocab = LearnedContinuous(16, depth=2), LearnedVocab(16, 40)
    before = [cont(x, pos=pos), vocab(x, pos=ipos)]
    cont.mlp[1][1].register_forward_hook(lambda module, args, out: out * 2)
    vocab.emb.register_forward_hook(lambda module, args, out: out * -1)
    other = LearnedContinuous(16, depth=2)
    other.mlp[0][0].register_forward_pre_hook(lambda module, args: (args[0] * 3,))
    got = [cont(x, pos=pos), vocab(x, pos=ipos), other(x, pos=pos)]
    flexpos.set_compile(False)
    want = [cont(x, pos=pos), vocab(x, pos=ipos), other(x, pos=pos)]
    for a, b, old in zip(got, want, before):
        assert not torch.allclose(b, old, atol=1e-3)  # the hooks change the numbers
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
