"""AttentionLayer: projections + all three stages, self and cross, extra batch dims."""

import pytest
import torch
from einops import rearrange
from torch._dynamo.utils import counters

import flexpos
import reference as R
from support import TOLERANCE, needs_cpu_flex
from flexpos import DPB, XL, ALiBi, AttentionLayer, LearnedContinuous, Rotary, Sinusoidal
from flexpos._compile import torch_version

F64 = torch.float64
DIM, H = 32, 4


def project(layer, x, context):
    heads = lambda t: rearrange(t, "... l (h d) -> ... h l d", h=H)  # noqa: E731
    k, v = layer.to_kv(context).chunk(2, -1)
    return heads(layer.to_q(x)), heads(k), heads(v)


def finish(layer, out):
    return layer.to_out(rearrange(out, "... h l d -> ... l (h d)"))


def test_self_attention_with_three_stages_and_extra_batch_dims():
    sin, rot, alibi = Sinusoidal(DIM), Rotary(DIM // H), ALiBi(H)
    layer = AttentionLayer(DIM, H, positional=[sin, rot, alibi]).double()
    x = torch.randn(2, 3, 40, DIM, dtype=F64)
    pos = torch.rand(2, 3, 38, dtype=F64).cumsum(-1) * 10
    valid = torch.rand(2, 3, 40) > 0.2
    out = layer(x, pos=pos, mask=valid)

    flat_pos = pos.reshape(6, 38)
    p, has = R.padded_positions(flat_pos, 6, 40)
    x_in = x.reshape(6, 40, DIM).clone()
    x_in[:, 2:] += R.sinusoid64(flat_pos, sin.inv_freq)
    q, k, v = project(layer, x_in, x_in)
    q, k = (R.rotate(t, p, has, rot.thetas, 1.0) for t in (q, k))
    bias = R.alibi_bias(H, p, p, has, has)
    ref = finish(layer, R.attend(q, k, v, bias, valid.reshape(6, 1, 1, 40)))
    assert (out.reshape(6, 40, DIM) - ref).abs().max() <= TOLERANCE[F64]


def test_cross_attention_positions_and_encoded_context():
    """Input transforms encode x with pos and the context with pos_context."""
    sin, alibi = Sinusoidal(DIM, divide=5.0), ALiBi(H, divide=2.0)
    layer = AttentionLayer(DIM, H, positional=[sin, alibi]).double()
    x, context = torch.randn(2, 25, DIM, dtype=F64), torch.randn(2, 60, DIM, dtype=F64)
    pos_x, pos_c = torch.rand(2, 25, dtype=F64) * 100, torch.rand(2, 60, dtype=F64) * 100
    out = layer(x, context, pos=pos_x, pos_context=pos_c)
    x_in = x + R.sinusoid64(pos_x / 5.0, sin.inv_freq)
    c_in = context + R.sinusoid64(pos_c / 5.0, sin.inv_freq)
    q, k, v = project(layer, x_in, c_in)
    px, hx = R.padded_positions(pos_x, 2, 25)
    pc, hc = R.padded_positions(pos_c, 2, 60)
    ref = finish(layer, R.attend(q, k, v, R.alibi_bias(H, px, pc, hx, hc, divide=2.0)))
    assert (out - ref).abs().max() <= TOLERANCE[F64]


def test_input_transforms_alone_leave_a_context_without_positions_as_it_is():
    """Only attention's modules need positions on both sides (tests/test_errors.py)."""
    sin = Sinusoidal(DIM, divide=5.0)
    layer = AttentionLayer(DIM, H, positional=[sin]).double()
    x, context = torch.randn(2, 25, DIM, dtype=F64), torch.randn(2, 60, DIM, dtype=F64)
    pos_x = torch.rand(2, 25, dtype=F64) * 100
    out = layer(x, context, pos=pos_x)
    q, k, v = project(layer, x + R.sinusoid64(pos_x / 5.0, sin.inv_freq), context)
    assert (out - finish(layer, R.attend(q, k, v))).abs().max() <= TOLERANCE[F64]


def test_causal_self_attention():
    rot, alibi = Rotary(DIM // H), ALiBi(H)
    layer = AttentionLayer(DIM, H, positional=[rot, alibi]).double()
    x, pos = torch.randn(2, 40, DIM, dtype=F64), torch.rand(2, 40, dtype=F64).cumsum(-1) * 10
    out = layer(x, pos=pos, causal=True)
    p, has = R.padded_positions(pos, 2, 40)
    q, k, v = project(layer, x, x)
    q, k = (R.rotate(t, p, has, rot.thetas, 1.0) for t in (q, k))
    keep = torch.ones(40, 40, dtype=torch.bool).tril()[None, None]
    ref = finish(layer, R.attend(q, k, v, R.alibi_bias(H, p, p, has, has), keep))
    assert (out - ref).abs().max() <= TOLERANCE[F64]


def test_empty_batches_sequences_and_contexts():
    """Any of B, *, L and Lc may be 0: x's shape back, gradients (zeros) for every parameter;
    with an empty context every query has no key, so attention gives zeros."""
    mods = [Sinusoidal(DIM), LearnedContinuous(DIM), Rotary(DIM // H), ALiBi(H), DPB(16, H), XL(DIM, H)]
    layer = AttentionLayer(DIM, H, positional=mods).double()
    for shape in [(0, 40), (2, 0), (2, 3, 0)]:
        x = torch.randn(*shape, DIM, dtype=F64)
        out = layer(x, pos=torch.rand(shape, dtype=F64), mask=torch.rand(shape) > 0.2, causal=True)
        assert out.shape == x.shape
        out.sum().backward()
        assert all(p.grad is not None and p.grad.eq(0).all() for p in layer.parameters())
        layer.zero_grad(set_to_none=True)
    x, context = torch.randn(2, 40, DIM, dtype=F64), torch.randn(2, 0, DIM, dtype=F64)
    out = layer(x, context, pos=torch.rand(2, 40, dtype=F64), pos_context=torch.rand(2, 0, dtype=F64))
    assert torch.equal(out, layer.to_out(torch.zeros_like(x)))


def test_layer_trains_on_cpu():
    layer = AttentionLayer(DIM, H, positional=[Rotary(DIM // H, learned_div=True), ALiBi(H, learned_div=True)])
    x = torch.randn(2, 50, DIM)
    layer(x, pos=torch.rand(2, 50) * 30, causal=True).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize("joins", [False, True], ids=["cpu", "traced-as-on-accelerators"])
def test_a_layer_inside_the_callers_torch_compile(joins, monkeypatch):
    """A model compiled by its user: same outputs and gradients as eager (graph breaks allowed),
    with flexpos.attention run as in eager calls (as on CPU) and traced into the caller's graph
    (as on accelerators),
    also at a second length, where Dynamo makes the lengths symbolic (Inductor then failed on
    the mask's tile count written as -(-L // 128): "Exponent must be non-negative"). Symbolic
    lengths need torch >= 2.9 on CPU: Inductor in 2.6.0 and 2.7.1 fails to build that graph
    (2.6: a C++ compile error in its vectorised int32 -> int64 conversion); traced into the
    caller's graph, >= 2.13 (2.11.0 fails to build its C++: "'tmp6' was not declared"; 2.12 not
    tried).
    The first queries have no key (causal, the first keys masked): the chunked backend zeroes
    their rows without reading back whether a chunk has any, which would break the graph at
    every chunk (with a warning from Dynamo each time)."""
    import flexpos._compile

    monkeypatch.setattr(flexpos._compile, "joins_callers_graph", lambda *where: joins)
    torch.manual_seed(0)
    layer = AttentionLayer(DIM, H, positional=[Rotary(DIM // H), ALiBi(H)])
    compiled = torch.compile(layer)
    item_breaks = _item_graph_breaks()
    for length in (300, 200) if torch_version() >= ((2, 13) if joins else (2, 9)) else (300,):
        x = torch.randn(2, length, DIM, requires_grad=True)
        pos = torch.rand(2, length).cumsum(-1) * 10
        valid = torch.rand(2, length) > 0.2
        valid[:, :3] = False
        got = compiled(x, pos=pos, mask=valid, causal=True)
        (got_grad,) = torch.autograd.grad(got.square().sum(), x)
        want = layer(x, pos=pos, mask=valid, causal=True)
        (want_grad,) = torch.autograd.grad(want.square().sum(), x)
        assert (got - want).abs().max() <= TOLERANCE[torch.float32]
        assert (got_grad - want_grad).abs().max() <= 10 * TOLERANCE[torch.float32]
    assert _item_graph_breaks() == item_breaks


def test_no_item_graph_break_without_a_score_mod_inside_the_callers_torch_compile():
    """CPU inference, Rotary alone (no score_mod): the read of whether every tile is full
    breaks the graph as the chunk plan's read does, without Dynamo's Tensor.item() warning."""
    layer = AttentionLayer(DIM, H, positional=[Rotary(DIM // H)])
    compiled = torch.compile(layer, backend="eager")
    item_breaks = _item_graph_breaks()
    with torch.no_grad():
        x, pos = torch.randn(2, 60, DIM), torch.rand(2, 60).cumsum(-1)
        assert (compiled(x, pos=pos) - layer(x, pos=pos)).abs().max() <= TOLERANCE[torch.float32]
    assert _item_graph_breaks() == item_breaks


def _item_graph_breaks() -> int:
    """Graph breaks Dynamo has counted at ``Tensor.item()`` (``bool(t)`` included) so far."""
    return sum(n for reason, n in counters["graph_break"].items() if "Tensor.item()" in reason)


@pytest.mark.parametrize(
    "backend",
    [
        "eager",
        pytest.param("inductor", marks=pytest.mark.skipif(
            torch_version() < (2, 7), reason="torch 2.6's Dynamo: 'SpeculationLog diverged' at a buffer registered in compiled code")),
    ],
)
def test_modules_built_inside_the_callers_torch_compile(backend):
    """Modules built in compiled code, as in ``attention(q, k, v, ALiBi(H), ...)`` inside a
    compiled forward: their fixed divisors hold their values (built empty and filled in place
    across the constructor's graph breaks, they kept whatever memory they were given: often 0,
    and ALiBi's biases NaN)."""
    torch._dynamo.reset()
    q = torch.randn(2, H, 150, 16)
    pos = torch.rand(2, 150).cumsum(-1) * 10

    def build_and_attend(q: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mods = [Rotary(16, divide=3.0), Sinusoidal(DIM, divide=5.0), XL(DIM, H, divide=7.0), DPB(8, H, divide=11.0)]
        divisors = torch.stack([m.divisor(torch.float64) for m in mods])
        return divisors, flexpos.attention(q, q, q, ALiBi(H, divide=13.0), pos=pos)

    with torch.no_grad():
        divisors, got = torch.compile(build_and_attend, backend=backend)(q, pos)
        want = flexpos.attention(q, q, q, ALiBi(H, divide=13.0), pos=pos)
    assert divisors.tolist() == [3.0, 5.0, 7.0, 11.0]
    assert (got - want).abs().max() <= TOLERANCE[torch.float32]


def test_inference_inside_the_callers_dynamic_torch_compile():
    """torch.compile(dynamic=True): symbolic sizes from the first call. Traced into the caller's
    graph, CPU inference failed in Inductor ("Exponent must be non-negative", on the chunks'
    symbolic bounds); flexpos.attention runs outside that graph there, as in training."""
    layer = AttentionLayer(DIM, H, positional=[Rotary(DIM // H), ALiBi(H)])
    compiled = torch.compile(layer, dynamic=True)
    with torch.no_grad():
        for length in (150, 90):
            x, pos = torch.randn(2, length, DIM), torch.rand(2, length).cumsum(-1) * 10
            got, want = compiled(x, pos=pos), layer(x, pos=pos)
            assert (got - want).abs().max() <= TOLERANCE[torch.float32]


def test_the_callers_torch_compile_does_not_recompile_for_new_lengths():
    """After Dynamo marks the length dynamic (its second call), new lengths reuse the graphs:
    no check pins a symbolic length to its value. Lengths stay above one 128-block (a single
    block specialises, by Dynamo's design)."""
    layer = AttentionLayer(DIM, H, positional=[Sinusoidal(DIM), ALiBi(H)])
    compiled = torch.compile(layer, backend="eager")
    with torch.no_grad():
        for i, length in enumerate((200, 150, 170, 231)):
            x, pos = torch.randn(2, length, DIM), torch.rand(2, length - 1).cumsum(-1)
            compiled(x, pos=pos, mask=torch.rand(2, length) > 0.2)
            if i == 1:
                graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.skipif(not hasattr(torch.compiler, "is_exporting"), reason="torch.export cannot be told apart before 2.7")
def test_torch_export_of_a_layer_on_the_default_backend():
    """torch.export (non-strict, static shapes) of a layer with six schemes (all but LearnedVocab),
    a key padding mask and causal: the exported program reads nothing back to the host, so it must
    give the eager outputs and gradients for other values of the same shapes."""
    torch.manual_seed(0)
    mods = [Sinusoidal(DIM), LearnedContinuous(DIM), Rotary(DIM // H), ALiBi(H), DPB(16, H, divide=5.0)]
    layer = AttentionLayer(DIM, H, positional=[*mods, XL(DIM, H)])

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, x: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
            return self.layer(x, pos=pos, mask=valid, causal=True)

    def draw():
        return torch.randn(2, 300, DIM), torch.rand(2, 299).cumsum(-1) * 10, torch.rand(2, 300) > 0.2

    model = Model()
    exported = torch.export.export(model, draw(), strict=False).module()
    for args in (draw(), draw()):  # other positions, masks and spans than those traced
        x = args[0].requires_grad_()
        got = exported(x, *args[1:])
        (got_grad,) = torch.autograd.grad(got.square().sum(), x)
        want = model(*args)
        (want_grad,) = torch.autograd.grad(want.square().sum(), x)
        assert (got - want).abs().max() <= TOLERANCE[torch.float32]
        assert (got_grad - want_grad).abs().max() <= 10 * TOLERANCE[torch.float32]


@needs_cpu_flex
def test_flex_inside_the_callers_torch_compile_is_one_graph(monkeypatch):
    """With backend='flex', a caller's torch.compile captures Rotary + ALiBi + DPB attention as
    one graph, with no graph break: flexpos' value checks, DPB's span read and its own compiled
    flex step aside.
    Traced by Dynamo and AOTAutograd without Inductor, as flexpos traces on CUDA (on CPU flexpos.attention
    runs outside the caller's graph: tested below)."""
    import flexpos._compile

    monkeypatch.setattr(flexpos._compile, "joins_callers_graph", lambda *where: True)
    torch.manual_seed(0)
    layer = AttentionLayer(128, H, positional=[Rotary(128 // H), ALiBi(H), DPB(16, H, divide=50.0)], backend="flex")
    x = torch.randn(2, 300, 128)
    pos = torch.rand(2, 300).cumsum(-1) * 10
    breaks, graphs = sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]
    with torch.no_grad():
        got = torch.compile(layer, backend="aot_eager")(x, pos=pos, causal=True)
        assert sum(counters["graph_break"].values()) == breaks
        assert counters["stats"]["unique_graphs"] == graphs + 1
        layer.backend = "chunked"
        want = layer(x, pos=pos, causal=True)
    assert (got - want).abs().max() <= TOLERANCE[torch.float32]


@needs_cpu_flex
def test_flex_on_cpu_inside_the_callers_inductor_compile():
    """On CPU, backend='flex' inside a caller's torch.compile (Inductor) runs as in eager calls,
    with flexpos' own compiled flex, outside the caller's graph: Inductor's CPU flex kernel
    (torch 2.13) fails there on ALiBi's and DPB's tables (NoValidChoicesError), on q from a
    projection, and on tables sized by dynamic lengths. Grouped-query heads, a CLS token and
    causal masking, at two lengths (the second one dynamic), against the chunked backend."""
    torch.manual_seed(0)
    positional = [Rotary(64 // H), ALiBi(H), DPB(16, H, depth=2, divide=50.0)]
    layer = AttentionLayer(64, H, n_kv_heads=H // 2, positional=positional, backend="flex").eval()
    compiled = torch.compile(layer)
    breaks = sum(counters["graph_break"].values())
    with torch.no_grad():
        for length in (200, 300):
            x, pos = torch.randn(2, length, 64), torch.rand(2, length - 1).cumsum(-1) * 10
            got = compiled(x, pos=pos, causal=True)
            layer.backend = "chunked"
            want = layer(x, pos=pos, causal=True)
            layer.backend = "flex"
            assert (got - want).abs().max() <= TOLERANCE[torch.float32]
    assert sum(counters["graph_break"].values()) > breaks


def test_positional_modules_from_a_generator_are_all_kept():
    modules = [Rotary(DIM // H), ALiBi(H)]
    from_list = AttentionLayer(DIM, H, positional=modules)
    from_generator = AttentionLayer(DIM, H, positional=(m for m in modules))
    from_generator.load_state_dict(from_list.state_dict())
    assert len(from_generator.positional) == 2
    x, pos = torch.randn(2, 30, DIM), torch.rand(2, 30) * 50
    assert torch.equal(from_generator(x, pos=pos), from_list(x, pos=pos))


def test_self_attention_reads_positions_once_per_stage_that_needs_them(monkeypatch):
    """The layer's own check leaves the values of self-attention positions to the stages that
    read them anyway (each read back is a sync on GPUs); in cross-attention it checks them
    under the caller's names."""
    import flexpos._checks
    import flexpos.positions

    calls = []

    def counted(read):
        return lambda name, p: calls.append(name) or read(name, p)

    for module in (flexpos._checks, flexpos.positions):
        monkeypatch.setattr(module, "read_positions", counted(module.read_positions))
    x, pos = torch.randn(2, 20, DIM), torch.rand(2, 20).cumsum(-1)
    with torch.no_grad():
        AttentionLayer(DIM, H, positional=[ALiBi(H)])(x, pos=pos)
        assert calls == ["pos"]
        AttentionLayer(DIM, H, positional=[Sinusoidal(DIM), ALiBi(H)])(x, pos=pos)
        assert calls == ["pos"] * 3
        calls.clear()
        AttentionLayer(DIM, H, positional=[ALiBi(H)])(x, torch.randn(2, 7, DIM), pos=pos, pos_context=pos[:, :7])
        assert calls == ["pos", "pos_context", "pos_q", "pos_k"]
