"""The one-time hint that points users of the compatibility layer to the native API."""

from __future__ import annotations

import warnings

_shown = False

_NATIVE_MODULES = ("Sinusoidal", "LearnedVocab", "LearnedContinuous", "Rotary", "ALiBi", "DPB", "XL")


def native_api(name: str) -> str:
    """The flexpos replacement of ``legacy.<name>`` (e.g. 'positional.ALiBi')."""
    short = name.rsplit(".", 1)[-1]
    if short in _NATIVE_MODULES:
        return f"flexpos.{short} with flexpos.attention or flexpos.AttentionLayer"
    return "flexpos.AttentionLayer or flexpos.attention"


def hint_once(name: str) -> None:
    """One FutureWarning per process, the first time any legacy class (``name``) is built."""
    global _shown
    if _shown:
        return
    _shown = True
    warnings.warn(
        f"legacy.{name} is a bio-attention compatibility class; new code should use "
        f"{native_api(name)} (checkpoints load unchanged; see docs/legacy.md)",
        FutureWarning,
        stacklevel=3,
    )


def reset() -> None:
    """Allow the hint to be shown again (for tests)."""
    global _shown
    _shown = False
