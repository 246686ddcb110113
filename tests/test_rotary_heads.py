"""benchmarks/rotary_heads.py, the candidate Rotary kernel, against flexpos' rotation.

Runs on CUDA, or on CPU under Triton's interpreter:

    TRITON_INTERPRET=1 python -m pytest tests/test_rotary_heads.py   # with triton installed

Skipped otherwise (CI installs no Triton).
"""

import os
import sys
from pathlib import Path

import pytest
import torch

import flexpos
import reference as R
from flexpos.rotary import rotate_real, rotation

pytest.importorskip("triton")
ON_CUDA = torch.cuda.is_available()
if not ON_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from rotary_heads import rotate_heads  # noqa: E402

DEV = "cuda" if ON_CUDA else "cpu"
F64 = torch.float64


def case(dtype, head_dim, layout_blhd=False, base=2_000_000_000):
    """q, k (2, 3, 70, head_dim) in ``dtype``, 3 leading tokens without a position, positions
    from ``base`` on, and the (pos, thetas, div) inputs with the float32 table of flexpos' rotation."""
    gen = torch.Generator().manual_seed(0)
    shape = (2, 70, 3, head_dim) if layout_blhd else (2, 3, 70, head_dim)
    q, k = (torch.randn(shape, generator=gen).to(DEV, dtype) for _ in range(2))
    if layout_blhd:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    pos = torch.randint(0, 10**6, (2, 67), generator=gen) + base
    p, has = (t.to(DEV) for t in R.padded_positions(pos, 2, 70))
    rot = flexpos.Rotary(head_dim, divide=7.0).to(DEV)
    inputs = (p, rot.thetas, rot.divisor(F64))
    table = rotation(p, has, rot.thetas, rot.divisor(F64), torch.float32)
    return q, k, p, has, rot, inputs, table


def one_step(want, x, dtype):
    """How far a rotated ``x`` in ``dtype`` may lie from ``want``: one rounding step of
    ``dtype`` (the interpreter rounds to bfloat16 toward zero, GPUs to nearest) plus a few
    float32 ulps of the inputs' size (cos and sin formed apart from the table's)."""
    return torch.finfo(dtype).eps * want.abs() + 4 * torch.finfo(torch.float32).eps * x.abs().max().double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 24])
@pytest.mark.parametrize("layout_blhd", [False, True])
@pytest.mark.parametrize("tiles", [(64, 4, False), (32, 2, False), (64, 4, True), (16, 2, True)])
def test_matches_flexpos_rotation(dtype, head_dim, layout_blhd, tiles):
    q, k, p, has, rot, inputs, table = case(dtype, head_dim, layout_blhd)
    got_q, got_k = rotate_heads(q, k, *inputs, tiles)
    for got, x in ((got_q, q), (got_k, k)):
        assert got.dtype == dtype and got.shape == x.shape
        shipped = rotate_real(x, table).double()
        assert ((got.double() - shipped).abs() <= one_step(shipped, x, dtype)).all()
        want = R.rotate(x.double(), p, has, rot.thetas.double(), 7.0)
        assert ((got.double() - want).abs() <= one_step(want, x, dtype)).all()
        assert torch.equal(got[:, :, :3], x[:, :, :3])  # no position: identity


@pytest.mark.parametrize("base", [10**12, 10**17])
def test_far_positions_match_flexpos_rotation(base):
    """Angles past 2**32 turns (reduced in one step, within about an ulp of the float64 angle,
    whose rounding is then all the phase there is) and past 2**53 radians (no phase: angle 0,
    exactly as flexpos.rotary.cos_sin) for the largest frequencies."""
    q, k, p, has, rot, inputs, table = case(torch.float32, 16, base=base)
    angles = p.double()[:, None, :, None] / 7.0 * rot.thetas.double()  # (B, 1, L, D/2)
    ulp = torch.where(angles < 2.0**53, torch.nextafter(angles, angles + 1) - angles, 0.0)
    for got, x in zip(rotate_heads(q, k, *inputs), (q, k)):
        shipped = rotate_real(x, table).double()
        phase = 2 * ulp.repeat_interleave(2, -1) * x.abs().max().double()
        assert ((got.double() - shipped).abs() <= one_step(shipped, x, torch.float32) + phase).all()


def test_backward_rotates_by_minus_the_angle():
    q, k, p, has, rot, inputs, table = case(torch.float32, 16)
    leaves = [t.clone().requires_grad_() for t in (q, k)]
    grads = [torch.randn_like(q), torch.randn_like(k)]
    torch.autograd.backward(rotate_heads(*leaves, *inputs), grads)
    for leaf, grad in zip(leaves, grads):
        ref = leaf.detach().clone().requires_grad_()
        rotate_real(ref, table).backward(grad)
        assert ((leaf.grad - ref.grad).abs() <= one_step(ref.grad, grad, torch.float32)).all()


def test_rejects_mismatched_shapes():
    q, k, p, has, rot, inputs, table = case(torch.float32, 16)
    with pytest.raises(ValueError, match=r"pos \(B, L\)"):
        rotate_heads(q, k, p[:, 1:], *inputs[1:])
    with pytest.raises(ValueError, match=r"thetas \(8,\)"):
        rotate_heads(q, k, p, inputs[1][:4], inputs[2])
