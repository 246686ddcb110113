"""CUDA: compiled flex forward and backward against the float64 chunked path on the same GPU.

Skipped without a GPU; benchmarks/gpu.sh runs it on a lent H100/H200.
"""

import pytest
import torch

import flexpos
import reference as R
from flexpos import ALiBi, DPB, XL, Rotary
from support import rotation_tolerance

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEV = "cuda"
H, D = 4, 64
FUDGE = {torch.float32: 10.0, torch.bfloat16: 2.0}  # compiled error <= FUDGE * eager error
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # ... + ATOL * max(1, max|golden|)
# Parameter gradients in bf16: Triton's flex backward rounds P and O to bf16 before its
# reductions over all B*H*Lq*Lk scores, while the eager (chunked) yardstick computes in float32.
# A float64 simulation of those roundings on this test's inputs gave errors up to 2.6% of
# max|grad| (75x the yardstick's); a wrong term would be O(100%).
# In float32, gradients of captured buffers (ALiBi's learned divisor) are summed by one atomic
# add per score element, 0.8-2M per head here, in no fixed order: a float64 simulation of such
# sums gave errors up to 2e-5 of the gradient (1.35e-3 on 67); on an H200 the compiled layer's
# divisor gradient, whose terms of both signs cancel to a sum far below their magnitudes, was
# off by 3.5e-4 of it (0.26 on 741; benchmarks/results/gpu-2026-11-27-b.txt).
PARAM_ATOL = {torch.float32: 1e-3, torch.bfloat16: 5e-2}
# DPB's output bias shifts every score of a row by a per-head constant, which softmax ignores:
# its gradient is exactly 0, a sum of terms that cancel. Flex's backward forms each row's
# correction from its output, rounded to the test dtype, so it gets sum over rows of
# dO . (O - rounded O) per head instead (0.07 in bf16 on an H200, gpu-2026-11-27-c.txt), plus
# a like term from the forward's bf16 rounding of P before P @ V, which shift_rounding() does
# not model (a float64 simulation of both: standard deviation 0.065, of the modelled term
# 0.050). SIGMAS of the modelled term are ~6 of both; a wrong term would be of the size of the
# terms (~10 here).
SIGMAS = 8.0


def modules():
    return [
        Rotary(D, divide=3.0, learned_div=True),
        ALiBi(H, divide=40.0, learned_div=True),
        DPB(16, H, depth=2, divide=300.0, learned_div=True),
    ]


def frozen_affine_modules():
    """bio-attention's default DPB (affine) without parameter gradients: a rate and a shift per
    head on flex, no table; Rotary with a fixed divisor: its Triton kernel, q and k trained."""
    return [Rotary(D, divide=3.0), ALiBi(H, divide=40.0), DPB(16, H, divide=300.0).requires_grad_(False)]


def xl_modules():
    return [XL(H * D, H, divide=10.0, learned_div=True)]


def run(mods, dtype, backend, q, k, v, grad, **kwargs):
    """Output and gradients (q, k, v, then every parameter) of one path, in float64."""
    for m in mods:
        m.zero_grad()
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = flexpos.attention(*leaves, *mods, backend=backend, **kwargs)
    out.backward(grad.to(dtype))
    grads = [t.grad for t in leaves] + [p.grad for p in params(mods)]
    return [out.double()] + [g.double() for g in grads]


def golden_eager_candidate(make_modules, dtype, candidate, default_positions=False, kv_heads=H):
    """float64 'chunked' golden, the test dtype on 'chunked' (eager) and on ``candidate`` (with
    flexpos' compiled transforms and bias kernels, which the rest of the suite runs eagerly): a CLS
    token (unless ``default_positions``: none given), padding, a length not a multiple of 128,
    a sequence with no valid key, and ``kv_heads`` key/value heads."""
    b, length = 2, 1000
    pos = None if default_positions else torch.randint(0, 20_000, (b, length - 1), device=DEV).sort(-1).values
    valid = torch.rand(b, length, device=DEV) > 0.2
    valid[1] = False
    q = torch.randn(b, H, length, D, device=DEV)
    k, v = (torch.randn(b, kv_heads, length, D, device=DEV) for _ in range(2))
    grad = torch.randn(b, H, length, D, device=DEV, dtype=torch.float64)
    mods = [m.to(DEV) for m in make_modules()]
    golden_mods = make_modules()
    for ours, ref in zip(mods, golden_mods):
        ref.load_state_dict(ours.state_dict())
        ref.double().to(DEV)
    kwargs = dict(pos=pos, mask=valid)
    golden = run(golden_mods, torch.float64, "chunked", q, k, v, grad, **kwargs)
    eager = run(mods, dtype, "chunked", q, k, v, grad, **kwargs)
    previous = flexpos.set_compile(True)  # the candidate as users run it: Triton transforms too
    try:
        other = run(mods, dtype, candidate, q, k, v, grad, **kwargs)
    finally:
        flexpos.set_compile(previous)
    names = ["out", "dq", "dk", "dv"] + [n for m in mods for n, p in m.named_parameters() if p.requires_grad]
    shifts = {i + 4: shift_rounding(other[0], grad, dtype) for i, p in enumerate(params(mods)) if is_shift(mods, p)}
    return names, golden, eager, other, shifts


def params(mods):
    """The parameters that get gradients."""
    return [p for m in mods for p in m.parameters() if p.requires_grad]


def is_shift(mods, param) -> bool:
    """Whether ``param`` is a DPB output bias (a per-head score shift)."""
    return any(isinstance(m, DPB) and param is m.mlp[-1].bias for m in mods)


def shift_rounding(out, grad, dtype):
    """(H,) SIGMAS standard deviations of sum over rows of dO . (O - rounded O), per head:
    out (B, H, L, D) already rounded to ``dtype``, each rounding error uniform within half an
    ulp (variance ulp^2 / 12); exact zeros (rows with no key) are not rounded."""
    exponent = torch.frexp(out.float()).exponent
    ulp = torch.ldexp(torch.full_like(out, torch.finfo(dtype).eps / 2), exponent) * (out != 0)
    variance = (grad.to(dtype).double() ** 2 * ulp**2 / 12).sum((0, 2, 3))
    return SIGMAS * variance.sqrt()


def assert_errors_within_policy(dtype, names, golden, eager, other, shifts=None, n_inputs=4):
    """The first ``n_inputs`` entries are outputs and input gradients, the rest parameter
    gradients; ``shifts``: index -> per-element allowance for shift_rounding()."""
    assert len(names) == len(golden) == len(eager) == len(other)
    failures = []
    for i, (name, g, e, c) in enumerate(zip(names, golden, eager, other)):
        eager_err = (e - g).abs().max().item()
        atol = (ATOL if i < n_inputs else PARAM_ATOL)[dtype]
        bound = FUDGE[dtype] * eager_err + atol * max(1.0, g.abs().max().item()) + (shifts or {}).get(i, 0.0)
        excess = (c - g).abs() - bound
        if not (excess <= 0).all():
            at = excess.argmax()
            failures.append(f"{name}: error {(c - g).abs().flatten()[at].item():.3g} > "
                            f"{torch.as_tensor(bound).broadcast_to(g.shape).flatten()[at].item():.3g} "
                            f"(max|golden| {g.abs().max().item():.3g})")
    assert not failures, "; ".join(failures)


def assert_within_policy(dtype, names, golden, eager, other, shifts):
    assert_errors_within_policy(dtype, names, golden, eager, other, shifts)
    assert torch.equal(other[0][1], torch.zeros_like(other[0][1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_forward_backward_against_golden(dtype):
    """PyTorch's policy: golden float64, eager (chunked) and compiled flex in the test dtype."""
    assert_within_policy(dtype, *golden_eager_candidate(modules, dtype, "flex"))


def test_flex_default_positions_against_golden():
    """Without positions ALiBi and DPB read no position tables (distances from token indices)."""
    dtype = torch.bfloat16
    assert_within_policy(dtype, *golden_eager_candidate(modules, dtype, "flex", default_positions=True))


def test_flex_frozen_affine_dpb_against_golden():
    dtype = torch.bfloat16
    assert_within_policy(dtype, *golden_eager_candidate(frozen_affine_modules, dtype, "flex"))


def test_flex_grouped_query_heads_against_golden():
    """Two key/value heads for four query heads: flex's own enable_gqa, forward and backward."""
    dtype = torch.bfloat16
    assert_within_policy(dtype, *golden_eager_candidate(modules, dtype, "flex", kv_heads=2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_xl_wide_features_take_the_chunked_backend(dtype):
    """XL appends dim + 1 = 257 features (head dim 321 > 256): 'auto' runs it chunked on CUDA."""
    assert_within_policy(dtype, *golden_eager_candidate(xl_modules, dtype, "auto"))


def test_no_recompile_when_length_changes():
    """Static sizes first; from the second length on, symbolic: no further compiles."""
    from torch._dynamo.utils import counters

    alibi = ALiBi(H).to(DEV)
    for i, length in enumerate((1000, 1500, 2048, 4000)):
        q, k, v = (torch.randn(2, H, length, D, device=DEV, dtype=torch.bfloat16) for _ in range(3))
        with torch.no_grad():
            flexpos.attention(q, k, v, alibi, pos=torch.rand(2, length, device=DEV).cumsum(-1))
        if i == 1:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs


def test_layer_inside_the_callers_torch_compile_trains():
    """A model compiled by its user (flex fused into the user's graph), against the float64
    chunked golden, with the eager chunked layer in float32 as the yardstick."""
    from flexpos import AttentionLayer

    torch.manual_seed(0)
    layers = {}
    for name, backend in (("golden", "chunked"), ("eager", "chunked"), ("compiled", "auto")):
        layers[name] = AttentionLayer(H * D, H, positional=modules(), backend=backend).to(DEV)
        layers[name].load_state_dict(layers["golden"].state_dict())
    layers["golden"].double()
    x = torch.randn(2, 1000, H * D, device=DEV)
    pos = torch.randint(0, 20_000, (2, 999), device=DEV).sort(-1).values
    valid = torch.rand(2, 1000, device=DEV) > 0.2
    compiled = torch.compile(layers["compiled"])
    results = []
    for model, name in ((layers["golden"], "golden"), (layers["eager"], "eager"), (compiled, "compiled")):
        # detach(): x.to(float32) would be x itself, and every float32 run's gradient would add
        # into one x.grad
        xin = x.detach().to(torch.float64 if name == "golden" else torch.float32).requires_grad_()
        out = model(xin, pos=pos, mask=valid)
        out.square().sum().backward()  # sum, not mean: gradients of order 1 for ATOL to bite
        results.append([out.double(), xin.grad.double()] + [p.grad.double() for p in layers[name].parameters()])
    names = ["out", "dx"] + [n for n, _ in layers["golden"].named_parameters()]
    assert_errors_within_policy(torch.float32, names, *results, n_inputs=2)


@pytest.mark.parametrize("backend, dtype", [("flex", torch.bfloat16), ("chunked", torch.float32)])
def test_cuda_graph_replays_attention(backend, dtype):
    """flexpos.attention captured in a CUDA graph (warm-up on a side stream and capture, both in
    no_host_reads, so that the capture launches the kernels the warm-up compiled) and replayed on
    new q, k, v: the eager call's output (which reads positions' extents and takes cheaper
    score_mods with the same numbers) within the dtype's tolerance."""
    b, length = 2, 1000
    pos = torch.randint(0, 20_000, (b, length - 1), device=DEV).sort(-1).values
    mask = flexpos.padding_mask(torch.rand(b, length, device=DEV) > 0.2, length)
    mods = [m.to(DEV).requires_grad_(False) for m in modules()]
    static = [torch.randn(b, H, length, D, device=DEV, dtype=dtype) for _ in range(3)]

    def call():
        return flexpos.attention(*static, *mods, pos=pos, mask=mask, backend=backend)

    graph = torch.cuda.CUDAGraph()
    with flexpos.no_host_reads(), torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                call()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            out = call()
    fresh = [torch.randn_like(t) for t in static]
    for buffer, new in zip(static, fresh):
        buffer.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    with torch.no_grad():
        expected = flexpos.attention(*fresh, *mods, pos=pos, mask=mask, backend=backend)
    assert (out.double() - expected.double()).abs().max() <= ATOL[dtype] * max(1.0, expected.abs().max().item())


def test_shared_masks_are_kept_per_gpu():
    """'cuda' means the current GPU: its masks are those of 'cuda:<index>', not another GPU's."""
    here = f"cuda:{torch.cuda.current_device()}"
    assert flexpos.full_mask(300, 300, "cuda") is flexpos.full_mask(300, 300, here)
    assert flexpos.causal_mask(300, device="cuda") is flexpos.causal_mask(300, device=here)
    assert flexpos.full_mask(300, 300, "cuda").kv_num_blocks.device == torch.device(here)


def test_forward_mode_ad_matches_the_cpu():
    """torch.func.jvp with 'auto' (the chunked backend in forward mode) and compiled transforms
    switched on, tangents on q and positions, float64: the product computed on the CPU."""
    length = 300
    q, k, v, dq = (torch.randn(2, H, length, D, dtype=torch.float64) for _ in range(4))
    pos = torch.rand(2, length, dtype=torch.float64).cumsum(-1) * 10
    dpos = torch.randn_like(pos)
    mods = [m.double() for m in modules()]

    def product(device):
        moved = [m.to(device) for m in mods]
        attend = lambda q, pos: flexpos.attention(q, k.to(device), v.to(device), *moved, pos=pos, causal=True)  # noqa: E731
        return torch.func.jvp(attend, (q.to(device), pos.to(device)), (dq.to(device), dpos.to(device)))[1].cpu()

    previous = flexpos.set_compile(True)
    try:
        on_gpu = product(DEV)
    finally:
        flexpos.set_compile(previous)
    assert torch.allclose(on_gpu, product("cpu"), atol=1e-9, rtol=0)


def test_training_after_an_inference_pass_at_the_same_length():
    """A validation pass under inference_mode first: its shared masks hold inference tensors,
    which flex's autograd could not save for a later training step at that length."""
    layer = flexpos.AttentionLayer(H * D, H, positional=[ALiBi(H)]).to(DEV)
    x = torch.randn(2, 300, H * D, device=DEV)
    with torch.inference_mode():
        layer(x)
        layer(x, causal=True)
    for causal in (False, True):
        layer(x.requires_grad_(), causal=causal).square().mean().backward()
        assert x.grad is not None and x.grad.isfinite().all()
        x.grad = None


def rotated_reference(x, pos, thetas, divide):
    """x (2, 2, H, L, D) rotated in float64 at pos (2, 2, L') (CLS tokens first), and the
    float64 leaf it came from."""
    leaf = x.detach().double().requires_grad_()
    p, has = (t.to(DEV) for t in R.padded_positions(pos.flatten(0, 1).cpu(), 4, x.shape[-2]))
    flat = R.rotate(leaf.flatten(0, 1), p, has, thetas.double(), divide)
    return flat.unflatten(0, x.shape[:2]), leaf


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_takes_the_triton_kernel(dtype, monkeypatch, compiled):
    """Rotary on CUDA: a fixed divisor takes flexpos.rotary_triton (self- and cross-attention
    positions, extra batch dims, grouped keys, CLS tokens), forward and backward within a
    rounding step of the float64 rotation; a learned divisor that trains takes the compiled
    table (its gradient as the float64 one's), one under no_grad the kernel."""
    rotary_triton = pytest.importorskip("flexpos.rotary_triton")
    real, calls = rotary_triton.rotate, []
    monkeypatch.setattr(rotary_triton, "rotate", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 4, 300, D, generator=gen).to(DEV, dtype).requires_grad_()
    k_self, k = (torch.randn(2, 2, 2, n, D, generator=gen).to(DEV, dtype).requires_grad_() for n in (300, 200))
    pos_q, pos_k = ((torch.rand(2, 2, n, generator=gen, dtype=torch.float64).cumsum(-1) * 40).to(DEV) for n in (297, 197))
    for name, kwargs in (("self", {"pos": pos_q}), ("cross", {"pos_q": pos_q, "pos_k": pos_k})):
        rot = Rotary(D, divide=3.0).to(DEV)
        x_k, p_k = (k_self, pos_q) if name == "self" else (k, pos_k)
        calls.clear()
        out_q, out_k = rot(q, x_k, **kwargs)
        assert calls, name
        grads = [torch.randn_like(out_q), torch.randn_like(out_k)]
        got = torch.autograd.grad((out_q, out_k), (q, x_k), grads)
        for out, x, p, grad, dx in ((out_q, q, pos_q, grads[0], got[0]), (out_k, x_k, p_k, grads[1], got[1])):
            want, leaf = rotated_reference(x, p, rot.thetas, 3.0)
            want.backward(grad.double())
            assert ((out.double() - want).abs() <= rotation_tolerance(want, x, dtype)).all(), name
            assert ((dx.double() - leaf.grad).abs() <= rotation_tolerance(leaf.grad, grad, dtype)).all(), name

    learned = Rotary(D, divide=3.0, learned_div=True).to(DEV)
    calls.clear()
    out_q, out_k = learned(q, k, pos_q=pos_q, pos_k=pos_k)
    assert not calls
    weights = [torch.randn_like(out) for out in (out_q, out_k)]  # |rotated x|^2 would not see the angle
    ((out_q * weights[0]).float().sum() + (out_k * weights[1]).float().sum()).backward()
    div = torch.tensor(3.0, dtype=torch.float64, device=DEV, requires_grad=True)
    want = [rotated_reference(x, p, learned.thetas, div)[0] for x, p in ((q, pos_q), (k, pos_k))]
    sum((w * c.double()).sum() for w, c in zip(want, weights)).backward()
    # learned_div holds log(divide): d/d log(div) = div * d/d div
    assert torch.allclose(learned.div.grad.double(), div.grad * 3.0, rtol=1e-3), (learned.div.grad, div.grad * 3.0)
    with torch.no_grad():
        calls.clear()
        learned(q, k, pos_q=pos_q, pos_k=pos_k)
        assert calls
