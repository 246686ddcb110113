"""ALiBi, DPB and XL inside flexpos.attention vs float64 dense references (chunked backend)."""

import math
import warnings
from collections import Counter

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import flexpos
import reference as R
from support import TOLERANCE
from flexpos import ALiBi, DPB, XL, Rotary
from flexpos.base import QK, Positional, index_grids
from flexpos.dpb import DistanceGrid

B, H, L, D = 2, 4, 150, 8
F64 = torch.float64


def qkv(lq=L, lk=L, dtype=F64, batch=(B,), heads=H, dim=D):
    q = torch.randn(*batch, heads, lq, dim, dtype=dtype)
    k = torch.randn(*batch, heads, lk, dim, dtype=dtype)
    v = torch.randn(*batch, heads, lk, dim, dtype=dtype)
    return q, k, v


def irregular(n, length, start=0, integer=True):
    if integer:
        return start + torch.randint(0, 40 * length, (n, length)).sort(-1).values
    return start + torch.rand(n, length, dtype=F64).cumsum(-1) * 13.7


def assert_close(out, ref, dtype=F64):
    err = (out.double() - ref).abs().max().item()
    assert err <= TOLERANCE[dtype], f"max |difference| {err} > {TOLERANCE[dtype]}"


@pytest.fixture(params=["every table (CPU)", "fewer tables (accelerators)"])
def tables(request, monkeypatch):
    """Position tables as built on CPU, and as on accelerators (one part per side for integers
    less than 2**24 apart, none for default positions)."""
    monkeypatch.setattr(flexpos.positions, "fewer_tables", lambda device: request.param.startswith("fewer"))


@pytest.mark.parametrize("n_heads", [4, 6])
@pytest.mark.parametrize("use_n_heads", [None, 3])
@pytest.mark.parametrize("asymmetric", [False, True])
@pytest.mark.parametrize("divide", [1.0, 7.5])
def test_alibi_matches_dense_reference(n_heads, use_n_heads, asymmetric, divide, tables):
    q, k, v = qkv(heads=n_heads)
    pos = irregular(B, L - 2, start=1_200_000_000)
    pq, hq = R.padded_positions(pos, B, L)
    alibi = ALiBi(n_heads, use_n_heads=use_n_heads, asymmetric=asymmetric, divide=divide)
    out = flexpos.attention(q, k, v, alibi, pos=pos)
    bias = R.alibi_bias(n_heads, pq, pq, hq, hq, use_n_heads, asymmetric, divide)
    assert_close(out, R.attend(q, k, v, bias))


@pytest.mark.parametrize("len_q", [L, 90])
@pytest.mark.parametrize("asymmetric", [False, True])
def test_default_positions_are_token_indices(len_q, asymmetric, tables):
    """No positions given: ``0 .. L-1`` on each side, cross-attention included."""
    q, k, v = qkv(len_q, L)
    alibi, dpb = ALiBi(H, asymmetric=asymmetric, divide=3.0), DPB(16, H, depth=2, divide=20.0).double()
    out = flexpos.attention(q, k, v, alibi, dpb)
    (pq, hq), (pk, hk) = R.padded_positions(None, B, len_q), R.padded_positions(None, B, L)
    bias = R.alibi_bias(H, pq, pk, hq, hk, asymmetric=asymmetric, divide=3.0) + R.dpb_bias(dpb, pq, pk, hq, hk, 20.0)
    assert_close(out, R.attend(q, k, v, bias))


def test_alibi_slopes_follow_the_paper():
    for n in (1, 2, 3, 5, 8, 12, 16, 24):
        slopes = ALiBi(n).slopes.flatten().double()
        assert torch.allclose(slopes, torch.tensor(R.reference_slopes(n), dtype=F64), rtol=1e-6)


@pytest.fixture(params=["span on host, shrunk grid", "span on host, full grid", "span on device", "every pair"])
def dpb_grid(request, monkeypatch):
    """DPB's grid as eager calls size it on CPU (to the span) and on accelerators (table_size
    nodes), as a caller's torch.compile does (chosen on the device, nothing read back), and
    the MLP at every pair, as eager CPU calls with fewer pairs than grid nodes run it."""
    cpu = request.param.endswith("shrunk grid") or request.param == "every pair"
    pairs = request.param == "every pair"
    monkeypatch.setattr(flexpos.dpb, "shrinks_grid", lambda device: cpu)
    monkeypatch.setattr(flexpos.dpb, "evaluates_pairs", lambda device, n_pairs, nodes: pairs)
    monkeypatch.setattr(flexpos.positions, "fewer_tables", lambda device: not cpu)
    if request.param == "span on device":
        for module in (flexpos._checks, flexpos.dpb):  # where positions are read, and DPB
            monkeypatch.setattr(module, "host_reads", lambda: False)
    return request.param


@pytest.mark.parametrize("depth, norm", [(1, False), (2, True), (3, False)])
@pytest.mark.parametrize("divide", [1.0, 4.0])
def test_dpb_integer_positions_are_exact(depth, norm, divide, dpb_grid):
    q, k, v = qkv()
    pos = irregular(B, L, start=3_000_000_000)
    pq, hq = R.padded_positions(pos, B, L)
    dpb = DPB(16, H, depth=depth, norm=norm, divide=divide).double()
    out = flexpos.attention(q, k, v, dpb, pos=pos)
    assert_close(out, R.attend(q, k, v, R.dpb_bias(dpb, pq, pq, hq, hq, divide)))


def test_dpb_of_a_float32_module_computes_in_float64_for_float64_inputs(dpb_grid):
    q, k, v = qkv()
    pos = irregular(B, L, start=10_000)
    pq, hq = R.padded_positions(pos, B, L)
    dpb = DPB(16, H, depth=2, norm=True, divide=30.0)
    out = flexpos.attention(q, k, v, dpb, pos=pos)
    assert_close(out, R.attend(q, k, v, R.dpb_bias(dpb, pq, pq, hq, hq, 30.0)))


def test_dpb_integer_positions_with_leading_tokens_without_positions(dpb_grid):
    q, k, v = qkv()
    pos = irregular(B, L - 2, start=7)
    pq, hq = R.padded_positions(pos, B, L)
    dpb = DPB(16, H, depth=2, divide=3.0).double()
    out = flexpos.attention(q, k, v, dpb, pos=pos)
    assert_close(out, R.attend(q, k, v, R.dpb_bias(dpb, pq, pq, hq, hq, 3.0)))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the vectorised jacobian uses torch.jit
@pytest.mark.parametrize("sides", ["pos", "pos_q and pos_k"])
def test_dpb_position_gradients_are_the_interpolation_slopes(sides, dpb_grid):
    """Gradients w.r.t. float positions are the slopes of the interpolation: within
    step/2 * max|g''| of g'(Delta), g(Delta) = MLP(Delta / divide), for every pair, those at
    distance +-span included (exactly g'(Delta) where the MLP runs at every pair). Separate
    query and key tensors with equal values tie the span's two candidates, which must not leak
    into the gradient."""
    dpb, n, divide = DPB(16, H, depth=3, divide=5.0, table_size=257).double(), 40, 5.0
    pos = irregular(1, n, integer=False)
    grids = index_grids(1, H, n, n)

    def bias(pos_q, pos_k):
        sides_kw = {"pos": pos_q} if sides == "pos" else {"pos_q": pos_q, "pos_k": pos_k}
        positions = flexpos.Positions.resolve((1,), n, n, "cpu", **sides_kw)
        positions.chunked = True  # as flexpos.attention marks it on the chunked backend
        return -dpb.score_mod(positions, F64)(torch.zeros((), dtype=F64), *grids)[0]

    # (H, n, n, n): d bias[h, i, j] / d p_q[m] and / d p_k[m], one forward-mode pass per position
    jac_q, jac_k = torch.autograd.functional.jacobian(
        bias, (pos, pos.clone()), vectorize=True, strategy="forward-mode"
    )
    rows, cols = torch.arange(n)[:, None], torch.arange(n)[None]
    got_q = jac_q[..., 0, :][:, rows, cols, rows]  # (H, n, n): d bias[h, i, j] / d p_q[i]
    delta = (pos[0, :, None] - pos[0, None, :]).requires_grad_()
    mlp = R.mlp64(dpb.mlp, (delta / divide)[..., None])
    want = torch.stack([torch.autograd.grad(mlp[..., h].sum(), delta, retain_graph=True)[0] for h in range(H)])
    span = (pos.max() - pos.min()).item()
    fine = torch.linspace(-span, span, 20001, dtype=F64) / divide
    values = R.mlp64(dpb.mlp, fine[:, None])
    second = ((values[2:] - 2 * values[1:-1] + values[:-2]) / (fine[1] - fine[0]) ** 2).abs().max().item()
    bound = (2 * span / 256) / 2 * second / divide**2
    if sides == "pos":  # a shared position is on both sides of its diagonal pair
        off_diagonal = rows != cols
        error = (got_q - want).abs()[:, off_diagonal].max().item()
    else:
        got_k = jac_k[..., 0, :][:, rows, cols, cols]  # d bias[h, i, j] / d p_k[j]
        error = max((got_q - want).abs().max().item(), (got_k + want).abs().max().item())
    if dpb_grid == "every pair":
        assert error <= 1e-12
    else:
        assert 0 < error <= bound * 1.01


@pytest.mark.parametrize("pairs", [False, True], ids=["grid", "every pair"])
def test_dpb_float32_position_gradients_keep_float32_accuracy(pairs, monkeypatch):
    """A float32 model's table slopes divide value differences by a step of ~1e-4 (default
    table, span 8): computed from float32 MLP values they were off by ~1% of the largest
    position gradient; the float32 attention around them leaves ~2e-5. Reference: float64
    autograd through the exact MLP."""
    monkeypatch.setattr(flexpos.dpb, "evaluates_pairs", lambda device, n_pairs, nodes: pairs)
    q, k, v = qkv(48, 48, dtype=torch.float32, batch=(1,), heads=2, dim=16)
    pos = (torch.rand(1, 48, dtype=F64).sort(-1).values * 8.0).float().requires_grad_()
    dpb = DPB(32, 2, depth=3)
    grad_out = torch.randn(1, 2, 48, 16, dtype=F64)
    (got,) = torch.autograd.grad((flexpos.attention(q, k, v, dpb, pos=pos).double() * grad_out).sum(), pos)
    pos64 = pos.detach().double().requires_grad_()
    p, has = R.padded_positions(pos64, 1, 48)
    ref = R.attend(*(t.double() for t in (q, k, v)), R.dpb_bias(dpb, p, p, has, has, 1.0))
    (want,) = torch.autograd.grad((ref * grad_out).sum(), pos64)
    assert (got.double() - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("tabulated", [False, True], ids=["rate and shift", "table"])
@pytest.mark.parametrize("dpb_grid", ["span on host, shrunk grid", "span on host, full grid", "span on device"], indirect=True)
def test_dpb_float32_interpolation_rounds_at_the_scale_of_the_distance(tabulated, dpb_grid):
    """On the interpolating grid in float32, a distance's cell and offset are taken from the
    middle node (at or next to 0), so their rounding scales with the distance, not the span: from the
    grid's first node (-span), neighbours 3 to 17 units apart at a span of ~1e6 read biases
    ~0.01 off. The MLP is affine, so interpolation adds no error: what is left is rounding.
    The same bounds hold for the affine MLP's rate and shift (the table is read where flex
    trains it: its parameters need gradients, not on the chunked backend)."""
    dpb = DPB(16, H, depth=1)
    pos = 1_200_000_000 + torch.tensor([[0, 3, 10, 17, 999_990]])  # integer span > 32768: interpolated
    positions = flexpos.Positions.resolve((1,), 5, 5, "cpu", pos=pos)
    positions.chunked = not tabulated
    bias = -dpb.score_mod(positions, torch.float32)(torch.zeros(()), *index_grids(1, H, 5, 5))
    p, has = R.padded_positions(pos, 1, 5)
    exact = -R.dpb_bias(dpb, p, p, has, has, 1.0)
    near = (p[:, :, None] - p[:, None, :]).abs().le(17)[:, None].expand_as(exact)
    slope = (dpb.mlp[1].weight.double() @ dpb.mlp[0][0].weight.double()).abs().max().item()
    assert (bias.double() - exact)[near].abs().max() <= 1e-6 * (1 + 17 * slope)
    far = (bias.double() - exact)[~near].abs().max() / exact[~near].abs().max()
    assert far <= 1e-6  # float32's relative precision at the far distances


def test_affine_dpb_reads_a_rate_and_a_shift_per_head(dpb_mlp_rows):
    """bio-attention's default DPB (depth 1, no norm) is affine: on the chunked backend its MLP
    runs on two inputs per call whatever the span. On the flex backend its score_mod gathers
    nothing (flex's default tiles on CUDA), except where flex trains it (its table then
    spreads flex's atomic gradient adds) and on CPU (Inductor's kernel mis-indexed it)."""
    seen = dpb_mlp_rows
    affine, deep, normed = DPB(8, H), DPB(8, H, depth=2), DPB(8, H, norm=True)
    assert affine.affine and not deep.affine and not normed.affine
    pos = irregular(1, 30, integer=False) * 1e5
    for chunked, trains, nodes in [(True, True, 2), (True, False, 2), (False, False, affine.table_size)]:
        positions = flexpos.Positions.resolve((1,), 30, 30, "cpu", pos=pos)
        positions.chunked = chunked
        seen.clear()
        with torch.set_grad_enabled(trains):
            affine.score_mod(positions)
        assert seen == [nodes]
    accelerated = DPB(8, H).to("meta")  # parameters off the CPU, as on a GPU
    cuda = torch.device("cuda")
    for trains in (False, True):
        with torch.set_grad_enabled(trains):
            assert accelerated.gathers_per_score == trains
            assert (flexpos.flex.flex_kernel_options(cuda, [accelerated]) is None) != trains
            assert affine.gathers_per_score and deep.gathers_per_score and normed.gathers_per_score
    accelerated.requires_grad_(False)
    assert not accelerated.gathers_per_score


def test_affine_dpb_gradients_match_autograd_through_its_mlp():
    """Rate and shift: gradients into q, k, v, float positions on both sides, the MLP's
    parameters and a learned divisor, against float64 autograd through the MLP at every pair;
    leading tokens without a position on both sides."""
    dpb = DPB(8, H, divide=30.0, learned_div=True).double()
    q, k, v = (t.requires_grad_() for t in qkv(20, 24))
    pos_q = irregular(B, 19, integer=False).requires_grad_()
    pos_k = irregular(B, 22, integer=False).requires_grad_()
    leaves = (q, k, v, pos_q, pos_k, *dpb.parameters())
    grad_out = torch.randn_like(q)
    out = flexpos.attention(q, k, v, dpb, pos_q=pos_q, pos_k=pos_k)
    got = torch.autograd.grad((out * grad_out).sum(), leaves)
    (pq, hq), (pk, hk) = R.padded_positions(pos_q, B, 20), R.padded_positions(pos_k, B, 24)
    bias = R.dpb_bias_through(dpb, pq, pk, hq, hk, dpb.divisor(F64))
    want = torch.autograd.grad((R.attend(q, k, v, bias) * grad_out).sum(), leaves)
    for name, a, b in zip(["q", "k", "v", "pos_q", "pos_k", *dict(dpb.named_parameters())], got, want):
        err = (a - b).abs().max().item()
        assert err <= TOLERANCE[F64] * max(1.0, b.abs().max().item()), (name, err)


def test_affine_dpb_float32_weight_gradients_sum_in_float64(compiled):
    """A float32 model's rate gradient sums gradient * distance over every score, terms that
    cancel over each query's keys: summed in float32 by the compiled bias kernel (as users run
    it), the MLP's weight gradients were 1.1e-4 of the largest off float64 autograd through the
    MLP at every pair here, in float64 2.5e-5
    (attention's own float32 rounding; other seeds: 1e-6 to 5e-5 against 1e-5 to 1.2e-4)."""
    torch.manual_seed(0)
    dpb = DPB(16, H)
    q, k, v = (torch.randn(4, H, 200, 6) for _ in range(3))
    pos = (torch.rand(4, 200) * 4).cumsum(-1)
    grad_out = torch.randn_like(q)
    got = torch.autograd.grad((flexpos.attention(q, k, v, dpb, pos=pos) * grad_out).sum(), list(dpb.parameters()))
    dpb64 = DPB(16, H).double()
    dpb64.load_state_dict(dpb.state_dict())
    p, has = R.padded_positions(pos, 4, 200)
    ref = R.attend(q, k, v, R.dpb_bias_through(dpb64, p, p, has, has, 1.0))
    want = torch.autograd.grad((ref * grad_out.double()).sum(), list(dpb64.parameters()))
    for (name, _), a, b in zip(dpb.named_parameters(), got, want):
        if name.endswith("weight"):
            assert (a.double() - b).abs().max() <= 5e-5 * b.abs().max(), name


@pytest.mark.parametrize("scheme", ["alibi", "dpb"])
def test_autocast_leaves_the_bias_in_float32(scheme):
    """Under bf16 autocast q, k, v are cast to bf16 but the bias stays float32 (DPB's table MLP
    included) and is added to float32 scores: autocast would round a bias of size 1e3 by whole
    units, moving softmax weights by factors up to e^4."""
    q, k, v = qkv(dtype=torch.float32)
    pos = irregular(B, L)  # distances up to ~6000: DPB's table stays exact
    module = ALiBi(H) if scheme == "alibi" else DPB(16, H, depth=2, divide=10.0)
    pq, hq = R.padded_positions(pos, B, L)
    if scheme == "alibi":
        bias = R.alibi_bias(H, pq, pq, hq, hq)
    else:
        bias = R.dpb_bias(module.double(), pq, pq, hq, hq, 10.0)
        module.float()
    ref = R.attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = flexpos.attention(q, k, v, module, pos=pos)
    assert out.dtype == torch.bfloat16
    assert_close(out, ref, torch.bfloat16)


@pytest.mark.parametrize("compile_on", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("scheme", ["dpb", "learned_continuous"])
def test_backward_inside_autocast_warns_of_low_precision_mlp_gradients(scheme, compile_on):
    """Autocast reaches the position MLPs' backward matmuls where backward() runs inside its
    block (DPB's parameter gradients were 35-44% off), which flexpos cannot switch off: it
    warns there, and only there, also with flexpos' compiling on (LearnedContinuous' MLP is
    compiled: the hook is set outside compiled code)."""
    previous = flexpos.set_compile(compile_on)
    try:
        _check_autocast_warning(scheme)
    finally:
        flexpos.set_compile(previous)


def _check_autocast_warning(scheme: str) -> None:
    q, k, v = qkv(dtype=torch.float32)
    pos = irregular(B, L, integer=False)
    if scheme == "dpb":
        dpb = DPB(8, H)
        run = lambda: flexpos.attention(q, k, v, dpb, pos=pos)  # noqa: E731
    else:
        encode, x = flexpos.LearnedContinuous(D), torch.randn(B, L, D)
        run = lambda: encode(x, pos)  # noqa: E731
    for inside in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = run()
                if inside:
                    out.sum().backward()
            if not inside:
                out.sum().backward()
        flagged = [w for w in caught if str(w.message).startswith("backward() runs inside a torch.autocast block")]
        assert len(flagged) == int(inside)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dpb_in_a_half_precision_model(dtype):
    """A ``.half()`` DPB builds its table in float32 from its rounded weights: in float16 the
    MLP's first layer at distances / divide ~ 1e5 would overflow (65504) to NaN."""
    q, k, v = (t.to(dtype) for t in qkv())
    pos = irregular(B, L)  # distances up to ~6000: an exact table
    dpb = DPB(16, H, depth=2, norm=True, divide=0.05).to(dtype)
    pq, hq = R.padded_positions(pos, B, L)
    ref = R.attend(q.double(), k.double(), v.double(), R.dpb_bias(dpb, pq, pq, hq, hq, 0.05))
    assert_close(flexpos.attention(q, k, v, dpb, pos=pos), ref, dtype)


def test_unsigned_positions_equal_int64_ones(tables):
    q, k, v = qkv()
    pos = irregular(B, L)
    dpb = DPB(16, H, depth=2).double()
    for module in (ALiBi(H), dpb):
        want = flexpos.attention(q, k, v, module, pos=pos)
        assert torch.equal(flexpos.attention(q, k, v, module, pos=pos.to(torch.uint16)), want)


def test_dpb_padding_positions_decide_its_table(dpb_grid):
    """docs/design.md: padded tokens count in DPB's table span. Padding that repeats the last real
    position keeps the biases between real tokens exact; padding with 0 at positions near 3e9
    stretches the table over 3e9 and they become a coarse interpolation (but stay exact where
    the MLP runs at every pair)."""
    q, k, v = qkv()
    pos = irregular(B, L, start=3_000_000_000)
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[:, -10:] = False
    repeated, zeros = pos.clone(), pos.clone()
    repeated[:, -10:] = pos[:, -11:-10]
    zeros[:, -10:] = 0
    dpb = DPB(16, H, depth=2, divide=1000.0).double()
    pq, hq = R.padded_positions(pos, B, L)
    ref = R.attend(q, k, v, R.dpb_bias(dpb, pq, pq, hq, hq, 1000.0), valid[:, None, None, :])
    real = slice(0, L - 10)  # rows of padded queries differ with their positions, as they should
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_close(flexpos.attention(q, k, v, dpb, pos=repeated, mask=valid)[..., real, :], ref[..., real, :])
        assert not _coarse_grid_warnings(caught)
        coarse = flexpos.attention(q, k, v, dpb, pos=zeros, mask=valid)[..., real, :]
        flexpos.attention(q, k, v, dpb, pos=zeros, mask=valid)  # warned once per module
    if dpb_grid == "every pair":
        assert_close(coarse, ref[..., real, :])
    else:
        assert (coarse - ref[..., real, :]).abs().max() > 100 * TOLERANCE[F64]
    # Where the grid's coarseness is read on the host, the call says so and names the remedy.
    warned = _coarse_grid_warnings(caught)
    assert len(warned) == (1 if dpb_grid.startswith("span on host") else 0), warned
    assert all("placeholder positions" in w and "table_size (now 65537)" in w for w in warned)


def test_dpb_reads_no_warning_state_where_nothing_is_read_back(monkeypatch):
    """Inside a caller's torch.compile (no host reads) the once-per-module flag is not read:
    Dynamo would guard on it, and the first warning of an eager call would recompile the graph."""

    class Watched(DPB):
        @property
        def _warned_coarse(self):
            raise AssertionError("read")

        @_warned_coarse.setter
        def _warned_coarse(self, value):
            pass

    dpb = Watched(16, H, depth=2)
    grid = DistanceGrid.covering(torch.tensor(1e9, dtype=F64), True, dpb.table_size)
    slopes = dpb.tables(grid, torch.float32)[1]
    monkeypatch.setattr(flexpos.dpb, "host_reads", lambda: False)
    dpb._warn_if_coarse(slopes, grid)
    monkeypatch.setattr(flexpos.dpb, "host_reads", lambda: True)
    with pytest.raises(AssertionError, match="read"):
        dpb._warn_if_coarse(slopes, grid)


def _coarse_grid_warnings(caught):
    return [str(w.message) for w in caught if str(w.message).startswith("DPB interpolates its MLP")]


def test_dpb_runs_its_mlp_at_every_pair_where_pairs_are_fewer_than_grid_nodes(dpb_mlp_rows, monkeypatch):
    """Eager CPU calls with fewer (sequence, query, key) pairs than grid nodes run the MLP once
    per pair (a bias per pair, exact); with more pairs, once per grid node. Off CPU, and inside
    a caller's torch.compile, the grid."""
    seen = dpb_mlp_rows
    dpb = DPB(8, H, depth=2).double()
    q, k, v = qkv(40, 30, batch=(2,))
    pos_q, pos_k = irregular(2, 40, integer=False), irregular(2, 28, integer=False)
    out = flexpos.attention(q, k, v, dpb, pos_q=pos_q, pos_k=pos_k)
    assert seen == [2 * 40 * 30]
    pq, hq = R.padded_positions(pos_q, 2, 40)
    pk, hk = R.padded_positions(pos_k, 2, 30)
    assert_close(out, R.attend(q, k, v, R.dpb_bias(dpb, pq, pk, hq, hk, 1.0)))
    seen.clear()
    q, k, v = qkv(300, 300, batch=(1,))  # 90,000 pairs, 65,537 nodes
    flexpos.attention(q, k, v, dpb, pos=irregular(1, 300, integer=False))
    assert seen == [dpb.table_size]
    assert not flexpos.dpb.evaluates_pairs(torch.device("cuda"), 10, 65537)
    monkeypatch.setattr(flexpos.dpb, "tracing", lambda: True)
    assert not flexpos.dpb.evaluates_pairs(torch.device("cpu"), 10, 65537)


def test_dpb_near_the_int64_limit_gives_the_biases_of_its_distances(dpb_grid):
    """int64 positions near 2**61 (float64 rounds them to multiples of 512) spread over 1e6: the
    grid's span is their exact spread (a rounded one left distances past the grid's end: an
    IndexError), so the outputs are those of the same distances near 0."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 60, 4, dtype=F64) for _ in range(3))
    dpb = DPB(8, 2, depth=2, divide=3.0).double()
    pos = torch.randint(0, 10**6, (2, 60))
    with torch.no_grad():
        near_zero = flexpos.attention(q, k, v, dpb, pos=pos)
        far = flexpos.attention(q, k, v, dpb, pos=pos + (2**61 - 12345))
    assert (far - near_zero).abs().max() <= TOLERANCE[F64]


def test_dpb_grid_covers_the_span_in_every_mode():
    span = torch.tensor(40.0, dtype=F64)
    modes = [{"known_span": 40, "shrink": True}, {"known_span": 40}, {}]  # CPU, accelerators, compiled
    for mode in modes:
        exact = DistanceGrid.covering(span, True, 101, **mode).nodes()
        assert exact.diff().eq(1).all() and exact[0] <= -40 and exact[-1] >= 40
        spread = DistanceGrid.covering(span, True, 51, **mode).nodes()  # 81 distances > 51 nodes
        assert len(spread) == 51 and torch.allclose(spread[[0, -1]], torch.tensor([-40.0, 40.0], dtype=F64))
    assert [len(DistanceGrid.covering(span, True, 101, **mode).nodes()) for mode in modes] == [81, 101, 101]
    # marked exact (the value alone is read) only where the host knows the integer span fits
    assert [DistanceGrid.covering(span, True, 101, **mode).exact for mode in modes] == [True, True, False]
    assert not DistanceGrid.covering(span, True, 51, known_span=40).exact
    assert not DistanceGrid.covering(span, False, 101).exact
    # the middle node, from which the score_mod counts cells: 0, or half a step below for even sizes
    for size in (101, 51, 50):
        for mode in modes:
            grid = DistanceGrid.covering(span, True, size, **mode)
            index, distance = grid.middle()
            assert torch.allclose(grid.nodes()[index], distance, atol=1e-12)
            assert distance == 0 or (size % 2 == 0 and torch.allclose(distance, -grid.step / 2))


def test_dpb_continuous_positions_within_stated_bound(dpb_grid):
    """Linear interpolation error <= (step/div)^2 / 8 * max|MLP''| (estimated on a fine grid)."""
    dpb = DPB(16, H, depth=3, divide=5.0, table_size=257).double()
    pos = irregular(1, 120, integer=False)
    positions = flexpos.Positions.resolve((1,), 120, 120, "cpu", pos=pos)
    positions.chunked = True  # as flexpos.attention marks it on the chunked backend
    span = float(positions.span_tensor())
    step = 2 * span / 256
    fine = torch.linspace(-span, span, 20001, dtype=F64)
    values = R.mlp64(dpb.mlp, (fine / 5.0)[:, None])
    h = (fine[1] - fine[0]).item() / 5.0
    second = ((values[2:] - 2 * values[1:-1] + values[:-2]) / h**2).abs().max().item()
    bound = (step / 5.0) ** 2 / 8 * second
    mod = dpb.score_mod(positions, F64)
    bias = -mod(torch.zeros((), dtype=F64), *index_grids(1, H, 120, 120))
    pq, hq = R.padded_positions(pos, 1, 120)
    exact = -R.dpb_bias(dpb, pq, pq, hq, hq, 5.0)
    error = (bias - exact).abs().max().item()
    if dpb_grid == "every pair":
        assert error <= 1e-12
    else:
        assert 0 < error <= bound * 1.01 + 1e-12
    # The estimate behind DPB's coarse-grid warning, from the table's second differences: the
    # bound read off the grid itself (the second difference averages |MLP''| over two cells,
    # so it may fall a little short of the largest error).
    grid = DistanceGrid.covering(positions.span_tensor(), False, dpb.table_size)
    estimate = flexpos.dpb.interpolation_error(dpb.tables(grid, F64)[1], grid.step).item()
    assert error / 1.2 <= estimate <= bound * 1.01


def test_dpb_on_a_fine_enough_grid_does_not_warn(monkeypatch):
    """Float positions a few thousand units apart, an MLP of distance / 100: the grid's
    interpolation error is estimated, far below COARSE_GRID_ERROR, and nothing is said."""
    monkeypatch.setattr(flexpos.dpb, "evaluates_pairs", lambda device, n_pairs, nodes: False)  # the grid
    estimates = []
    estimate = flexpos.dpb.interpolation_error
    monkeypatch.setattr(flexpos.dpb, "interpolation_error", lambda *args: estimates.append(estimate(*args)) or estimates[-1])
    q, k, v = qkv()
    dpb = DPB(16, H, depth=2, divide=100.0).double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flexpos.attention(q, k, v, dpb, pos=irregular(B, L, integer=False) * 30)
    assert len(estimates) == 1 and 0 < estimates[0] < flexpos.dpb.COARSE_GRID_ERROR / 100
    assert not _coarse_grid_warnings(caught)


@pytest.mark.parametrize("divide", [1.0, 3.0])
def test_xl_follows_dai_et_al(divide):
    q, k, v = qkv()
    pos = irregular(B, L - 3, start=10_000)
    pq, hq = R.padded_positions(pos, B, L)
    xl = XL(H * D, H, divide=divide).double()
    out = flexpos.attention(q, k, v, xl, pos=pos)
    u = xl.bias_r_w.double()[None, :, None]
    w = xl.bias_r_r.double()[None, :, None]
    bias = R.xl_bias(xl, q + w, pq, pq, hq, hq, divide)
    assert_close(out, R.attend(q + u, k, v, bias))


def test_xl_factorised_bias_equals_dense_form():
    xl = XL(H * D, H, divide=2.0).double()
    pos = irregular(B, L, integer=False)
    qv = torch.randn(B, H, L, D, dtype=F64)
    positions = flexpos.Positions.resolve((B,), L, L, "cpu", pos=pos)
    pq, hq = R.padded_positions(pos, B, L)
    dense = R.xl_bias(xl, qv, pq, pq, hq, hq, 2.0)
    assert torch.allclose(xl.relative_bias(qv, positions), dense, atol=1e-10, rtol=0)


@pytest.mark.parametrize("change", ["no bias", "weight norm"])
def test_xl_reads_a_changed_embed_lin(change):
    """XL folds embed_lin into its features without calling it: a layer without bias or with
    a parametrized weight still gives the dense form's numbers."""
    xl = XL(H * D, H).double()
    if change == "no bias":
        xl.embed_lin = torch.nn.Linear(H * D, H * D, bias=False, dtype=F64)
    else:
        torch.nn.utils.parametrizations.weight_norm(xl.embed_lin)
        with torch.no_grad():
            xl.embed_lin.parametrizations.weight.original0.mul_(3.0)  # the norm, away from its initial value
    pos = irregular(B, L)
    qv = torch.randn(B, H, L, D, dtype=F64)
    positions = flexpos.Positions.resolve((B,), L, L, "cpu", pos=pos)
    pq, hq = R.padded_positions(pos, B, L)
    dense = R.xl_bias(xl, qv, pq, pq, hq, hq, 1.0)
    assert torch.allclose(xl.relative_bias(qv, positions), dense, atol=1e-10, rtol=0)


def test_cross_attention_with_separate_positions():
    lq, lk = 90, 170
    q, k, v = qkv(lq, lk)
    pos_q = irregular(B, lq - 1, integer=False)
    pos_k = irregular(B, lk - 4, integer=False)
    pq, hq = R.padded_positions(pos_q, B, lq)
    pk, hk = R.padded_positions(pos_k, B, lk)
    alibi, dpb = ALiBi(H, divide=3.0), DPB(8, H).double()
    out = flexpos.attention(q, k, v, alibi, dpb, pos_q=pos_q, pos_k=pos_k)
    bias = R.alibi_bias(H, pq, pk, hq, hk, divide=3.0) + R.dpb_bias(dpb, pq, pk, hq, hk, 1.0)
    # DPB interpolates on float positions, exactly for its depth-1 (affine) MLP
    assert_close(out, R.attend(q, k, v, bias))


def test_extra_batch_dims_and_masks():
    q, k, v = qkv(batch=(2, 3))
    pos = irregular(6, L).view(2, 3, L)
    keep = torch.rand(2, 3, L) > 0.3
    out = flexpos.attention(q, k, v, ALiBi(H), pos=pos, mask=keep)
    flat = [t.reshape(6, H, L, D) for t in (q, k, v)]
    pq, hq = R.padded_positions(pos.reshape(6, L), 6, L)
    ref = R.attend(*flat, R.alibi_bias(H, pq, pq, hq, hq), keep.reshape(6, 1, 1, L))
    assert_close(out.reshape(6, H, L, D), ref)


@pytest.mark.parametrize(
    "shape",
    [(2, 3, 1, L, L), (1, 1, L), (1, 1, L, L), (1, 1, H, L, L), (1, 1, 1, L, L),
     (2, 3, 1, L), (2, 3, 1, 1, L), (2, 3, H, 1, L), (1, 1, 1, 1, L)],
    ids=["one-head", "one-sequence-keys", "one-sequence-pairs", "one-sequence-heads", "one-for-all",
         "one-query", "sdpa-key-padding", "one-query-per-head", "one-for-all-queries"],
)
def test_bool_masks_of_one_sequence_or_head_serve_all(shape):
    """A bool mask with 1 for all batch dims, for H or for Lq (as SDPA's (B, 1, 1, Lk)), against
    the reference with it expanded."""
    q, k, v = qkv(batch=(2, 3))
    pos = irregular(6, L).view(2, 3, L)
    keep = torch.rand(shape) > 0.3
    out = flexpos.attention(q, k, v, ALiBi(H), pos=pos, mask=keep)
    flat = [t.reshape(6, H, L, D) for t in (q, k, v)]
    pq, hq = R.padded_positions(pos.reshape(6, L), 6, L)
    full = {3: keep[:, :, None, None], 4: keep[:, :, None], 5: keep}[keep.ndim]  # (.., H|1, Lq|1, Lk)
    full = full.expand(2, 3, H, L, L).reshape(6, H, L, L)
    assert_close(out.reshape(6, H, L, D), R.attend(*flat, R.alibi_bias(H, pq, pq, hq, hq), full))


def score_mod_on_grids(module):
    """``module``'s score_mod at irregular positions, and broadcast (b, h, q_idx, kv_idx) grids."""
    pos = irregular(B, L - 1)
    positions = flexpos.Positions.resolve((B,), L, L, torch.device("cpu"), pos)
    return module.score_mod(positions), index_grids(B, H, L, L)


@pytest.mark.parametrize(
    "module",
    [ALiBi(H, divide=3.0), ALiBi(H, asymmetric=True), DPB(8, H, depth=2, divide=40.0)],
    ids=["alibi", "alibi-asymmetric", "dpb"],
)
def test_score_mods_add_a_bias_independent_of_the_score(module):
    """The chunked backend relies on ``score_mod(s) == s + score_mod(0)`` (Positional.score_mod)."""
    mod, (b, h, q_idx, kv_idx) = score_mod_on_grids(module)
    score = torch.randn(B, H, L, L) * 4
    bias = mod(torch.zeros(()), b, h, q_idx, kv_idx)
    assert bias.ne(0).any()
    assert torch.equal(mod(score, b, h, q_idx, kv_idx), score + bias)


@pytest.mark.parametrize(
    "module",
    [ALiBi(H, learned_div=True), ALiBi(H, asymmetric=True, learned_div=True), DPB(8, H, learned_div=True)],
    ids=["alibi", "alibi-asymmetric", "dpb"],
)
def test_score_mods_index_each_trainable_tensor_once(module):
    """FlexAttention's GPU backward accumulates gradients of captured tensors with one scatter per
    tensor: a score_mod may index each tensor that requires grad only once per score element."""
    mod, grids = score_mod_on_grids(module)
    graph = make_fx(mod)(torch.zeros(()), *grids)
    reads = Counter(
        node.args[0].target
        for node in graph.graph.nodes
        if node.target is torch.ops.aten.index.Tensor and node.args[0].op == "get_attr"
    )
    trainable = [name for name in reads if getattr(graph, name).requires_grad]
    assert trainable, "the score_mod reads no trainable tensor"
    assert all(reads[name] == 1 for name in trainable), reads


def test_dpb_reads_its_table_only_inside_the_grid(dpb_grid):
    """A key without a position lies outside the positioned span: queries at 0 and 100 over one
    positioned key at 50 (span 50); the eager score_mod would raise on an index past the table."""
    q, k, v = qkv(2, 2, batch=(1,))
    dpb = DPB(8, H, depth=2).double()
    pos_q, pos_k = torch.tensor([[0, 100]]), torch.tensor([[50]])
    out = flexpos.attention(q, k, v, dpb, pos_q=pos_q, pos_k=pos_k)
    pq, hq = R.padded_positions(pos_q, 1, 2)
    pk, hk = R.padded_positions(pos_k, 1, 2)
    assert_close(out, R.attend(q, k, v, R.dpb_bias(dpb, pq, pk, hq, hk, 1.0)))


def test_dpb_with_unchecked_nan_positions_gives_nan_not_a_read_past_its_table(monkeypatch):
    """In no_host_reads positions are not checked; a NaN distance has no cell in the grid (and
    makes the grid, chosen on the device for the whole batch, NaN too): every output is NaN."""
    monkeypatch.setattr(flexpos.dpb, "evaluates_pairs", lambda device, n_pairs, nodes: False)
    q, k, v = qkv(6, 6, batch=(2,))
    pos = torch.tensor([[0.0, 1, 2, float("nan"), 4, 5], [0, 1, 2, 3, 4, 5]])
    with torch.no_grad(), flexpos.no_host_reads():
        out = flexpos.attention(q, k, v, DPB(8, H, depth=2).double(), pos=pos)
    assert out.isnan().all()


def cross_reference(scheme, module, q, k, v, pos_q, pos_k):
    """float64 reference of one scheme in cross-attention; q, k, v flattened to (N, H, L, D)."""
    return R.scheme_attention(scheme, module, q, k, v, pos_q, pos_k, divide=2.0)


CROSS_SCHEMES = {
    "rotary": lambda: Rotary(D, divide=2.0),
    "xl": lambda: XL(H * D, H, divide=2.0),
    "alibi-asymmetric": lambda: ALiBi(H, asymmetric=True, divide=2.0),
}
"""The schemes that see the direction of p_q - p_k, by the names cross_reference takes."""


@pytest.mark.parametrize("scheme", CROSS_SCHEMES)
@pytest.mark.parametrize("lengths", [(70, 70), (60, 90)], ids=["Lq=Lk", "Lq<Lk"])
def test_cross_attention_uses_each_sides_positions(scheme, lengths):
    """Schemes that see the direction of p_q - p_k, with different query and key positions (also
    at equal lengths, where mixing the two sides up is easiest), CLS tokens on both sides and
    extra batch dims."""
    lq, lk = lengths
    q, k, v = qkv(lq, lk, batch=(2, 3))
    pos_q = irregular(6, lq - 1, integer=False).view(2, 3, lq - 1)
    pos_k = irregular(6, lk - 2, integer=False).view(2, 3, lk - 2) + 5.0
    module = CROSS_SCHEMES[scheme]().double()
    out = flexpos.attention(q, k, v, module, pos_q=pos_q, pos_k=pos_k)
    flat = [t.reshape(6, H, -1, D) for t in (q, k, v)]
    assert_close(out.reshape(6, H, lq, D), cross_reference(scheme, module, *flat, pos_q, pos_k))


@pytest.mark.parametrize("scheme", CROSS_SCHEMES)
@pytest.mark.parametrize("side", ["q", "k"])
def test_a_side_given_no_positions_gets_no_positional_effect(scheme, side):
    """Cross-attention where one side's tokens have no position: a (B, *, 0) tensor (one side
    left out is refused, tests/test_errors.py)."""
    q, k, v = qkv(50, 70, batch=(2, 3))
    given = {"q": irregular(6, 49, integer=False).view(2, 3, 49), "k": irregular(6, 70, integer=False).view(2, 3, 70)}
    given[side] = torch.zeros(2, 3, 0, dtype=F64)
    module = CROSS_SCHEMES[scheme]().double()
    out = flexpos.attention(q, k, v, module, pos_q=given["q"], pos_k=given["k"])
    flat = [t.reshape(6, H, -1, D) for t in (q, k, v)]
    assert_close(out.reshape(6, H, 50, D), cross_reference(scheme, module, *flat, given["q"], given["k"]))


@pytest.mark.parametrize("scheme", ["alibi", "xl"])
def test_custom_scale(scheme):
    """``scale`` multiplies q.k only: XL's relative term (appended features) stays unscaled."""
    q, k, v = qkv()
    pos = irregular(B, L - 1)
    pq, hq = R.padded_positions(pos, B, L)
    if scheme == "alibi":
        out = flexpos.attention(q, k, v, ALiBi(H), pos=pos, scale=0.37)
        ref = R.attend(q, k, v, R.alibi_bias(H, pq, pq, hq, hq), scale=0.37)
    else:
        xl = XL(H * D, H).double()
        out = flexpos.attention(q, k, v, xl, pos=pos, scale=0.37)
        u, w = (b.double()[None, :, None] for b in (xl.bias_r_w, xl.bias_r_r))
        ref = R.attend(q + u, k, v, R.xl_bias(xl, q + w, pq, pq, hq, hq, 1.0), scale=0.37)
    assert_close(out, ref)


@pytest.mark.parametrize("scheme", ["rotary", "xl"])
def test_learned_divisor_gradient_at_genomic_positions(scheme):
    """float32 gradient of a learned divisor at positions near 1.2e9 against a float64 reference.
    Angles formed from absolute positions gave gradients that cancel in float32 (measured over
    six draws: XL 1-140% off, Rotary 0.5-37%); the scores depend on p_q - p_k only, so flexpos
    counts angles from the per-sequence offset."""
    q, k, v = qkv(64, 64, dtype=torch.float32, heads=2, dim=16)
    pos = irregular(B, 64, start=1_200_000_000)
    grad_out = torch.randn(B, 2, 64, 16, dtype=F64)
    module = Rotary(16, divide=300.0, learned_div=True) if scheme == "rotary" else XL(32, 2, 300.0, True)
    (flexpos.attention(q, k, v, module, pos=pos).double() * grad_out).sum().backward()

    log_div = torch.tensor(math.log(300.0), dtype=F64, requires_grad=True)
    p, has = R.padded_positions(pos, B, 64)
    q, k, v = (t.double() for t in (q, k, v))
    if scheme == "rotary":
        ref = R.attend(*(R.rotate(t, p, has, module.thetas, log_div.exp()) for t in (q, k)), v)
    else:
        u, w = (b.detach().double()[None, :, None] for b in (module.bias_r_w, module.bias_r_r))
        ref = R.attend(q + u, k, v, R.xl_bias(module, q + w, p, p, has, has, log_div.exp()))
    (ref * grad_out).sum().backward()
    assert module.div.grad == pytest.approx(log_div.grad.item(), rel=1e-4)


@pytest.mark.parametrize("scheme, seed", [("rotary", 2), ("xl", 7)])
def test_learned_divisor_gradient_in_a_float16_model(scheme, seed):
    """Cross-attention in a float16 model, angles for queries and keys formed apart: the divisor's
    gradient is summed over both sides in float64 and rounded once. Each side's float16 partial
    gradient overflowed before the two cancelled (NaN; the true values are ~2.5e4-2.9e4).
    Reference: flexpos in float64 on the same rounded inputs and weights."""
    torch.manual_seed(seed)
    heads, dim, len_k = 4, 8, 127
    pos_q = 1_200_000_000 + torch.randint(0, 10**6, (2, 1)).sort(-1).values
    pos_k = 1_200_000_000 + (torch.rand(2, len_k if scheme == "rotary" else len_k - 3, dtype=F64) * 1e6).sort(-1).values
    module = Rotary(dim, learned_div=True) if scheme == "rotary" else XL(heads * dim, heads, learned_div=True)
    module.half()
    q = torch.randn(2, heads, 1, dim).half()
    k, v, grad_out = (torch.randn(2, heads, n, dim).half() for n in (len_k, len_k, 1))
    (got,) = torch.autograd.grad(flexpos.attention(q, k, v, module, pos_q=pos_q, pos_k=pos_k), module.div, grad_out)
    wide = module.double()
    out = flexpos.attention(q.double(), k.double(), v.double(), wide, pos_q=pos_q, pos_k=pos_k)
    (want,) = torch.autograd.grad(out, wide.div, grad_out.double())
    assert got.dtype == torch.float16 and got.double().item() == pytest.approx(want.item(), rel=1e-2)


@pytest.mark.parametrize("order", ["rotary_then_xl", "xl_then_rotary"])
def test_rotary_and_xl_in_either_order(order):
    """Transforms apply in the order given, and XL's relative term reads the queries it is
    handed: after Rotary the rotated ones, whose absolute angles matter (positions far from 0)."""
    q, k, v = qkv()
    pos = irregular(B, L, start=10_000)
    rot, xl = Rotary(D), XL(H * D, H).double()
    modules = (rot, xl) if order == "rotary_then_xl" else (xl, rot)
    out = flexpos.attention(q, k, v, *modules, pos=pos)

    p, has = R.padded_positions(pos, B, L)
    u, w = (b.detach().double()[None, :, None] for b in (xl.bias_r_w, xl.bias_r_r))
    turn = lambda t: R.rotate(t, p, has, rot.thetas, 1.0)  # noqa: E731
    if order == "rotary_then_xl":
        q_rot, k_rot = turn(q), turn(k)
        ref = R.attend(q_rot + u, k_rot, v, R.xl_bias(xl, q_rot + w, p, p, has, has, 1.0))
    else:
        ref = R.attend(turn(q + u), turn(k), v, R.xl_bias(xl, q + w, p, p, has, has, 1.0))
    assert_close(out, ref)


def test_a_custom_transform_written_without_dot_only():
    """``dot_only`` goes only to transforms that declare ``takes_dot_only`` (Rotary): a
    Positional subclass with the plain ``transform_qk(q, k, positions)`` keeps working."""

    class Double(Positional):
        transforms_qk = True

        def transform_qk(self, q, k, positions):
            return QK(2 * q, k)

    q, k, v = qkv()
    pos = irregular(B, L)
    p, has = R.padded_positions(pos, B, L)
    rot = Rotary(D)
    turn = lambda t: R.rotate(t, p, has, rot.thetas, 1.0)  # noqa: E731
    assert_close(flexpos.attention(q, k, v, Double(), pos=pos), R.attend(2 * q, k, v))
    assert_close(flexpos.attention(q, k, v, rot, Double(), pos=pos), R.attend(2 * turn(q), turn(k), v))
