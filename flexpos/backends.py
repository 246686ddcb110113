"""Which backend runs attention, decided *before* running.

- ``flex`` (:mod:`flexpos.flex`): ``torch.compile(flex_attention)``; fused, forward and
  backward. The default on CUDA (sizes static until they change, then symbolic; on CPU
  symbolic from the start).
- ``chunked`` (:mod:`flexpos.chunked`): SDPA (or its own softmax) under a bias built chunk by
  chunk. The default on CPU, where Inductor's flex kernel has no backward and its forward is
  slower than SDPA plus a fused bias (see benchmarks/README.md), and wherever flex cannot run
  the call (see :func:`choose_backend`).

The choice is made up front because a compiled flex call that fails leaves later compiled
calls in the process on a slow path.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from ._compile import CPU_FLEX_MIN_TORCH, torch_version
from ._host import forward_ad_active, functorch_active
from .base import Positional
from .masks import cpu_flex_safe

Backend = Literal["auto", "flex", "chunked"]

MAX_FLEX_HEAD_DIM = 256
"""Largest q/k head dim 'auto' sends to flex: its Triton kernels round head dims up to a power of
two, and at 512 their tiles no longer fit a GPU's shared memory."""


def check_backend(requested: object) -> None:
    if not isinstance(requested, str):
        raise TypeError(f"backend must be 'auto', 'flex' or 'chunked', got {type(requested).__name__}")
    if requested not in ("auto", "flex", "chunked"):
        raise ValueError(f"backend must be 'auto', 'flex' or 'chunked', got {requested!r}")


def choose_backend(
    requested: Backend,
    q: Tensor,
    needs_grad: bool,
    block_mask: Optional[BlockMask] = None,
    modules: Sequence[Positional] = (),
) -> str:
    """'flex' or 'chunked' for inputs like ``q`` and these positional ``modules``;
    ``needs_grad`` if autograd must flow.

    'auto' is 'chunked' on CPU and 'flex' elsewhere, except for q/k head dims above
    :data:`MAX_FLEX_HEAD_DIM` (XL appends ``dim + 1`` features), in forward-mode AD (flex
    carries no tangents) and inside torch.func transforms (tested on the chunked backend only),
    which take 'chunked' too. 'flex' is refused in forward-mode AD, and on CPU where Inductor's
    CPU flex kernel cannot run (see :func:`_cpu_flex_refusal`).
    """
    check_backend(requested)
    forward_mode = forward_ad_active()
    if requested == "auto":
        chunked = q.device.type == "cpu" or q.shape[-1] > MAX_FLEX_HEAD_DIM or forward_mode or functorch_active()
        return "chunked" if chunked else "flex"
    if requested == "flex" and forward_mode:
        raise ValueError(
            "backend='flex' cannot carry forward-mode AD tangents (torch.func.jvp, jacfwd, "
            "torch.autograd.forward_ad); use backend='auto' or 'chunked'"
        )
    if requested == "flex" and q.device.type == "cpu":
        why = _cpu_flex_refusal(q, needs_grad, block_mask, modules)
        if why is not None:
            raise ValueError(f"backend='flex' {why}; use backend='auto' or 'chunked'")
    return requested


def _cpu_flex_refusal(
    q: Tensor, needs_grad: bool, block_mask: Optional[BlockMask], modules: Sequence[Positional] = ()
) -> Optional[str]:
    """Why the CPU flex kernel cannot run this call, or None: a module that says it cannot
    (:attr:`Positional.cpu_flex_refusal`); torch before :data:`CPU_FLEX_MIN_TORCH`; gradients
    (it has no backward); float64; masks other than flexpos' full, causal and sliding-window
    ones: those whose mask_mod reads a captured table (padding, dense, distance-window,
    segment masks) torch 2.13 fails to build ("'cur_kvSplitSize2' was not declared") or indexes
    with a wrong stride, and a caller's own mask_mod is not known to build (one of indices alone
    crashed the process with SIGFPE); more than one module that gathers per score (DPB): reads
    of key positions after a gather get a wrong stride (see ``flexpos.attention._compose``)."""
    for m in modules:
        if m.cpu_flex_refusal is not None:
            return f"cannot run {m.cpu_flex_refusal} on CPU"
    gathering = [type(m).__name__ for m in modules if m.gathers_per_score]
    if len(gathering) > 1:  # the second one's position reads follow the first one's gather
        return f"cannot run two score_mods that gather per score ({', '.join(gathering)}) on CPU"
    if torch_version() < CPU_FLEX_MIN_TORCH:
        return f"needs torch >= {'.'.join(map(str, CPU_FLEX_MIN_TORCH))} on CPU (found {torch.__version__})"
    if needs_grad:
        return (
            "cannot run gradients on CPU (needed for q, k, v, the positions or the modules' "
            "parameters: run inference under torch.no_grad())"
        )
    if q.dtype == torch.float64:
        return "cannot run float64 on CPU"
    if block_mask is not None and not cpu_flex_safe(block_mask):
        return (
            f"cannot run the mask {getattr(block_mask.mask_mod, '__name__', 'mask_mod')!r} on CPU "
            "(only flexpos' full, causal and sliding-window masks)"
        )
    return None
