"""``python -m flexpos.bench``: flexpos side by side with the dense path, on this machine.

The dense path is what a bio-attention user runs today: every positional bias is materialised
as a (B, NH, L, L) float tensor (DPB and XL first build (B, L, L, dim) activations) and handed
to ``torch.nn.functional.scaled_dot_product_attention`` as ``attn_mask``. flexpos evaluates the
same bias inside FlexAttention's kernel one tile at a time (CUDA), or one chunk of queries at a
time in front of SDPA (CPU, see ``flexpos.chunked``). The input encodings (``sinusoidal``,
``learned_vocab``, ``learned_continuous``) build no bias on either path: bio-attention's
``mod_x`` against flexpos' compiled transform, each adding the encoding to x (B, L, H*D) before
the same normalisation, projection and SDPA. For every scheme and length the bench runs both on
the same inputs in one process and prints time, peak memory growth and the largest difference
of their outputs, with plain SDPA (no positional effect) as the floor.

Dense baselines (``--dense``):

- ``bio``: bio-attention's own plugins (``mod_qkv`` / ``mod_mask`` / ``mod_x``, bio-attention's
  (B, L, NH, H) layout), with parameters copied from the flexpos modules so the outputs must agree;
- ``formula``: the same biases written out densely from their definitions, the encodings
  computed eagerly (``dense.py``), for machines without bio-attention (a GPU box, say);
- ``auto`` (default): ``bio`` when bio-attention is importable, else ``formula``.

Memory is the peak growth during one warm call: CUDA allocator statistics on GPU; on Linux CPUs
the process' peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` before the
call). Before that call glibc returns its free heap pages to the OS (``malloc_trim``), so every
page the call touches counts, heap or mmap; the allocator keeps its default behaviour, which is
what users run and what the timings see.

Compile time is the first call's time minus the steady time; torch.compile state is reset
before the first length of each scheme, so that every scheme compiles once, in isolation, and
a failure in one scheme cannot leave later ones on a slow path. Later lengths reuse the
dynamic-shape kernels (their compile time is about 0; on CUDA the second length compiles once
more, when flex's sizes turn symbolic).

Modules: ``cases`` (inputs and the three paths), ``dense`` (the dense formulas), ``memory``
(peak growth), ``run`` (one case), ``report`` (table, machine facts, plot), ``cli`` (``main``).
"""

from .cases import (
    DPB_DEPTH,
    DPB_DIM,
    DTYPES,
    INPUT_SCHEMES,
    SCHEMES,
    Case,
    Setup,
    bio_available,
    build_case,
    estimate_dense_bytes,
    irregular_positions,
    resolve_dense,
)
from .cli import DEFAULT_LENGTHS, foresee, main, parse_args
from .dense import (
    dense_alibi_bias,
    dense_dpb_bias,
    dense_encoding,
    dense_rotate,
    dense_xl_bias,
    distances,
    window_keep,
)
from .memory import GIB, MIB, PeakMemory, available_bytes
from .report import format_table, machine_facts, plot_results
from .run import Row, Runner, run_case

__all__ = [
    "DEFAULT_LENGTHS",
    "DPB_DEPTH",
    "DPB_DIM",
    "DTYPES",
    "GIB",
    "INPUT_SCHEMES",
    "MIB",
    "SCHEMES",
    "Case",
    "PeakMemory",
    "Row",
    "Runner",
    "Setup",
    "available_bytes",
    "bio_available",
    "build_case",
    "dense_alibi_bias",
    "dense_dpb_bias",
    "dense_encoding",
    "dense_rotate",
    "dense_xl_bias",
    "distances",
    "estimate_dense_bytes",
    "foresee",
    "format_table",
    "irregular_positions",
    "machine_facts",
    "main",
    "parse_args",
    "plot_results",
    "resolve_dense",
    "run_case",
    "window_keep",
]
