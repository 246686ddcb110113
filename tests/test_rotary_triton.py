"""flexpos.rotary_triton, Rotary's CUDA kernel, against the float64 rotation and flexpos' compiled
rotation.

Runs on CUDA, or on CPU under Triton's interpreter, which this module switches on
(``TRITON_INTERPRET=1``, read where a kernel is defined: at the kernel module's import). Skipped
without Triton (``pip install triton``; .ci/run installs it). That Rotary on CUDA takes this
kernel is tested in tests/test_cuda.py.
"""

import importlib
import os
import sys

import pytest
import torch

import flexpos
import reference as R
from flexpos.rotary import rotate_real, rotation
from support import rotation_tolerance

pytest.importorskip("triton")
ON_CUDA = torch.cuda.is_available()
if not ON_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
    if "flexpos.rotary_triton" in sys.modules:  # defined for a GPU: define it again, interpreted
        importlib.reload(sys.modules["flexpos.rotary_triton"])
from flexpos.rotary_triton import rotate  # noqa: E402

DEV = "cuda" if ON_CUDA else "cpu"
F64 = torch.float64
LENGTH, CLS = 70, 3


def case(dtype, head_dim, layout_blhd=False, base=2_000_000_000, k_heads=3):
    """q (2, 3, 70, head_dim) and k (2, k_heads, 70, head_dim) in ``dtype``, 3 leading tokens
    without a position, positions from ``base`` on; the kernel's (pos, thetas, div) and the
    float32 table of flexpos' compiled rotation."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, heads, LENGTH, head_dim, generator=gen).to(DEV, dtype) for heads in (3, k_heads))
    if layout_blhd:  # AttentionLayer's projections: heads interleaved in memory
        q, k = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k))
    pos = torch.randint(0, 10**6, (2, LENGTH - CLS), generator=gen) + base
    p, has = (t.to(DEV) for t in R.padded_positions(pos, 2, LENGTH))
    rot = flexpos.Rotary(head_dim, divide=7.0).to(DEV)
    inputs = (p, rot.thetas, rot.divisor(F64))
    table = rotation(p, has, rot.thetas, rot.divisor(F64), torch.float32)
    return q, k, p, has, rot, inputs, table


def assert_rotated(got, x, p, has, rot, table, dtype):
    """``got`` is ``x`` rotated: within a rounding step of the float64 rotation and of flexpos'
    compiled rotation; tokens without a position untouched."""
    assert got.dtype == dtype and got.shape == x.shape and got.is_contiguous()
    shipped = rotate_real(x, table).double()
    assert ((got.double() - shipped).abs() <= rotation_tolerance(shipped, x, dtype)).all()
    want = R.rotate(x.double(), p, has, rot.thetas.double(), 7.0)
    assert ((got.double() - want).abs() <= rotation_tolerance(want, x, dtype)).all()
    assert torch.equal(got[:, :, :CLS], x[:, :, :CLS])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 24])
@pytest.mark.parametrize("layout_blhd", [False, True])
@pytest.mark.parametrize("rows", [None, 16])
def test_rotates_q_and_k_as_flexpos(dtype, head_dim, layout_blhd, rows):
    """Head dims with and without padding to a power of two; tiles of 32 and 16 positions over
    a length of 70 (a partial last tile); either memory layout."""
    q, k, p, has, rot, inputs, table = case(dtype, head_dim, layout_blhd)
    for got, x in zip(rotate(*inputs, q, k, rows=rows), (q, k)):
        assert_rotated(got, x, p, has, rot, table, dtype)


def test_grouped_keys_one_tensor_and_shared_positions():
    """k with one head for q's three; a single tensor; positions (1, L) shared by the batch."""
    q, k, p, has, rot, inputs, table = case(torch.float32, 16, k_heads=1)
    got_q, got_k = rotate(*inputs, q, k)
    assert_rotated(got_q, q, p, has, rot, table, torch.float32)
    assert_rotated(got_k, k, p, has, rot, table, torch.float32)
    (alone,) = rotate(*inputs, q)
    assert torch.equal(alone, got_q)
    shared = p[:1]
    (got,) = rotate(shared, *inputs[1:], q)
    assert_rotated(got, q, shared.expand_as(p), has, rot, table[:1].expand_as(table), torch.float32)


@pytest.mark.parametrize("base", [10**12, 10**17])
def test_far_positions_match_flexpos_rotation(base):
    """Angles past 2**32 turns (reduced in one step, within about an ulp of the float64 angle,
    whose rounding is then all the phase there is) and past 2**53 radians (no phase: angle 0,
    exactly as flexpos._trig.cos_sin) for the largest frequencies."""
    q, k, p, has, rot, inputs, table = case(torch.float32, 16, base=base)
    angles = p.double()[:, None, :, None] / 7.0 * rot.thetas.double()  # (B, 1, L, D/2)
    ulp = torch.where(angles < 2.0**53, torch.nextafter(angles, angles + 1) - angles, 0.0)
    for got, x in zip(rotate(*inputs, q, k), (q, k)):
        shipped = rotate_real(x, table).double()
        phase = 2 * ulp.repeat_interleave(2, -1) * x.abs().max().double()
        assert ((got.double() - shipped).abs() <= rotation_tolerance(shipped, x, torch.float32) + phase).all()


def test_backward_and_double_backward():
    """Gradients: the rotation back, as flexpos' compiled rotation's; the gradient of a
    gradient (w.r.t. the incoming gradient) is the rotation forward."""
    q, k, p, has, rot, inputs, table = case(torch.float32, 16)
    leaves = [t.clone().requires_grad_() for t in (q, k)]
    grads = [torch.randn_like(q).requires_grad_(), torch.randn_like(k).requires_grad_()]
    out = rotate(*inputs, *leaves)
    dq, dk = torch.autograd.grad(out, leaves, grads, create_graph=True)
    for got, leaf, grad in zip((dq, dk), leaves, grads):
        ref = leaf.detach().clone().requires_grad_()
        rotate_real(ref, table).backward(grad.detach())
        assert ((got - ref.grad).abs() <= rotation_tolerance(ref.grad, grad.detach(), torch.float32)).all()
    probe = torch.randn_like(q)
    (again,) = torch.autograd.grad(dq, grads[0], probe)
    assert_rotated(again, probe, p, has, rot, table, torch.float32)


def test_rejects_mismatched_inputs():
    q, k, p, has, rot, inputs, table = case(torch.float32, 16)
    with pytest.raises(ValueError, match=r"float64 pos \(2 or 1, 70\)"):
        rotate(p[:, 1:], *inputs[1:], q, k)
    with pytest.raises(ValueError, match=r"float64 pos"):
        rotate(p.float(), *inputs[1:], q, k)
    with pytest.raises(ValueError, match=r"float32 thetas \(8,\)"):
        rotate(p, inputs[1][:4], inputs[2], q, k)
    with pytest.raises(ValueError, match=r"k \(N, Hkv, L, D\)"):
        rotate(*inputs, q, k[:, :, 1:])


def test_empty_inputs():
    """No positions or no sequences: empty outputs, no launch."""
    q, k, p, has, rot, inputs, table = case(torch.float32, 16)
    for x, pos in ((q[:, :, :0], p[:, :0]), (q[:0], p[:0])):
        got_q, got_k = rotate(pos, *inputs[1:], x, x)
        assert got_q.shape == got_k.shape == x.shape
