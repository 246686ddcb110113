"""Every wrong call fails at the boundary with a ValueError/TypeError naming the argument."""

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

import flexpos
from flexpos import DPB, XL, ALiBi, AttentionLayer, LearnedContinuous, LearnedVocab, Rotary, Sinusoidal

q = torch.randn(2, 4, 10, 8)
k = torch.randn(2, 4, 12, 8)
v = torch.randn(2, 4, 12, 8)
sq = torch.randn(2, 4, 10, 8)  # self-attention
# int64 positions 2**63 + 2**61 apart in the second sequence: their difference overflows int64
far_ints = torch.tensor([list(range(10)), [-(2**62) - 1] + [2**62 + 2**61] * 9])


def attn(*args, **kwargs):
    with torch.no_grad():
        return flexpos.attention(*args, backend="chunked", **kwargs)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: attn(q.numpy(), k, v), TypeError, "q must be a torch.Tensor"),
        (lambda: attn(q[0], k, v), ValueError, r"q must have shape \(B, \*, H, L, D\)"),
        (lambda: attn(q.long(), k.long(), v.long()), TypeError, "q must be a floating point"),
        (lambda: attn(q, k[..., :4], v), ValueError, r"k must have shape \(2, Hkv, Lk, 8\) to match q"),
        (lambda: attn(q, k[:, :3], v[:, :3]), ValueError, r"k must have shape .*with Hkv = 4 or a divisor of it"),
        (lambda: attn(q, k, v[..., :5, :]), ValueError, r"v must have shape \(2, 4, 12, Dv\) to match k"),
        (lambda: attn(q, k.double(), v), TypeError, "share one dtype"),
        (lambda: attn(q, k, v, "alibi"), TypeError, "flexpos positional modules"),
        (lambda: attn(q, k, v, Sinusoidal(8)), TypeError, "transforms the input x"),
        (lambda: attn(q, k, v, ALiBi(8)), ValueError, r"n_heads=8 but q \(B, \*, H, L, D\) has 4 heads"),
        (lambda: attn(q, k, v, Rotary(16)), ValueError, "head_dim=16"),
        (lambda: attn(q, k, v, XL(64, 4)), ValueError, r"XL\(dim=64, n_heads=4\) expects q"),
        (lambda: attn(sq, sq, sq, pos=torch.zeros(3, 10)), ValueError, r"pos must have shape \(2, L'\) with L' <= 10, got \(3, 10\)$"),
        (lambda: attn(sq, sq, sq, pos=torch.zeros(1, 10)), ValueError,
         r"got \(1, 10\); positions are not broadcast: to share them, pass pos.expand\(2, -1\)$"),
        (lambda: AttentionLayer(32, 4)(torch.randn(2, 3, 10, 32), pos=torch.zeros(2, 1, 10)), ValueError,
         r"pos must have shape \(2, 3, L'\) with L' <= 10, got \(2, 1, 10\); .* pass pos.expand\(2, 3, -1\)$"),
        (lambda: attn(sq, sq, sq, pos=torch.zeros(2, 11)), ValueError, "11 positions but the sequence has only 10"),
        (lambda: Rotary(8)(sq.transpose(1, 2), sq.transpose(1, 2), pos=torch.zeros(2, 10)), ValueError,
         r"10 positions but the sequence has only 4 tokens \(L, dim -2 of q and k laid out \(B, \*, H, L, D\)\)"),
        (lambda: attn(sq, sq, sq, pos=torch.zeros(2, 1, 10)), ValueError, "pos must have shape"),
        (lambda: attn(sq, sq, sq, pos=torch.full((2, 10), float("nan"))), ValueError, "pos must be finite"),
        (lambda: attn(sq, sq, sq, pos=torch.ones(2, 10, dtype=torch.bool)), TypeError, "int or float positions"),
        (lambda: attn(q, k, v, pos=torch.zeros(2, 10)), ValueError, "pass pos_q and pos_k"),
        (lambda: attn(sq, sq, sq, pos=torch.zeros(2, 10), pos_q=torch.zeros(2, 10)), ValueError, "not both"),
        (lambda: attn(q, k, v, pos_k=torch.zeros(2, 13)), ValueError, "pos_k has 13 positions"),
        # A side without positions would count 0 .. L-1, far from the other side's.
        (lambda: attn(q, k, v, ALiBi(4), Rotary(8), ALiBi(4), pos_q=torch.zeros(2, 10)), ValueError,
         r"pos_q is given without pos_k: ALiBi, Rotary read the positions .* Pass pos_k too; a \(B, \*, 0\) tensor"),
        (lambda: attn(q, k, v, DPB(4, 4), pos_k=torch.zeros(2, 12)), ValueError, "pos_k is given without pos_q: DPB reads"),
        (lambda: AttentionLayer(32, 4, positional=[Sinusoidal(32), XL(32, 4)])(torch.randn(2, 10, 32), torch.randn(2, 7, 32), pos=torch.zeros(2, 10)),
         ValueError, "pos is given without pos_context: XL reads"),
        (lambda: AttentionLayer(32, 4, positional=[ALiBi(4)])(torch.randn(2, 10, 32), torch.randn(2, 7, 32), pos_context=torch.zeros(2, 7)),
         ValueError, "pos_context is given without pos: ALiBi reads"),
        (lambda: attn(q, k, v, mask=torch.ones(2, 10, dtype=torch.bool)), ValueError, "mask must have shape"),
        (lambda: attn(q, k, v, mask=torch.ones(2, 2, 10, 12, dtype=torch.bool)), ValueError,
         r"mask must have shape \(2, 12\) or \(2, 10, 12\) or \(2, 4, 10, 12\) \(or with 1 for all batch dims, for H or for Lq\), got \(2, 2, 10, 12\)$"),
        (lambda: attn(q, k, v, mask=torch.ones(2, 12)), TypeError,
         r"mask must be a bool tensor \(True = keep\), got dtype torch.float32 \(for an additive mask of 0 and -inf, pass mask == 0\)$"),
        (lambda: attn(q, k, v, mask=torch.ones(2, 12, dtype=torch.long)), TypeError, r"got dtype torch.int64$"),
        (lambda: attn(q, k, v, mask=[1, 2]), TypeError, "mask must be a BlockMask"),
        (lambda: attn(q, k, v, mask=flexpos.full_mask(10, 10)), ValueError, r"mask \(a BlockMask\) is for \(Lq, Lk\)=\(10, 10\), inputs have \(10, 12\) \(with fewer positions than tokens, build masks from positions with len_q=/len_k=\)"),
        (lambda: attn(q, k, v, mask=flexpos.full_mask(12, 12)), ValueError, r"mask \(a BlockMask\) is for \(Lq, Lk\)=\(12, 12\), inputs have \(10, 12\)$"),
        (lambda: attn(q, k, v, mask=torch.ones(2, 12, dtype=torch.bool, device="meta")), ValueError, "mask is on meta"),
        (lambda: attn(q[:0], k[:0], v[:0], mask=torch.ones(0, 12)), TypeError, "mask must be a bool tensor"),
        (lambda: attn(q[:, :0], k[:, :0], v[:, :0], mask=torch.ones(2, 12, dtype=torch.long)), TypeError, "mask must be a bool"),
        (lambda: Sinusoidal(8)(torch.randn(2, 6, 8), mask=torch.ones(2, 6, dtype=torch.bool, device="meta")), ValueError,
         "mask is on meta, x on cpu"),
        (lambda: Rotary(8)(sq, sq.double()), TypeError, "q and k must share one dtype"),
        (lambda: ALiBi(4, divide=1e-39), ValueError, r"divide must lie in float32's normal range \[1.18e-38, 3.4e\+38\]"),
        (lambda: DPB(8, 4, divide=1e39), ValueError, "divide must lie in float32's normal range"),
        (lambda: AttentionLayer(32, 4, positional=5), TypeError, "positional must be a sequence of modules, got int"),
        (lambda: flexpos.attention(q, k, v, backend=["flex"]), TypeError, "backend must be 'auto', 'flex' or 'chunked', got list"),
        (lambda: flexpos.full_mask(5, 5, device="bogus"), ValueError, "device must name a torch device, got 'bogus'"),
        (lambda: flexpos.causal_mask(5, device=None), TypeError, "device must be a torch.device or a device name"),
        (lambda: flexpos.sliding_window_mask(5, 2, device=5), TypeError, "device must be a torch.device"),
        (lambda: Rotary(2**70), ValueError, "head_dim must fit in int64"),
        (lambda: flexpos.and_masks(create_block_mask(lambda b, h, i, j: i >= j, None, None, 64, 64, "cpu", BLOCK_SIZE=64)),
         ValueError, "and_masks needs masks with 128x128 blocks"),
        (lambda: attn(q[..., :0], k[..., :0], v), ValueError, r"q and k need a head dim D of at least 1, got q \(2, 4, 10, 0\)"),
        # Empty inputs are checked as others are.
        (lambda: attn(q[:0], k[:0], v[:0], mask=torch.ones(2, 12, dtype=torch.bool)), ValueError, r"mask must have shape \(0, 12\)"),
        (lambda: attn(q[:0], k[:0], v[:0], pos_k=torch.zeros(2, 12)), ValueError, r"pos_k must have shape \(0, L'\)"),
        (lambda: attn(q[:, :, :0], k, v, ALiBi(8)), ValueError, r"n_heads=8 but q \(B, \*, H, L, D\) has 4 heads"),
        (lambda: flexpos.attention(q, k[:, :, :0], v[:, :, :0], backend="fast"), ValueError, "backend must be"),
        (lambda: attn(q, k, v, mask=create_block_mask(lambda b, h, i, j: i >= j, None, None, 10, 12, "cpu", BLOCK_SIZE=64)),
         ValueError, r"mask \(a BlockMask\) must use 128x128 blocks"),
        (lambda: attn(q, k, v, kernel_options=[("BLOCK_M", 64)]), TypeError, "kernel_options must be a dict of option names to values, got list"),
        (lambda: attn(q, k, v, kernel_options={1: 64}), TypeError, r"kernel_options keys must be option names \(str\), got 1"),
        (lambda: attn(q, k, v, kernel_options={"BLOCK_M": 64.0}), TypeError, r"kernel_options\['BLOCK_M'\] must be an int, bool or str, got float"),
        (lambda: AttentionLayer(32, 4, kernel_options={"num_stages": None}), TypeError, r"kernel_options\['num_stages'\] must be an int"),
        (lambda: attn(q, k, v, kernel_options={"OUTPUT_LOGSUMEXP": False}), ValueError, r"kernel_options\['OUTPUT_LOGSUMEXP'\] is set by FlexAttention itself"),
        (lambda: AttentionLayer(32, 4, kernel_options={"OUTPUT_MAX": True}), ValueError, r"kernel_options\['OUTPUT_MAX'\] is set by FlexAttention itself"),
        (lambda: attn(q, k, v, scale="a"), TypeError, "scale must be a positive float"),
        (lambda: attn(q, k, v, scale=float("nan")), ValueError, "scale must be a finite positive"),
        (lambda: attn(q, k, v, scale=1e39), ValueError, r"scale must be finite in q's dtype torch.float32 \(at most 3.4e\+38\)"),
        (lambda: attn(q.half(), k.half(), v.half(), scale=7e4), ValueError, "scale must be finite in q's dtype torch.float16"),
        (lambda: attn(q, k, v, scale=torch.tensor(0.5, requires_grad=True)), TypeError, "scale must be a positive float"),
        (lambda: attn(sq, sq, sq, causal="no"), TypeError, "causal must be a bool"),
        (lambda: attn(q, k, v.to("meta")), ValueError, "must be on one device, got cpu/cpu/meta"),
        (lambda: flexpos.attention(q, k, v, backend="fast"), ValueError, "backend must be"),
        (lambda: Sinusoidal(7), ValueError, "dim must be even"),
        (lambda: Rotary(8, n_dims=3), ValueError, "n_dims must be even"),
        (lambda: Rotary(8, n_dims=10), ValueError, "n_dims must be <= head_dim"),
        (lambda: Rotary(8, n_dims="4"), TypeError, "n_dims must be an int"),
        (lambda: Rotary(8)(sq, sq[:1]), ValueError, r"k must have shape \(2, Hkv, Lk, D\) like q"),
        (lambda: Rotary(8)(sq, torch.randn(*sq.shape[:-1], 6)), ValueError, r"k must have head dim 8 \(Rotary\(head_dim=8\)\)"),
        (lambda: Rotary(8)(q, k, pos_k=torch.zeros(2, 12)), ValueError, "pos_k is given without pos_q: Rotary reads the positions"),
        (lambda: ALiBi(4, divide=0.0), ValueError, "divide must be a finite positive"),
        (lambda: ALiBi(4, divide=float("nan")), ValueError, "divide must be a finite positive"),
        (lambda: ALiBi(4, divide="2"), TypeError, "divide must be a positive float"),
        (lambda: Sinusoidal(8, divide=1e-320), ValueError, "with a finite inverse"),
        (lambda: ALiBi(4, use_n_heads=5), ValueError, "use_n_heads must be <= n_heads=4"),
        (lambda: ALiBi(0), ValueError, "n_heads must be positive"),
        (lambda: ALiBi(2.5), TypeError, "n_heads must be an int"),
        (lambda: XL(30, 4), ValueError, "divisible by n_heads"),
        (lambda: DPB(8, 4, table_size=1), ValueError, "table_size must be >= 2"),
        (lambda: DPB(8, 4, depth=0), ValueError, "depth must be positive"),
        (lambda: LearnedVocab(8, 5)(torch.randn(1, 3, 8), pos=torch.rand(1, 3)), TypeError, "integer positions"),
        (lambda: LearnedVocab(8, 5)(torch.randn(1, 3, 8), pos=torch.tensor([[0, 2, 5]])), ValueError, r"\[0, 4\]"),
        (lambda: Sinusoidal(8)(torch.randn(1, 3, 6)), ValueError, r"x must have shape \(\*, L, 8\)"),
        (lambda: Sinusoidal(8)(torch.randn(3, 8).long()), TypeError, "x must be a floating point"),
        (lambda: Sinusoidal(8)(torch.randn(1, 3, 8), mask=torch.ones(1, 3)), TypeError, "mask must be a bool"),
        (lambda: Sinusoidal(8)(torch.randn(1, 3, 8), mask=torch.ones(1, 4, dtype=torch.bool)), ValueError, r"mask must have shape \(1, 3\), got \(1, 4\)"),
        (lambda: AttentionLayer(30, 4), ValueError, "divisible by n_heads"),
        (lambda: AttentionLayer(32, 4, positional=[torch.nn.Linear(2, 2)]), TypeError, "positional must hold"),
        (lambda: AttentionLayer(32, 4, positional=ALiBi(4)), TypeError, "got a single ALiBi"),
        (lambda: AttentionLayer(32, 4, backend="fast"), ValueError, "backend must be"),
        (lambda: AttentionLayer(32, 4)(torch.randn(10, 32)), ValueError, r"x must have shape \(B, \*, L, dim\)"),
        (lambda: AttentionLayer(32, 4)(torch.randn(2, 10, 30)), ValueError, r"x must have shape \(2, L, 32\)"),
        (lambda: AttentionLayer(32, 4)(torch.randn(2, 10, 32).long()), TypeError, "x must be a floating point"),
        (lambda: AttentionLayer(32, 4)(torch.randn(2, 10, 32), torch.randn(3, 7, 32)), ValueError, r"context must have shape \(2, L, 32\)"),
        (lambda: AttentionLayer(32, 4)(torch.randn(2, 10, 32), pos_context=torch.zeros(2, 10)), ValueError, "pass context too"),
        (lambda: AttentionLayer(32, 4)(torch.randn(2, 10, 32), torch.randn(2, 7, 32), pos_context=torch.zeros(2, 8)), ValueError, "pos_context has 8 positions"),
        (lambda: AttentionLayer(32, 4)(torch.randn(2, 10, 32), torch.randn(2, 7, 32), pos=torch.zeros(3, 10)), ValueError, r"pos must have shape \(2, L'\)"),
        (lambda: AttentionLayer(32, 4, positional=[Sinusoidal(32)])(torch.randn(2, 10, 32), torch.randn(2, 7, 32), pos_context=torch.zeros(2, 7, 1)), ValueError, "pos_context must have shape"),
        (lambda: Sinusoidal(8)(torch.randn(1, 3, 8), pos=torch.zeros(1, 4)), ValueError, "pos has 4 positions"),
        (lambda: flexpos.distance_window_mask(5.0), ValueError, "needs pos"),
        (lambda: flexpos.set_compile("no"), TypeError, "enabled must be a bool, got str"),
        (lambda: attn(q, k, v, ALiBi(4).to("meta")), ValueError, "ALiBi is on meta but its input is on cpu"),
        (lambda: attn(*(t.to("meta") for t in (q, k, v)), ALiBi(4)), ValueError, "ALiBi is on cpu but its input is on meta"),
        (lambda: attn(q, k, v, XL(32, 4).to("meta")), ValueError, "XL is on meta but its input is on cpu"),
        (lambda: Sinusoidal(8).to("meta")(torch.randn(1, 3, 8)), ValueError, "Sinusoidal is on meta but its input"),
        (lambda: attn(sq, sq, sq, pos=torch.zeros(2, 10, device="meta")), ValueError, "pos is on the meta device"),
        (lambda: attn(sq, sq, sq, pos=torch.zeros(2, 10).to(torch.float8_e4m3fn)), TypeError, r"float positions \(float16, bfloat16, float32 or float64\), got dtype torch.float8_e4m3fn"),
        (lambda: attn(sq, sq, sq, causal=1), TypeError, "causal must be a bool, got int"),
        (lambda: AttentionLayer(32, 4)(torch.randn(2, 10, 32).double()), TypeError, "x must have the layer's dtype torch.float32"),
        (lambda: AttentionLayer(32, 4)(torch.randn(2, 10, 32), torch.randn(2, 7, 32).double()), TypeError, "context must have the layer's dtype"),
        (lambda: AttentionLayer(32, 4)(torch.randn(2, 10, 32), pos=torch.zeros(2, 10, device="meta")), ValueError, "pos is on the meta device"),
        (lambda: AttentionLayer(32, 4).to("meta")(torch.randn(2, 10, 32)), ValueError, "AttentionLayer is on meta but its input is on cpu"),
        (lambda: attn(*(t.to("meta") for t in (q, k, v))), ValueError, "q, k, v are on the meta device, which holds no values"),
        (lambda: flexpos.attention(*(t.to("meta") for t in (q, k, v))), ValueError, "on the meta device"),
        (lambda: AttentionLayer(32, 4).to("meta")(torch.randn(2, 10, 32, device="meta")), ValueError, "on the meta device"),
        (lambda: flexpos.and_masks(flexpos.causal_mask(20, device="meta"), flexpos.causal_mask(20)), ValueError, "masks on one device, got cpu and meta"),
        (lambda: flexpos.segment_mask(torch.zeros(1, 20, dtype=torch.long), torch.zeros(1, 20, dtype=torch.long, device="meta")), ValueError, "segments_k is on meta, segments_q on cpu"),
        (lambda: ALiBi(4, asymmetric="no"), TypeError, "asymmetric must be a bool, got str"),
        (lambda: ALiBi(4, learned_div="False"), TypeError, "learned_div must be a bool, got str"),
        (lambda: DPB(8, 4, norm=1), TypeError, "norm must be a bool, got int"),
        (lambda: AttentionLayer(32, 4, bias="no"), TypeError, "bias must be a bool, got str"),
        (lambda: AttentionLayer(32, 4, positional=[ALiBi(8)]), ValueError, "ALiBi was built for n_heads=8 but the layer has 4 heads"),
        (lambda: AttentionLayer(32, 4, positional=[Rotary(16)]), ValueError, "Rotary was built for head_dim=16 but the layer has head dim 8"),
        (lambda: AttentionLayer(32, 4, positional=[Sinusoidal(16)]), ValueError, "Sinusoidal was built for dim=16 but the layer has dim=32"),
        (lambda: AttentionLayer(32, 4, positional=[XL(64, 4)]), ValueError, "XL was built for dim=64 but the layer has dim=32"),
        (lambda: AttentionLayer(32, 4)(torch.randn(2, 10, 32), torch.zeros(2, 10)), ValueError, "positions are keyword-only, pass them as pos="),
        (lambda: AttentionLayer(32, 4)(torch.randn(2, 3, 10, 32), torch.randn(2, 7, 32)), ValueError, r"context must have shape \(2, 3, L, 32\), got \(2, 7, 32\)$"),
        (lambda: ALiBi(4)(sq), TypeError, r"ALiBi is not called on tensors: pass it to flexpos.attention\(q, k, v, alibi"),
        (lambda: XL(32, 4)(sq, sq), TypeError, "XL is not called on tensors"),
        (lambda: attn(q.to(torch.float8_e4m3fn), k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)), TypeError,
         r"q must be a floating point tensor \(float16, bfloat16, float32 or float64\), got dtype torch.float8_e4m3fn"),
        (lambda: Rotary(8)(sq.to(torch.float8_e5m2), sq), TypeError, "q must be a floating point tensor"),
        (lambda: Rotary(8)(sq, sq.to("meta")), ValueError, "q and k must be on one device, got cpu/meta"),
        (lambda: Rotary(8).to("meta")(sq, sq), ValueError, "Rotary is on meta but its input is on cpu"),
        (lambda: attn(sq, sq, sq, pos=far_ints), ValueError,
         r"pos must lie within 2\*\*62 of each other in each sequence \(int distances would overflow\), got positions 1.15e\+19 apart"),
        (lambda: attn(sq, sq, sq, pos=torch.full((2, 10), 2**63 + 5, dtype=torch.uint64)), ValueError,
         r"pos \(uint64\) must hold values below 2\*\*63"),
        (lambda: attn(sq, sq, sq, pos=torch.linspace(0, 1e39, 10, dtype=torch.float64).expand(2, 10)), ValueError,
         r"pos must lie within 1e38 of each other in each sequence \(float distances would overflow\), got positions 1e\+39 apart"),
        (lambda: attn(q, k, v, pos_q=torch.zeros(2, 10, dtype=torch.float64), pos_k=torch.full((2, 12), 2e38, dtype=torch.float64)),
         ValueError, "pos_q and pos_k must lie within 1e38 of each other"),
        (lambda: attn(q, k, v, pos_q=torch.zeros(2, 10), pos_k=torch.full((2, 12), float("inf"))), ValueError, "pos_k must be finite"),
        (lambda: Sinusoidal(8)(torch.randn(3, 8), pos=torch.zeros(1, 3)), ValueError, r"pos must have shape \(L'\) with L' <= 3"),
        (lambda: AttentionLayer(32, 4)(torch.randn(2, 10, 32), torch.randn(2, 7, 32), pos_context=torch.full((2, 7), float("nan"))),
         ValueError, "pos_context must be finite"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _assigned_from_meta(make):
    """Built on the meta device, then given a checkpoint with assign=True that lacks a tensor
    (strict=False): that tensor stays on meta."""
    with torch.device("meta"):
        module = make()
    checkpoint = make().state_dict()
    checkpoint.pop(next(iter(checkpoint)))
    module.load_state_dict(checkpoint, assign=True, strict=False)
    return module


@pytest.mark.parametrize(
    "call",
    [
        lambda: _assigned_from_meta(lambda: LearnedContinuous(8, depth=2))(torch.randn(1, 3, 8), pos=torch.rand(1, 3)),
        lambda: attn(q, k, v, _assigned_from_meta(lambda: DPB(8, 4))),
        lambda: AttentionLayer(32, 4, positional=[_assigned_from_meta(lambda: XL(32, 4))])(torch.randn(2, 10, 32)),
    ],
)
def test_a_buffer_left_on_meta_is_named(call):
    with pytest.raises(ValueError, match=r"is on meta but its input is on cpu \((positional.0.)?[\w.]+\): materialise it"):
        call()


class _ShiftedLinear(torch.nn.Linear):
    def forward(self, x):
        return super().forward(x) + 1.0


def _with(module, attribute, value):
    setattr(module, attribute, value)
    return module


def _hooked(xl):
    xl.embed_lin.register_forward_hook(lambda module, args, out: out * 0)
    return xl


@pytest.mark.parametrize(
    "xl, match",
    [
        (_with(XL(32, 4), "embed_lin", _ShiftedLinear(32, 32)), r"XL.embed_lin must be an nn.Linear\(32, 32\)"),
        (_with(XL(32, 4), "embed_lin", torch.nn.Linear(32, 16)), r"XL.embed_lin must be an nn.Linear\(32, 32\)"),
        (_hooked(XL(32, 4)), "XL.embed_lin has forward hooks, which would not run"),
    ],
)
def test_xl_refuses_an_embed_lin_it_cannot_fold(xl, match):
    with pytest.raises(TypeError, match=match):
        attn(q, k, v, xl)


def test_numpy_bools_count_as_bools():
    np = pytest.importorskip("numpy")
    assert torch.equal(attn(sq, sq, sq, causal=np.bool_(True)), attn(sq, sq, sq, causal=True))


def test_numpy_numbers_count_as_numbers():
    """Sizes and scales read from numpy configs give the same modules as Python numbers."""
    np = pytest.importorskip("numpy")
    pos = torch.rand(2, 10) * 50
    torch.manual_seed(0)
    numpy_made = DPB(np.int64(4), np.int32(4), divide=np.float32(8.0))
    torch.manual_seed(0)
    python_made = DPB(4, 4, divide=8.0)
    assert type(numpy_made.divide) is float and numpy_made.divide == 8.0
    expected = attn(sq, sq, sq, python_made, pos=pos, scale=0.25)
    assert torch.equal(attn(sq, sq, sq, numpy_made, pos=pos, scale=np.float32(0.25)), expected)
    assert torch.equal(flexpos.masks.causal_mask(np.int64(10)).to_dense(), flexpos.masks.causal_mask(10).to_dense())
    with pytest.raises(TypeError, match="n_heads must be an int, got Tensor"):
        ALiBi(torch.tensor(4))
