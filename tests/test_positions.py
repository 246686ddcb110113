"""Relative distances: exact for large integer coordinates, float32-accurate for floats."""

import warnings

import pytest
import torch

import flexpos._checks
import flexpos.positions
from flexpos.positions import Positions


def _grid_delta(positions: Positions, dtype=torch.float32):
    rel = positions.relative(dtype)
    b = torch.arange(positions.batch).view(-1, 1, 1)
    qi = torch.arange(positions.len_q).view(1, -1, 1)
    ki = torch.arange(positions.len_k).view(1, 1, -1)
    return rel.distance(b, qi, ki)


def test_genomic_int64_distances_are_exact():
    start = 1_200_000_000
    pos = start + torch.randint(0, 3_000_000, (2, 300)).sort(-1).values
    delta, valid = _grid_delta(Positions.resolve((2,), 300, 300, "cpu", pos=pos))
    expected = (pos[:, :, None] - pos[:, None, :]).double()
    assert valid.all()
    assert torch.equal(delta.double(), expected)
    # the naive float32 route rounds positions to multiples of 128 and is far off
    naive = pos.float()[:, :, None] - pos.float()[:, None, :]
    assert (naive.double() - expected).abs().max() >= 64


def test_each_sequence_may_lie_anywhere_in_int64():
    """The span limit (2**62) holds per sequence: sequences near -2**62 and 2**63 - 1 are far
    apart from each other, and their own distances are exact."""
    pos = torch.tensor([[-(2**62) - 3, -(2**62), -(2**62) + 5], [2**63 - 9, 2**63 - 4, 2**63 - 1]])
    delta, _ = _grid_delta(Positions.resolve((2,), 3, 3, "cpu", pos=pos))
    small = pos - pos[:, :1]  # the same distances, computed from small numbers
    assert torch.equal(delta.double(), (small[:, :, None] - small[:, None, :]).double())


def test_float_distances_have_float32_accuracy_of_the_difference():
    pos = 5e8 + torch.rand(1, 200, dtype=torch.float64).cumsum(-1) * 3.7
    delta, _ = _grid_delta(Positions.resolve((1,), 200, 200, "cpu", pos=pos))
    expected = pos[:, :, None] - pos[:, None, :]
    error = (delta.double() - expected).abs()
    assert (error <= 4e-7 * expected.abs() + 1e-6).all()


def test_missing_positions_are_invalid_and_cross_lengths():
    pos_q = torch.tensor([[5.0, 7.0]])
    pos_k = torch.tensor([[1, 2, 3]])
    positions = Positions.resolve((1,), 4, 5, "cpu", pos_q=pos_q, pos_k=pos_k)
    assert (positions.off_q, positions.off_k) == (2, 2)
    delta, valid = _grid_delta(positions)
    assert valid.sum() == 6 and not valid[0, :2].any() and not valid[0, :, :2].any()
    assert torch.equal(delta[0, 2:, 2:], torch.tensor([[4.0, 3.0, 2.0], [6.0, 5.0, 4.0]]))
    assert float(positions.span_tensor()) == 6.0


def test_extra_batch_dims_are_flattened_and_float64_relative():
    pos = torch.randn(2, 3, 10, dtype=torch.float64)
    positions = Positions.resolve((2, 3), 10, 10, "cpu", pos=pos)
    delta, _ = _grid_delta(positions, torch.float64)
    flat = pos.reshape(6, 10)
    assert torch.allclose(delta, flat[:, :, None] - flat[:, None, :], atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "pos",
    [
        torch.tensor([[-128, 0, 127]], dtype=torch.int8),
        torch.tensor([[10, 200, 255]], dtype=torch.uint8),
        torch.tensor([[-32768, 5, 32767]], dtype=torch.int16),
        torch.tensor([[-(2**31), 2**31 - 9, 2**31 - 1]], dtype=torch.int32),
        torch.tensor([[4.0, 1e8, 1e8 + 8]], dtype=torch.float32),  # float32 spacing at 1e8 is 8
        torch.tensor([[0.5, 2048.0, 2049.0]], dtype=torch.float16),
        torch.tensor([[3.0, 1000.0, 2**20]], dtype=torch.bfloat16),  # 997 is no bfloat16 number
    ],
    ids=["int8", "uint8", "int16", "int32", "float32", "float16", "bfloat16"],
)
def test_narrow_dtypes_give_the_distances_of_their_values(pos):
    """Offsets are subtracted in int64/float64: no overflow, no rounding of the difference."""
    wide = pos.long() if not pos.is_floating_point() else pos.double()
    delta, _ = _grid_delta(Positions.resolve((1,), 3, 3, "cpu", pos=pos), torch.float64)
    assert torch.equal(delta, (wide[:, :, None] - wide[:, None, :]).double())


@pytest.mark.parametrize(
    "dtype, value, spacing", [(torch.float32, 1.2e9, "128"), (torch.float16, 4000.0, "2"), (torch.bfloat16, 1000.0, "4")]
)
def test_narrow_float_positions_past_their_exact_integers_warn_once(dtype, value, spacing, monkeypatch):
    """float32 genomic coordinates were rounded before flexpos got them (to multiples of 128 near
    1.2e9): the first such call in a process says so, naming the dtype's spacing there."""
    monkeypatch.setattr(flexpos._checks, "_warned_rounded", False)
    pos = torch.tensor([[value, value * 1.01]], dtype=dtype)
    with pytest.warns(UserWarning, match=f"pos is {dtype} .* multiples of {spacing}: .* int64 or float64") as record:
        Positions.resolve((1,), 2, 2, "cpu", pos=pos)
    assert record[0].filename == __file__  # the caller's line, not flexpos'
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Positions.resolve((1,), 2, 2, "cpu", pos=pos)


@pytest.mark.parametrize(
    "pos",
    [
        torch.tensor([[-(2.0**24), 2.0**24]]),  # every float32 integer up to 2**24
        torch.tensor([[1.2e9, 1.3e9]], dtype=torch.float64),
        torch.tensor([[1_200_000_000, 1_300_000_000]]),
    ],
    ids=["float32 within 2**24", "float64", "int64"],
)
def test_positions_their_dtype_holds_exactly_do_not_warn(pos, monkeypatch):
    monkeypatch.setattr(flexpos._checks, "_warned_rounded", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Positions.resolve((1,), 2, 2, "cpu", pos=pos)


@pytest.fixture
def accelerator_tables(monkeypatch):
    """Relative tables as built on accelerators (CPU keeps every table: see fewer_tables)."""
    monkeypatch.setattr(flexpos.positions, "fewer_tables", lambda device: True)


def test_default_positions_read_no_tables(accelerator_tables):
    positions = Positions.resolve((2,), 5, 7, "cpu")
    rel = positions.relative()
    assert rel.q_hi is None and rel.k_hi is None and positions.integer_span() == 6
    delta, valid = _grid_delta(positions)
    assert valid.all() and torch.equal(delta[0], (torch.arange(5)[:, None] - torch.arange(7)).float())


@pytest.mark.parametrize("span", [2**24 - 1, 2**24])
def test_integers_less_than_2_24_apart_read_one_part(span, accelerator_tables):
    pos = 3_000_000_000 + torch.tensor([[0, 5, span], [7, 8, 9]])
    positions = Positions.resolve((2,), 4, 4, "cpu", pos=pos)  # one leading token without a position
    rel = positions.relative()
    assert positions.integer_span() == span
    assert (rel.q_lo is None) == (span < 2**24)
    delta, valid = _grid_delta(positions)
    wide = pos[:, :, None] - pos[:, None, :]
    assert torch.equal(delta[:, 1:, 1:].double(), wide.double()) and not valid[:, 0].any()


@pytest.mark.parametrize("q_top", [2**24 - 1, 2**24 + 3])
def test_cross_attention_reads_one_part_only_within_2_24_of_both_sides(q_top, accelerator_tables):
    """Each side's ``hi`` is its positions minus the smallest of both sides: with queries at
    [0, q_top] and keys at 2**23 + 3 the largest distance stays below 2**24 while ``hi`` of the
    last query does not when q_top >= 2**24."""
    start = 3_000_000_000
    pos_q = start + torch.tensor([[0, q_top]])
    pos_k = start + torch.tensor([[2**23 + 3, 2**23 + 3]])
    positions = Positions.resolve((1,), 2, 2, "cpu", pos_q=pos_q, pos_k=pos_k)
    assert positions.integer_span() == max(q_top - 2**23 - 3, 2**23 + 3) < 2**24
    assert (positions.relative().q_lo is None) == (q_top < 2**24)
    delta, _ = _grid_delta(positions)
    assert torch.equal(delta.double(), (pos_q[:, :, None] - pos_k[:, None, :]).double())


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_unsigned_positions_are_read_as_their_values(dtype, accelerator_tables):
    pos = torch.tensor([[3, 70, 1000]])
    positions = Positions.resolve((1,), 3, 3, "cpu", pos=pos.to(dtype))
    assert positions.integer_span() == 997 and positions.relative().q_lo is None
    delta, _ = _grid_delta(positions)
    assert torch.equal(delta.double(), (pos[:, :, None] - pos[:, None, :]).double())


def test_spans_are_not_read_inside_a_callers_compile(accelerator_tables, monkeypatch):
    monkeypatch.setattr(flexpos._checks, "host_reads", lambda: False)
    pos = torch.tensor([[0, 5, 9]])
    positions = Positions.resolve((1,), 3, 3, "cpu", pos=pos)
    assert positions.integer_span() is None and positions.relative().q_lo is not None
    assert Positions.resolve((1,), 3, 3, "cpu").integer_span() == 2  # known from the lengths


def test_float_positions_read_two_parts_except_in_float64(accelerator_tables):
    positions = Positions.resolve((1,), 3, 3, "cpu", pos=torch.tensor([[0.5, 1.0, 2.0]]))
    assert positions.integer_span() is None and positions.relative().q_lo is not None
    assert positions.relative(torch.float64).q_lo is None


def test_cpu_reads_every_table():
    rel = Positions.resolve((1,), 3, 3, "cpu", pos=torch.tensor([[0, 5, 9]])).relative()
    assert rel.q_hi is not None and rel.q_lo is not None


def test_meta_positions_have_no_span_to_read(accelerator_tables):
    pos = torch.zeros(1, 3, dtype=torch.long, device="meta")
    positions = Positions.resolve((1,), 3, 3, torch.device("meta"), pos=pos)
    assert positions.integer_span() is None and positions.relative().q_lo is not None


def test_self_attention_positions_are_read_once(accelerator_tables, monkeypatch):
    """One read back per positions tensor checks its values and gives its extents."""
    read = flexpos.positions.read_positions
    calls = []
    monkeypatch.setattr(flexpos.positions, "read_positions", lambda name, p: calls.append(p) or read(name, p))
    pos = torch.tensor([[3, 9, 20]])
    assert Positions.resolve((1,), 3, 3, "cpu", pos=pos).integer_span() == 17
    assert len(calls) == 1
    assert Positions.resolve((1,), 3, 4, "cpu", pos_q=pos, pos_k=pos).integer_span() == 17
    assert len(calls) == 3  # cross-attention: each side read


def test_integer_positions_off_cpu_are_read_only_when_needed(monkeypatch):
    """Off CPU a read back is a sync: integer positions are read (and checked) where a
    score_mod needs their extents, not for transforms; float positions always (NaN/inf)."""
    calls = []
    monkeypatch.setattr(flexpos.positions, "read_positions", lambda name, p: calls.append(name) or None)
    meta = torch.device("meta")
    ints = Positions.resolve((1,), 3, 3, meta, pos=torch.zeros(1, 3, dtype=torch.long, device="meta"))
    assert calls == []
    ints.integer_span()
    ints.integer_span()
    assert calls == ["pos"]
    Positions.resolve((1,), 3, 4, meta, pos_q=torch.zeros(1, 3, device="meta"), pos_k=torch.zeros(1, 4, device="meta"))
    assert calls == ["pos", "pos_q", "pos_k"]


def test_in_place_changes_of_positions_are_read():
    """Positions are read afresh in every call: an in-place change (a wider span, a NaN) is
    seen by the next call, whatever wrote it (see :func:`flexpos._checks.read_positions`)."""
    pos = torch.tensor([[3, 9, 20]])
    assert Positions.resolve((1,), 3, 3, "cpu", pos=pos).integer_span() == 17
    pos.numpy()[0, 0] = -30  # a write the version counter does not see
    assert Positions.resolve((1,), 3, 3, "cpu", pos=pos).integer_span() == 50
    floats = torch.tensor([[0.5, 1.5]])
    Positions.resolve((1,), 2, 2, "cpu", pos=floats)
    floats.data[0, 1] = float("nan")
    with pytest.raises(ValueError, match="pos must be finite"):
        Positions.resolve((1,), 2, 2, "cpu", pos=floats)


def test_dpb_after_an_in_place_change_of_positions():
    """DPB's exact grid is sized from the extents read: widening the positions in place must
    not reuse the narrower span (its table would end before the new distances), even where the
    write leaves the tensor's version counter as it was."""
    import reference as R
    from support import TOLERANCE

    dpb = flexpos.DPB(8, 2, depth=2).double()
    q, k, v = (torch.randn(1, 2, 4, 8, dtype=torch.float64) for _ in range(3))
    pos = torch.tensor([[0, 1, 2, 3]])
    flexpos.attention(q, k, v, dpb, pos=pos)
    pos.numpy()[0, 3] = 500
    out = flexpos.attention(q, k, v, dpb, pos=pos)
    p, has = R.padded_positions(pos, 1, 4)
    ref = R.attend(q, k, v, R.dpb_bias(dpb, p, p, has, has, 1.0))
    assert (out - ref).abs().max() <= TOLERANCE[torch.float64]


@pytest.fixture
def reads(monkeypatch):
    """A list that gets the positions of each read back (:func:`flexpos._checks._read_rows`)."""
    rows = []
    read = flexpos._checks._read_rows
    monkeypatch.setattr(flexpos._checks, "_read_rows", lambda name, p: rows.append(p) or read(name, p))
    return rows


def test_reuse_position_reads_reads_each_tensor_once_in_the_block(reads):
    pos = torch.tensor([[3, 9, 20]])
    with flexpos.reuse_position_reads():
        for _ in range(3):
            assert Positions.resolve((1,), 3, 3, "cpu", pos=pos).integer_span() == 17
        assert len(reads) == 1
        pos[0, 0] = -30  # in place: the version counter changes, so it is read again
        with flexpos.reuse_position_reads():  # nested: the outer block's reads
            assert Positions.resolve((1,), 3, 3, "cpu", pos=pos).integer_span() == 50
            assert Positions.resolve((1,), 3, 3, "cpu", pos=pos).integer_span() == 50
        assert Positions.resolve((1,), 3, 3, "cpu", pos=pos).integer_span() == 50
        assert len(reads) == 2
        assert Positions.resolve((1,), 3, 3, "cpu", pos=pos.clone()).integer_span() == 50
        assert len(reads) == 3
        with torch.inference_mode():  # no version counter: read in every call
            frozen = torch.tensor([[1, 4]])
        for _ in range(2):
            Positions.resolve((1,), 2, 2, "cpu", pos=frozen)
        assert len(reads) == 5
    assert flexpos._host.kept_reads() is None
    Positions.resolve((1,), 3, 3, "cpu", pos=pos)
    assert len(reads) == 6  # after the block: read again


def test_reuse_position_reads_tells_new_tensors_apart_and_keeps_a_few():
    """Tensors freed in the block and new ones (whose ids may repeat) each get their own
    extents; only the last READS_KEPT tensors are held."""
    with flexpos.reuse_position_reads():
        for i in range(3 * flexpos._checks.READS_KEPT):
            pos = torch.tensor([[0, i + 1]])
            assert Positions.resolve((1,), 2, 2, "cpu", pos=pos).integer_span() == i + 1
            del pos
        assert len(flexpos._host.kept_reads()) == flexpos._checks.READS_KEPT


def test_reuse_position_reads_ends_with_an_error_in_the_block():
    with pytest.raises(RuntimeError, match="inside"):
        with flexpos.reuse_position_reads():
            Positions.resolve((1,), 2, 2, "cpu", pos=torch.tensor([[0, 1]]))
            raise RuntimeError("inside")
    assert flexpos._host.kept_reads() is None


def test_layers_sharing_positions_read_them_once_in_the_block(reads):
    """The same outputs, with one read for a stack of layers instead of one per layer."""
    torch.manual_seed(0)
    dim, heads = 16, 2
    layers = torch.nn.ModuleList(
        flexpos.AttentionLayer(dim, heads, positional=[flexpos.ALiBi(heads), flexpos.DPB(8, heads, depth=2)])
        for _ in range(3)
    ).double()
    x, pos = torch.randn(2, 20, dim, dtype=torch.float64), torch.randint(0, 500, (2, 20)).sort(-1).values

    def model():
        h = x
        for layer in layers:
            h = h + layer(h, pos=pos)
        return h

    with torch.no_grad():
        plain = model()
        assert len(reads) == 3
        with flexpos.reuse_position_reads():
            reused = model()
    assert len(reads) == 4
    assert torch.equal(plain, reused)
