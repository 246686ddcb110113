"""Compiled flex vs the chunked backend vs float64 references; gradients; no recompiles.

Compiled variants are few on purpose: each costs ~15 s on a 2-core CPU.
"""

import contextlib
import math
import os
import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters
from torch.func import functional_call

import flexpos
import reference as R
from support import TOLERANCE, needs_cpu_flex
from flexpos import ALiBi, DPB, XL
from flexpos import backends, chunked, flex
from flexpos._compile import RECOMPILE_LIMIT, LazyCompiled, compile_settings
from flexpos.backends import choose_backend
from flexpos.positions import BLOCK

H, D = 4, 16


def inputs(b, length, dtype=torch.float32):
    return [torch.randn(b, H, length, D, dtype=dtype) for _ in range(3)]


def positions(b, length):
    return 1_200_000_000 + torch.randint(0, 30 * length, (b, length)).sort(-1).values


@needs_cpu_flex
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_with_composed_mods_and_masks(dtype):
    """ALiBi + DPB with a CLS token: causal and a fractional sliding window on compiled flex; key
    padding (incl. a sequence with no valid key) on the path 'auto' picks for it. DPB comes first
    on flex: Inductor's CPU kernel (torch 2.13) mis-indexed ALiBi's key positions after DPB's
    gather at batch >= 2 and Lk > 128, so flexpos composes DPB last."""
    b, length = 3, 200
    q, k, v = inputs(b, length)
    pos = positions(b, length - 1)
    valid = torch.rand(b, length) > 0.25
    valid[2] = False
    alibi, dpb = ALiBi(H, divide=50.0), DPB(16, H, depth=2, divide=500.0)
    low = [t.to(dtype) for t in (q, k, v)]
    with torch.no_grad():
        window = flexpos.sliding_window_mask(length, 37.5)
        causal = flexpos.attention(*low, dpb, alibi, pos=pos, mask=window, causal=True, backend="flex")
        padded = flexpos.attention(*low, alibi, dpb, pos=pos, mask=valid, causal=True)
    p, has = R.padded_positions(pos, b, length)
    bias = R.alibi_bias(H, p, p, has, has, divide=50.0) + R.dpb_bias(dpb, p, p, has, has, 500.0)
    tril = torch.ones(length, length, dtype=torch.bool).tril()
    near = (torch.arange(length)[:, None] - torch.arange(length)).abs() <= 37
    assert (causal.double() - R.attend(q, k, v, bias, tril & near)).abs().max() <= TOLERANCE[dtype]
    ref = R.attend(q, k, v, bias, valid[:, None, None, :] & tril)
    assert (padded.double() - ref).abs().max() <= TOLERANCE[dtype]
    assert torch.equal(padded[2], torch.zeros_like(padded[2]))


@needs_cpu_flex
def test_cpu_flex_runs_dpb_on_its_grid_where_chunked_reads_pairs(dpb_mlp_rows):
    """Short sequences on CPU: the chunked backend runs DPB's MLP at every pair, but Inductor's
    CPU flex kernel (torch 2.13) cannot build a score_mod reading a per-pair table ('cur_qSplitSize0'
    was not declared): there DPB keeps its grid. Batch 1 and 2, a CLS token."""
    seen = dpb_mlp_rows
    dpb = DPB(16, H, depth=2, divide=50.0)
    for b in (1, 2):
        q, k, v = inputs(b, 100)
        pos = torch.rand(b, 99, dtype=torch.float64).cumsum(-1) * 30
        with torch.no_grad():
            out = flexpos.attention(q, k, v, dpb, pos=pos, backend="flex")
            chunked = flexpos.attention(q, k, v, dpb, pos=pos)
        assert seen == [dpb.table_size, b * 100 * 100]
        seen.clear()
        p, has = R.padded_positions(pos, b, 100)
        ref = R.attend(q, k, v, R.dpb_bias(dpb, p, p, has, has, 50.0))
        assert (out.double() - ref).abs().max() <= TOLERANCE[torch.float32]
        assert (chunked.double() - ref).abs().max() <= TOLERANCE[torch.float32]


@needs_cpu_flex
def test_flex_xl_appended_features():
    q, k, v = inputs(2, 150)
    pos = torch.rand(2, 150, dtype=torch.float64).cumsum(-1) * 20
    xl = XL(H * D, H, divide=4.0)
    with torch.no_grad():
        out = flexpos.attention(q, k, v, xl, pos=pos, backend="flex")
    p, has = R.padded_positions(pos, 2, 150)
    u, w = (t.double()[None, :, None] for t in (xl.bias_r_w, xl.bias_r_r))
    ref = R.attend(q.double() + u, k, v, R.xl_bias(xl, q.double() + w, p, p, has, has, 4.0))
    assert (out.double() - ref).abs().max() <= TOLERANCE[torch.float32] * 5  # dim + 1 extra terms


@pytest.mark.parametrize("backend", ["chunked", pytest.param("flex", marks=needs_cpu_flex)])
def test_changing_length_and_batch_does_not_recompile(backend, compiled):
    """New lengths, batch sizes and chunk offsets reuse the compiled kernels. Batch 1 compiles
    once more, by design (size-1 dims specialise), and is warmed up first where it runs."""
    alibi = ALiBi(H)
    warm, later = [(2, 200), (1, 150)], [(3, 333), (1, 700), (2, 517), (4, 1000)]
    if backend == "flex":  # batch 1 runs there as heads-as-batch, another score_mod
        warm, later = warm[:1], [s for s in later if s[0] > 1]
    shapes = warm + later
    breaks = sum(counters["graph_break"].values())
    with torch.no_grad():
        for i, (b, length) in enumerate(shapes):
            q, k, v = inputs(b, length)
            pos = positions(b, length)
            out = flexpos.attention(q, k, v, alibi, pos=pos, causal=True, backend=backend)
            if i == len(warm) - 1:
                graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs
    assert sum(counters["graph_break"].values()) == breaks
    p, has = R.padded_positions(pos, b, length)
    tril = torch.ones(length, length, dtype=torch.bool).tril()
    ref = R.attend(q, k, v, R.alibi_bias(H, p, p, has, has), tril)
    assert (out.double() - ref).abs().max() <= TOLERANCE[torch.float32]


def test_compile_settings_hold_inside_and_are_restored_after_an_error():
    from torch.fx.experimental import _config as fx_config

    def now():
        dynamo = torch._dynamo.config
        return dynamo.cache_size_limit, fx_config.use_duck_shape, dynamo.skip_nnmodule_hook_guards

    before = now()
    with pytest.raises(RuntimeError, match="inside"):
        with compile_settings():
            assert now() == (max(before[0], RECOMPILE_LIMIT), False, False)
            with compile_settings():  # nested: nothing to change, nothing to restore early
                pass
            assert now() == (max(before[0], RECOMPILE_LIMIT), False, False)
            raise RuntimeError("inside")
    assert now() == before


def test_own_compiled_calls_allow_more_variants_than_dynamos_default(monkeypatch):
    """Grad modes x score_mod and mask mixes x dtypes exceed Dynamo's 8 variants of one
    function; flexpos' own compiled calls allow RECOMPILE_LIMIT and leave the caller's setting."""
    limits = []

    def fake_compile(fn, **kwargs):
        return lambda *args: limits.append(torch._dynamo.config.cache_size_limit) or fn(*args)

    def fake_flex(q, k, v, score_mod, block_mask, kernel_options=None, enable_gqa=False):
        limits.append(torch._dynamo.config.cache_size_limit)
        return v

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(flex, "_flex", lambda device: fake_flex)
    before = torch._dynamo.config.cache_size_limit
    previous = flexpos.set_compile(True)
    try:
        assert LazyCompiled(lambda x: x + 1)(torch.ones(())) == 2
    finally:
        flexpos.set_compile(previous)
    q = torch.randn(2, 2, 8, 32)
    flex.run_flex(q, q, q, None, flexpos.full_mask(8, 8), 32**-0.5)
    assert limits == [RECOMPILE_LIMIT] * 2 and torch._dynamo.config.cache_size_limit == before < RECOMPILE_LIMIT
    with torch._dynamo.config.patch(cache_size_limit=1000):  # a higher setting of the user's stays
        flex.run_flex(q, q, q, None, flexpos.full_mask(8, 8), 32**-0.5)
    assert limits[-1] == 1000


def test_backend_choice_is_made_before_running(monkeypatch):
    monkeypatch.setattr(backends, "torch_version", lambda: (2, 13))
    q = torch.randn(1, 1, 4, 4)
    assert choose_backend("auto", q, needs_grad=False) == "chunked"
    assert choose_backend("auto", q.to("meta"), needs_grad=True) == "flex"
    wide = torch.empty(1, 1, 4, backends.MAX_FLEX_HEAD_DIM + 1, device="meta")  # XL's appended features
    assert choose_backend("auto", wide[..., :-1], needs_grad=True) == "flex"
    assert choose_backend("auto", wide, needs_grad=True) == "chunked"
    with torch.autograd.forward_ad.dual_level():  # flex carries no tangents
        assert choose_backend("auto", q.to("meta"), needs_grad=False) == "chunked"
    inside_vmap = []
    torch.func.vmap(lambda x: inside_vmap.append(choose_backend("auto", q.to("meta"), needs_grad=False)) or x)(q)
    assert inside_vmap == ["chunked"]
    assert choose_backend("flex", q, needs_grad=False) == "flex"
    with pytest.raises(ValueError, match="gradients"):
        choose_backend("flex", q, needs_grad=True)
    with pytest.raises(ValueError, match="float64"):
        choose_backend("flex", q.double(), needs_grad=False)
    with pytest.raises(ValueError, match="backend"):
        choose_backend("fast", q, needs_grad=False)


def test_cpu_flex_refuses_gradients_that_only_positions_need(monkeypatch):
    """Positions that require grad need the backward pass CPU flex lacks (it failed inside
    Inductor before)."""
    monkeypatch.setattr(backends, "torch_version", lambda: (2, 13))
    q = torch.randn(1, 2, 20, 8)
    pos = torch.arange(20.0)[None].requires_grad_()
    with pytest.raises(ValueError, match="gradients"):
        flexpos.attention(q, q, q, ALiBi(2), pos=pos, backend="flex")
    # DPB's own parameters need gradients too, outside torch.no_grad: the message says so.
    with pytest.raises(ValueError, match=r"cannot run gradients on CPU \(needed for .* the modules' parameters: run inference under torch.no_grad\(\)\)"):
        flexpos.attention(q, q, q, DPB(8, 2), backend="flex")


class Heads(torch.nn.Module):
    def __init__(self, *mods):
        super().__init__()
        self.mods = torch.nn.ModuleList(mods)

    def forward(self, q, k, v, pos, mask):
        return flexpos.attention(q, k, v, *self.mods, pos=pos, mask=mask)


def test_chunked_gradcheck_float64_all_parameters():
    """Gradients into q, k, v, learned divisors, DPB's MLP (on its grid, and an affine one as a
    rate and shift per head) and XL's weights; a fully masked row."""
    b, length, heads, dim = 1, 9, 2, 4
    model = Heads(
        ALiBi(heads, divide=2.0, learned_div=True),
        DPB(3, heads, depth=2, divide=3.0, learned_div=True),
        DPB(3, heads, divide=5.0, learned_div=True),
        XL(heads * dim, heads, divide=1.5, learned_div=True),
    ).double()
    pos = torch.tensor([[0, 3, 4, 9, 12, 13, 20, 21]])  # one token without a position
    mask = torch.ones(b, length, length, dtype=torch.bool)
    mask[:, 4] = False  # query 4 sees nothing
    q, k, v = (torch.randn(b, heads, length, dim, dtype=torch.float64, requires_grad=True) for _ in range(3))
    names, params = zip(*model.named_parameters())

    def f(q, k, v, *values):
        return functional_call(model, dict(zip(names, values)), (q, k, v, pos, mask))

    assert torch.autograd.gradcheck(f, (q, k, v, *params), atol=1e-6)
    out = f(q, k, v, *params)
    assert torch.equal(out[:, :, 4], torch.zeros_like(out[:, :, 4]))


def test_chunked_gradients_match_dense_autograd():
    b, length = 2, 300
    q, k, v = (t.double().requires_grad_() for t in inputs(b, length))
    pos = positions(b, length)
    flexpos.attention(q, k, v, ALiBi(H), pos=pos).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    p, has = R.padded_positions(pos, b, length)
    for t in (q, k, v):
        t.grad = None
    R.attend(q, k, v, R.alibi_bias(H, p, p, has, has)).sum().backward()
    for got, want in zip(grads, (q.grad, k.grad, v.grad)):
        assert torch.allclose(got, want, atol=1e-10, rtol=0)


def test_no_key_anywhere_gives_zero_gradients_not_none():
    """Every key masked out: zeros out, and (as with flex) zero gradients for q, k, v and the
    score_mods' parameters, so that backward works and optimisers see every parameter."""
    q, k, v = (t.double().requires_grad_() for t in inputs(2, 150))
    mods = [ALiBi(H, learned_div=True).double(), DPB(8, H).double()]
    out = flexpos.attention(q, k, v, *mods, mask=torch.zeros(2, 150, dtype=torch.bool), backend="chunked")
    assert out.eq(0).all()
    out.sum().backward()
    grads = [q.grad, k.grad, v.grad] + [p.grad for m in mods for p in m.parameters()]
    assert all(g is not None and g.eq(0).all() for g in grads)


@pytest.mark.parametrize("shape_q, len_k", [((0, H, 10), 12), ((2, H, 0), 12), ((2, H, 10), 0), ((2, 3, H, 0), 12)])
def test_empty_inputs_give_empty_or_zero_outputs_with_zero_gradients(shape_q, len_k):
    """An empty batch, no queries or no keys (each query then has no key: zeros, as where every
    key is masked): the output's shape, and zero gradients for q, k, v, float positions and
    parameters, also for inf inputs (no 0 * inf)."""
    *batch, heads, len_q = shape_q
    q = torch.full((*batch, heads, len_q, D), float("inf"), dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(*batch, heads, len_k, D, dtype=torch.float64, requires_grad=True) for _ in range(2))
    pos_q = torch.rand(*batch, len_q, dtype=torch.float64, requires_grad=True)
    pos_k = torch.rand(*batch, len_k, dtype=torch.float64)
    mods = [XL(heads * D, heads).double(), ALiBi(heads, learned_div=True).double(), DPB(8, heads).double()]
    valid = torch.ones(*batch, len_k, dtype=torch.bool)
    out = flexpos.attention(q, k, v, *mods, pos_q=pos_q, pos_k=pos_k, mask=valid, causal=True)
    assert out.shape == (*batch, heads, len_q, D) and out.dtype == torch.float64 and out.eq(0).all()
    out.sum().backward()
    leaves = [q, k, v, pos_q, *(p for m in mods for p in m.parameters())]
    assert all(t.grad is not None and t.grad.shape == t.shape and t.grad.eq(0).all() for t in leaves)
    with torch.no_grad():
        assert not flexpos.attention(q, k, v, *mods, pos_q=pos_q, pos_k=pos_k).requires_grad


@pytest.mark.parametrize("len_q", [5, 0])
def test_positions_that_no_module_reads_get_no_gradient(len_q):
    """As any input a computation does not use (None, not zeros), with or without tokens."""
    q = torch.randn(2, H, len_q, D, dtype=torch.float64, requires_grad=True)
    pos = torch.rand(2, len_q, dtype=torch.float64, requires_grad=True)
    flexpos.attention(q, q, q, pos=pos).sum().backward()
    assert q.grad is not None and pos.grad is None


def test_compiled_chunked_training_step(compiled):
    """The CPU training path compiled: ALiBi (learned divisor) + DPB with a CLS token, padding and
    causal masks. q/k/v gradients against the float64 dense reference; parameter gradients
    against the eager path (which gradcheck verifies above)."""
    b, length = 2, 300
    q, k, v = (t.requires_grad_() for t in inputs(b, length))
    pos = positions(b, length - 1)
    valid = torch.rand(b, length) > 0.2
    alibi, dpb = ALiBi(H, divide=30.0, learned_div=True), DPB(16, H, depth=2, divide=500.0)
    params = [alibi.div, *dpb.parameters()]

    def step():
        out = flexpos.attention(q, k, v, alibi, dpb, pos=pos, mask=valid, causal=True)
        return out, torch.autograd.grad(out.square().sum(), [q, k, v, *params])

    out, grads = step()
    previous = flexpos.set_compile(False)
    try:
        _, eager = step()
    finally:
        flexpos.set_compile(previous)
    p, has = R.padded_positions(pos, b, length)
    bias = R.alibi_bias(H, p, p, has, has, divide=30.0) + R.dpb_bias(dpb, p, p, has, has, 500.0)
    keep = valid[:, None, None, :] & torch.ones(length, length, dtype=torch.bool).tril()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = R.attend(*leaves, bias, keep)
    want = torch.autograd.grad(ref.square().sum(), leaves)
    assert (out.double() - ref).abs().max() <= TOLERANCE[torch.float32]
    for got, w in zip(grads[:3], want):
        assert (got.double() - w).abs().max() <= 10 * TOLERANCE[torch.float32]
    for got, e in zip(grads[3:], eager[3:]):
        assert torch.allclose(got, e, rtol=1e-4, atol=1e-6)

    # A second backward through the same compiled graph (docs/design.md: torch's donated buffers off).
    config = torch._functorch.config
    with config.patch(**({"donated_buffer": False} if hasattr(config, "donated_buffer") else {})):
        loss = flexpos.attention(q, k, v, alibi, dpb, pos=pos, mask=valid, causal=True).square().sum()
        first = torch.autograd.grad(loss, [q, *params], retain_graph=True)
        second = torch.autograd.grad(loss, [q, *params])
    for a, b_, g in zip(first, second, [grads[0], *grads[3:]]):
        assert torch.allclose(a, b_, rtol=1e-4, atol=1e-6) and torch.allclose(a, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("forward_compiled", [True, False], ids=["compiled-forward", "eager-forward"])
def test_compile_setting_changed_between_forward_and_backward(forward_compiled):
    """Chunks are recomputed in backward with the forward pass's compile setting (the other
    setting saved other tensors: checkpoint raised CheckpointError). The mix of the training
    step above, so no new variant compiles."""
    b, length = 2, 300
    q, k, v = (t.requires_grad_() for t in inputs(b, length))
    pos, valid = positions(b, length - 1), torch.rand(b, length) > 0.2
    alibi, dpb = ALiBi(H, divide=30.0, learned_div=True), DPB(16, H, depth=2, divide=500.0)
    leaves = [q, k, v, alibi.div, *dpb.parameters()]
    loss = lambda: flexpos.attention(q, k, v, alibi, dpb, pos=pos, mask=valid, causal=True).square().sum()  # noqa: E731
    previous = flexpos.set_compile(forward_compiled)
    try:
        want = torch.autograd.grad(loss(), leaves)
        out = loss()
        flexpos.set_compile(not forward_compiled)
        got = torch.autograd.grad(out, leaves)
    finally:
        flexpos.set_compile(previous)
    for a, w in zip(got, want):  # DPB's table gradient sums in thread order (docs/design.md): not bitwise
        assert (a - w).abs().max() <= 1e-6 * w.abs().max()


@needs_cpu_flex
def test_autocast_casts_float32_qkv_on_both_backends():
    """Under bf16 autocast, float32 q, k, v reach either backend in bf16, as SDPA's would: both
    return bf16, at bf16's distance from the float64 reference of the rounded inputs."""
    q, k, v = inputs(2, 160)
    pos = positions(2, 160)
    p, has = R.padded_positions(pos, 2, 160)
    ref = R.attend(*(t.bfloat16() for t in (q, k, v)), R.alibi_bias(H, p, p, has, has, divide=50.0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for backend in ("flex", "chunked"):
            out = flexpos.attention(q, k, v, ALiBi(H, divide=50.0), pos=pos, backend=backend)
            assert out.dtype == torch.bfloat16, backend
            assert (out.double() - ref).abs().max() <= TOLERANCE[torch.bfloat16], backend


def test_chunks_without_a_bias_run_sdpa_in_the_inputs_dtype(monkeypatch):
    """No bias to keep in float32 (Rotary alone, with no mask or a mask's 0 and -inf): bf16 q,
    k, v go to SDPA's fused kernel as they are, as the floor's do (2.2x faster on CPU than in
    float32, the same error); with a bias, or where flexpos' own softmax runs (XL's wider q and
    k), the chunk works in float32."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(chunked.F, "scaled_dot_product_attention", lambda q, *a, **kw: seen.append(q.dtype) or sdpa(q, *a, **kw))
    q, k, v = inputs(2, 160, torch.bfloat16)
    pos = positions(2, 150)
    rotary = flexpos.Rotary(D)
    p, has = R.padded_positions(pos, 2, 160)
    rotated = [R.rotate(t, p, has, rotary.thetas, 1.0) for t in (q, k)]
    valid = torch.rand(2, 160) > 0.3
    valid[1] = False  # no key at all: zeros
    tril = torch.ones(160, 160, dtype=torch.bool).tril()
    for mask, causal, keep in [(None, False, None), (None, True, tril), (valid, True, valid[:, None, None] & tril)]:
        del seen[:]
        out = flexpos.attention(q, k, v, rotary, pos=pos, mask=mask, causal=causal, backend="chunked")
        assert seen and all(dtype == torch.bfloat16 for dtype in seen) and out.dtype == torch.bfloat16
        ref = R.attend(*rotated, v, 0.0, keep)
        assert (out.double() - ref).abs().max() <= TOLERANCE[torch.bfloat16]
    assert out[1].eq(0).all()
    del seen[:]
    flexpos.attention(q, k, v, ALiBi(H), pos=pos, backend="chunked")
    flexpos.attention(q, k, v, XL(H * D, H), pos=pos, causal=True, backend="chunked")
    assert all(dtype == torch.float32 for dtype in seen)  # none at all where its own softmax runs
    # With gradients in float32 after all: bf16 SDPA's dk and dv were 1.5x further from float64.
    del seen[:]
    flexpos.attention(q, k, v.requires_grad_(), rotary, pos=pos, backend="chunked").sum().backward()
    assert seen and all(dtype == torch.float32 for dtype in seen)


@needs_cpu_flex
def test_cpu_flex_small_head_dims_and_short_sequences():
    """Head dims 8 and 16 at lengths < 128 on the CPU flex kernel (which flexpos feeds zero-padded
    to head dim 32) against the float64 reference."""
    with torch.no_grad():
        for dim, length in ((8, 24), (16, 56)):
            q, k, v = (torch.randn(2, H, length, dim) for _ in range(3))
            pos = positions(2, length)
            out = flexpos.attention(q, k, v, ALiBi(H), pos=pos, causal=True, backend="flex")
            p, has = R.padded_positions(pos, 2, length)
            keep = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
            ref = R.attend(q, k, v, R.alibi_bias(H, p, p, has, has), keep)
            assert (out.double() - ref).abs().max() <= TOLERANCE[torch.float32]


def test_cpu_flex_is_refused_before_its_first_working_torch(monkeypatch):
    q = torch.randn(1, 1, 4, 4)
    monkeypatch.setattr(backends, "torch_version", lambda: (2, 8))
    with pytest.raises(ValueError, match=r"needs torch >= 2\.9"):
        choose_backend("flex", q, needs_grad=False)
    assert choose_backend("auto", q, needs_grad=False) == "chunked"
    assert choose_backend("flex", q.to("meta"), needs_grad=False) == "flex"


def test_cpu_flex_refuses_table_masks_and_chunked_runs_them(monkeypatch):
    monkeypatch.setattr(backends, "torch_version", lambda: (2, 13))
    q = torch.randn(1, 1, 4, 4)
    pos = torch.rand(1, 600, dtype=torch.float64).cumsum(-1) * 10
    window = flexpos.distance_window_mask(100.0, pos=pos)
    assert choose_backend("flex", q, False, flexpos.causal_mask(600)) == "flex"
    for table_mask in (flexpos.padding_mask(torch.ones(1, 600, dtype=torch.bool), 600), window):
        with pytest.raises(ValueError, match="mask"):
            choose_backend("flex", q, False, table_mask)
    q, k, v = (torch.randn(1, H, 600, D) for _ in range(3))
    with torch.no_grad():
        out = flexpos.attention(q, k, v, ALiBi(H), pos=pos, mask=window)
    p, has = R.padded_positions(pos, 1, 600)
    keep = (p[:, :, None] - p[:, None, :]).abs()[:, None] <= 100
    ref = R.attend(q, k, v, R.alibi_bias(H, p, p, has, has), keep)
    assert (out.double() - ref).abs().max() <= TOLERANCE[torch.float32]


@needs_cpu_flex
def test_cpu_flex_runs_the_default_dpb_from_its_table():
    """bio-attention's default DPB (affine) at batch 2 over 300 tokens, a CLS token: the CPU flex
    kernel (torch 2.13) raised "index out of bounds ... cur_qSplitSize" on its rate-and-shift
    score_mod, so on CPU flex it reads its table."""
    dpb = DPB(16, H, divide=300.0)
    q, k, v = (torch.randn(2, H, 300, D) for _ in range(3))
    pos = positions(2, 299)
    with torch.no_grad():
        out = flexpos.attention(q, k, v, dpb, pos=pos, backend="flex")
    p, has = R.padded_positions(pos, 2, 300)
    ref = R.attend(q, k, v, R.dpb_bias(dpb, p, p, has, has, 300.0))
    assert (out.double() - ref).abs().max() <= TOLERANCE[torch.float32]


@needs_cpu_flex
def test_cpu_flex_runs_a_one_head_dpb():
    """DPB's exact grid with one head and batch 2: Inductor's CPU flex kernel (torch 2.13) failed
    to build the read of a one-row table ("'cur_qSplitSize4' was not declared")."""
    dpb = DPB(16, 1, depth=2)
    q, k, v = (torch.randn(2, 1, 64, 32) for _ in range(3))
    with torch.no_grad():
        out = flexpos.attention(q, k, v, dpb, backend="flex")
    p, has = R.padded_positions(torch.arange(64).expand(2, 64), 2, 64)
    ref = R.attend(q, k, v, R.dpb_bias(dpb, p, p, has, has, 1.0))
    assert (out.double() - ref).abs().max() <= TOLERANCE[torch.float32]


def test_cpu_flex_refuses_two_dpbs_and_chunked_runs_them(monkeypatch):
    """The second DPB's key positions would be read after the first one's gather, which torch
    2.13's CPU flex kernel mis-indexes (see test_flex_with_composed_mods_and_masks)."""
    monkeypatch.setattr(backends, "torch_version", lambda: (2, 13))
    q = torch.randn(1, 1, 4, 4)
    first, second = DPB(8, H, divide=50.0), DPB(8, H, depth=2)
    assert choose_backend("flex", q, False, None, [first, ALiBi(H)]) == "flex"
    with pytest.raises(ValueError, match=r"cannot run two score_mods that gather per score \(DPB, DPB\) on CPU"):
        choose_backend("flex", q, False, None, [first, ALiBi(H), second])
    q, k, v = (torch.randn(2, H, 150, D, dtype=torch.float64) for _ in range(3))
    pos = positions(2, 150)
    p, has = R.padded_positions(pos, 2, 150)
    bias = R.dpb_bias(first, p, p, has, has, 50.0) + R.dpb_bias(second, p, p, has, has, 1.0)
    with torch.no_grad():
        out = flexpos.attention(q, k, v, first, second, pos=pos)
    assert (out - R.attend(q, k, v, bias)).abs().max() <= TOLERANCE[torch.float64]


def test_chunk_rows_keep_the_bias_within_budget():
    for device, budget in (("cpu", chunked.CHUNK_BYTES["cpu"]), ("cuda", chunked.CHUNK_BYTES["default"])):
        for batch_heads, len_k in ((8, 4096), (8, 8192), (64, 512), (1, 100), (8, 32768), (512, 65536)):
            rows = chunked.chunk_rows(batch_heads, len_k, torch.device(device))
            assert rows & (rows - 1) == 0 and 16 <= rows <= 1024
            assert rows == 16 or 4 * batch_heads * len_k * rows <= budget
            assert rows == 1024 or 4 * batch_heads * len_k * rows * 2 > budget  # the largest that fits


def test_a_last_chunk_of_one_query_joins_the_one_before(monkeypatch):
    """A chunk of one row would compile the bias kernel again (sizes 0 and 1 are specialised):
    513 queries in chunks of 128 end with 129 rows; the numbers are the reference's."""
    assert chunked.chunk_bounds(513, 128) == [(0, 128), (128, 256), (256, 384), (384, 513)]
    assert chunked.chunk_bounds(514, 128)[-1] == (512, 514)
    assert chunked.chunk_bounds(128, 128) == [(0, 128)]
    assert chunked.chunk_bounds(1, 128) == [(0, 1)]  # a call of one query keeps its one row
    monkeypatch.setattr(chunked, "chunk_rows", lambda *args: 16)
    rows = []
    attend = chunked._attend_chunk
    monkeypatch.setattr(chunked, "_attend_chunk", lambda q, *rest: rows.append(q.shape[-2]) or attend(q, *rest))
    q, k, v = inputs(2, 33, torch.float64)
    pos = positions(2, 33)
    keep = torch.rand(2, 33) > 0.2
    p, has = R.padded_positions(pos, 2, 33)
    ref = R.attend(q, k, v, R.alibi_bias(H, p, p, has, has), keep[:, None, None, :])
    for mask in (None, keep):  # the plan from tile states, and every key
        rows.clear()
        with torch.no_grad():
            out = flexpos.attention(q, k, v, ALiBi(H), pos=pos, mask=mask)
        assert rows == [16, 17]
        want = ref if mask is not None else R.attend(q, k, v, R.alibi_bias(H, p, p, has, has))
        assert (out - want).abs().max() <= TOLERANCE[torch.float64]


def test_chunked_attends_only_to_the_key_span_the_mask_leaves(monkeypatch):
    """A 100-token sliding window over 2000 tokens: each chunk's SDPA sees at most the tiles
    its window touches, and the output still matches the dense reference."""
    length, window = 2000, 100
    spans = []
    attend = chunked._attend_chunk

    def spy(q, k, v, q_start, k_start, *rest):
        spans.append((q_start, q.shape[-2], k_start, k.shape[-2]))
        return attend(q, k, v, q_start, k_start, *rest)

    monkeypatch.setattr(chunked, "_attend_chunk", spy)
    q, k, v = inputs(2, length)
    with torch.no_grad():
        out = flexpos.attention(q, k, v, ALiBi(H), mask=flexpos.sliding_window_mask(length, window))
    rows = spans[0][1]
    for q_start, n_q, k_start, n_k in spans:
        first = max(0, q_start - window) // 128 * 128
        assert k_start == first and k_start + n_k <= -(-(q_start + n_q + window) // 128) * 128
    assert max(n_k for *_, n_k in spans) <= rows + 2 * window + 256 < length
    idx = torch.arange(length)
    keep = (idx[:, None] - idx[None, :]).abs() <= window
    p, has = R.padded_positions(None, 2, length)
    assert (out.double() - R.attend(q, k, v, R.alibi_bias(H, p, p, has, has), keep)).abs().max() <= TOLERANCE[torch.float32]


@needs_cpu_flex
@pytest.mark.parametrize("heads, depth", [(1, 2), (H, 1)])
def test_flex_batch_of_one(heads, depth):
    """Batch 1 (which the raw CPU kernel cannot build) with ALiBi + DPB (its table with one head,
    rate and shift per head when affine) and a causal mask."""
    q, k, v = (torch.randn(1, heads, 300, D) for _ in range(3))
    pos = positions(1, 299)
    alibi, dpb = ALiBi(heads, divide=20.0), DPB(16, heads, depth=depth, divide=300.0)
    with torch.no_grad():
        out = flexpos.attention(q, k, v, alibi, dpb, pos=pos, causal=True, backend="flex")
    p, has = R.padded_positions(pos, 1, 300)
    bias = R.alibi_bias(heads, p, p, has, has, divide=20.0) + R.dpb_bias(dpb, p, p, has, has, 300.0)
    ref = R.attend(q, k, v, bias, torch.ones(300, 300, dtype=torch.bool).tril())
    assert (out.double() - ref).abs().max() <= TOLERANCE[torch.float32]


def test_chunked_backend_propagates_nan_biases():
    """A bias gone NaN (a diverged DPB) gives NaN rows, as dense attention does, not the zeros
    of rows with no key; rows that are really dead still give zeros."""
    q, k, v = inputs(1, 40)
    dpb = DPB(8, H)
    with torch.no_grad():
        dpb.mlp[-1].bias[1] = float("nan")
    valid = torch.ones(1, 40, 40, dtype=torch.bool)
    valid[0, 3] = False  # query 3 attends to nothing
    with torch.no_grad():
        out = flexpos.attention(q, k, v, dpb, mask=valid, backend="chunked")
    live = [i for i in range(40) if i != 3]
    assert out[:, 1, live].isnan().all() and not out[:, [0, 2, 3]].isnan().any()
    assert out[:, :, 3].eq(0).all()


def test_masks_inside_attention_against_the_reference():
    """Segments and a per-head bool mask (B, H, Lq, Lk) with ALiBi, and causal cross-attention
    with Lq != Lk (top-left aligned, as SDPA's is_causal), on the default backend in float64."""
    b, length = 2, 200
    q, k, v = inputs(b, length, torch.float64)
    pos = positions(b, length)
    p, has = R.padded_positions(pos, b, length)
    bias = R.alibi_bias(H, p, p, has, has)
    segments = torch.randint(0, 4, (b, length)).sort(-1).values
    same = segments[:, :, None] == segments[:, None, :]
    out = flexpos.attention(q, k, v, ALiBi(H), pos=pos, mask=flexpos.segment_mask(segments))
    assert (out - R.attend(q, k, v, bias, same[:, None])).abs().max() <= TOLERANCE[torch.float64]
    per_head = torch.rand(b, H, length, length) > 0.3
    out = flexpos.attention(q, k, v, ALiBi(H), pos=pos, mask=per_head)
    assert (out - R.attend(q, k, v, bias, per_head)).abs().max() <= TOLERANCE[torch.float64]
    kc, vc = k[:, :, :150], v[:, :, :150]
    out = flexpos.attention(q, kc, vc, causal=True)
    keep = torch.ones(length, 150, dtype=torch.bool).tril()[None, None]
    assert (out - R.attend(q, kc, vc, 0.0, keep)).abs().max() <= TOLERANCE[torch.float64]


ONE_THREAD_SCRIPT = """
import torch, flexpos
torch.manual_seed(0)
dpb = flexpos.DPB(8, 1, depth=2, divide=1000.0, table_size=33).double()
q, k, v = (torch.randn(1, 1, 6, 8, dtype=torch.float64) for _ in range(3))
pos = (torch.rand(1, 5, dtype=torch.float64) * 12978 + 1e6).requires_grad_()  # token 0: CLS
grads = []
for compiled in (True, False):
    flexpos.set_compile(compiled)
    out = flexpos.attention(q, k, v, dpb, pos=pos)
    grads.append(torch.autograd.grad(out.sum(), (pos, *dpb.parameters())))
for got, want in zip(*grads):
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12), (got, want)
"""


def test_compiled_position_gradients_on_one_thread(tmp_path):
    """With one thread, Inductor (torch 2.13) built the backward of DPB's table reads with an
    index used before its declaration: a C++ compile error at the first backward. A fresh
    process and cache, so that the kernel really is compiled for one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", ONE_THREAD_SCRIPT], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]


def test_kernel_options_given_go_over_flexposs_own_and_reach_flex(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    given = {"BLOCK_M": 128, "bwd_num_stages": 2}
    assert flex.flex_kernel_options(cuda, [DPB(8, 2)], given) == {**flex.GATHER_TILES, **given}
    assert flex.flex_kernel_options(cpu, [DPB(8, 2)], given) == given
    assert flex.flex_kernel_options(cuda, [ALiBi(2)], {}) is None
    seen = []

    def fake_run_flex(q, k, v, score_mod, block_mask, scale, kernel_options=None):
        seen.append(kernel_options)
        return v

    attention_module = sys.modules["flexpos.attention"]
    monkeypatch.setattr(attention_module, "run_flex", fake_run_flex)
    monkeypatch.setattr(attention_module, "choose_backend", lambda *args: "flex")  # torch < 2.9 refuses CPU flex
    x = torch.randn(1, 2, 8, 16)
    flexpos.attention(x, x, x, backend="flex", kernel_options=given)
    layer = flexpos.AttentionLayer(32, 2, backend="flex", kernel_options=given)
    with torch.no_grad():
        layer(torch.randn(1, 8, 32))
        given["BLOCK_M"] = 64  # the layer kept its own copy
        layer(torch.randn(1, 8, 32))
    assert seen == [{"BLOCK_M": 128, "bwd_num_stages": 2}] * 3


def test_flex_kernel_options_shrink_tiles_for_score_mods_that_gather_per_score_on_cuda():
    cuda = torch.device("cuda")
    tiles = flex.flex_kernel_options(cuda, [flexpos.Rotary(8), flexpos.DPB(8, 2)])
    assert tiles == flex.GATHER_TILES
    assert flex.flex_kernel_options(cuda, [flexpos.ALiBi(2), flexpos.Rotary(8)]) is None
    assert flex.flex_kernel_options(torch.device("cpu"), [flexpos.DPB(8, 2)]) is None
    # flex's own constraints: tiles divide the BlockMask's blocks; backward N1 % M1 and M2 % N2
    assert all(BLOCK % size == 0 for size in tiles.values())
    assert tiles["BLOCK_N1"] % tiles["BLOCK_M1"] == 0 and tiles["BLOCK_M2"] % tiles["BLOCK_N2"] == 0


@contextlib.contextmanager
def _reads_forbidden(monkeypatch, mode):
    """Any read of a tensor's values back to the host fails the test, within
    ``flexpos.no_host_reads()`` or as while a CUDA graph is captured (flexpos sees a capturing
    stream); so does ``torch.tensor(value, device=...)``, on an accelerator a blocking copy from
    host memory, which a capture refuses (``torch.full`` fills on the device instead)."""
    with monkeypatch.context() as m, (flexpos.no_host_reads() if mode == "no_host_reads" else contextlib.nullcontext()):
        if mode == "capture":
            m.setattr(torch.cuda, "is_initialized", lambda: True)
            m.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)

        def host_read(*args, **kwargs):
            raise AssertionError("host read")

        for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist"):
            m.setattr(torch.Tensor, name, host_read)
        tensor = torch.tensor

        def no_copy_to_a_device(*args, **kwargs):
            if kwargs.get("device") is not None:
                raise AssertionError("torch.tensor(..., device=...): a copy from host memory")
            return tensor(*args, **kwargs)

        m.setattr(torch, "tensor", no_copy_to_a_device)
        yield


@pytest.mark.parametrize("mode", ["no_host_reads", "capture"])
@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.float32])
def test_no_host_reads_in_no_host_reads_or_while_a_cuda_graph_is_captured(monkeypatch, pos_dtype, mode):
    """Eager calls read positions' extents, check float positions are finite and plan chunks from
    tile states; in no_host_reads() or under capture they read nothing and give the same numbers:
    DPB from a grid chosen on the device, every chunk over every key, rows without keys zeroed."""
    b, length = 2, 40
    q, k, v = (torch.randn(b, 2, length, 16, dtype=torch.float64) for _ in range(3))
    pos = (torch.randint(0, 3, (b, length)).cumsum(-1) - 30).to(pos_dtype)
    keep = torch.rand(b, length, length) > 0.3
    keep[:, 5] = False  # a query with no key
    dpb, alibi = DPB(8, 2, depth=2).double(), ALiBi(2)
    p, has = R.padded_positions(pos.double(), b, length)
    bias = R.dpb_bias(dpb, p, p, has, has, 1.0) + R.alibi_bias(2, p, p, has, has)
    ref = R.attend(q, k, v, bias, keep[:, None])
    step = 2 * float((p.amax(-1) - p.amin(-1)).max()) / (dpb.table_size - 1)  # grid of float positions
    rotary, vocab = flexpos.Rotary(16), flexpos.LearnedVocab(8, 100)
    x = torch.randn(b, length, 8)
    with _reads_forbidden(monkeypatch, mode), torch.no_grad():
        out = flexpos.attention(q, k, v, dpb, alibi, pos=pos, mask=keep, backend="chunked")
        rotated = flexpos.attention(q, k, v, rotary, pos=pos, backend="chunked")
        encoded = vocab(x, pos=pos.long() + 30) if pos_dtype == torch.int64 else None
    assert flexpos._host.host_reads()  # back to reading after the block
    assert torch.equal(rotated, flexpos.attention(q, k, v, rotary, pos=pos, backend="chunked"))
    if encoded is not None:
        assert torch.equal(encoded, vocab(x, pos=pos.long() + 30))
    # integer positions fit the grid exactly; float ones interpolate: step^2 / 8 * |MLP''|
    # (measured 4e-9 against step^2 = 2e-6)
    assert (out - ref).abs().max() <= (1e-9 if pos_dtype == torch.int64 else step**2)
    assert out[:, :, 5].abs().max() == 0


def test_host_read_rules_trace_without_a_graph_break():
    """The rules run inside a caller's torch.compile (chunked backend) without breaking its graph."""
    from flexpos import _host

    def rules(x):
        return x + 1 if _host.blind() or _host.host_reads() else x - 1

    with flexpos.no_host_reads():
        out = torch.compile(rules, backend="eager", fullgraph=True)(torch.zeros(()))
    assert out == -1  # compiling: no reads, and not blind (the caller's compile decides)


def test_another_threads_compile_leaves_checks_and_kernels_on(monkeypatch):
    """torch.compiler.is_compiling() is process-wide (torch 2.13 holds it True for the whole
    compile session of any thread). flexpos asks whether its own code is traced, so a call made
    meanwhile still reads values back and checks its positions."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # another thread compiling
    from flexpos import _host

    assert _host.host_reads() and not _host.tracing()
    q = torch.randn(1, 2, 16, 8)
    pos = torch.arange(16.0)[None].clone()
    pos[0, 5] = float("nan")
    with pytest.raises(ValueError, match="pos"):
        flexpos.attention(q, q, q, ALiBi(2), pos=pos)


def test_gradients_of_a_call_in_no_host_reads_with_backward_outside_it():
    """Checkpointed chunks are recomputed in backward, maybe outside the block (or on autograd's
    own thread): they recompute as their forward ran, and the gradients are the reference's."""
    b, length = 2, 40
    q, k, v = (torch.randn(b, 2, length, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pos = torch.randint(0, 3, (b, length)).cumsum(-1)
    keep = torch.rand(b, length, length) > 0.3  # every row keeps a key: read, none is dead
    grad = torch.randn(b, 2, length, 16, dtype=torch.float64)
    with flexpos.no_host_reads():
        out = flexpos.attention(q, k, v, ALiBi(2), pos=pos, mask=keep, backend="chunked")
    got = torch.autograd.grad(out, (q, k, v), grad)
    p, has = R.padded_positions(pos, b, length)
    ref = R.attend(q, k, v, R.alibi_bias(2, p, p, has, has), keep[:, None])
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for g, w in zip(got, want):
        assert (g - w).abs().max() <= TOLERANCE[torch.float64]


def test_dead_rows_are_looked_for_only_where_a_query_can_lose_every_key(monkeypatch):
    """Chunks that evaluate the mask_mod, or whose score_mod may return -inf (asymmetric ALiBi),
    are checked for queries with no key left; other chunks skip that pass over the bias. The
    outputs are the reference's either way, zero rows included (a query before every key, on a
    head that looks back only)."""
    seen = []
    attend = chunked._attend_chunk

    def spy(*args):
        seen.append(args[-1])  # rows_may_die
        return attend(*args)

    monkeypatch.setattr(chunked, "_attend_chunk", spy)
    b, lq, lk = 2, 40, 30
    q, k, v = (torch.randn(b, 2, n, 16, dtype=torch.float64) for n in (lq, lk, lk))
    pos_q = torch.randint(0, 100, (b, lq)).sort(-1).values
    pos_k = torch.randint(10, 100, (b, lk)).sort(-1).values
    pos_q[:, 0] = 0  # before every key
    for module, may_die in ((ALiBi(2), False), (DPB(8, 2).double(), False), (ALiBi(2, asymmetric=True), True)):
        seen.clear()
        with torch.no_grad():
            out = flexpos.attention(q, k, v, module, pos_q=pos_q, pos_k=pos_k, backend="chunked")
        assert seen and all(s == may_die for s in seen)
        pq, hq = R.padded_positions(pos_q, b, lq)
        pk, hk = R.padded_positions(pos_k, b, lk)
        if isinstance(module, DPB):
            bias = R.dpb_bias(module, pq, pk, hq, hk, 1.0)
        else:
            bias = R.alibi_bias(2, pq, pk, hq, hk, asymmetric=module.asymmetric)
        assert (out - R.attend(q, k, v, bias)).abs().max() <= TOLERANCE[torch.float64]
    assert out[:, 1, 0].abs().max() == 0  # asymmetric head 1 rules out keys after the query: none left
    seen.clear()
    with torch.no_grad():
        flexpos.attention(q, k, v, ALiBi(2), pos_q=pos_q, pos_k=pos_k, mask=torch.rand(b, lk) > 0.5, backend="chunked")
    assert seen == [True]  # the mask_mod is evaluated

    class Undeclared(flexpos.Positional):  # a user's module that does not say its bias is finite
        modifies_scores = True

        def score_mod(self, positions, dtype=torch.float32):
            return lambda score, b, h, q_idx, kv_idx: score
    for modules, may_die in (([Undeclared()], True), ([flexpos.Rotary(16), ALiBi(2)], False)):
        seen.clear()
        with torch.no_grad():
            flexpos.attention(q, k, v, *modules, pos_q=pos_q, pos_k=pos_k, backend="chunked")
        assert seen and all(s == may_die for s in seen)


def test_a_tensor_the_score_mod_captures_gets_its_gradient():
    """q, k, v, positions and parameters need no gradient, but the score_mod captures a tensor
    made by another network that does: its gradient is the reference's."""

    class Captured(flexpos.Positional):
        modifies_scores = True
        table = None  # set per call: not a parameter, not a buffer

        def score_mod(self, positions, dtype=torch.float32):
            table = self.table
            return lambda score, b, h, q_idx, kv_idx: score + table[h] * (kv_idx.to(table.dtype) / 40.0)

    q, k, v = (t.double() for t in inputs(2, 140))
    w = torch.randn(H, dtype=torch.float64, requires_grad=True)
    module = Captured()
    module.table = w * 2
    out = flexpos.attention(q, k, v, module, backend="chunked")
    bias = (w * 2)[:, None, None] * (torch.arange(140, dtype=torch.float64) / 40.0)
    ref = R.attend(q, k, v, bias)
    probe = torch.randn_like(ref)
    got, = torch.autograd.grad((out * probe).sum(), w)
    want, = torch.autograd.grad((ref * probe).sum(), w)
    assert (out - ref).abs().max() <= TOLERANCE[torch.float64]
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunks_keep_sdpa_outputs_where_the_bias_needs_no_gradient(monkeypatch, dtype):
    """On CPU a chunk whose bias needs no gradient keeps SDPA's output and log-sum-exp and
    recomputes only the bias in backward; one with a learned divisor is checkpointed. Both give
    the reference's gradients, a row without keys included, and repeated backward passes agree."""
    monkeypatch.setattr(chunked, "chunk_rows", lambda *args: 16)
    saved = []
    apply = chunked._SavedChunk.apply
    monkeypatch.setattr(chunked._SavedChunk, "apply", lambda *args: saved.append(1) or apply(*args))
    b, length = 2, 70
    q, k, v = (torch.randn(b, 2, length, 16, dtype=dtype, requires_grad=True) for _ in range(3))
    pos = torch.randint(0, 3, (b, length)).cumsum(-1) * 60  # weights from 1 down past subnormal
    keep = torch.rand(b, length, length) > 0.3
    keep[:, 20] = False  # a query without keys
    grad = torch.randn(b, 2, length, 16, dtype=dtype)
    p, has = R.padded_positions(pos, b, length)
    # where SDPA's CPU flash kernel does not run this bias (torch 2.6), every chunk is checkpointed
    flash = chunked._keeps_outputs(q, k, v, None)
    for alibi, kept in ((ALiBi(2), flash), (ALiBi(2, divide=2.0, learned_div=True), False)):
        saved.clear()
        out = flexpos.attention(q, k, v, alibi, pos=pos, mask=keep, backend="chunked")
        assert len(saved) == (5 if kept else 0)  # chunks of 16 query rows, kept in one buffer
        params = [alibi.div] if alibi.learned else []
        got = torch.autograd.grad(out, (q, k, v, *params), grad, retain_graph=True)
        again = torch.autograd.grad(out, (q, k, v, *params), grad)
        divide = torch.exp(alibi.div.double()) if alibi.learned else 1.0
        ref = R.attend(q.double(), k.double(), v.double(), R.alibi_bias(2, p, p, has, has, divide=divide), keep[:, None])
        want = torch.autograd.grad(ref, (q, k, v, *params), grad.double())
        for g, a, w in zip(got, again, want):
            assert torch.equal(g, a)
            assert (g.double() - w).abs().max() <= TOLERANCE[dtype] * max(1.0, w.abs().max().item())


def test_kept_chunks_backward_inside_autocast_equals_outside():
    """A backward run inside the caller's bf16 autocast block rebuilds kept chunks' bias in
    float32, as their forward built it (autocast's bf16 matmul once rounded it: with DPB at large
    distances the gradients were off by a factor of 1e26)."""
    q, k, v = (torch.randn(2, 2, 160, 16, requires_grad=True) for _ in range(3))
    if not chunked._keeps_outputs(q, k, v, None):
        pytest.skip("SDPA's CPU flash kernel takes no bias in this torch: no chunk is kept")
    pos = torch.rand(2, 160, dtype=torch.float64).cumsum(-1) * 1000
    dpb = DPB(8, 2, depth=2).requires_grad_(False)
    grads = []
    for inside in (False, True):
        out = flexpos.attention(q, k, v, dpb, pos=pos)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=inside):
            grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    for outside, inside in zip(*grads):
        assert torch.equal(outside, inside)


def test_create_graph_through_kept_chunks_of_inputs_that_need_no_gradient():
    """create_graph=True with a frozen q: kept chunks recompute with autograd for k and v alone
    (their first derivatives, with a graph; SDPA's flash kernel has no second derivative)."""
    q = torch.randn(2, 2, 50, 16, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 50, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    pos = torch.randint(0, 3, (2, 50)).cumsum(-1)
    out = flexpos.attention(q, k, v, ALiBi(2), pos=pos, backend="chunked")
    dk, dv = torch.autograd.grad(out.square().sum(), (k, v), create_graph=True)
    p, has = R.padded_positions(pos, 2, 50)
    ref = R.attend(q, k, v, R.alibi_bias(2, p, p, has, has))
    want = torch.autograd.grad(ref.square().sum(), (k, v))
    assert dk.requires_grad and dv.requires_grad
    for g, w in zip((dk, dv), want):
        assert (g - w).abs().max() <= TOLERANCE[torch.float64]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weights_below_the_smallest_normal_are_cut_and_no_other(dtype):
    """Kept chunks' backward gives the flash kernel -inf where exp(score + bias - lse) is
    subnormal (several times slower to compute with, and changing nothing)."""
    q, k = torch.randn(2, 3, 40, 16, dtype=dtype) * 3, torch.randn(2, 3, 50, 16, dtype=dtype) * 3
    tiny = torch.finfo(dtype).tiny
    bias = -torch.rand(1, 3, 40, 50, dtype=dtype) * 3 * -math.log(tiny)  # weights of 1 to far below tiny
    scale = 16**-0.5
    logits = (q.double() @ k.double().transpose(-1, -2)) * scale + bias.double()
    lse = logits.logsumexp(-1)
    cut = chunked._without_subnormal_weights(bias, q, k, lse.to(dtype), scale).isinf()
    weights = (logits - lse[..., None]).exp()
    assert cut.any() and (~cut).any()
    assert cut[weights < tiny / 2].all() and not cut[weights > tiny * 2].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_checkpointed_chunks_cut_subnormal_weights_and_no_normal_ones(dtype):
    """A bias that needs a gradient runs flexpos' own math on CPU (no SDPA): its weights, read
    out with v the identity, are the reference's, except that those below ``n`` times the
    smallest normal float are 0, so that none is subnormal."""
    n = 50
    q, k = torch.randn(2, 3, 40, 16, dtype=dtype) * 3, torch.randn(2, 3, n, 16, dtype=dtype) * 3
    tiny = torch.finfo(dtype).tiny
    bias = -torch.rand(1, 3, 40, n, dtype=dtype) * 3 * -math.log(tiny)  # weights of 1 to far below tiny
    eye = torch.eye(n, dtype=dtype).expand(2, 3, n, n)
    weights = chunked._attend_math(q, k, eye, bias, 16**-0.5)
    want = ((q.double() @ k.double().transpose(-1, -2)) * 16**-0.5 + bias.double()).softmax(-1)
    assert ((weights == 0) | (weights >= tiny)).all() and (want < tiny).any()
    assert (weights[want < tiny] == 0).all() and (weights[want > 2 * n * tiny] > 0).all()
    assert (weights.double() - want).abs().max() <= TOLERANCE[dtype]


@pytest.mark.parametrize("case", ["flash takes no bias", "q and v head dims differ"])
def test_chunks_run_own_math_where_sdpa_would_run_its_math_kernel(monkeypatch, case):
    """A fixed bias where SDPA's CPU flash kernel cannot run it (a torch whose kernel takes no
    bias, as 2.6; q and k with more features than v, as XL makes them) runs flexpos' own math,
    2.3-3.3x and 1.05-1.23x faster than SDPA's math kernel there, with the reference's numbers."""
    monkeypatch.setattr(chunked, "chunk_rows", lambda *args: 16)
    if case == "flash takes no bias":
        monkeypatch.setattr(chunked, "_flash_cpu_takes_a_bias", lambda: False)
    calls = []
    own = chunked._attend_math
    monkeypatch.setattr(chunked, "_attend_math", lambda *args: calls.append(1) or own(*args))
    length, e = 40, 16 if case == "flash takes no bias" else 24
    q, k = (torch.randn(2, 2, length, e, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 2, length, 16, dtype=torch.float64, requires_grad=True)
    pos = torch.randint(0, 3, (2, length)).cumsum(-1) * 60
    keep = torch.rand(2, length) > 0.2
    p, has = R.padded_positions(pos, 2, length)
    ref = R.attend(q, k, v, R.alibi_bias(2, p, p, has, has), keep[:, None, None])
    for grad_mode in (False, True):
        calls.clear()
        with torch.set_grad_enabled(grad_mode):
            out = flexpos.attention(q, k, v, ALiBi(2), pos=pos, mask=keep, backend="chunked")
        assert len(calls) == 3 and (out - ref).abs().max() <= TOLERANCE[torch.float64]
    got, want = (torch.autograd.grad(o.square().sum(), (q, k, v)) for o in (out, ref))
    for g, w in zip(got, want):
        assert (g - w).abs().max() <= TOLERANCE[torch.float64]


def test_chunks_are_checkpointed_where_sdpas_private_kernel_choice_is_missing(monkeypatch):
    """flexpos asks torch._fused_sdp_choice (private) whether SDPA would run its flash kernel; a
    torch without it, or with another signature, gets checkpointed chunks and the same numbers."""
    q = torch.randn(1, 2, 40, 16, dtype=torch.float64, requires_grad=True)
    pos = torch.arange(40)[None] * 9

    def changed(*args, **kwargs):
        raise TypeError("_fused_sdp_choice() got an unexpected keyword argument 'scale'")

    monkeypatch.setattr(torch, "_fused_sdp_choice", changed)
    assert not chunked._keeps_outputs(q, q, q, None)
    out = flexpos.attention(q, q, q, ALiBi(2), pos=pos, backend="chunked")
    p, has = R.padded_positions(pos, 1, 40)
    ref = R.attend(q, q, q, R.alibi_bias(2, p, p, has, has))
    (g,), (want,) = (torch.autograd.grad(o.sum(), q) for o in (out, ref))
    assert (g - want).abs().max() <= TOLERANCE[torch.float64]
