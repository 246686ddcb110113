"""Dynamic positional bias: a per-head MLP of the relative distance, as a score_mod.

The MLP is never run per score element. An affine MLP (bio-attention's default: ``depth=1``,
no ``norm``) is ``rate_h * Delta + shift_h``: its score_mod reads those two numbers per head,
at every distance without interpolation, with no table (:meth:`DPB._affine_score_mod`). The
flex backend keeps the table below for it where its parameters get gradients (flex's backward
adds each score's gradient into the captured tensor it read with an atomic add, and a per-head
rate would take all of a tile's adds at one address, where table cells spread them) and on
CPU (:attr:`DPB.gathers_per_score`).

Any other MLP is evaluated once on a grid of distances and the score_mod reads a (value,
slope) pair per head and grid cell, interpolating linearly:

- integer positions whose distances fit the table (``2 * span + 1 <= table_size``): one grid
  node per integer distance, interpolation weight 0, so the bias is exactly the MLP's value;
- otherwise (float positions, or wider spans): ``table_size`` nodes evenly spread over
  ``[-span, span]`` with step ``s`` (in position units). Linear interpolation of a twice
  differentiable function is off by at most ``(s / divide)^2 / 8 * max|MLP''|`` (second
  derivative taken over the MLP's input ``Delta / divide``). Parameter gradients are those of
  the interpolated bias: the same bound holds with ``MLP`` replaced by its derivative with
  respect to each parameter, whose curvature in ``Delta`` can be larger than the MLP's.
  Position gradients are the slopes of the interpolation, within ``s / 2 / divide^2 *
  max|MLP''|`` of the exact derivative. A distance's cell is counted from the node at (or next
  to) 0, so that float32 rounds its offset at the scale of the distance, not of the span.

When positions require gradients, the table is computed in float64 (its slopes would
otherwise magnify the model dtype's rounding by ``1 / s``). The grid depends on the positions
but carries no gradient.

Short sequences on CPU: where a call has fewer (sequence, query, key) pairs than grid nodes,
the chunked backend runs the MLP at every pair's distance instead and reads a
``(B, n_heads, Lq, Lk)`` table (:func:`evaluates_pairs`): exact biases and position gradients,
and no fixed cost of ``table_size`` MLP rows per call. Inductor's CPU flex kernel (torch 2.13)
cannot build a score_mod reading such a table, so the flex backend keeps the grid.

In eager calls the span of integer positions is known on the host (see
:meth:`Positions.integer_span`): where the grid is exact the score_mod reads the value alone,
no slope (on an H200, DPB with its MLP frozen took 50 instead of 136 ms that way:
benchmarks/results/gpu-2026-11-27-d.txt). On CPU the exact grid then has just ``2 * span + 1``
nodes (DPB's forward at L=4096: 394-398 instead of 428-485 ms, benchmarks/results/cpu-2026-11-27.txt);
elsewhere it keeps ``table_size`` nodes, so that the table's size, and with it the compiled
kernel, does not change from call to call. Inside a caller's torch.compile (and in
:func:`flexpos.no_host_reads`) the grid is chosen on the device (nothing read back) and the
score_mod reads a value and a slope per score. Values
and slopes are two tensors, each read once per score element, which FlexAttention's backward
requires of captured tensors that need gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_positive_int, warn_caller
from ._host import functorch_active, host_reads, tracing
from .base import Positional, ScoreMod, index_grids
from .learned import mlp_dtype, position_mlp, run_mlp, watch_autocast
from .positions import Positions, two_rows


@dataclass(frozen=True)
class DistanceGrid:
    """Evenly spaced distances ``start + step * i`` for ``i < size`` (position units); start and
    step are 0-d float64 tensors. ``exact``: known on the host to hold one node per integer
    distance of integer positions (the bias is a node's value, no interpolation)."""

    start: Tensor
    step: Tensor
    size: int
    exact: bool = False

    @classmethod
    def covering(
        cls, span: Tensor, integer: bool, table_size: int, known_span: Optional[int] = None, shrink: bool = False
    ) -> "DistanceGrid":
        """A grid over ``[-span, span]`` (``span`` a 0-d float64 tensor, at least 1 is used).

        ``known_span``: the same span as a host int, for integer positions (None where not
        known). Where its ``2 * span + 1`` integer distances fit ``table_size``, the grid is
        :attr:`exact`: one node per integer distance, ``2 * span + 1`` nodes with ``shrink``,
        else ``table_size`` nodes centred on 0. Otherwise ``table_size`` nodes from ``-span``
        to ``span``; with the span unknown on the host, chosen on the device (no sync, no graph
        break): centred on 0 with step 1 where ``integer`` positions fit, not marked exact.
        """
        span = span.clamp(min=1.0)
        ones = torch.ones_like(span)
        centred = torch.full_like(span, -((table_size - 1) // 2))
        spread = 2 * span / (table_size - 1)
        if known_span is not None:
            nodes = 2 * max(known_span, 1) + 1
            if nodes > table_size:
                return cls(-span, spread, table_size)
            return cls(-span, ones, nodes, exact=True) if shrink else cls(centred, ones, table_size, exact=True)
        exact = (2 * span + 1 <= table_size) & integer
        return cls(torch.where(exact, centred, -span), torch.where(exact, ones, spread), table_size)

    def nodes(self) -> Tensor:
        """(size,) float64 grid distances."""
        return self.start + self.step * torch.arange(self.size, device=self.start.device, dtype=torch.float64)

    def middle(self) -> tuple[int, Tensor]:
        """Index ``(size - 1) // 2`` and its distance (0-d float64): 0, or half a step below 0
        for an even number of spread nodes, in every grid :meth:`covering` builds. Cells counted
        from it round at the scale of the distance: from ``start`` (``-span``), float32 put a
        neighbour's offset within its cell off by up to ``span * 2**-24``."""
        index = (self.size - 1) // 2
        return index, self.start + index * self.step


COARSE_GRID_ERROR = 1e-3
"""Estimated interpolation error of DPB's grid, in score units, from which an eager call warns
(once per module) that the grid is too coarse for its MLP."""


def interpolation_error(slopes: Tensor, step: Tensor) -> Tensor:
    """0-d float64 estimate of the largest error of linear interpolation on a grid of ``step``
    (0-d) with (H, N) ``slopes`` per cell: an eighth of the largest second difference of the
    node values, ``step * |slope change|`` (``step^2 / 8 * |MLP''|`` where the MLP is smooth
    at the step's scale; where it is not, the same order of magnitude)."""
    return torch.diff(slopes, dim=-1).abs().amax().double() * step / 8


def shrinks_grid(device: torch.device) -> bool:
    """Size an exact grid to the span on CPU, where that saves MLP work on short sequences; keep
    ``table_size`` nodes elsewhere, where one table size keeps compiled kernels' static sizes."""
    return device.type == "cpu"


def evaluates_pairs(device: torch.device, pairs: int, nodes: int) -> bool:
    """Run the MLP on every (sequence, query, key) pair rather than on the grid (on the chunked
    backend): on CPU, in eager calls, where there are fewer pairs than grid nodes. The grid's
    fixed cost (65,537 nodes by default) then outweighs short sequences' attention, and each
    bias is the MLP's exact value."""
    return device.type == "cpu" and not tracing() and pairs < nodes


class DPB(Positional):
    """Subtracts ``MLP(Delta / divide)[h]`` from every score, ``Delta = p_q - p_k``.

    The MLP has bio-attention's layout (``mlp.0`` ... ``mlp.depth``: Linear(1, dim) with
    optional LayerNorm, then ``depth - 1`` SiLU/Linear blocks, then Linear(dim, n_heads));
    ``dim`` is its hidden width, not the model's. It never runs per score:

    - With bio-attention's defaults (``depth=1``, no ``norm``) it is two Linear layers, affine in
      ``Delta``: the bias is ``rate_h * Delta + shift_h``, from two MLP rows per call, with no
      table and no interpolation (only the rounding of that product in the compute dtype).
      The flex backend reads a table instead where the MLP trains, and on CPU (see
      :attr:`gathers_per_score`).
    - Otherwise (``depth >= 2`` adds SiLU blocks, ``norm`` LayerNorms) it runs once per call on
      a grid of at most ``table_size`` distances (on CPU's chunked backend at every pair's
      distance where there are fewer pairs): for integer positions with ``2 * span + 1 <=
      table_size`` (span: the largest ``|p_q - p_k|`` in the call) the bias is the MLP's exact
      value; otherwise a linear interpolation, off by at most ``(step / divide)^2 / 8 *
      max|MLP''|`` with ``step = 2 * span / (table_size - 1)`` (details in :mod:`flexpos.dpb`).

    Tokens without a position get no bias.

    A module providing a score_mod, passed to :func:`flexpos.attention` with q (B, *, n_heads, Lq, D) and positions
    ``pos`` (B, *, L') or ``pos_q`` (B, *, Lq') / ``pos_k`` (B, *, Lk').

    Example::

        dpb = DPB(dim=32, n_heads=8, depth=2)
        out = flexpos.attention(q, k, v, dpb, pos=pos)
    """

    modifies_scores = True
    masks_scores = False  # the MLP's values are finite
    _repr_fields = ("n_heads", "table_size")

    def __init__(
        self,
        dim: int,
        n_heads: int,
        depth: int = 1,
        norm: bool = False,
        divide: float = 1.0,
        learned_div: bool = False,
        *,
        table_size: int = 65537,
    ) -> None:
        super().__init__()
        self.n_heads = check_positive_int("n_heads", n_heads)
        self.table_size = check_positive_int("table_size", table_size)
        if self.table_size < 2:
            raise ValueError(f"table_size must be >= 2, got {table_size}")
        self._init_divisor(divide, learned_div)
        self.mlp = position_mlp(dim, depth, norm, out=n_heads)
        self._warned_coarse = False

    @property
    def affine(self) -> bool:
        """Whether the MLP is affine in its input: Linear(1, dim), then Linear(dim, n_heads)."""
        return len(self.mlp) == 2 and all(isinstance(layer, nn.Identity) for layer in list(self.mlp[0].children())[1:])

    @property
    def gathers_per_score(self) -> bool:  # type: ignore[override]
        """Reads its table per score on the flex backend (the flags are read before the backend
        is chosen): unless affine, except where its parameters get gradients, and on CPU, where
        Inductor's flex kernel (torch 2.13) mis-indexed the rate-and-shift score_mod at batch >= 2
        and more than 128 queries ("index out of bounds ... cur_qSplitSize")."""
        return not self.affine or self._trains() or self.mlp[-1].weight.device.type == "cpu"

    def _trains(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())

    def bias_at(self, distances: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """(...,) distances in position units -> (..., n_heads) MLP outputs, computed in
        ``dtype`` (default: the MLP's, at least float32)."""
        return watch_autocast(run_mlp(self.mlp, (distances.double() / self.divisor(torch.float64))[..., None], dtype))

    def tables(self, grid: DistanceGrid, dtype: torch.dtype, precise: bool = False) -> tuple[Tensor, Tensor]:
        """(n_heads, size + 2) values at the grid nodes and slopes per position unit to the next.

        ``precise`` runs the MLP in float64. Gradients with respect to positions need it: a
        slope divides a value difference by the step, which magnifies the MLP's rounding by up
        to ``1 / step``. In the bias itself a slope is multiplied by an offset below the step,
        which undoes that.
        """
        values = self.bias_at(grid.nodes(), torch.float64 if precise else mlp_dtype(dtype)).t()
        slopes = torch.diff(values, dim=-1) / grid.step
        # The last node (distance +span, which a pair can reach) continues the last cell's line.
        slopes = torch.cat((slopes, slopes[:, -1:]), dim=-1)
        # One guard cell at each end extends the line outward: a distance rounded just past the
        # grid still reads a valid cell, so the score_mod needs no clamp.
        before = values[:, :1] - slopes[:, :1] * grid.step
        after = values[:, -1:] + slopes[:, -1:] * grid.step
        values = torch.cat((before, values, after), dim=-1)
        slopes = F.pad(slopes, (1, 1), mode="replicate")
        return values.to(dtype).contiguous(), slopes.to(dtype).contiguous()

    def score_mod(self, positions: Positions, dtype: torch.dtype = torch.float32) -> ScoreMod:
        """An affine MLP's rate and shift per head (:meth:`_affine_score_mod`; on the flex backend
        only where :attr:`gathers_per_score` says so), the MLP at every pair's distance
        (:meth:`_pairs_score_mod`), or read from its table on a grid of distances that covers the
        positions (:meth:`_grid_score_mod`)."""
        if self.affine and (positions.chunked or not self.gathers_per_score):
            return self._affine_score_mod(positions, dtype)
        device = positions.q.device
        # The grid is a discretisation, not a function of the positions: no gradient through it.
        grid = DistanceGrid.covering(
            positions.span_tensor().detach(),
            positions.is_integer,
            self.table_size,
            positions.integer_span(),
            shrinks_grid(device),
        )
        pairs = positions.batch * positions.len_q * positions.len_k
        if positions.chunked and evaluates_pairs(device, pairs, grid.size):
            return self._pairs_score_mod(positions, dtype)
        return self._grid_score_mod(positions, grid, dtype)

    def _grid_score_mod(self, positions: Positions, grid: DistanceGrid, dtype: torch.dtype) -> ScoreMod:
        """The score_mod reading the MLP's (n_heads, nodes) table on ``grid``: at the node of each
        distance on an exact grid, else interpolated between the two nodes around it."""
        values, slopes = self.tables(grid, dtype, positions.q.requires_grad or positions.k.requires_grad)
        if not grid.exact:
            self._warn_if_coarse(slopes, grid)
        values, slopes = two_rows(values), two_rows(slopes)
        rel = positions.relative(dtype)
        start, step = grid.start.to(dtype), grid.step.to(dtype)
        middle, zero = grid.middle()
        zero, first = zero.to(dtype), middle + 1  # + 1: past the guard cell
        # Positions whose values were not checked (no host reads) may be NaN: keep the read of a
        # NaN distance (whose bias is NaN anyway) inside the table.
        last_cell = None if host_reads() else values.shape[-1] - 1

        def dpb(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            delta, valid = rel.distance(b, q_idx, kv_idx)
            # A token without a position has no distance inside the grid: read at 0 instead.
            delta = torch.where(valid, delta, 0.0)
            cell = torch.floor((delta - zero) / step)  # counted from the middle node
            offset = delta - (zero + cell * step)
            cell = cell.to(torch.int64) + first
            if last_cell is not None:
                cell = cell.clamp(0, last_cell)
            bias = values[h, cell] + slopes[h, cell] * offset
            return score - torch.where(valid, bias, 0.0).to(score.dtype)

        def dpb_exact(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            delta, valid = rel.distance(b, q_idx, kv_idx)  # integers, exact in float32 here
            node = (torch.where(valid, delta, 0.0) - start).to(torch.int64) + 1
            return score - torch.where(valid, values[h, node], 0.0).to(score.dtype)

        # On an exact grid every offset is 0: the slope would be read for nothing.
        return dpb_exact if grid.exact else dpb

    def _warn_if_coarse(self, slopes: Tensor, grid: DistanceGrid) -> None:
        """Warn once where interpolating on ``grid`` with ``slopes`` (H, N) may be off by more
        than :data:`COARSE_GRID_ERROR` (eager calls only: the estimate is read back to the
        host; on a 2-core CPU 2-3% of the time the grid's MLP takes)."""
        # host_reads() first: inside a caller's graph the flag is not read (no guard on it).
        if not host_reads() or functorch_active() or getattr(self, "_warned_coarse", False):
            return
        error, step = torch.stack((interpolation_error(slopes.detach(), grid.step), grid.step)).tolist()
        if error <= COARSE_GRID_ERROR:
            return
        warn_caller(
            f"DPB interpolates its MLP on a grid of {grid.size} distances {step:.3g} position units apart "
            f"(covering the batch's largest distance, {step * (grid.size - 1) / 2:.3g}), which may put "
            f"biases off by up to about {error:.2g} (estimated from the MLP's curvature anywhere on the "
            "grid, where pairs of tokens may or may not fall). If padded tokens carry placeholder "
            "positions (0, -1), pad with a real position instead (repeat each sequence's last one); "
            f"otherwise raise table_size (now {self.table_size}) or divide, or split batches of very "
            "different spans."
        )
        self._warned_coarse = True  # after the warning: under -W error every call raises

    def rate_and_shift(self) -> tuple[Tensor, Tensor]:
        """An affine MLP's bias ``rate_h * Delta + shift_h`` as two (n_heads,) float64 tensors:
        its change per position unit and its value at 0, from two MLP rows."""
        inputs = torch.arange(2, dtype=torch.float64, device=self.div.device)[:, None]  # 0 and 1
        at = watch_autocast(run_mlp(self.mlp, inputs, torch.float64))  # (2, n_heads)
        return (at[1] - at[0]) / self.divisor(torch.float64), at[0]

    def _affine_score_mod(self, positions: Positions, dtype: torch.dtype) -> ScoreMod:
        """The score_mod subtracting ``rate_h * Delta + shift_h`` (:meth:`rate_and_shift`)."""
        rates, shifts = self.rate_and_shift()
        # With gradients in float64: the rate's gradient sums gradient * distance over every
        # score, terms that cancel (a query's gradients sum to 0 over its keys). In float32 the
        # MLP's weight gradients were 2x further from float64 than through the table (1.1e-4
        # against 5.3e-5 of the largest), in float64 2.5e-5.
        work = torch.float64 if rates.requires_grad else dtype
        rates, shifts = rates.to(work), shifts.to(work)
        rel = positions.relative(dtype)

        def dpb_affine(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            delta, valid = rel.distance(b, q_idx, kv_idx)
            return score - torch.where(valid, rates[h] * delta.to(work) + shifts[h], 0.0).to(score.dtype)

        return dpb_affine

    def _pairs_score_mod(self, positions: Positions, dtype: torch.dtype) -> ScoreMod:
        """The score_mod reading a (B, n_heads, Lq, Lk) table of the MLP at every pair's distance
        (0 where a token has no position). Unpadded: the chunked backend, the only one that
        reads it, evaluates score_mods at real queries and keys only."""
        b, _, q_idx, kv_idx = index_grids(positions.batch, 1, positions.len_q, positions.len_k, positions.q.device)
        delta, valid = positions.relative(dtype).distance(b, q_idx, kv_idx)  # (B, 1, Lq, Lk)
        bias = self.bias_at(torch.where(valid, delta, 0.0), mlp_dtype(dtype)).to(dtype)  # (B, 1, Lq, Lk, n_heads)
        table = torch.where(valid[..., None], bias, 0.0)[:, 0].permute(0, 3, 1, 2).contiguous()

        def dpb_pairs(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return score - table[b, h, q_idx, kv_idx].to(score.dtype)

        return dpb_pairs
