"""flexpos' host-side work per call on the flex path, as an accelerator runs it, measured on CPU.

    python benchmarks/host_overhead.py [--length 256] [--repeat 300]

On a GPU this work (checks, position tables, one read back of integer positions' extents) runs
on the host before the kernel is launched; in a call timed from a synced GPU it adds to the
kernel's time, and each read back makes the host wait for the GPU. Here flex's kernel is stubbed
out (it returns an empty output), tables are chosen as on accelerators
(:func:`flexpos.positions.fewer_tables`) and the CPU paths' workarounds are skipped, so what is
timed is the host's own work: forward, no grad, B=4 H=16 D=64. Rows interleaved, median
microseconds and the extra over the row without a positional module; ``ops``: tensor ops per
call (each one a kernel launch, or a read back, on a GPU).

Positions: sorted integers with gaps 1-3 from 10**6 (or half of them, as float64), one tensor
for every call: read back in every call all the same (:func:`flexpos._checks.read_positions`),
except in the row "in reuse_position_reads", whose calls run inside one
:func:`flexpos.reuse_position_reads` block, as the later layers of a model do there.
"""

from __future__ import annotations

import argparse
import contextvars
import statistics
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from targets import interleaved  # also makes flexpos importable from a checkout

import flexpos
from flexpos import flex, positions

SHAPE_OPS = {"view", "reshape", "expand", "_unsafe_view", "t", "transpose", "detach", "alias", "slice", "select",
             "unsqueeze", "squeeze", "as_strided", "empty", "new_empty"}
"""Ops that only make views or empty tensors: no kernel on a GPU."""


class CountOps(TorchDispatchMode):
    """Counts the tensor ops that run kernels (see :data:`SHAPE_OPS`)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.overloadpacket.__name__ not in SHAPE_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def stub_the_kernel() -> None:
    """flex's kernel returns an empty output; tables as on accelerators; no CPU workarounds."""
    def kernel(q, k, v, score_mod=None, block_mask=None, kernel_options=None, enable_gqa=False):  # type: ignore[no-untyped-def]
        return q.new_empty(*q.shape[:-1], v.shape[-1])

    flex._flex = lambda device: kernel
    flex._cpu_batch_of_one = lambda q, k, v, mod: (q, k, v, mod, lambda out: out)
    flex._cpu_safe = lambda q, k, v: (q, k, v)
    positions.fewer_tables = lambda device: True


def rows(length: int) -> dict[str, Callable[[], object]]:
    batch, heads = 4, 16
    q, k, v = (torch.randn(batch, heads, length, 64) for _ in range(3))
    pos = torch.randint(1, 4, (batch, length)).cumsum(-1) + 10**6
    floats = pos.double() * 0.5
    alibi = flexpos.ALiBi(heads)
    dpb = flexpos.DPB(32, heads, depth=2).requires_grad_(False)
    return {
        "no positional module": lambda: flexpos.attention(q, k, v, backend="flex"),
        "ALiBi, default positions": lambda: flexpos.attention(q, k, v, alibi, backend="flex"),
        "ALiBi, int positions": lambda: flexpos.attention(q, k, v, alibi, pos=pos, backend="flex"),
        "ALiBi, int positions, in reuse_position_reads":
            in_one_block(lambda: flexpos.attention(q, k, v, alibi, pos=pos, backend="flex")),
        "ALiBi, float positions": lambda: flexpos.attention(q, k, v, alibi, pos=floats, backend="flex"),
        "DPB frozen, int positions": lambda: flexpos.attention(q, k, v, dpb, pos=pos, backend="flex"),
    }


_open_blocks: list[Callable[[], object]] = []  # closers, for the end of main


def in_one_block(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run in a context where one :func:`flexpos.reuse_position_reads` block stays open
    across calls (the other rows run outside it)."""
    context, block = contextvars.copy_context(), flexpos.reuse_position_reads()
    context.run(block.__enter__)
    _open_blocks.append(lambda: context.run(block.__exit__, None, None, None))
    return lambda: context.run(fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=256, help="L (default 256)")
    parser.add_argument("--repeat", type=int, default=300, help="timed rounds (default 300)")
    args = parser.parse_args()
    torch.manual_seed(0)
    stub_the_kernel()
    fns = rows(args.length)
    ops = {}
    with torch.no_grad():
        for name, fn in fns.items():
            fn()  # warm up: imports, the shared masks
            with CountOps() as counted:
                fn()
            ops[name] = counted.count
        times = interleaved(fns, lambda: None, args.repeat)  # nothing to sync on the CPU
    print(f"flexpos {flexpos.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"host work per call, flex kernel stubbed; B=4 H=16 L={args.length} D=64")
    base = statistics.median(times["no positional module"])
    print(f"{'row':46s} {'us':>6s} {'extra us':>9s} {'ops':>4s}")
    for name, t in times.items():
        median = statistics.median(t)
        print(f"{name:46s} {1e6 * median:6.0f} {1e6 * (median - base):9.0f} {ops[name]:4d}")
    for close in _open_blocks:
        close()


if __name__ == "__main__":
    main()
