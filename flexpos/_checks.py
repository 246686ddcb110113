"""Argument checks shared by every public entry point.

Each check raises a ``ValueError`` or ``TypeError`` that names the argument and says what was
expected, so that a wrong call fails at the boundary instead of deep inside a compiled kernel.
"""

from __future__ import annotations

import itertools
import math
import numbers
import os
import sys
import warnings
from types import FrameType
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ._host import functorch_active, host_reads, kept_reads, on_host, without_grad_wrappers

# Largest distance between two positions of one sequence: int64 holds every difference of
# integers below it; float32 (the distance tables' dtype) holds float differences below it.
POSITION_SPAN = {"int": (2**62, "2**62"), "float": (1e38, "1e38")}


def check_tensor(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_rank(name: str, x: Tensor, min_rank: int, shape_doc: str) -> None:
    if x.ndim < min_rank:
        raise ValueError(
            f"{name} must have shape {shape_doc} (at least {min_rank} dims), got {tuple(x.shape)}"
        )


# Model dtypes: the floats that attention, its transforms and its layers compute in.
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float(name: str, x: Tensor) -> None:
    if x.dtype not in _FLOATS:
        raise TypeError(
            f"{name} must be a floating point tensor (float16, bfloat16, float32 or float64), got dtype {x.dtype}"
        )


def check_bool(name: str, value: object) -> bool:
    """A Python bool, or numpy's (``np.bool_``)."""
    kind = type(value)
    if isinstance(value, bool) or (kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_")):
        return bool(value)
    shown = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    raise TypeError(f"{name} must be a bool, got {shown}")


def check_layer_dtype(name: str, t: Tensor, weight: Tensor) -> None:
    """A layer's input ``t`` must have the dtype of the layer's ``weight``, unless autocast,
    which casts it at the projections, is on for its device."""
    if t.dtype != weight.dtype and not torch.is_autocast_enabled(t.device.type):
        raise TypeError(f"{name} must have the layer's dtype {weight.dtype}, got {t.dtype} (or run under autocast)")


def check_module_heads(module: nn.Module, heads: int, head_dim: int, where: str) -> None:
    """``module``'s own head count and head dim, where it has them, must be ``heads`` and
    ``head_dim``; ``where`` names their source in the message ("q has", "the layer has")."""
    n_heads = getattr(module, "n_heads", heads)
    if n_heads != heads:
        raise ValueError(f"{type(module).__name__} was built for n_heads={n_heads} but {where} {heads} heads")
    own_dim = getattr(module, "head_dim", head_dim)
    if own_dim != head_dim:
        raise ValueError(f"{type(module).__name__} was built for head_dim={own_dim} but {where} head dim {head_dim}")


def check_module_device(module: nn.Module, device: torch.device) -> None:
    """Every parameter and buffer of ``module`` must be on ``device``, its input's device (one
    left behind, such as a buffer outside the state_dict after ``load_state_dict(assign=True)``
    from the meta device, would fail deep inside a kernel)."""
    for name, t in itertools.chain(module.named_parameters(), module.named_buffers()):
        if t.device != device:
            remedy = (
                f"materialise it with .to_empty(device={str(device)!r}), then load a checkpoint or call reset_parameters()"
                if t.is_meta
                else f"move the module with .to({str(device)!r})"
            )
            raise ValueError(f"{type(module).__name__} is on {t.device} but its input is on {device} ({name}): {remedy}")


def _check_int(name: str, value: object) -> int:
    """A Python or numpy integer (not a bool, not a tensor), returned as an int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    number = int(value)
    if abs(number) >= 2**63:
        raise ValueError(f"{name} must fit in int64, got {number}")
    return number


def check_positive_int(name: str, value: object) -> int:
    """A positive Python or numpy integer, returned as an int."""
    number = _check_int(name, value)
    if number <= 0:
        raise ValueError(f"{name} must be positive, got {number}")
    return number


def check_length(name: str, value: object) -> int:
    """A sequence length: an int >= 0. A length read from a tensor's shape while tracing with
    symbolic shapes is a ``torch.SymInt``; it is taken as it is (a value check would add a guard)."""
    if isinstance(value, torch.SymInt):
        return value  # type: ignore[return-value]
    number = _check_int(name, value)
    if number < 0:
        raise ValueError(f"{name} must be >= 0, got {number}")
    return number


def check_even(name: str, value: int) -> int:
    value = check_positive_int(name, value)
    if value % 2:
        raise ValueError(f"{name} must be even (sin/cos pairs), got {value}")
    return value


def check_positive_float(name: str, value: object) -> float:
    """A Python or numpy int or float, finite, positive and with a finite inverse (``divide``,
    ``scale``), returned as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0 or not math.isfinite(1 / value):
        raise ValueError(f"{name} must be a finite positive number (with a finite inverse), got {value}")
    return value


# Divisors of positions: float32's normal range.
DIVISOR_RANGE = (torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max)


def check_divisor(name: str, value: object) -> float:
    """A positive float within float32's normal range: positions are divided by it in float32
    (a subnormal divisor's inverse, or a larger one's float32 value, is infinite)."""
    value = check_positive_float(name, value)
    low, high = DIVISOR_RANGE
    if not low <= value <= high:
        raise ValueError(f"{name} must lie in float32's normal range [{low:.3g}, {high:.3g}], got {value}")
    return value


def shape_text(*dims: object) -> str:
    """A shape for messages, sizes and symbols alike: ``shape_text(2, "L", 32)`` is ``(2, L, 32)``."""
    return f"({', '.join(map(str, dims))})"


def check_positions(
    name: str,
    pos: Tensor,
    batch: Sequence[int],
    length: int,
    device: Optional[torch.device] = None,
    values: bool = True,
    tokens: str = "",
) -> None:
    """``pos`` must be ``(*batch, L')`` with ``L' <= length``, int or float, and readable from
    ``device`` (the meta device holds no values); with ``values``, its values (see
    :func:`read_positions`) and their span (:func:`check_position_span`) where
    :func:`reads_now`. ``tokens`` says where the token count was read, for the message."""
    check_tensor(name, pos)
    if pos.dtype == torch.bool or pos.is_complex() or (pos.is_floating_point() and pos.dtype not in _FLOATS):
        raise TypeError(
            f"{name} must hold int or float positions (float16, bfloat16, float32 or float64), got dtype {pos.dtype}"
        )
    if pos.is_meta and device is not None and device.type != "meta":
        raise ValueError(f"{name} is on the meta device (no values) but the attention inputs are on {device}")
    # Messages are formatted only on failure: formatting a symbolic length while a caller's
    # torch.compile traces would pin it to its value (a recompile for every new length).
    expected = lambda: shape_text(*batch, "L'") + f" with L' <= {length}"  # noqa: E731
    if pos.ndim != len(batch) + 1 or tuple(pos.shape[:-1]) != tuple(batch):
        raise ValueError(f"{name} must have shape {expected()}, got {tuple(pos.shape)}{_expand_hint(name, pos, batch)}")
    if pos.shape[-1] > length:
        raise ValueError(
            f"{name} has {pos.shape[-1]} positions but the sequence has only {length} tokens{tokens}; "
            f"expected shape {expected()}"
        )
    if values and reads_now(pos):
        check_position_span([(name, pos, read_positions(name, pos))])


def reads_now(pos: Tensor) -> bool:
    """Whether the values of positions are read back (and checked) when the positions are:
    floats always (NaN/inf), and anything on the CPU, where a read costs no sync. Integer
    positions elsewhere are read where a score_mod needs their extents anyway."""
    return pos.is_floating_point() or pos.device.type == "cpu"


Extents = tuple[list, list]
"""Per sequence (row of the leading dims): the smallest and the largest position (Python ints
for integer positions, exact; floats otherwise)."""


def read_positions(name: str, pos: Tensor) -> Optional[Extents]:
    """Check the values of positions ``pos`` (*, L'), reading them back once: floats must be
    finite, uint64 values must fit int64. Returns their :data:`Extents`, or None where nothing
    is read (:func:`host_reads` says no, or the meta device).

    Read afresh in every call: a positions tensor can change without a trace that could be
    checked without reading it (a ``torch.distributed`` broadcast into it, writes through
    ``.data`` or a NumPy view leave its version counter as it was), and extents read earlier
    would size DPB's grid or drop ALiBi's ``lo`` tables wrongly. Except inside
    :func:`flexpos.reuse_position_reads`, where the caller promises they do not change.
    """
    if pos.shape[-1] == 0:
        return [], []
    if pos.is_meta or not host_reads():
        return None
    functional = functorch_active()
    plain = without_grad_wrappers(pos) if functional else pos
    kept = None if functional or pos.is_inference() else kept_reads()  # inference: no version counter
    if kept is None:
        return on_host(functional, _read_rows, name, plain.detach().reshape(-1, pos.shape[-1]))
    entry = kept.get(id(pos))
    if entry is not None and entry[0] is pos and entry[1] == pos._version:
        kept.move_to_end(id(pos))
        return entry[2]
    extents = _read_rows(name, pos.detach().reshape(-1, pos.shape[-1]))
    # The tensor itself is held, so that its id is not reused while kept; the oldest go first.
    kept[id(pos)] = (pos, pos._version, extents)
    kept.move_to_end(id(pos))
    while len(kept) > READS_KEPT:
        kept.popitem(last=False)
    return extents


READS_KEPT = 16
"""Positions tensors whose reads a :func:`flexpos.reuse_position_reads` block keeps at a time."""


def _read_rows(name: str, rows: Tensor) -> Extents:
    """:func:`read_positions` on (rows, L') positions."""
    if rows.is_floating_point():
        wide = rows.double()
        ok: Optional[Tensor] = torch.isfinite(wide).all(-1)
    elif rows.dtype == torch.uint64:
        wide = rows.view(torch.int64)  # values from 2**63 on turn negative
        ok = (wide >= 0).all(-1)
    else:
        wide, ok = rows.long(), None  # amin/amax have no kernels for every int dtype
    read = (wide.amin(-1), wide.amax(-1)) if ok is None else (ok.to(wide.dtype), wide.amin(-1), wide.amax(-1))
    *fine, lows, highs = torch.stack(read).tolist()  # one read
    if fine and not all(fine[0]):
        if rows.is_floating_point():
            raise ValueError(f"{name} must be finite, found NaN or inf")
        raise ValueError(f"{name} (uint64) must hold values below 2**63 (int64's range), got larger ones")
    _warn_if_rounded(name, rows.dtype, lows + highs)
    return lows, highs


_warned_rounded = False


def _warn_if_rounded(name: str, dtype: torch.dtype, extremes: list) -> None:
    """Warn once per process where float16/bfloat16/float32 positions reach past the integers
    their dtype holds exactly (2**24 in float32): finer positions were rounded before flexpos
    received them (genomic coordinates near 1.2e9 in float32: to multiples of 128)."""
    global _warned_rounded
    if _warned_rounded or not extremes or dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return
    eps = torch.finfo(dtype).eps
    largest = max(abs(x) for x in extremes)
    if largest <= 2 / eps:
        return
    spacing = 2.0 ** math.floor(math.log2(largest)) * eps
    warn_caller(
        f"{name} is {dtype} with values up to {largest:.4g}, where {dtype} holds only multiples of "
        f"{spacing:g}: finer positions (genomic coordinates, say) were rounded before flexpos received "
        "them. Pass int64 or float64 positions, and keep them out of .to(dtype) casts."
    )
    _warned_rounded = True  # after the warning: under -W error every call raises


_FLEXPOS_DIR = os.path.dirname(os.path.abspath(__file__))
_LIBRARY_DIRS = tuple(
    d + os.sep
    for d in (_FLEXPOS_DIR, os.path.join(os.path.dirname(_FLEXPOS_DIR), "legacy"), os.path.dirname(torch.__file__))
)


def warn_caller(message: str) -> None:
    """``warnings.warn(message)`` (a UserWarning) attributed to the first frame outside flexpos,
    legacy and torch, the user's line, however deep the call that warns."""
    frame: Optional[FrameType] = sys._getframe(1)
    level = 2  # stacklevel 2: the caller of warn_caller
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


def check_position_span(named: Sequence[tuple[str, Tensor, Optional[Extents]]]) -> None:
    """Positions of one call, ``(name, positions, extents read)``: the queries' and the keys'
    (one tensor for self-attention), whose distances are formed across them, must lie within
    :data:`POSITION_SPAN` of each other in each sequence. Unread extents are not checked."""
    read = [(name, p, e) for name, p, e in named if e is not None and e[0]]
    if not read:
        return
    kind = "float" if any(p.is_floating_point() for _, p, _ in read) else "int"
    per_row = zip(zip(*(e[0] for *_, e in read)), zip(*(e[1] for *_, e in read)))
    span = max(max(highs) - min(lows) for lows, highs in per_row)
    limit, shown = POSITION_SPAN[kind]
    if span > limit:
        names = " and ".join(name for name, *_ in read)
        raise ValueError(
            f"{names} must lie within {shown} of each other in each sequence "
            f"({kind} distances would overflow), got positions {span:.3g} apart"
        )


def check_device(name: str, t: Tensor, device: torch.device, beside: str) -> None:
    """``t`` must be on ``device``, the device of ``beside`` (a name for the message)."""
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, {beside} on {device}")


def _expand_hint(name: str, pos: Tensor, batch: Sequence[int]) -> str:
    """For positions of size 1 where the batch has more: how to share them (they are not
    broadcast, so that a wrong batch dim is not taken for a shared one)."""
    if pos.ndim != len(batch) + 1 or any(p not in (1, b) for p, b in zip(pos.shape[:-1], batch)):
        return ""
    return f"; positions are not broadcast: to share them, pass {name}.expand({', '.join(map(str, batch))}, -1)"


def check_bool_mask(
    name: str,
    mask: Tensor,
    shapes: Sequence[tuple[int, ...]],
    device: torch.device,
    beside: str,
    shared: Sequence[tuple[int, ...]] = (),
    shared_doc: str = "",
) -> None:
    """A bool tensor of one of ``shapes``, or of ``shared`` (left out of the message, which says
    ``shared_doc`` instead), on ``device``, the device of the tensor ``beside``."""
    check_tensor(name, mask)
    if mask.dtype != torch.bool:
        additive = f" (for an additive mask of 0 and -inf, pass {name} == 0)" if mask.is_floating_point() else ""
        raise TypeError(f"{name} must be a bool tensor (True = keep), got dtype {mask.dtype}{additive}")
    if tuple(mask.shape) not in [tuple(s) for s in (*shapes, *shared)]:
        # Distinct shapes, in order. Only here: hashing a traced symbolic length would pin it.
        options = list(dict.fromkeys(tuple(s) for s in shapes))
        note = f" ({shared_doc})" if shared_doc else ""
        raise ValueError(f"{name} must have shape {' or '.join(map(str, options))}{note}, got {tuple(mask.shape)}")
    check_device(name, mask, device, beside)


def check_both_sides(modules: Sequence[object], **sides: Optional[Tensor]) -> None:
    """Cross-attention positions, ``sides`` (the query side's, then the key side's, by the
    caller's names), come in pairs where modules read them: a side without positions would count
    ``0 .. L-1``, not in the other side's coordinates."""
    (q_name, pos_q), (k_name, pos_k) = sides.items()
    if not modules or (pos_q is None) == (pos_k is None):
        return
    given, missing = (q_name, k_name) if pos_k is None else (k_name, q_name)
    readers = list(dict.fromkeys(type(m).__name__ for m in modules))
    verb = "reads" if len(readers) == 1 else "read"
    raise ValueError(
        f"{given} is given without {missing}: {', '.join(readers)} {verb} the positions of queries and "
        f"keys, and a side without them would count 0 .. L-1, not in {given}'s coordinates. Pass "
        f"{missing} too; a (B, *, 0) tensor gives that side's tokens no position"
    )
