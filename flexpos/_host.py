"""When flexpos reads tensor values back to the host (a device sync): value checks of positions,
the extents of integer positions (which pick cheaper score_mods and DPB's exact grid) and the
chunked backend's plan of which keys each query chunk needs.

In eager calls it does, once per call, or once per positions tensor inside
:func:`reuse_position_reads`; inside a caller's torch.compile it does not (each read would be a
graph break); in :func:`no_host_reads` and while a CUDA graph is captured it reads nothing at all.
Also here: which tracer or transform runs flexpos' code (a caller's torch.compile, torch.func,
forward-mode AD), which these decisions and the backend choice depend on.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections import OrderedDict
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")

_reads_allowed: contextvars.ContextVar[bool] = contextvars.ContextVar("flexpos_host_reads", default=True)


@contextlib.contextmanager
def no_host_reads() -> Iterator[None]:
    """Within this block flexpos reads no tensor value back to the host, so it never waits for
    the GPU: what CUDA graph capture requires, and what a capture's warm-up calls must do too
    (so that they compile the kernels the capture will launch). flexpos enters this mode by itself
    while a CUDA graph is captured.

    It costs: positions are not checked (NaN/inf, their span) nor LearnedVocab's for range; DPB,
    where it reads a table, chooses its grid on the device and reads a value and a slope per
    score; ALiBi reads two parts of each position; the chunked backend attends every query chunk
    to every key.

    Example::

        with flexpos.no_host_reads():
            out = layer(x, pos=pos)  # warm-up (on a side stream), then torch.cuda.graph capture
    """
    token = _reads_allowed.set(False)
    try:
        yield
    finally:
        _reads_allowed.reset(token)


_kept_reads: contextvars.ContextVar[Optional[OrderedDict[int, tuple[Any, int, Any]]]] = contextvars.ContextVar(
    "flexpos_kept_reads", default=None
)


@contextlib.contextmanager
def reuse_position_reads() -> Iterator[None]:
    """Within this block each positions tensor is read back to the host once: later calls with
    the same tensor object reuse what was read (each sequence's extremes; the last
    :data:`flexpos._checks.READS_KEPT` tensors, held until the block ends or they are dropped).
    On GPUs every read waits for the work queued before it, so the layers of a model that
    share one ``pos`` wait for it once per forward instead of once per layer. Other reads
    stay: DPB's check of an interpolated grid (until it warns), the chunked backend's plan,
    LearnedVocab's range check; a new view or slice of ``pos`` is another tensor; inference
    tensors (no version counter) are read in every call.

    The promise is yours: positions passed in the block do not change in it. An in-place change
    that bumps the tensor's version counter is read again; one that does not (a
    ``torch.distributed`` broadcast into it, writes through ``.data`` or a NumPy view) would go
    unseen, and extents read before it would size DPB's grid, or drop ALiBi's ``lo`` tables,
    wrongly. What was read is dropped when the block ends; nested blocks share the outer one's.

    Example::

        with flexpos.reuse_position_reads():
            out = model(x, pos=pos)  # every layer's attention reads pos once in all
    """
    if _kept_reads.get() is not None:
        yield
        return
    token = _kept_reads.set(OrderedDict())
    try:
        yield
    finally:
        _kept_reads.reset(token)


def kept_reads() -> Optional[OrderedDict[int, tuple[Any, int, Any]]]:
    """The reads kept by :func:`reuse_position_reads` (by ``id`` of the tensor, oldest first:
    the tensor, its version counter, what was read), or None outside such a block."""
    return _kept_reads.get()


_is_exporting: Callable[[], bool] = getattr(torch.compiler, "is_exporting", lambda: False)  # torch >= 2.7


def exporting() -> bool:
    """Whether torch.export traces this code outside Dynamo (non-strict export; torch >= 2.7).
    Not asked while Dynamo traces: with torch 2.11, asking there made a caller's torch.compile
    recompile for every new length (tests/test_layer.py)."""
    return not torch.compiler.is_dynamo_compiling() and _is_exporting()


def tracing() -> bool:
    """Whether this code is being traced by a caller's torch.compile (Dynamo) or torch.export.

    Not ``torch.compiler.is_compiling()``: a process-wide flag, which torch 2.13 holds for the
    whole compile session of any thread, so that a call in another thread would skip flexpos'
    checks and compiled kernels. Dynamo folds ``is_dynamo_compiling()`` to True in the code it
    traces; code that runs eagerly gets False."""
    return torch.compiler.is_dynamo_compiling() or _is_exporting()


def capturing_cuda_graph() -> bool:
    """Whether the current CUDA stream is capturing a CUDA graph (which forbids host syncs)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def blind() -> bool:
    """Whether no tensor value may be read back at all: :func:`no_host_reads`, or a capture.
    Never inside a caller's torch.compile, which decides for itself (Dynamo cannot trace a
    ContextVar: it would break the graph here)."""
    if tracing():
        return False
    return not _reads_allowed.get() or capturing_cuda_graph()


def host_reads() -> bool:
    """Whether flexpos may read tensor values back to the host (value checks, extents of integer
    positions): in eager calls, not inside a caller's torch.compile (a graph break there), nor
    where :func:`blind`."""
    return not (tracing() or blind())


def functorch_active() -> bool:
    """Whether a torch.func transform (grad, vjp, vmap, ...) is running (outside a caller's
    torch.compile, which traces the transforms itself)."""
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is not None and not tracing() and peek() is not None


def forward_ad_active() -> bool:
    """Whether a forward-mode AD level is open (``torch.autograd.forward_ad.dual_level``, as
    ``torch.func.jvp`` and ``jacfwd`` open one). Its tangents pass neither torch.compile (which
    drops them, or fails where autograd records too), FlexAttention, nor SDPA's CPU flash
    kernel: flexpos then runs its functions uncompiled, chunked, on SDPA's math kernel."""
    return getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


def without_grad_wrappers(t: Tensor) -> Tensor:
    """``t`` without torch.func.grad's wrappers (for tensors that carry no gradient)."""
    functorch = torch._C._functorch
    while functorch.is_gradtrackingtensor(t):
        t = functorch.get_unwrapped(t)
    return t


def on_host(functional: bool, read: Callable[..., T], *args: object) -> T:
    """``read(*args)``, which reads tensor values back to the host. Inside torch.func
    transforms (``functional``) torch 2.6 cannot read the tensors they wrap, and wraps every
    op's result: there the read runs with the transforms switched off."""
    if not functional:
        return read(*args)
    with torch._C._DisableFuncTorch():
        return read(*args)


def vmapped(t: Tensor) -> bool:
    """Whether ``t`` carries a torch.func.vmap batch dim (possibly under grad transforms)."""
    return torch._C._functorch.is_batchedtensor(without_grad_wrappers(t))
