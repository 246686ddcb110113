"""flexpos under the autograd machinery users wrap around it: torch.func transforms, forward-mode
AD, double backward, and a caller's choice of SDPA kernel (float64 references, chunked backend)."""

import pytest
import reference as R
import torch
import torch.autograd.forward_ad as fwAD
from support import TOLERANCE
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

import flexpos
from flexpos import (
    DPB,
    XL,
    ALiBi,
    AttentionLayer,
    LearnedContinuous,
    Rotary,
    Sinusoidal,
)

B, H, L, D = 1, 2, 9, 4
F64 = torch.float64


def qkv():
    return [torch.randn(B, H, L, D, dtype=F64) for _ in range(3)]


def irregular():
    return torch.rand(B, L, dtype=F64).cumsum(-1) * 10


CASES = {
    "no module": lambda: ((), None),
    "key mask": lambda: ((), torch.tensor([[True, False, True, True, False, True, True, True, True]])),
    "alibi": lambda: ((ALiBi(H),), None),
    "dpb": lambda: ((DPB(8, H).double(),), None),
    "rotary": lambda: ((Rotary(D),), None),
    "xl": lambda: ((XL(H * D, H).double(),), None),
}


class Heads(torch.nn.Module):
    def __init__(self, *mods):
        super().__init__()
        self.mods = torch.nn.ModuleList(mods)

    def forward(self, q, k, v, pos, mask=None):
        return flexpos.attention(q, k, v, *self.mods, pos=pos, mask=mask)


@pytest.mark.parametrize("case", sorted(CASES))
def test_torch_func_grad_and_grad_of_grad_equal_autograd(case):
    """torch.func.grad (it refuses checkpoint's hooks, which the chunked backend recomputes
    chunks with) and grad of grad, against torch.autograd with create_graph."""
    mods, mask = CASES[case]()
    q, k, v = qkv()
    pos = irregular()

    def loss(q):
        return flexpos.attention(q, k, v, *mods, pos=pos, mask=mask).sin().sum()

    first = grad(loss)(q)
    second = grad(lambda q: grad(loss)(q).square().sum())(q)
    leaf = q.clone().requires_grad_()
    with sdpa_kernel(SDPBackend.MATH):  # SDPA's CPU flash kernel has no double backward
        (g,) = torch.autograd.grad(loss(leaf), leaf, create_graph=True)
        (h,) = torch.autograd.grad(g.square().sum(), leaf)
    assert torch.allclose(first, g, atol=1e-12, rtol=0)
    assert torch.allclose(second, h, atol=1e-10, rtol=0)


@pytest.mark.parametrize("case", ["alibi", "dpb", "key mask"])
def test_vmap_over_queries_only(case):
    """vmap with only q batched: the chunks are batched, the default output buffer is not."""
    mods, mask = CASES[case]()
    q, k, v = qkv()
    pos = irregular()
    stacked = torch.stack([q, 2 * q, -q])
    out = vmap(lambda q: flexpos.attention(q, k, v, *mods, pos=pos, mask=mask))(stacked)
    for i in range(3):
        assert torch.allclose(out[i], flexpos.attention(stacked[i], k, v, *mods, pos=pos, mask=mask), atol=1e-12)


@pytest.mark.parametrize("scheme", ["alibi", "dpb"])
def test_vmap_over_a_learned_divisor(scheme):
    """An ensemble of divisors through functional_call: rows without a key are found without
    reading values back (vmap cannot branch on them), and DPB's bias needs gradients."""
    module = ALiBi(H, learned_div=True) if scheme == "alibi" else DPB(8, H, learned_div=True).double()
    model = Heads(module)
    q, k, v = qkv()
    pos = irregular()
    div = module.div.detach().clone()
    out = vmap(lambda d: functional_call(model, {"mods.0.div": d}, (q, k, v, pos)))(torch.stack([div, div + 1]))
    for i, value in enumerate((div, div + 1)):
        with torch.no_grad():
            module.div.copy_(value)
            assert torch.allclose(out[i], model(q, k, v, pos), atol=1e-12)


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradgradcheck_under_the_math_kernel(case):
    mods, mask = CASES[case]()
    q, k, v = (t.requires_grad_() for t in qkv())
    pos = irregular()
    with sdpa_kernel(SDPBackend.MATH):
        assert torch.autograd.gradgradcheck(
            lambda q, k, v: flexpos.attention(q, k, v, *mods, pos=pos, mask=mask), (q, k, v)
        )


def test_backward_after_the_sdpa_kernel_block_has_ended():
    """The chunked backend recomputes chunks in backward with the SDPA kernels of the forward
    pass (another kernel saves other tensors: checkpoint raised CheckpointError)."""
    q, k, v = (t.requires_grad_() for t in qkv())
    pos = irregular()
    with sdpa_kernel(SDPBackend.MATH):
        out = flexpos.attention(q, k, v, ALiBi(H), pos=pos)
    out.sum().backward()
    got = [t.grad for t in (q, k, v)]
    p, has = R.padded_positions(pos, B, L)
    want = torch.autograd.grad(R.attend(q, k, v, R.alibi_bias(H, p, p, has, has)).sum(), (q, k, v))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_torch_func_after_a_nested_transform(causal):
    """A Hessian-vector product (jvp of grad) is the first call at its lengths: the full or
    causal mask it needs is built inside both transforms and must not be memoised for later
    calls (a later grad hit PyTorch's internal assert on the escaped wrapper)."""
    length = 23  # a length no other test memoises a mask for
    q, k, v = (torch.randn(B, H, length, D, dtype=F64) for _ in range(3))
    loss = lambda q: flexpos.attention(q, k, v, causal=causal).sin().sum()  # noqa: E731
    ref = lambda q: R.attend(q, k, v, keep=torch.ones(length, length, dtype=torch.bool).tril() if causal else None).sin().sum()  # noqa: E731
    tangent = torch.randn_like(q)
    _, hvp = jvp(grad(loss), (q,), (tangent,))
    _, want_hvp = jvp(grad(ref), (q,), (tangent,))
    assert torch.allclose(hvp, want_hvp, atol=1e-10, rtol=0)
    assert torch.allclose(grad(loss)(q), grad(ref)(q), atol=1e-12, rtol=0)


def test_torch_func_with_chunks_the_mask_skips(monkeypatch):
    """Chunks of 16 queries, the middle 128 queries without any key: under torch.func the chunk
    outputs are concatenated around zeros, as the default path fills its buffer."""
    monkeypatch.setattr(flexpos.chunked, "chunk_rows", lambda *args: 16)
    length = 300
    q, k, v = (torch.randn(B, H, length, D, dtype=F64) for _ in range(3))
    mask = torch.rand(B, length, length) > 0.2
    mask[:, 128:256] = False
    attend = lambda q: flexpos.attention(q, k, v, ALiBi(H), mask=mask)  # noqa: E731
    out = vmap(attend)(torch.stack([q, -q]))
    assert out[:, :, :, 128:256].eq(0).all()
    for i, sign in enumerate((1, -1)):
        assert torch.allclose(out[i], attend(sign * q), atol=1e-12, rtol=0)
    leaf = q.clone().requires_grad_()
    attend(leaf).sin().sum().backward()
    assert torch.allclose(grad(lambda q: attend(q).sin().sum())(q), leaf.grad, atol=1e-12, rtol=0)


@pytest.mark.parametrize("batched", ["pos", "mask"])
def test_vmap_over_positions_or_masks_is_refused_by_name(batched):
    q, k, v = qkv()
    pos, mask = irregular(), torch.rand(B, L) > 0.3
    stacked = {"pos": torch.stack([pos, pos + 1]), "mask": torch.stack([mask, ~mask])}[batched]

    def attend(t):
        kwargs = {"pos": pos, "mask": mask, batched: t}
        return flexpos.attention(q, k, v, ALiBi(H), **kwargs)

    with pytest.raises(ValueError, match=f"{batched} is batched by torch.func.vmap"):
        vmap(attend)(stacked)


def test_vmap_of_grad_where_no_query_has_a_key():
    """Every key masked: zeros and zero gradients, also when vmapped (the zeros get their graph
    out of place)."""
    q, k, v = qkv()
    none, pos = torch.zeros(B, L, dtype=torch.bool), irregular()
    loss = lambda q: flexpos.attention(q, k, v, ALiBi(H), pos=pos, mask=none).sum()  # noqa: E731
    grads = vmap(grad(loss))(torch.stack([q, -q]))
    assert grads.eq(0).all() and grads.shape == (2, *q.shape)


def test_repeated_backward_passes_after_the_sdpa_kernel_block(monkeypatch):
    """Several chunks, each recomputed twice (retain_graph) and once more inside a double
    backward, all after the sdpa_kernel block has ended; the global SDPA flags are restored."""
    monkeypatch.setattr(flexpos.chunked, "chunk_rows", lambda *args: 16)
    length = 150
    q, k, v = (torch.randn(B, H, length, D, dtype=F64, requires_grad=True) for _ in range(3))
    pos = torch.rand(B, length, dtype=F64).cumsum(-1) * 10
    with sdpa_kernel(SDPBackend.MATH):
        out = flexpos.attention(q, k, v, ALiBi(H), pos=pos)
    p, has = R.padded_positions(pos, B, length)
    ref = R.attend(q, k, v, R.alibi_bias(H, p, p, has, has))
    weights = torch.randn_like(out)
    for _ in range(2):
        (g,) = torch.autograd.grad((out * weights).sum(), q, retain_graph=True)
        (want,) = torch.autograd.grad((ref * weights).sum(), q, retain_graph=True)
        assert torch.allclose(g, want, atol=1e-12, rtol=0)
    (g,) = torch.autograd.grad((out * weights).sum(), q, create_graph=True)
    (h,) = torch.autograd.grad(g.square().sum(), k)
    (want,) = torch.autograd.grad(ref, q, weights, create_graph=True)
    (want_h,) = torch.autograd.grad(want.square().sum(), k)
    assert torch.allclose(h, want_h, atol=1e-10, rtol=0)
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()


def _forward_mode(fn, primals, tangents, api):
    """The Jacobian-vector product of ``fn`` at ``primals`` (tensors) along ``tangents``."""
    if api == "torch.func.jvp":
        return jvp(fn, primals, tangents)[1]
    with fwAD.dual_level():
        return fwAD.unpack_dual(fn(*map(fwAD.make_dual, primals, tangents))).tangent


def _jvp_case(case):
    """(model, call(model, *inputs), inputs): attention over q, k, v, positions, or a layer."""
    if case == "layer":
        mods = [Sinusoidal(16), LearnedContinuous(16, divide=3.0), Rotary(16 // H), ALiBi(H), DPB(8, H, learned_div=True)]
        layer = AttentionLayer(16, H, positional=mods).double()
        return layer, lambda model, x, pos: model(x, pos=pos), (torch.randn(B, L, 16, dtype=F64), irregular())
    mods, mask = ((ALiBi(H, learned_div=True), Rotary(D, learned_div=True)), None) if case == "learned divisors" else CASES[case]()
    return Heads(*mods), lambda model, *inputs: model(*inputs, mask=mask), (*qkv(), irregular())


@pytest.mark.parametrize("api", ["torch.func.jvp", "forward_ad"])
@pytest.mark.parametrize("case", [*sorted(CASES), "learned divisors", "layer"])
def test_forward_mode_ad_equals_reverse_mode(case, api, compiled):
    """Tangents on every input (positions included) and every parameter at once, with compiled
    transforms switched on (torch.compile drops tangents, or fails where autograd records too):
    the product against autograd's, formed by double backward (torch.autograd.functional.jvp)."""
    model, call, inputs = _jvp_case(case)
    names = [name for name, _ in model.named_parameters()]
    primals = (*inputs, *(p.detach() for p in model.parameters()))

    def fn(*flat):
        params = dict(zip(names, flat[len(inputs) :]))
        return call(lambda *a, **kw: functional_call(model, params, a, kw), *flat[: len(inputs)])

    tangents = tuple(torch.randn_like(t) for t in primals)
    got = _forward_mode(fn, primals, tangents, api)
    flexpos.set_compile(False)
    with sdpa_kernel(SDPBackend.MATH):  # SDPA's CPU flash kernel has no double backward
        want = torch.autograd.functional.jvp(fn, primals, tangents)[1]
    assert got is not None and want.abs().max() > 0
    assert torch.allclose(got, want, atol=TOLERANCE[F64], rtol=0)


@pytest.mark.parametrize("scheme", ["alibi", "dpb"])
def test_forward_mode_ad_where_parameters_need_gradients(scheme):
    """Parameters that require grad (modules' default), so autograd records too: forward mode
    keeps the chunks (a checkpoint recomputed them in backward outside the dual level, with other
    kernels: CheckpointError). The tangent, the primal's gradients after the dual level, and
    torch.func's gradient of the tangent (grad of jvp), against autograd's double backward."""
    mods = (ALiBi(H, learned_div=True),) if scheme == "alibi" else (DPB(8, H).double(),)
    params = [p for m in mods for p in m.parameters()]
    q, k, v = qkv()
    pos, dq, w = irregular(), torch.randn_like(q), torch.randn_like(q)
    attend = lambda q: flexpos.attention(q, k, v, *mods, pos=pos)  # noqa: E731
    leaf = q.clone().requires_grad_()
    with fwAD.dual_level():
        primal, tangent = fwAD.unpack_dual(attend(fwAD.make_dual(leaf, dq)))
    got = torch.autograd.grad((primal * w).sum(), [leaf, *params])
    with sdpa_kernel(SDPBackend.MATH):  # SDPA's CPU flash kernel has no double backward
        out, want_tangent = torch.autograd.functional.jvp(attend, leaf, dq, create_graph=True)
        want = torch.autograd.grad((out * w).sum(), [leaf, *params], retain_graph=True)
        (want_of_tangent,) = torch.autograd.grad((want_tangent * w).sum(), leaf)
    got_of_tangent = grad(lambda q: (jvp(attend, (q,), (dq,))[1] * w).sum())(q)
    assert torch.allclose(tangent, want_tangent, atol=TOLERANCE[F64], rtol=0)
    for a, b in zip([*got, got_of_tangent], [*want, want_of_tangent]):
        assert torch.allclose(a, b, atol=TOLERANCE[F64], rtol=0)


def test_jacfwd_equals_jacrev():
    mods = (ALiBi(H), DPB(8, H).double())
    k, v = qkv()[1:]
    pos = irregular()
    attend = lambda q: flexpos.attention(q, k, v, *mods, pos=pos, causal=True)  # noqa: E731
    q = qkv()[0]
    assert torch.allclose(jacfwd(attend)(q), jacrev(attend)(q), atol=TOLERANCE[F64], rtol=0)


def test_flex_refuses_forward_mode_ad_by_name():
    q, k, v = qkv()
    with fwAD.dual_level(), pytest.raises(ValueError, match="backend='flex' cannot carry forward-mode AD"):
        flexpos.attention(fwAD.make_dual(q, torch.ones_like(q)), k, v, backend="flex")
