"""BlockMask builders vs dense boolean formulas, tile by tile."""

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask

import flexpos
import flexpos.masks as M
import reference as R
from support import TOLERANCE

LQ, LK = 300, 420


def dense_of(block_mask):
    """(B, H, Lq, Lk) from the BlockMask's own tiles and mask_mod."""
    return block_mask.to_dense().repeat_interleave(128, -1).repeat_interleave(128, -2)[
        ..., : block_mask.seq_lengths[0], : block_mask.seq_lengths[1]
    ].bool() & materialise(block_mask)


def materialise(block_mask):
    lq, lk = block_mask.seq_lengths
    b, h = block_mask.kv_num_blocks.shape[:2]
    return create_mask(block_mask.mask_mod, b, h, lq, lk, device="cpu")


def check(block_mask, expected):
    """Tiles marked full hold only True, empty tiles only False, and the mask is exact."""
    lq, lk = expected.shape[-2:]
    states = M.states_of(block_mask)
    tiles = states.repeat_interleave(128, -1).repeat_interleave(128, -2)[..., :lq, :lk]
    assert expected[(tiles == M.FULL).expand_as(expected)].all()
    assert not expected[(tiles == M.EMPTY).expand_as(expected)].any()
    assert torch.equal(materialise(block_mask) | (tiles == M.FULL), expected | (tiles == M.FULL))
    assert torch.equal(dense_of(block_mask), expected & (tiles != M.EMPTY))
    return states


def test_full_and_causal():
    check(M.full_mask(LQ, LK), torch.ones(1, 1, LQ, LK, dtype=torch.bool))
    i, j = torch.arange(LQ)[:, None], torch.arange(LK)[None]
    states = check(M.causal_mask(LQ, LK), (i >= j)[None, None])
    assert (states == M.EMPTY).any() and (states == M.FULL).any()


def test_causal_agrees_with_create_block_mask():
    ours = M.causal_mask(LQ, LK)
    theirs = create_block_mask(lambda b, h, q, kv: q >= kv, 1, 1, LQ, LK, device="cpu")
    assert torch.equal(ours.to_dense(), theirs.to_dense())


def test_query_side_lists_as_torch_derives_them():
    """flex's backward reads the query-side lists, which flexpos forms from the tile states."""
    valid = torch.rand(3, LK) > 0.5
    pos = torch.rand(2, LQ).sort(-1).values * 1000
    for mask in (M.causal_mask(LQ, LK), M.padding_mask(valid, LQ), M.distance_window_mask(200.0, pos=pos),
                 M.and_masks(M.sliding_window_mask(LQ, 150), M.padding_mask(valid[:, :LQ], LQ))):
        derived = BlockMask.from_kv_blocks(mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks,
                                           mask.full_kv_indices, 128, mask.mask_mod, seq_lengths=mask.seq_lengths)
        for name in ("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
            ours, theirs = getattr(mask, name), getattr(derived, name)
            assert torch.equal(ours, theirs) and ours.stride() == theirs.stride(), name


def test_kept_tile_states_are_those_of_the_lists():
    """Masks built by flexpos keep their tile states for states_of; a rebuilt mask (BlockMask.to
    makes a new one) derives them from its block lists, and they agree."""
    valid = torch.rand(3, LK) > 0.5
    pos = torch.rand(2, LQ).sort(-1).values * 1000
    for mask in (M.full_mask(LQ, LK), M.causal_mask(LQ, LK), M.padding_mask(valid, LQ),
                 M.distance_window_mask(200.0, pos=pos), M.and_masks(M.causal_mask(LQ), M.padding_mask(valid[:, :LQ], LQ))):
        rebuilt = mask.to("cpu")
        assert getattr(rebuilt, "_flexpos_states", None) is None
        assert torch.equal(M.states_of(mask), M.states_of(rebuilt))


def test_padding_mask():
    valid = torch.rand(2, LK) > 0.3
    valid[1, 256:] = False  # a whole empty tile
    states = check(M.padding_mask(valid, LQ), valid[:, None, None, :].expand(2, 1, LQ, LK))
    assert (states[1, ..., 2:] == M.EMPTY).all()


@pytest.mark.parametrize("window", [0, 5, 200, 2.9999999999, 128.99999999, 129.5])
def test_sliding_window_by_index(window):
    """Exact for fractional windows too (a float32 window rounded 2.9999999999 up to 3, and a
    pair at distance 129 was kept in one tile and dropped in another)."""
    i, j = torch.arange(LQ)[:, None], torch.arange(LK)[None]
    check(M.sliding_window_mask(LQ, window, LK), ((i - j).abs().double() <= window)[None, None])


@pytest.mark.parametrize("window", [10.0, 300.0, 5000.0])
def test_distance_window_on_irregular_positions(window):
    pos = 1_200_000_000 + torch.randint(0, 40 * LQ, (2, LQ - 2)).sort(-1).values
    mask = M.distance_window_mask(window, pos=pos, len_q=LQ, len_k=LQ)
    full = torch.nn.functional.pad(pos, (2, 0)).double()
    has = torch.arange(LQ) >= 2
    near = (full[:, :, None] - full[:, None, :]).abs() <= window
    check(mask, (near | ~(has[:, None] & has[None, :]))[:, None])


def test_distance_window_is_block_sparse_and_sparser_when_narrow():
    pos = torch.rand(1, 4096, dtype=torch.float64).cumsum(-1) * 10
    kept = [M.states_of(M.distance_window_mask(w, pos=pos)).ne(M.EMPTY).float().mean() for w in (200, 2000, 20000)]
    assert kept[0] < kept[1] < kept[2] and kept[0] < 0.1


def test_distance_window_with_extra_batch_dims():
    """(B, *, L) positions give a mask over the flattened batch B * prod(*)."""
    pos = torch.rand(2, 3, LQ).cumsum(-1) * 10
    flat = pos.reshape(6, LQ).double()
    check(M.distance_window_mask(25.0, pos=pos), ((flat[:, :, None] - flat[:, None, :]).abs() <= 25)[:, None])


def test_distance_window_cross_unsorted():
    pos_q, pos_k = torch.rand(1, LQ) * 1000, torch.rand(1, LK) * 1000
    mask = M.distance_window_mask(100.0, pos_q=pos_q, pos_k=pos_k)
    expected = (pos_q.double()[:, :, None] - pos_k.double()[:, None, :]).abs() <= 100
    check(mask, expected[:, None])


@pytest.mark.parametrize("window", [0.0, 300.0, float("inf")])
def test_causal_distance_window_on_irregular_positions(window):
    """Keys at or before the query's position, within the window; ties (equal positions) and
    leading tokens without a position included."""
    pos = 1_200_000_000 + torch.randint(0, 20 * LQ, (2, LQ - 2)).sort(-1).values
    mask = M.distance_window_mask(window, pos=pos, len_q=LQ, len_k=LQ, causal=True)
    full = torch.nn.functional.pad(pos, (2, 0)).double()
    has = torch.arange(LQ) >= 2
    delta = full[:, :, None] - full[:, None, :]
    states = check(mask, (((delta >= 0) & (delta <= window)) | ~(has[:, None] & has[None, :]))[:, None])
    assert (states == M.EMPTY).any() and (window != float("inf") or (states == M.FULL).any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_causal_distance_window_in_cross_attention(dtype):
    """Queries and keys at their own float positions (unsorted keys): each query sees the keys
    up to 100 units before it, whatever their order."""
    pos_q = (torch.rand(2, LQ, dtype=torch.float64) * 1000).sort(-1).values.to(dtype)
    pos_k = (torch.rand(2, LK, dtype=torch.float64) * 1000).to(dtype)
    mask = M.distance_window_mask(100.0, pos_q=pos_q, pos_k=pos_k, causal=True)
    delta = pos_q.double()[:, :, None] - pos_k.double()[:, None, :]
    check(mask, ((delta >= 0) & (delta <= 100))[:, None])


def test_causal_distance_window_in_attention_against_the_reference():
    """In flexpos.attention with ALiBi, against the float64 reference with the dense mask."""
    q, k, v = (torch.randn(2, 4, n, 16, dtype=torch.float64) for n in (LQ, LK, LK))
    pos_q = torch.randint(0, 5000, (2, LQ)).sort(-1).values
    pos_k = torch.randint(0, 5000, (2, LK))
    mask = M.distance_window_mask(800.0, pos_q=pos_q, pos_k=pos_k, causal=True)
    out = flexpos.attention(q, k, v, flexpos.ALiBi(4), pos_q=pos_q, pos_k=pos_k, mask=mask)
    pq, hq = R.padded_positions(pos_q, 2, LQ)
    pk, hk = R.padded_positions(pos_k, 2, LK)
    delta = pq[:, :, None] - pk[:, None, :]
    keep = ((delta >= 0) & (delta <= 800))[:, None]
    want = R.attend(q, k, v, R.alibi_bias(4, pq, pk, hq, hk), keep)
    assert (out - want).abs().max().item() <= TOLERANCE[torch.float64]


def test_segments():
    seg_q = torch.repeat_interleave(torch.arange(4), torch.tensor([128, 100, 50, 22]))[None]
    seg_k = torch.repeat_interleave(torch.arange(4), torch.tensor([128, 172, 60, 60]))[None]
    states = check(M.segment_mask(seg_q, seg_k), (seg_q[:, :, None] == seg_k[:, None, :])[:, None])
    assert (states == M.EMPTY).any() and (states == M.FULL).any()


def test_dense_and_combination():
    dense = torch.rand(2, 3, LQ, LK) > 0.5
    dense[:, :, :128, :128] = True
    dense[:, :, 128:256, :128] = False
    check(M.dense_mask(dense, LQ, LK), dense)
    valid = torch.rand(2, LK) > 0.2
    i, j = torch.arange(LQ)[:, None], torch.arange(LK)[None]
    both = M.and_masks(M.padding_mask(valid, LQ), M.causal_mask(LQ, LK))
    check(both, valid[:, None, None, :] & (i >= j))


KV = torch.ones(2, 10, dtype=torch.bool)
MASK_SHAPES = r"mask must have shape \(B, Lk\), \(B, Lq, Lk\) or \(B, H, Lq, Lk\) with Lq=10 \(or 1, shared by every query\), Lk=10, got "


def test_per_token_masks_take_extra_batch_dims():
    """(B, *, L) like attention's inputs: the mask of the flattened batch, which serves q of
    shape (B, *, H, L, D)."""
    valid = torch.rand(2, 3, 200) > 0.3
    ids = torch.randint(0, 3, (2, 3, 200)).sort(-1).values
    for mask, flat in (
        (M.padding_mask(valid, 150), M.padding_mask(valid.reshape(6, 200), 150)),
        (M.segment_mask(ids), M.segment_mask(ids.reshape(6, 200))),
    ):
        assert torch.equal(M.states_of(mask), M.states_of(flat))
        assert torch.equal(mask.to_dense(), flat.to_dense())
    q, k, v = (torch.randn(2, 3, 2, 200, 8, dtype=torch.float64) for _ in range(3))
    with torch.no_grad():
        out = flexpos.attention(q, k, v, mask=M.segment_mask(ids))
    same = ids[..., :, None] == ids[..., None, :]
    want = R.attend(q, k, v, keep=same[:, :, None])
    assert (out - want).abs().max() <= TOLERANCE[torch.float64]


@pytest.mark.parametrize(
    "call, error, match",
    [
        # lengths: ints >= 0, named
        (lambda: M.full_mask(-1, 5), ValueError, "len_q must be >= 0, got -1"),
        (lambda: M.full_mask(5, -3), ValueError, "len_k must be >= 0, got -3"),
        (lambda: M.causal_mask(10.5), TypeError, "len_q must be an int, got float"),
        (lambda: M.causal_mask("10"), TypeError, "len_q must be an int, got str"),
        (lambda: M.causal_mask(10, -2), ValueError, "len_k must be >= 0"),
        (lambda: M.sliding_window_mask(-10, 3), ValueError, "len_q must be >= 0"),
        (lambda: M.sliding_window_mask(10, 3, len_k=2.0), TypeError, "len_k must be an int"),
        (lambda: M.padding_mask(KV, -5), ValueError, "len_q must be >= 0, got -5"),
        (lambda: M.padding_mask(KV, 10.0), TypeError, "len_q must be an int"),
        (lambda: M.dense_mask(KV, -1, 10), ValueError, "len_q must be >= 0"),
        (lambda: M.dense_mask(KV, True, 10), TypeError, "len_q must be an int, got bool"),
        (lambda: M.distance_window_mask(1.0, pos=torch.rand(2, 10), len_q=12.0), TypeError, "len_q must be an int"),
        (lambda: M.distance_window_mask(1.0, pos_q=torch.rand(2, 3), pos_k=torch.rand(2, 4), len_k=-1), ValueError, "len_k must be >= 0"),
        (lambda: M.distance_window_mask(1.0, pos_q=torch.rand(2, 3), pos_k=torch.rand(2, 4), len_k=0), ValueError, "pos_k has 4 positions but the sequence has only 0"),
        (lambda: M.distance_window_mask(1.0, pos=torch.rand(2, 10), causal="past"), TypeError, "causal must be a bool, got str"),
        # tensors of the wrong kind
        (lambda: M.distance_window_mask(1.0, pos=[1.0, 2.0]), TypeError, "pos must be a torch.Tensor, got list"),
        (lambda: M.distance_window_mask(1.0, pos=torch.rand(10)), ValueError, r"pos must have shape \(B, \*, L'\)"),
        (lambda: M.distance_window_mask(1.0, pos_q=torch.rand(2, 3), pos_k=torch.rand(3)), ValueError, "pos_k must have shape"),
        # dense_mask: every accepted shape checked against len_q and len_k
        (lambda: M.dense_mask(torch.ones(10, dtype=torch.bool), 10, 10), ValueError, MASK_SHAPES + r"\(10,\)$"),
        (lambda: M.dense_mask(torch.ones(2, 9, dtype=torch.bool), 10, 10), ValueError, MASK_SHAPES + r"\(2, 9\)$"),
        (lambda: M.dense_mask(torch.ones(2, 9, 10, dtype=torch.bool), 10, 10), ValueError, MASK_SHAPES + r"\(2, 9, 10\)$"),
        (lambda: M.dense_mask(torch.ones(2, 3, 10, 9, dtype=torch.bool), 10, 10), ValueError, MASK_SHAPES + r"\(2, 3, 10, 9\)$"),
        (lambda: M.dense_mask(torch.ones(1, 2, 3, 10, 10, dtype=torch.bool), 10, 10), ValueError, MASK_SHAPES),
        (lambda: M.dense_mask(torch.ones(1, 4, 4), 4, 4), TypeError, "mask must be a bool tensor"),
        # and_masks: lengths, batch, heads and block sizes
        (lambda: M.and_masks(M.full_mask(10, 10), M.full_mask(10, 11)), ValueError, "equal"),
        (
            lambda: M.and_masks(M.padding_mask(KV, 10), M.padding_mask(torch.ones(3, 10, dtype=torch.bool), 10)),
            ValueError,
            r"and_masks needs batch counts that are equal or 1, got \(batch, heads\) \(2, 1\) and \(3, 1\)",
        ),
        (
            lambda: M.and_masks(
                M.dense_mask(torch.ones(1, 2, 10, 10, dtype=torch.bool), 10, 10),
                M.causal_mask(10),
                M.dense_mask(torch.ones(1, 3, 10, 10, dtype=torch.bool), 10, 10),
            ),
            ValueError,
            r"head counts that are equal or 1, got \(batch, heads\) \(1, 2\) and \(1, 1\) and \(1, 3\)",
        ),
        (
            lambda: M.and_masks(M.causal_mask(300), create_block_mask(lambda b, h, q, kv: q >= kv, 1, 1, 300, 300, device="cpu", BLOCK_SIZE=64)),
            ValueError,
            r"and_masks needs masks with 128x128 blocks, got block sizes \[\(128, 128\), \(64, 64\)\]",
        ),
        (lambda: M.and_masks(), ValueError, "at least one"),
        (lambda: M.and_masks(M.full_mask(4, 4), KV), TypeError, "and_masks takes BlockMasks, got Tensor"),
        # windows: a number >= 0, not NaN
        (lambda: M.sliding_window_mask(10, -1), ValueError, "window must be a number >= 0"),
        (lambda: M.sliding_window_mask(10, float("nan")), ValueError, r"window must be a number >= 0 \(inf for no window\), got nan"),
        (lambda: M.distance_window_mask(float("nan"), pos=torch.rand(1, 6)), ValueError, "got nan"),
        (lambda: M.sliding_window_mask(10, "3"), TypeError, "window must be a number >= 0, got str"),
        (lambda: M.distance_window_mask(True, pos=torch.rand(1, 6)), TypeError, "window must be a number >= 0, got bool"),
        (lambda: M.sliding_window_mask(10, torch.tensor(3.0)), TypeError, "got Tensor"),
        # a wrong dtype is a TypeError, a wrong shape a ValueError
        (lambda: M.padding_mask(torch.ones(2, 10), 10), TypeError, "key_valid must be a bool tensor"),
        (lambda: M.padding_mask(torch.ones(3, dtype=torch.bool), 5), ValueError, r"key_valid must have shape \(B, \*, Lk\) \(at least 2 dims\), got \(3,\)"),
        (lambda: M.padding_mask(KV.numpy(), 5), TypeError, "key_valid must be a torch.Tensor"),
        (lambda: M.segment_mask(torch.rand(1, 5)), TypeError, "segments_q must be an integer tensor"),
        (lambda: M.segment_mask(torch.ones(1, 5, dtype=torch.long), torch.ones(1, 5, dtype=torch.bool)), TypeError, "segments_k must be an integer tensor"),
        (lambda: M.segment_mask(torch.ones(5, dtype=torch.long)), ValueError, r"segments_q must have shape \(B, \*, Lq\)"),
        (lambda: M.segment_mask(torch.ones(2, 5, dtype=torch.long), torch.ones(3, 5, dtype=torch.long)), ValueError, r"segments_k must have shape \(2, Lk\) to match segments_q, got \(3, 5\)"),
        (lambda: M.segment_mask(torch.ones(2, 3, 5, dtype=torch.long), torch.ones(2, 2, 5, dtype=torch.long)), ValueError,
         r"segments_k must have shape \(2, 3, Lk\)"),
    ],
)
def test_bad_mask_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("shape", [(2, LK), (2, LQ, LK), (2, 3, LQ, LK), (2, 1, LK), (2, 1, 1, LK), (2, 3, 1, LK)])
def test_dense_mask_of_each_accepted_shape(shape):
    dense = torch.rand(shape) > 0.5
    dense[..., 128:256] = False  # whole empty key tiles
    expected = {2: dense[:, None, None, :], 3: dense[:, None], 4: dense}[dense.ndim].expand(2, -1, LQ, LK)
    states = check(M.dense_mask(dense, LQ, LK), expected)
    assert (states[..., 1] == M.EMPTY).all()


def test_and_masks_broadcasts_batch_and_heads_of_one():
    dense = torch.rand(1, 3, LQ, LK) > 0.3
    valid = torch.rand(2, LK) > 0.2
    i, j = torch.arange(LQ)[:, None], torch.arange(LK)[None]
    both = M.and_masks(M.dense_mask(dense, LQ, LK), M.padding_mask(valid, LQ), M.causal_mask(LQ, LK))
    assert tuple(both.kv_num_blocks.shape[:2]) == (2, 3)
    check(both, dense & valid[:, None, None, :] & (i >= j))


@pytest.mark.parametrize(
    "build",
    [
        lambda n: M.padding_mask((torch.rand(1, 300) > 0.5).expand(n, -1), 300),
        lambda n: M.dense_mask((torch.rand(1, 3, 300, 300) > 0.5).expand(n, -1, -1, -1), 300, 300),
        lambda n: M.segment_mask(torch.randint(0, 4, (1, 300)).sort(-1).values.expand(n, -1)),
        lambda n: M.distance_window_mask(5.0, pos=(torch.rand(1, 300) * 100).expand(n, -1)),
    ],
    ids=["padding", "dense", "segment", "distance_window"],
)
def test_a_mask_of_batch_one_serves_every_sequence(build):
    """A batch-1 mask that reads a per-sequence table applies its one row to the whole batch
    (a distance window's table has two rows when built for one sequence: a batch of 3 read
    past them)."""
    x = torch.randn(3, 3, 300, 8)
    torch.manual_seed(1)
    shared = build(1)
    torch.manual_seed(1)
    per_sequence = build(3)
    got = flexpos.attention(x, x, x, mask=shared, backend="chunked")
    assert torch.equal(got, flexpos.attention(x, x, x, mask=per_sequence, backend="chunked"))


def test_an_infinite_window_keeps_every_pair():
    check(M.sliding_window_mask(LQ, float("inf"), LK), torch.ones(1, 1, LQ, LK, dtype=torch.bool))
    pos = torch.rand(2, LQ) * 1e6
    states = check(M.distance_window_mask(float("inf"), pos=pos), torch.ones(2, 1, LQ, LQ, dtype=torch.bool))
    assert (states == M.FULL).all()


def test_distance_window_without_positions_windows_nothing():
    """Tokens without a position are not windowed, also when a side has no positions at all."""
    states = check(
        M.distance_window_mask(1.0, pos=torch.rand(2, 0), len_q=LQ), torch.ones(2, 1, LQ, LQ, dtype=torch.bool)
    )
    assert (states == M.FULL).all()
    mask = M.distance_window_mask(1.0, pos_q=torch.rand(2, 0), pos_k=torch.rand(2, LK - 3) * 5, len_q=LQ, len_k=LK)
    check(mask, torch.ones(2, 1, LQ, LK, dtype=torch.bool))


def test_distance_window_with_an_empty_batch():
    for pos, len_q in ((torch.rand(0, 50), None), (torch.rand(0, 0), 50)):
        mask = M.distance_window_mask(3.0, pos=pos, len_q=len_q)
        assert mask.kv_num_blocks.shape[0] == 0 and tuple(mask.seq_lengths) == (50, 50)


EMPTY_SEQUENCE_BUILDERS = {
    "full": lambda lq, lk: M.full_mask(lq, lk),
    "causal": lambda lq, lk: M.causal_mask(lq, lk),
    "sliding window": lambda lq, lk: M.sliding_window_mask(lq, 3, lk),
    "padding": lambda lq, lk: M.padding_mask(torch.ones(2, lk, dtype=torch.bool), lq),
    "distance window": lambda lq, lk: M.distance_window_mask(3.0, pos_q=torch.rand(2, lq), pos_k=torch.rand(2, lk)),
    "segments": lambda lq, lk: M.segment_mask(torch.zeros(2, lq, dtype=torch.long), torch.zeros(2, lk, dtype=torch.long)),
    "dense": lambda lq, lk: M.dense_mask(torch.ones(2, lq, lk, dtype=torch.bool), lq, lk),
    "and": lambda lq, lk: M.and_masks(M.causal_mask(lq, lk), M.padding_mask(torch.ones(2, lk, dtype=torch.bool), lq)),
}


@pytest.mark.parametrize("build", EMPTY_SEQUENCE_BUILDERS.values(), ids=EMPTY_SEQUENCE_BUILDERS.keys())
@pytest.mark.parametrize("len_q, len_k", [(0, 0), (0, 7), (7, 0)])
def test_every_builder_takes_empty_sequences(build, len_q, len_k):
    """Sequences without tokens, as attention takes them: a mask of no tiles on that side, and
    attention under it gives zeros (queries without keys) of the right shape."""
    mask = build(len_q, len_k)
    assert tuple(mask.seq_lengths) == (len_q, len_k)
    assert M.states_of(mask).shape[-2:] == (-(-len_q // 128), -(-len_k // 128))
    q = torch.randn(2, 4, len_q, 8, requires_grad=True)
    k, v = torch.randn(2, 4, len_k, 8), torch.randn(2, 4, len_k, 8)
    out = flexpos.attention(q, k, v, flexpos.ALiBi(4), mask=mask)
    assert out.shape == (2, 4, len_q, 8) and out.eq(0).all()
    out.sum().backward()
    assert q.grad.eq(0).all()


def _count_blocks(x):
    len_q, len_k = x.shape
    masks = (M.full_mask(len_q, len_k), M.causal_mask(len_q, len_k), M.sliding_window_mask(len_q, 5, len_k))
    return sum(m.kv_num_blocks.sum() + m.full_kv_num_blocks.sum() for m in masks) + x.sum()


def test_mask_builders_take_symbolic_lengths():
    """Lengths read from shapes while tracing with symbolic shapes (torch.SymInt) pass the
    length checks, under Dynamo and under make_fx."""
    compiled = torch.compile(_count_blocks, backend="eager", dynamic=True, fullgraph=True)
    for shape in ((300, 400), (200, 500)):
        x = torch.ones(shape)
        assert torch.equal(compiled(x), _count_blocks(x))
    traced = make_fx(_count_blocks, tracing_mode="symbolic")(x)
    assert torch.equal(traced(x), _count_blocks(x))


def test_full_and_causal_masks_are_built_once_per_shape():
    assert flexpos.full_mask(300, 300) is flexpos.full_mask(300, 300, torch.device("cpu"))
    assert flexpos.full_mask(300, 301) is not flexpos.full_mask(300, 300)
    assert flexpos.causal_mask(300) is flexpos.causal_mask(300, 300, "cpu")
    assert flexpos.causal_mask(300, 400) is not flexpos.causal_mask(300)


def test_masks_built_in_inference_mode_are_not_shared_with_training():
    """A first call under inference_mode (a validation pass) must not leave inference tensors to
    training calls: flex's autograd saves the mask's tensors for backward, which refuses them."""
    with torch.inference_mode():
        for_inference = flexpos.causal_mask(333), flexpos.full_mask(333, 333)
        assert for_inference[0] is flexpos.causal_mask(333)
    for inferred, mask in zip(for_inference, (flexpos.causal_mask(333), flexpos.full_mask(333, 333))):
        assert inferred.kv_num_blocks.is_inference() and mask is not inferred
        assert not any(t.is_inference() for t in mask.as_tuple() if isinstance(t, torch.Tensor))


def test_masks_built_while_a_cuda_graph_is_captured_are_not_shared(monkeypatch):
    """Their tensors are filled only when the graph replays: later eager calls must not get them."""
    shared = flexpos.full_mask(300, 300)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    captured = flexpos.full_mask(300, 300)
    assert captured is not shared and captured is not flexpos.full_mask(300, 300)
    monkeypatch.undo()
    assert flexpos.full_mask(300, 300) is shared


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_segment_ids_of_narrow_integer_dtypes(dtype):
    ids = torch.repeat_interleave(torch.arange(3), torch.tensor([100, 60, 140]))[None].to(dtype)
    check(M.segment_mask(ids), (ids[:, :, None] == ids[:, None, :])[:, None])


def test_windows_take_numpy_scalars():
    np = pytest.importorskip("numpy")
    for window in (np.int64(5), np.float32(5.0)):
        assert torch.equal(M.states_of(M.sliding_window_mask(LQ, window)), M.states_of(M.sliding_window_mask(LQ, 5)))


def test_segment_ids_beyond_float64_precision():
    """int64 ids such as hashes: 2**60 and 2**60 + 1 are one float64 number, two segments."""
    ids = torch.full((1, LQ), 2**60)
    ids[0, 150:] = 2**60 + 1
    ids[0, 256:] = torch.iinfo(torch.int64).max  # the last block, padded past the largest id
    states = check(M.segment_mask(ids), (ids[:, :, None] == ids[:, None, :])[:, None])
    assert states[0, 0, 2, 2] == M.FULL  # the padded tail block holds one id


@pytest.mark.parametrize(
    "pos, window",
    [
        # int64: |delta| = 20_000_001 rounds to the window in float32
        (torch.cat([torch.zeros(1, 128, dtype=torch.int64), torch.full((1, 172), 20_000_001)], -1), 20_000_000),
        (torch.cat([torch.zeros(1, 128, dtype=torch.int64), torch.tensor([[5]]), torch.full((1, 171), 20_000_001)], -1),
         20_000_000),
        # float64 m/z-like positions 1e-5 past the window
        (torch.cat([torch.full((1, 128), 100.0, dtype=torch.float64), torch.full((1, 172), 1100.00001, dtype=torch.float64)], -1), 1000.0),
    ],
    ids=["int-far-tile", "int-mixed-tile", "float"],
)
def test_distance_window_decides_each_pair_alike_in_every_tile(pos, window):
    """The mask_mod compares float32 distances; tiles are classified from float64 ranges. Tiles
    within float32 rounding of the window are left partial, so a tile's state never contradicts
    the mask_mod (a pair's fate does not depend on its tile-mates), and pairs farther than that
    rounding from the window follow the exact rule."""
    mask = M.distance_window_mask(window, pos=pos)
    check(mask, materialise(mask))
    p = pos.double()
    delta = (p[:, :, None] - p[:, None, :]).abs()[:, None]
    clear = (delta - window).abs() > window * 2.0**-20
    assert torch.equal(materialise(mask)[clear], (delta <= window)[clear])


def test_block_structure_decides_for_torchs_default_mask_mod():
    """BlockMask.from_kv_blocks with its default mask_mod (True everywhere): the block structure
    alone masks. Queries of block 1 skip key block 1, every other query skips key block 2; the
    chunked backend evaluates mask_mods over whole key spans, alone and after and_masks."""
    length, n = 384, 3
    listed = torch.tensor([[0, 1, 2], [0, 2, 1], [0, 1, 2]], dtype=torch.int32)  # 2 listed per row
    block_mask = BlockMask.from_kv_blocks(
        torch.full((1, 1, n), 2, dtype=torch.int32), listed[None, None].contiguous(), BLOCK_SIZE=128,
        seq_lengths=(length, length),
    )
    tiles = torch.tensor([[1, 1, 0], [1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    keep = tiles.repeat_interleave(128, 0).repeat_interleave(128, 1)
    check(M.tiles_decide(block_mask), keep[None, None])
    q, k, v = (torch.randn(2, 2, length, 8, dtype=torch.float64) for _ in range(3))
    out = flexpos.attention(q, k, v, mask=block_mask, backend="chunked")
    torch.testing.assert_close(out, R.attend(q, k, v, keep=keep), rtol=0, atol=1e-12)
    both = flexpos.attention(q, k, v, mask=flexpos.and_masks(block_mask, flexpos.causal_mask(length)))
    torch.testing.assert_close(both, R.attend(q, k, v, keep=keep & torch.ones_like(keep).tril()), rtol=0, atol=1e-12)
