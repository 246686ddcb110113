"""BlockMask builders vs dense boolean formulas, tile by tile."""

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, create_mask

import flexpos
import flexpos.masks as M

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


def test_padding_mask():
    valid = torch.rand(2, LK) > 0.3
    valid[1, 256:] = False  # a whole empty tile
    states = check(M.padding_mask(valid, LQ), valid[:, None, None, :].expand(2, 1, LQ, LK))
    assert (states[1, ..., 2:] == M.EMPTY).all()


@pytest.mark.parametrize("window", [0, 5, 200])
def test_sliding_window_by_index(window):
    i, j = torch.arange(LQ)[:, None], torch.arange(LK)[None]
    check(M.sliding_window_mask(LQ, window, LK), ((i - j).abs() <= window)[None, None])


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


def test_distance_window_cross_unsorted():
    pos_q, pos_k = torch.rand(1, LQ) * 1000, torch.rand(1, LK) * 1000
    mask = M.distance_window_mask(100.0, pos_q=pos_q, pos_k=pos_k)
    expected = (pos_q.double()[:, :, None] - pos_k.double()[:, None, :]).abs() <= 100
    check(mask, expected[:, None])


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


def test_errors():
    with pytest.raises(ValueError, match="window"):
        M.sliding_window_mask(10, -1)
    with pytest.raises(ValueError, match="key_valid"):
        M.padding_mask(torch.ones(3), 5)
    with pytest.raises(ValueError, match="equal"):
        M.and_masks(M.full_mask(10, 10), M.full_mask(10, 11))
    with pytest.raises(TypeError, match="bool"):
        M.dense_mask(torch.ones(1, 4, 4), 4, 4)
    with pytest.raises(ValueError, match="segments_q"):
        M.segment_mask(torch.rand(1, 5))


def test_full_and_causal_masks_are_built_once_per_shape():
    assert flexpos.full_mask(300, 300) is flexpos.full_mask(300, 300, torch.device("cpu"))
    assert flexpos.full_mask(300, 301) is not flexpos.full_mask(300, 300)
    assert flexpos.causal_mask(300) is flexpos.causal_mask(300, 300, "cpu")
    assert flexpos.causal_mask(300, 400) is not flexpos.causal_mask(300)
