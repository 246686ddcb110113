"""A layer inside its user's torch.compile against the same layer eager, on CPU, one process.

    python benchmarks/callers_compile.py [--length 2048] [--batch 1] [--dim 512] [--heads 8] [--dpb]
                                         [--repeat 10]

AttentionLayer(dim, heads) with Rotary and ALiBi (``--dpb``: and a depth-2 DPB, whose MLP
trains, so that the bias needs a gradient), float32, a key padding mask (the last eighth of
the keys) and causal masking. "outside": flexpos.attention runs outside the caller's graph, as in
eager calls; "traced": the caller's compile traces it into its graph, as on accelerators
(``flexpos._compile.joins_callers_graph`` patched either way). By default CPU training steps
and flex run outside, chunked inference is traced. Cases:

  chunked, forward           no_grad, the default backend on CPU
  chunked, forward+backward  gradients into x (the training step's attention)
  flex, forward              backend='flex', no_grad, causal mask alone (CPU flex takes no
                             padding mask); traced, Inductor fails to lower it (not timed)

Each line: median ms of the compiled layer (outside the graph, and traced), of the eager
layer, and their ratios. Compile excluded; "breaks" counts Dynamo's graph breaks at the first
call of each compiled variant.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Callable
from unittest import mock

import torch
from targets import interleaved  # also makes flexpos importable from a checkout
from torch._dynamo.utils import counters

import flexpos
import flexpos._compile
from flexpos import DPB, ALiBi, AttentionLayer, Rotary

PLACES = {True: lambda *where: True, False: lambda *where: False}  # one object each: Dynamo guards on it


def in_graph(joins: bool, step: Callable[[], object]) -> Callable[[], object]:
    """``step`` with flexpos.attention traced into the caller's graph (``joins``) or not."""

    def run() -> object:
        with mock.patch.object(flexpos._compile, "joins_callers_graph", PLACES[joins]):
            return step()

    return run


def interleaved_ms(steps: dict[str, Callable[[], object]], repeat: int) -> tuple[dict[str, float], dict[str, int]]:
    """Median ms of each step (:func:`targets.interleaved`, after one warm-up call each), and the
    graph breaks Dynamo counted at each one's warm-up."""
    breaks = {}
    for name, step in steps.items():
        before = sum(counters["graph_break"].values())
        step()
        breaks[name] = sum(counters["graph_break"].values()) - before
    times = interleaved(steps, lambda: None, repeat)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}, breaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2048, help="L (default 2048)")
    parser.add_argument("--batch", type=int, default=1, help="B (default 1)")
    parser.add_argument("--dim", type=int, default=512, help="model width (default 512)")
    parser.add_argument("--heads", type=int, default=8, help="heads (default 8)")
    parser.add_argument("--dpb", action="store_true", help="add a depth-2 DPB (its MLP trains)")
    parser.add_argument("--repeat", type=int, default=10, help="timed calls per line (default 10)")
    args = parser.parse_args()
    torch.manual_seed(0)
    length, heads = args.length, args.heads
    x = torch.randn(args.batch, length, args.dim, requires_grad=True)
    pos = torch.rand(args.batch, length).cumsum(-1) * 10
    valid = torch.ones(args.batch, length, dtype=torch.bool)
    valid[:, length - length // 8 :] = False
    schemes = "Rotary + ALiBi" + (" + DPB(depth 2)" if args.dpb else "")
    print(f"flexpos {flexpos.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"AttentionLayer({args.dim}, {heads}) with {schemes}, B={args.batch} L={length}, float32")
    print(f"{'case':26s} {'outside ms':>10s} {'breaks':>6s} {'traced ms':>9s} {'breaks':>6s} {'eager ms':>8s} "
          f"{'outside/eager':>13s} {'traced/eager':>12s}")
    for backend, mask, training in (("chunked", valid, False), ("chunked", valid, True), ("flex", None, False)):
        positional = [Rotary(args.dim // heads), ALiBi(heads)] + ([DPB(16, heads, depth=2, divide=100.0)] if args.dpb else [])
        layer = AttentionLayer(args.dim, heads, positional=positional, backend=backend)
        compiled = torch.compile(layer)

        def step(model: torch.nn.Module) -> object:
            out = model(x, pos=pos, mask=mask, causal=True)
            return torch.autograd.grad(out.square().sum(), x) if training else out

        steps = {"outside": in_graph(False, lambda: step(compiled)), "eager": lambda: step(layer)}
        if backend != "flex":
            steps["traced"] = in_graph(True, lambda: step(compiled))
        with torch.set_grad_enabled(training):
            ms, breaks = interleaved_ms(steps, args.repeat)
        eager = ms["eager"]
        traced = (f"{ms['traced']:9.1f} {breaks['traced']:6d}", f"{ms['traced'] / eager:11.2f}x") if "traced" in ms else (
            f"{'-':>9s} {'-':>6s}", f"{'-':>12s}")
        name = f"{backend}, {'forward+backward' if training else 'forward'}"
        print(f"{name:26s} {ms['outside']:10.1f} {breaks['outside']:6d} {traced[0]} {eager:8.1f} "
              f"{ms['outside'] / eager:12.2f}x {traced[1]}")


if __name__ == "__main__":
    main()
