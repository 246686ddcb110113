"""Lazy ``torch.compile``: nothing compiles at import, each function compiles on first use; and
which torch releases can compile what.

``set_compile(False)`` (or ``FLEXPOS_COMPILE=0``) runs the eager functions instead: the numbers
are the same, and float64 reference checks do not pay for a compile per variant. It covers the
transforms and the chunked backend's bias kernel; the flex backend always compiles
``flex_attention`` (its eager form materialises the scores, which is what flexpos avoids).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, Optional

import torch
import torch._dynamo.config as dynamo_config
from torch.fx.experimental import _config as fx_config

_enabled = os.environ.get("FLEXPOS_COMPILE", "1") != "0"


CPU_FLEX_MIN_TORCH = (2, 9)
"""Oldest torch whose Inductor builds the CPU flex kernel with dynamic shapes (2.6 fails to lower
it, 2.7 and 2.8 fail to compile its C++)."""


def torch_version() -> tuple[int, int]:
    """(major, minor) of the running torch."""
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def set_compile(enabled: bool) -> bool:
    """Turn compiling of flexpos transforms and the chunked bias kernel on or off; returns the
    previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


RECOMPILE_LIMIT = 64
"""Compiled variants per flexpos function. Each mix of score_mods and mask, each grad mode
(training, no_grad, inference_mode) and each dtype is one variant of the same function; past
Dynamo's default of 8 the rest would run uncompiled, 2-3x slower (measured)."""


def _more_variants() -> contextlib.AbstractContextManager[None]:
    """Allow at least :data:`RECOMPILE_LIMIT` variants (torch >= 2.7 calls the setting
    ``recompile_limit``, 2.6 ``cache_size_limit``); a higher setting of the user's stays."""
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    if getattr(dynamo_config, name) >= RECOMPILE_LIMIT:
        return contextlib.nullcontext()  # a patch costs ~20 us: callers enter it once per call
    return dynamo_config.patch(name, RECOMPILE_LIMIT)


def _sizes_apart() -> contextlib.AbstractContextManager[None]:
    """Without duck sizing, equal sizes (batch 2 and 2 query blocks, say) do not become one
    symbol, so a later call where they differ does not recompile."""
    if not fx_config.use_duck_shape:
        return contextlib.nullcontext()
    return fx_config.patch(use_duck_shape=False)


def _hooks_guarded() -> contextlib.AbstractContextManager[None]:
    """Guard on the hooks of modules passed in (an MLP, an embedding): by default Dynamo does
    not, and a hook registered after the first call, or on another instance, would not run."""
    if not getattr(dynamo_config, "skip_nnmodule_hook_guards", False):
        return contextlib.nullcontext()
    return dynamo_config.patch(skip_nnmodule_hook_guards=False)


@contextlib.contextmanager
def compile_settings() -> Iterator[None]:
    """Dynamo settings for flexpos' own compiled functions: :func:`_more_variants`,
    :func:`_sizes_apart` and :func:`_hooks_guarded`. A caller's torch.compile keeps its own
    settings."""
    if torch.compiler.is_compiling():
        yield
        return
    with _more_variants(), _sizes_apart(), _hooks_guarded():
        yield


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
        if not _enabled or torch.compiler.is_compiling():
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
