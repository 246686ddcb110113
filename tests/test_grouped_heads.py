"""Grouped-query attention: k and v with fewer heads than q, against float64 references in
which each key/value head is repeated for its group of query heads."""

import pytest
import torch

import flexpos
import reference as R
from support import TOLERANCE, needs_cpu_flex
from flexpos import ALiBi, DPB, XL, AttentionLayer, Positional, Rotary
from flexpos.base import QK

B, H, D = 2, 6, 8
F64 = torch.float64
DIVIDE = 3.0

SCHEMES = {
    "alibi": lambda: ALiBi(H, divide=DIVIDE),
    "dpb-affine": lambda: DPB(8, H, divide=DIVIDE),
    "dpb-depth-2": lambda: DPB(8, H, depth=2, divide=DIVIDE),
    "rotary": lambda: Rotary(D, divide=DIVIDE),
    "xl": lambda: XL(H * D, H, divide=DIVIDE),
}


def positions(n: int, length: int) -> torch.Tensor:
    """(n, length) integer positions, sorted and irregular."""
    return torch.randint(0, 40 * max(length, 1), (n, length)).sort(-1).values


def reference(scheme, module, q, k, v, pos_q, pos_k, keep=None):
    """float64 attention of q (N, H, Lq, D) with k, v (N, Hkv, Lk, D), each key/value head
    repeated for its ``H // Hkv`` query heads."""
    name = "dpb" if scheme.startswith("dpb") else scheme
    return R.scheme_attention(name, module, q, k, v, pos_q, pos_k, DIVIDE, keep)


def assert_close(got, want, dtype=F64):
    err = (got.double() - want).abs().max().item()
    bound = TOLERANCE[dtype] * max(1.0, want.abs().max().item())
    assert err <= bound, f"max |difference| {err} > {bound}"


@pytest.mark.parametrize("kv_heads", [1, 2, 3])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_grouped_heads_match_the_reference_with_gradients(scheme, kv_heads):
    """Cross-attention with a CLS token on both sides (integer positions: DPB's table is exact
    there), a per-head bool mask: outputs and the gradients of q, k and v."""
    lq, lk = 70, 90
    module = SCHEMES[scheme]().double()
    q = torch.randn(B, H, lq, D, dtype=F64, requires_grad=True)
    k, v = (torch.randn(B, kv_heads, lk, D, dtype=F64, requires_grad=True) for _ in range(2))
    pos_q, pos_k = positions(B, lq - 1), positions(B, lk - 1)
    keep = torch.rand(B, H, lq, lk) > 0.2
    out = flexpos.attention(q, k, v, module, pos_q=pos_q, pos_k=pos_k, mask=keep)
    want = reference(scheme, module, q, k, v, pos_q, pos_k, keep)
    assert out.shape == (B, H, lq, D)
    assert_close(out, want)
    grad_out = torch.randn_like(want)
    got = torch.autograd.grad((out * grad_out).sum(), (q, k, v))
    expected = torch.autograd.grad((want * grad_out).sum(), (q, k, v))
    for name, a, b in zip("qkv", got, expected):
        assert a.shape == b.shape, name
        assert_close(a, b)


@pytest.mark.parametrize("n_kv_heads", [1, 2])
def test_the_layer_with_grouped_heads_and_extra_batch_dims(n_kv_heads):
    """AttentionLayer(n_kv_heads=...) over (B, *, L, dim) with Rotary and ALiBi: its output from
    its own weights (to_kv: keys, then values, each in head order), densely in float64."""
    dim, length = H * D, 50
    layer = AttentionLayer(dim, H, positional=[Rotary(D), ALiBi(H)], n_kv_heads=n_kv_heads).double()
    assert tuple(layer.to_kv.weight.shape) == (2 * n_kv_heads * D, dim)
    x = torch.randn(2, 3, length, dim, dtype=F64)
    pos = positions(6, length).view(2, 3, length)
    y = layer(x, pos=pos)
    flat = x.reshape(6, length, dim)
    q = layer.to_q(flat).view(6, length, H, D).transpose(1, 2)
    k, v = (t.view(6, length, n_kv_heads, D).transpose(1, 2) for t in layer.to_kv(flat).chunk(2, dim=-1))
    k, v = (t.repeat_interleave(H // n_kv_heads, dim=1) for t in (k, v))
    p, has = R.padded_positions(pos.reshape(6, length), 6, length)
    thetas = layer.positional[0].thetas
    rq, rk = R.rotate(q, p, has, thetas, 1.0), R.rotate(k, p, has, thetas, 1.0)
    out = R.attend(rq, rk, v, R.alibi_bias(H, p, p, has, has))
    want = layer.to_out(out.transpose(1, 2).reshape(6, length, dim)).view(2, 3, length, dim)
    assert_close(y, want)


def test_rotary_alone_rotates_keys_with_fewer_heads():
    rotary = Rotary(D, divide=DIVIDE)
    q, k = torch.randn(B, H, 40, D, dtype=F64), torch.randn(B, 2, 40, D, dtype=F64)
    pos = positions(B, 40)
    rq, rk = rotary(q, k, pos=pos)
    p, has = R.padded_positions(pos, B, 40)
    assert_close(rq, R.rotate(q, p, has, rotary.thetas, DIVIDE))
    assert_close(rk, R.rotate(k, p, has, rotary.thetas, DIVIDE))


def test_a_mix_with_block_masks_and_parameter_gradients():
    """Rotary, a learned-divisor ALiBi and a depth-2 DPB with float positions, a position
    window and causal masking: outputs and gradients of q, k, v, the positions and every
    parameter, through a float64 reference that evaluates the DPB's MLP at every pair."""
    length, kv_heads = 130, 2
    rotary, alibi = Rotary(D, divide=DIVIDE), ALiBi(H, divide=DIVIDE, learned_div=True).double()
    dpb = DPB(8, H, depth=2, divide=DIVIDE).double()
    q = torch.randn(B, H, length, D, dtype=F64, requires_grad=True)
    k, v = (torch.randn(B, kv_heads, length, D, dtype=F64, requires_grad=True) for _ in range(2))
    pos = (torch.rand(B, length, dtype=F64).cumsum(-1) * 5).requires_grad_()
    window = flexpos.distance_window_mask(200.0, pos=pos.detach())
    out = flexpos.attention(q, k, v, rotary, alibi, dpb, pos=pos, mask=window, causal=True)
    p, has = R.padded_positions(pos, B, length)
    kr, vr = (t.repeat_interleave(H // kv_heads, dim=1) for t in (k, v))
    rq, rk = (R.rotate(t, p, has, rotary.thetas, DIVIDE) for t in (q, kr))
    bias = R.alibi_bias(H, p, p, has, has) / alibi.divisor(F64)  # learned: gradients reach it
    bias = bias + R.dpb_bias_through(dpb, p, p, has, has, DIVIDE)
    near = (p[:, :, None] - p[:, None, :]).abs() <= 200.0
    keep = (near & torch.ones(length, length, dtype=torch.bool).tril())[:, None]
    want = R.attend(rq, rk, vr, bias, keep)
    assert_close(out, want)
    leaves = (q, k, v, pos, *alibi.parameters(), *dpb.parameters())
    grad_out = torch.randn_like(want)
    got = torch.autograd.grad((out * grad_out).sum(), leaves)
    expected = torch.autograd.grad((want * grad_out).sum(), leaves)
    for a, b in zip(got, expected):
        assert_close(a, b)


def test_a_custom_transform_with_per_query_head_key_features_is_refused_by_name():
    """Key features must have k's heads (or 1); with grouped heads a transform that returns them
    per query head gets a ValueError naming it, not a broadcast error."""

    class PerHeadKeys(Positional):
        transforms_qk = True

        def __init__(self) -> None:
            super().__init__()
            self._init_divisor(1.0, False)

        def transform_qk(self, q, k, positions):
            extra_q = q.new_ones(*q.shape[:-1], 2)
            return QK(q, k, extra_q, k.new_ones(k.shape[0], q.shape[1], k.shape[2], 2))

    q, k, v = torch.randn(B, H, 10, D), torch.randn(B, 2, 10, D), torch.randn(B, 2, 10, D)
    with pytest.raises(ValueError, match=r"PerHeadKeys.transform_qk returned extra_k of shape \(2, 6, 10, 2\)"):
        flexpos.attention(q, k, v, PerHeadKeys())


@needs_cpu_flex
@pytest.mark.parametrize("batch, head_dim", [(2, 32), (1, 8)])
def test_cpu_flex_forward_with_grouped_heads(batch, head_dim, compiled):
    """The flex backend (forward) with two key/value heads for six query heads, float32; batch
    1 and head dim 8 take its CPU workarounds (heads as the batch, features padded to 32)."""
    module = SCHEMES["alibi"]()
    q = torch.randn(batch, H, 150, head_dim)
    k, v = torch.randn(batch, 2, 150, head_dim), torch.randn(batch, 2, 150, head_dim)
    pos = positions(batch, 149)
    with torch.no_grad():
        out = flexpos.attention(q, k, v, module, pos=pos, backend="flex")
    assert_close(out, reference("alibi", module, q.double(), k.double(), v.double(), pos, pos), torch.float32)


@pytest.mark.parametrize("kv_heads", [4, 0, 12])
def test_key_value_heads_that_do_not_divide_the_query_heads_are_refused(kv_heads):
    q = torch.randn(B, H, 10, D)
    k, v = torch.randn(B, kv_heads, 10, D), torch.randn(B, kv_heads, 10, D)
    with pytest.raises(ValueError, match=r"k must have shape \(2, Hkv, Lk, 8\).*Hkv = 6 or a divisor"):
        flexpos.attention(q, k, v)


def test_values_with_other_heads_than_keys_are_refused():
    q, k, v = torch.randn(B, H, 10, D), torch.randn(B, 2, 10, D), torch.randn(B, 3, 10, D)
    with pytest.raises(ValueError, match=r"v must have shape \(2, 2, 10, Dv\)"):
        flexpos.attention(q, k, v)


@pytest.mark.parametrize("n_kv_heads, error", [(4, ValueError), (0, ValueError), (2.0, TypeError)])
def test_layer_n_kv_heads_must_divide_n_heads(n_kv_heads, error):
    with pytest.raises(error, match="n_kv_heads"):
        AttentionLayer(H * D, H, n_kv_heads=n_kv_heads)
