"""Lazy ``torch.compile``: nothing compiles at import, each function compiles on first use; and
which torch releases can compile what.

``set_compile(False)`` (or ``FLEXPOS_COMPILE=0``) runs the eager functions instead: the numbers
are the same, and float64 reference checks do not pay for a compile per variant. It covers the
transforms and the chunked backend's bias kernel; the flex backend always compiles
``flex_attention`` (its eager form materialises the scores, which is what flexpos avoids).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch
import torch._dynamo.config as dynamo_config
from torch.fx.experimental import _config as fx_config

from ._checks import check_bool
from ._host import forward_ad_active, tracing

_enabled = os.environ.get("FLEXPOS_COMPILE", "1") != "0"

Run = TypeVar("Run", bound=Callable[..., torch.Tensor])


CPU_FLEX_MIN_TORCH = (2, 9)
"""Oldest torch whose Inductor builds the CPU flex kernel with dynamic shapes (2.6 fails to lower
it, 2.7 and 2.8 fail to compile its C++)."""


def torch_version() -> tuple[int, int]:
    """(major, minor) of the running torch."""
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def set_compile(enabled: bool) -> bool:
    """Turn compiling of flexpos transforms and the chunked bias kernel on or off (on CUDA also
    Rotary's Triton kernel, :mod:`flexpos.rotary_triton`); returns the previous setting. Chunks
    that the chunked backend recomputes in backward keep the setting of their forward pass."""
    global _enabled
    previous, _enabled = _enabled, check_bool("enabled", enabled)
    return previous


def compile_enabled() -> bool:
    """The current :func:`set_compile` setting."""
    return _enabled


@contextlib.contextmanager
def compiling(enabled: bool) -> Iterator[None]:
    """:func:`set_compile` ``(enabled)`` for the block, the previous setting after it."""
    previous = set_compile(enabled)
    try:
        yield
    finally:
        set_compile(previous)


RECOMPILE_LIMIT = 64
"""Compiled variants per flexpos function. Each mix of score_mods and mask, each grad mode
(training, no_grad, inference_mode) and each dtype is one variant of the same function; past
Dynamo's default of 8 the rest would run uncompiled, 2-3x slower (measured)."""


def _settings() -> Iterator[tuple[Any, str, Any]]:
    """(config module, name, value) of each setting for flexpos' own compiled functions:

    - at least :data:`RECOMPILE_LIMIT` variants (torch >= 2.7 calls the setting
      ``recompile_limit``, 2.6 ``cache_size_limit``); a higher setting of the user's stays;
    - no duck sizing: equal sizes (batch 2 and 2 query blocks, say) do not become one symbol,
      so a later call where they differ does not recompile;
    - guards on the hooks of modules passed in (an MLP, an embedding), which Dynamo skips by
      default: a hook registered after the first call, or on another instance, would not run.
    """
    limit, duck, hooks = _SETTING_NAMES
    yield dynamo_config, limit, max(getattr(dynamo_config, limit), RECOMPILE_LIMIT)
    if duck:
        yield fx_config, "use_duck_shape", False
    if hooks:
        yield dynamo_config, "skip_nnmodule_hook_guards", False


_SETTING_NAMES = (
    "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit",
    hasattr(fx_config, "use_duck_shape"),  # private, in every torch from 2.6 to 2.15
    hasattr(dynamo_config, "skip_nnmodule_hook_guards"),
)
"""Which of :func:`_settings`' names this torch has, asked once: each ``hasattr`` on a config
module costs microseconds, and settings are entered in every call."""


@contextlib.contextmanager
def compile_settings() -> Iterator[None]:
    """:func:`_settings` for the duration, restored after; a caller's torch.compile keeps its
    own. Set directly: ``config.patch`` builds a class per use (~15 us each, per call)."""
    if tracing():
        yield
        return
    changed = []
    for config, name, value in _settings():
        previous = getattr(config, name)
        if previous != value:
            setattr(config, name, value)
            changed.append((config, name, previous))
    try:
        yield
    finally:
        for config, name, previous in reversed(changed):
            setattr(config, name, previous)


class LazyCompiled:
    """``fn`` compiled on first call, with ``dynamic=True`` by default (so new lengths do not
    recompile); ``options`` are Inductor settings for this function only."""

    def __init__(
        self, fn: Callable[..., Any], options: Optional[dict[str, Any]] = None, dynamic: Optional[bool] = True
    ) -> None:
        self.fn = fn
        self.options = options
        self.dynamic = dynamic
        self._compiled: Optional[Callable[..., Any]] = None
        self.__name__ = getattr(fn, "__name__", "compiled")
        self.__doc__ = fn.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not _enabled or tracing() or forward_ad_active():
            return self.fn(*args, **kwargs)
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=self.dynamic, options=self.options)
        with compile_settings():
            return self._compiled(*args, **kwargs)


def lazy_compile(
    fn: Callable[..., Any], options: Optional[dict[str, Any]] = None, dynamic: Optional[bool] = True
) -> LazyCompiled:
    """``dynamic=None`` is Dynamo's automatic mode: static sizes first, symbolic from the first
    call with other sizes on."""
    return LazyCompiled(fn, options, dynamic)


def joins_callers_graph(device: torch.device, grad_enabled: bool, backend: str) -> bool:
    """Whether :func:`flexpos.attention` joins a caller's torch.compile graph: on devices other
    than the CPU always; on the CPU in inference (grad mode off) on the chunked backend, unless
    the caller compiles with ``dynamic=True`` (``assume_static_by_default`` off while Dynamo
    traces): there the chunks' bounds are symbolic from the first call, and Inductor (torch
    2.13) failed to lower their slices ("Exponent must be non-negative").

    Elsewhere on the CPU it runs as in eager calls (a graph break), with flexpos' own compiled
    kernels (benchmarks/results/cpu-2026-11-29-g.txt). Traced into the caller's graph, the
    chunked backend's training steps were slower than eager ones: each chunk recomputed in
    backward where eager calls keep the flash kernel's outputs (Rotary + ALiBi, L=2048: 1.74x
    the eager layer's time, against 1.12x outside), and DPB's table on its full grid where eager
    calls size it to the positions; its inference was as fast or faster there (a small DPB
    layer: 0.58x against 0.87x). And Inductor's CPU flex kernel (torch 2.13) could not lower
    flex there: a score_mod reading tables computed in the graph
    (``NoValidChoicesError``), q from a view of a tensor of another rank (from a projection or
    Rotary), and, once lengths are dynamic, tables sized by them (C++ errors)."""
    if device.type != "cpu":
        return True
    return not grad_enabled and backend != "flex" and dynamo_config.assume_static_by_default


def eager_unless_joining(run: Run) -> Run:
    """``run(q, ..., backend=...)``, called outside a caller's torch.compile graph, as in eager
    calls, where :func:`joins_callers_graph` says no. torch.export traces it (Dynamo alone can
    leave a function out of its graph)."""
    eager = torch.compiler.disable(run)

    @functools.wraps(run)
    def wrapper(q: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if torch.compiler.is_dynamo_compiling() and not joins_callers_graph(
            q.device, torch.is_grad_enabled(), kwargs.get("backend", "auto")
        ):
            return eager(q, *args, **kwargs)
        return run(q, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
