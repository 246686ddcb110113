"""The flex backend: ``torch.compile(flex_attention)``, its Triton kernel options, and the
input workarounds Inductor's CPU flex kernel needs (which calls may reach it:
:func:`flexpos.backends.choose_backend`).
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ._compile import compile_settings
from ._gqa import share_kv_heads
from ._host import tracing
from .base import Positional, ScoreMod

_compiled_flex: dict[bool, Callable[..., Tensor]] = {}  # by "on CUDA"


def _flex(device: torch.device) -> Callable[..., Tensor]:
    """flex_attention compiled on first use; inside a caller's torch.compile, flex_attention
    itself, which the caller's compile fuses into its graph.

    On CUDA with Dynamo's automatic sizes: static until a call with other sizes, symbolic from
    then on. Static sizes made flex with no score_mod 1.3x faster on an H200 (bf16, L=8192,
    forward+backward; benchmarks/results/gpu-2026-11-27-c.txt and -d.txt), at the price of one more
    compile when B or L first change. Elsewhere symbolic from the first call.
    """
    if tracing():
        return flex_attention
    cuda = device.type == "cuda"
    if cuda not in _compiled_flex:
        _compiled_flex[cuda] = torch.compile(flex_attention, dynamic=None if cuda else True)
    return _compiled_flex[cuda]


GATHER_TILES = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32}
"""Triton tiles for score_mods that gather a table entry per score (DPB): forward 64x64,
backward 32x64 and 64x32. Triton stages such gathers in shared memory for every pipeline stage;
with CUDA's default bf16 tiles on an H100/H200 (forward 128x128) DPB with a padding mask needed
444,416 bytes of the 232,448 there are (benchmarks/results/gpu-2026-11-27.txt)."""


KernelOptions = Mapping[str, Union[int, bool, str]]


# Chosen by flex_attention per call (from grad mode and return flags); it refuses them given.
FLEX_OWN_OPTIONS = ("OUTPUT_LOGSUMEXP", "OUTPUT_MAX")


def check_kernel_options(options: object) -> Optional[dict[str, Union[int, bool, str]]]:
    """None, or a mapping of FlexAttention kernel option names (str) to int, bool or str values,
    copied into a dict."""
    if options is None:
        return None
    if not isinstance(options, Mapping):
        raise TypeError(f"kernel_options must be a dict of option names to values, got {type(options).__name__}")
    for key, value in options.items():
        if not isinstance(key, str):
            raise TypeError(f"kernel_options keys must be option names (str), got {key!r}")
        if not isinstance(value, (int, str)):  # bool is an int
            raise TypeError(f"kernel_options[{key!r}] must be an int, bool or str, got {type(value).__name__}")
        if key in FLEX_OWN_OPTIONS:
            raise ValueError(f"kernel_options[{key!r}] is set by FlexAttention itself; leave it out")
    return dict(options)


def flex_kernel_options(
    device: torch.device, modules: Sequence[Positional], given: Optional[KernelOptions] = None
) -> Optional[dict[str, Union[int, bool, str]]]:
    """Triton kernel options for flex on ``device`` with these modules: :data:`GATHER_TILES`
    on CUDA when a score_mod gathers per score, then the caller's ``given`` options over them
    (``fwd_``/``bwd_`` prefixed names take precedence in flex itself); None for flex's defaults."""
    options: dict[str, Union[int, bool, str]] = {}
    if device.type == "cuda" and any(m.gathers_per_score for m in modules):
        options.update(GATHER_TILES)
    options.update(given or {})
    return options or None


def run_flex(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    score_mod: Optional[ScoreMod],
    block_mask: BlockMask,
    scale: float,
    kernel_options: Optional[KernelOptions] = None,
) -> Tensor:
    """q (B, H, Lq, E), k (B, Hkv, Lk, E), v (B, Hkv, Lk, Dv) -> (B, H, Lq, Dv), Hkv dividing H
    (grouped-query attention); ``kernel_options`` go to flex's Triton kernels (see
    :func:`flex_kernel_options`)."""
    if not torch.is_grad_enabled():
        # CPU flex refuses inputs that require grad even under no_grad; nothing flows back here.
        q, k, v = q.detach(), k.detach(), v.detach()
    dv = v.shape[-1]
    if q.device.type == "cpu":
        # The batch-of-one workaround moves heads into the batch, where flex cannot group them.
        k, v = share_kv_heads(k, v, q.shape[1])
        q, k, v, score_mod, restore = _cpu_batch_of_one(q, k, v, score_mod)
        q, k, v = _cpu_safe(q, k, v)
    grouped = k.shape[1] != q.shape[1]
    default = q.shape[-1] ** -0.5
    if scale != default:
        # A Python float scale becomes a symbolic float under dynamic=True, which the CPU
        # kernel cannot lower; fold it into q and let flex apply its default 1/sqrt(E).
        q = q * (scale / default)
    with compile_settings():
        out = _flex(q.device)(
            q, k, v, score_mod=score_mod, block_mask=block_mask, kernel_options=kernel_options, enable_gqa=grouped
        )
    if q.device.type == "cpu":
        out = restore(out)
    return out[..., :dv]


MIN_CPU_HEAD_DIM = 32


def _cpu_batch_of_one(
    q: Tensor, k: Tensor, v: Tensor, score_mod: Optional[ScoreMod]
) -> tuple[Tensor, Tensor, Tensor, Optional[ScoreMod], Callable[[Tensor], Tensor]]:
    """Inductor's CPU flex kernel fails to build for batch 1 (torch 2.13, 'cur_qSplitSize7' was
    not declared): run the heads as the batch (or a lone head twice) and map indices back.

    Only reached with masks that ignore b and h (see ``cpu_flex_safe``). Returns q, k, v, the
    score_mod to use and a function that restores the output's (B, H, Lq, Dv) layout.
    """
    if q.shape[0] != 1:
        return q, k, v, score_mod, lambda out: out
    heads = q.shape[1]
    if heads > 1:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        restore = lambda out: out.transpose(0, 1)  # noqa: E731
    else:
        q, k, v = (torch.cat((t, t)) for t in (q, k, v))
        restore = lambda out: out[:1]  # noqa: E731
    if score_mod is None:
        return q, k, v, None, restore
    inner = score_mod

    def batch_of_one(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        zero = torch.zeros_like(b)
        return inner(score, zero, b if heads > 1 else h, q_idx, kv_idx)

    batch_of_one.__name__ = f"{getattr(inner, '__name__', 'score_mod')}_batch_of_one"
    return q, k, v, batch_of_one, restore


def _cpu_safe(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Work around two faults of Inductor's CPU flex kernel (torch 2.13), same numbers:

    - view inputs with a score_mod fail to build ('cur_kvSplitSize1' was not declared): copy;
    - head dims 8 and 16 give wrong rows for some lengths < 128: zero-pad q, k, v to 32.
    """
    q, k, v = (t.clone(memory_format=torch.contiguous_format) if t._base is not None else t for t in (q, k, v))
    if q.shape[-1] < MIN_CPU_HEAD_DIM:
        q, k = (F.pad(t, (0, MIN_CPU_HEAD_DIM - t.shape[-1])) for t in (q, k))
    if v.shape[-1] < MIN_CPU_HEAD_DIM:
        v = F.pad(v, (0, MIN_CPU_HEAD_DIM - v.shape[-1]))
    return q, k, v
