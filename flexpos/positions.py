"""Positions of queries and keys, and exact relative distances for score_mods.

Positions may be ints or floats of any magnitude (genomic coordinates near 1e9, spectra in
m/z), one row per sequence, as long as the positions of one sequence (queries' and keys'
together) lie within 2**62 (ints) or 1e38 (floats) of each other, so that their distances fit
int64 and float32. Values are checked where they are read back to the host, in eager calls:
float positions always (also for NaN/inf), integer positions on CPU and, on other devices,
where a score_mod reads their extents anyway (a read is a sync there; see
:meth:`Positions._extent_rows`). When a sequence has ``x`` more tokens than positions, its first
``x`` tokens (CLS and the like) have no position and receive no positional effect.

Relative schemes need ``p_i - p_j``. Casting positions near 1.2e9 to float32 first would round
them to multiples of 128, so distances are formed from a per-sequence offset in int64/float64
and stored as a float32 pair ``hi + lo`` (48 bits). For integer positions ``(hi_i - hi_j) +
(lo_i - lo_j)`` equals the difference to float32 precision of the *difference itself*, whatever
the magnitude of the positions (integer distances below 2**24 are exact); float positions are
held to about 2**-48 of their spread in the sequence, then differences rounded to float32.

Score_mods read fewer tables where the host knows that costs nothing in precision: none for the
default positions ``0 .. L-1`` (the distance is ``q_idx - kv_idx``), and the ``hi`` part alone
for integer positions that lie within 2**24 of each other, queries and keys together (each
sequence's largest minus smallest position). Those extents are read back from the positions'
device with the check of their values, at most once per call and tensor (two numbers per
sequence), in eager calls only (see :mod:`flexpos._host`): inside a caller's torch.compile, where a read would
break the graph, and in :func:`flexpos.no_host_reads`, every table is read. CPU reads every table (see
:func:`fewer_tables`).

Shape legend: B batch, Lq/Lk query/key tokens, Lq'/Lk' positions (<= tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import Extents, check_position_span, check_positions, read_positions, reads_now

BLOCK = 128  # FlexAttention's block size; per-token tables are padded to a multiple of it


def n_blocks(length: int) -> int:
    """Blocks of ``BLOCK`` tokens that cover ``length`` tokens (0 for none)."""
    # Not -(-length // BLOCK): with a symbolic length Inductor (torch 2.13) failed to compare
    # strides holding that form ("Exponent must be non-negative").
    return (length + BLOCK - 1) // BLOCK


def table_len(length: int) -> int:
    """Length of a per-token table read by a score_mod or mask_mod: whole blocks plus one.

    Whole blocks keep indices of padded tiles in range. The extra element keeps the table's
    length odd, never a power of two nor equal to the sequence length: Inductor's CPU flex
    kernel (torch 2.13) confuses such sizes with its own tile sizes and mis-indexes the table.
    """
    return n_blocks(max(length, 1)) * BLOCK + 1


EXACT_INTEGERS = {torch.float32: 2**24, torch.float64: 2**53}
"""Integers up to these magnitudes are exact in the dtype used for distances."""


@dataclass(frozen=True)
class Relative:
    """Tables from which score_mods form ``p_q - p_k``, padded per token.

    q_hi: (B, Lq padded) and k_hi: (B, Lk padded): positions minus a per-sequence offset in
    ``dtype``; q_lo, k_lo: what rounding to ``dtype`` left, or None where it is known to be 0
    (integer positions within 2**24 of each other; always in float64). All four are None for the
    default positions ``0 .. L-1`` on both sides, whose distance is ``q_idx - kv_idx``.
    off_q, off_k: 0-d int64 tensors, the number of leading tokens without a position, or None
    where both are zero.
    """

    dtype: torch.dtype
    off_q: Optional[Tensor]
    off_k: Optional[Tensor]
    q_hi: Optional[Tensor] = None
    k_hi: Optional[Tensor] = None
    q_lo: Optional[Tensor] = None
    k_lo: Optional[Tensor] = None

    def distance(self, b: Tensor, q_idx: Tensor, kv_idx: Tensor) -> tuple[Tensor, Tensor]:
        """Distance ``p_q - p_k`` and whether both tokens have a position (broadcast shapes).

        A method rather than ``__call__``: torch 2.6's Dynamo guards the identity of a called
        object, so a new ``Relative`` per attention call recompiled every time. Which tables
        exist is fixed per call, so each branch below is decided while tracing.
        """
        if self.q_hi is None or self.k_hi is None:
            delta = (q_idx - kv_idx).to(self.dtype)
        else:
            delta = self.q_hi[b, q_idx] - self.k_hi[b, kv_idx]
            if self.q_lo is not None and self.k_lo is not None:
                delta = delta + (self.q_lo[b, q_idx] - self.k_lo[b, kv_idx])
        if self.off_q is None or self.off_k is None:  # a constant, which the kernel folds away
            return delta, torch.ones((), dtype=torch.bool, device=delta.device)
        return delta, (q_idx >= self.off_q) & (kv_idx >= self.off_k)


IN_QK = " (L, dim -2 of q and k laid out (B, *, H, L, D))"
"""Where callers that take q and k read the token counts: said where positions outnumber them,
as they do when q is laid out (B, L, H, D)."""


class Positions:
    """Positions of one attention call, resolved and checked.

    q: (B, Lq') and k: (B, Lk') as int64 or float64 (``0 .. L-1`` where none were given);
    len_q, len_k: token counts Lq, Lk; chunked: whether the call runs on the chunked backend,
    set by :func:`flexpos.attention` before score_mods are built (DPB reads it).
    Build one with :meth:`resolve`.
    """

    def __init__(
        self,
        q: Tensor,
        k: Tensor,
        len_q: int,
        len_k: int,
        given: tuple[Optional[Tensor], Optional[Tensor]] = (None, None),
        named: Sequence[tuple[str, Tensor]] = (),
    ) -> None:
        """``given``: the user's tensors for the query and key sides (None for the default
        positions), as passed: on their own device, leading batch dims not yet flattened;
        ``named``: the same tensors by argument name (``pos``, or ``pos_q`` and ``pos_k``), for
        the check of their values."""
        self.q, self.k, self.len_q, self.len_k = q, k, len_q, len_k
        self._given, self._named = given, list(named)
        self._relative: dict[torch.dtype, Relative] = {}  # shared by the score_mods of one call
        self._offset: Optional[Tensor] = None
        self._extents: Optional[list[tuple[int, int, int, int]]] = None
        self._extents_read = False
        # Set by flexpos.attention before it builds score_mods: they run on the chunked backend
        # and may read tables indexed by query and key both, which Inductor's CPU flex kernel
        # (torch 2.13) fails to build.
        self.chunked = False

    @classmethod
    def resolve(
        cls,
        batch: Sequence[int],
        len_q: int,
        len_k: int,
        device: torch.device,
        pos: Optional[Tensor] = None,
        pos_q: Optional[Tensor] = None,
        pos_k: Optional[Tensor] = None,
        tokens: str = "",
    ) -> "Positions":
        """Check user positions and fill in defaults (``0 .. L-1``).

        ``pos`` (*batch, L') serves both sides of self-attention; ``pos_q`` (*batch, Lq') and
        ``pos_k`` (*batch, Lk') serve cross-attention. Leading batch dims are flattened.
        ``tokens``: where the lengths were read, for messages (see :data:`IN_QK`).
        """
        if pos is not None:
            if pos_q is not None or pos_k is not None:
                raise ValueError("pass either pos (self-attention) or pos_q/pos_k, not both")
            if len_q != len_k:
                raise ValueError(
                    f"pos is for self-attention but queries have {len_q} tokens and keys "
                    f"{len_k}; pass pos_q and pos_k for cross-attention"
                )
            pos_q = pos_k = pos
        named = [("pos", pos, len_q)] if pos is not None else [("pos_q", pos_q, len_q), ("pos_k", pos_k, len_k)]
        named = [(name, p, length) for name, p, length in named if p is not None]
        for name, p, length in named:
            check_positions(name, p, batch, length, device, values=False, tokens=tokens)
        flat = math.prod(batch)
        q = _flat_or_default(pos_q, flat, len_q, device)
        shared = pos_k is pos_q and len_q == len_k  # self-attention: one tensor for both sides
        k = q if shared else _flat_or_default(pos_k, flat, len_k, device)
        positions = cls(q, k, len_q, len_k, (pos_q, pos_k), [(name, p) for name, p, _ in named])
        if any(reads_now(p) for _, p, _ in named):
            positions._extent_rows()  # checked now, else where a score_mod reads the extents
        return positions

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def off_q(self) -> int:
        return self.len_q - self.q.shape[-1]

    @property
    def off_k(self) -> int:
        return self.len_k - self.k.shape[-1]

    @property
    def is_integer(self) -> bool:
        return not (self.q.is_floating_point() or self.k.is_floating_point())

    @property
    def shared(self) -> bool:
        """Self-attention with one tensor of positions for queries and keys (see :meth:`resolve`)."""
        return self.k is self.q

    @property
    def indices(self) -> bool:
        """Both sides hold the default positions ``0 .. L-1``."""
        return self._given[0] is None and self._given[1] is None

    def integer_span(self) -> Optional[int]:
        """Largest ``|p_q - p_k|`` of this call for integer positions, as a Python int known on
        the host: from the lengths for default positions, else as read with the positions' check
        (none where :func:`flexpos._host.host_reads` says no: None there, and for floats)."""
        rows = self._extent_rows()
        if rows is None:
            return None
        return max((max(q_max - k_min, k_max - q_min) for q_min, q_max, k_min, k_max in rows), default=0)

    def _integer_extent(self) -> Optional[int]:
        """Largest ``p - offset`` (see :meth:`offset`) over both sides, as :meth:`integer_span`.
        In cross-attention it can be up to twice the span: ``pos_q`` [0, 2s] and ``pos_k`` [s]."""
        rows = self._extent_rows()
        if rows is None:
            return None
        return max((max(q_max, k_max) - min(q_min, k_min) for q_min, q_max, k_min, k_max in rows), default=0)

    def _extent_rows(self) -> Optional[list[tuple[int, int, int, int]]]:
        """Per sequence: smallest and largest query position, smallest and largest key position
        (rows without positions on a side are left out); None where unknown (floats, or not
        read). The first call reads the user's positions back, once per tensor, and checks
        their values (:func:`read_positions`, :func:`check_position_span`)."""
        if not self._extents_read:
            self._extents_read = True
            read = {name: read_positions(name, p) for name, p in self._named}
            check_position_span([(name, p, read[name]) for name, p in self._named])
            sides = [
                self._side_extents(given, read.get("pos", read.get(name)), length)
                for given, name, length in zip(self._given, ("pos_q", "pos_k"), (self.len_q, self.len_k))
            ]
            q_side, k_side = sides
            if self.is_integer and q_side is not None and k_side is not None:
                self._extents = list(zip(*q_side, *k_side))
        return self._extents

    def _side_extents(self, given: Optional[Tensor], read: Optional[Extents], length: int) -> Optional[Extents]:
        """One side's extents: those read from the user's positions, or ``0 .. L-1``'s."""
        return ([0] * self.batch, [length - 1] * self.batch) if given is None else read

    def absolute(self, side: str, centred: bool = False) -> Tensor:
        """Float64 positions of ``side`` ('q' or 'k'), zero-padded on the left to (B, L).

        ``centred``: minus the per-sequence :meth:`offset` (exact for ints; no longer absolute
        then, but the name stays), for schemes whose
        effect depends on differences only: angles formed from it stay small, and so do their
        gradients, which at positions near 1e9 would otherwise cancel in float32.
        """
        p, length = (self.q, self.len_q) if side == "q" else (self.k, self.len_k)
        p = _minus(p, self.offset()) if centred else p.to(torch.float64)
        return F.pad(p, (length - p.shape[-1], 0))

    def has_position(self, side: str) -> Tensor:
        """(L,) bool: which tokens of ``side`` have a position."""
        n, length = (self.q.shape[-1], self.len_q) if side == "q" else (self.k.shape[-1], self.len_k)
        return torch.arange(length, device=self.q.device) >= length - n

    def offset(self) -> Tensor:
        """(B, 1) per-sequence offset: the smallest position of either side (0 where neither
        side has one), in the positions' dtype (float64 if the sides differ)."""
        if self._offset is None:
            self._offset = self._smallest()
        return self._offset

    def _smallest(self) -> Tensor:
        # "> 0", not truthiness: torch 2.6 pins a symbolic length to its value on bool().
        lo_q = self.q.amin(-1, keepdim=True) if self.q.shape[-1] > 0 else None
        if self.shared:
            return torch.zeros(self.batch, 1, dtype=self.q.dtype, device=self.q.device) if lo_q is None else lo_q
        lo_k = self.k.amin(-1, keepdim=True) if self.k.shape[-1] > 0 else None
        if lo_q is None or lo_k is None:
            ref = lo_q if lo_k is None else lo_k
            zero = torch.zeros(self.batch, 1, dtype=self.q.dtype, device=self.q.device)
            return zero if ref is None else ref
        if lo_q.dtype != lo_k.dtype:
            lo_q, lo_k = lo_q.double(), lo_k.double()
        return torch.minimum(lo_q, lo_k)

    def span_tensor(self) -> Tensor:
        """Largest possible ``|p_q - p_k|`` in this call: a 0-d float64 tensor on the positions'
        device (no host sync)."""
        if self.q.shape[-1] == 0 or self.k.shape[-1] == 0:
            return torch.zeros((), dtype=torch.float64, device=self.q.device)
        # Integers subtracted in int64: near 2**61 float64 would round them to multiples of 512,
        # and a span rounded down leaves distances past the end of DPB's grid.
        exact = torch.float64 if self.q.is_floating_point() or self.k.is_floating_point() else torch.int64
        q, k = self.q.to(exact), self.k.to(exact)
        far = torch.maximum(q.amax(-1) - k.amin(-1), k.amax(-1) - q.amin(-1)).double()
        return torch.cat((far.flatten(), far.new_zeros(1))).max()  # 0 for an empty batch too

    def relative(self, dtype: torch.dtype = torch.float32) -> Relative:
        """Distances for score_mods; ``dtype`` is float32, or float64 for float64 references."""
        if dtype not in self._relative:
            self._relative[dtype] = self._split_relative(dtype)
        return self._relative[dtype]

    def _split_relative(self, dtype: torch.dtype) -> Relative:
        device = self.q.device
        # Filled on the device: torch.tensor would copy from host memory, which blocks on
        # accelerators and which a CUDA graph capture refuses.
        off_q, off_k = (None, None) if self.off_q == self.off_k == 0 else (
            torch.full((), off, dtype=torch.int64, device=device) for off in (self.off_q, self.off_k)
        )
        exact = EXACT_INTEGERS[dtype]
        fewer = fewer_tables(device)
        if fewer and self.indices and max(self.len_q, self.len_k) <= exact:
            return Relative(dtype, off_q, off_k)
        ref = self.offset()
        remainder = not (fewer and self._no_remainder(dtype))
        q_hi, q_lo = _split(self.q, ref, self.len_q, dtype, remainder)
        if self.shared:  # copies, not the same tensors: see fewer_tables
            k_hi, k_lo = q_hi.clone(), None if q_lo is None else q_lo.clone()
        else:
            k_hi, k_lo = _split(self.k, ref, self.len_k, dtype, remainder)
        tables: tuple[Optional[Tensor], ...] = (q_hi, k_hi, q_lo, k_lo)
        tables = tuple(None if t is None else two_rows(t) for t in tables)
        return Relative(dtype, off_q, off_k, *tables)

    def _no_remainder(self, dtype: torch.dtype) -> bool:
        """Whether the ``lo`` parts are known to be 0: in float64 (``hi`` is the float64
        difference itself) and where every ``hi``, an integer ``p - offset``, is below 2**24."""
        extent = self._integer_extent()
        return dtype == torch.float64 or (extent is not None and extent < EXACT_INTEGERS[dtype])


def _flat_or_default(p: Optional[Tensor], flat: int, length: int, device: torch.device) -> Tensor:
    """(B, L') int64 or float64 positions: offsets are subtracted exactly (ints) or with one
    rounding (floats), never in a narrow dtype that would overflow or round the difference."""
    if p is None:
        return torch.arange(length, device=device).expand(flat, length)
    wide = torch.float64 if p.is_floating_point() else torch.int64
    return p.reshape(flat, p.shape[-1]).to(device=device, dtype=wide)


def fewer_tables(device: torch.device) -> bool:
    """Whether score_mods on ``device`` skip the tables they need not read (see the module
    docstring). Not on CPU: Inductor's CPU flex kernel (torch 2.13) fails to build ALiBi and DPB
    from one table per side or from none (C++ error: 'cur_kvSplitSize4' was not declared), and
    from one tensor read as both sides' table, so self-attention's key tables are copies."""
    return device.type != "cpu"


def _minus(p: Tensor, ref: Tensor) -> Tensor:
    """Float64 ``p - ref``: exact for int64 positions, one rounding for floats."""
    if p.dtype != ref.dtype:
        p, ref = p.double(), ref.double()
    return (p - ref).double()


def two_rows(table: Tensor) -> Tensor:
    """A table a score_mod reads, (n, ...): itself, or for n = 1 its row twice. A one-row table
    gets a static stride that Inductor's CPU flex kernel (torch 2.13) mis-indexes (batch-1
    position tables) or fails to build (DPB's one-head table: "'cur_qSplitSize4' was not
    declared"); an unused second row keeps the dim symbolic."""
    return table.expand(2, *table.shape[1:]).contiguous() if table.shape[0] == 1 else table


def _split(
    p: Tensor, ref: Tensor, length: int, dtype: torch.dtype, remainder: bool = True
) -> tuple[Tensor, Optional[Tensor]]:
    """(B, L') positions -> hi/lo parts of ``p - ref`` in ``dtype``, padded to (B, pad(L));
    lo is None without ``remainder`` (known to be 0)."""
    pad = (length - p.shape[-1], table_len(length) - length)
    if not remainder and not p.is_floating_point():
        # integers p - ref below 2**24 (no remainder): exact in float32 straight from int64
        return F.pad((p - ref).to(dtype), pad), None
    rel = _minus(p, ref)
    hi = rel.to(dtype)
    lo = F.pad((rel - hi.double()).to(dtype), pad) if remainder else None
    return F.pad(hi, pad), lo
