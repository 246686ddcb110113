"""``python -m flexpos.bench``: flexpos side by side with the dense path, on this machine.

The dense path is what a bio-attention user runs today: every positional bias is materialised
as a (B, NH, L, L) float tensor (DPB and XL first build (B, L, L, dim) activations) and handed
to ``torch.nn.functional.scaled_dot_product_attention`` as ``attn_mask``. flexpos evaluates the
same bias inside FlexAttention's kernel one tile at a time (CUDA), or one chunk of queries at a
time in front of SDPA (CPU, see ``flexpos.backends``). For every scheme and length the
bench runs both on the same inputs in one process and prints time, peak memory growth and the
largest difference of their outputs, with plain SDPA (no positional effect) as the floor.

Dense baselines (``--dense``):

- ``bio``: bio-attention's own plugins (``mod_qkv`` / ``mod_mask``, bio-attention's (B, L, NH, H)
  layout), with parameters copied from the flexpos modules so the outputs must agree;
- ``formula``: the same biases written out densely from their definitions in this file, for
  machines without bio-attention (a GPU box, say);
- ``auto`` (default): ``bio`` when bio-attention is importable, else ``formula``.

Memory is the peak growth during one warm call: CUDA allocator statistics on GPU; on Linux CPUs
the process' peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` before the
call). Before that call glibc returns its free heap pages to the OS (``malloc_trim``), so every
page the call touches counts, heap or mmap; the allocator keeps its default behaviour, which is
what users run and what the timings see.

Compile time is the first call's time minus the steady time; torch.compile state is reset
before the first length of each scheme, so that every scheme compiles once, in isolation, and
a failure in one scheme cannot leave later ones on a slow path. Later lengths reuse the
dynamic-shape kernels (their compile time is about 0).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import importlib
import json
import math
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

import flexpos

SCHEMES = ("alibi", "dpb", "xl", "rotary", "window")
DEFAULT_LENGTHS = (512, 2048)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DPB_DIM, DPB_DEPTH = 32, 2
MIB = 2**20
GIB = 2**30


# --------------------------------------------------------------------------------------------
# Memory


def _libc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim  # noqa: B018 (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


def _status_kib(*keys: str) -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name = line.split(":", 1)[0]
            if name in keys:
                out[name] = int(line.split()[1])
    return out


def _hwm_resettable() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM" in _status_kib("VmHWM")
    except OSError:
        return False


class _RssSampler:
    """Fallback: the largest resident set seen by a thread polling every millisecond."""

    def __init__(self) -> None:
        try:
            import psutil  # type: ignore[import-not-found]

            self._rss = psutil.Process().memory_info
        except ImportError:
            self._rss = None
        self.available = self._rss is not None

    def __call__(self, fn: Callable[[], Any]) -> tuple[Any, Optional[float]]:
        if not self.available:
            return fn(), None
        base = self._rss().rss
        peak = [base]
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], self._rss().rss)
                time.sleep(0.001)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            out = fn()
        finally:
            stop.set()
            thread.join()
        peak[0] = max(peak[0], self._rss().rss)
        return out, (peak[0] - base) / MIB


class PeakMemory:
    """``measure(fn) -> (result, peak growth in MiB or None)`` for ``device``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated growth"
        elif _hwm_resettable():
            self.method = "peak RSS growth (VmHWM reset via /proc/self/clear_refs)"
        else:
            self._sampler = _RssSampler()
            self.method = "peak RSS growth (sampled every 1 ms)" if self._sampler.available else "unavailable"

    def measure(self, fn: Callable[[], Any]) -> tuple[Any, Optional[float]]:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            out = fn()
            torch.cuda.synchronize(self.device)
            return out, (torch.cuda.max_memory_allocated(self.device) - base) / MIB
        if self.method.startswith("peak RSS growth (VmHWM"):
            libc = _libc()
            if libc is not None:
                libc.malloc_trim(0)
            base = _status_kib("VmRSS")["VmRSS"]
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            out = fn()
            return out, (_status_kib("VmHWM")["VmHWM"] - base) / 1024
        return self._sampler(fn)


def available_bytes(device: torch.device) -> Optional[int]:
    """Memory the dense path may take: free GPU memory, or the OS's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# --------------------------------------------------------------------------------------------
# Dense baselines written from the definitions (no bio-attention needed)


def distances(pos_q: Tensor, pos_k: Tensor) -> Tensor:
    """(B, Lq, Lk) float32 ``p_q - p_k``, the difference formed before rounding."""
    return (pos_q[:, :, None] - pos_k[:, None, :]).to(torch.float32)


def dense_alibi_bias(alibi: flexpos.ALiBi, pos: Tensor) -> Tensor:
    """(B, H, L, L) ``-|slope_h (p_q - p_k) / divide|``."""
    slopes = alibi.slopes.to(device=pos.device, dtype=torch.float32).view(1, -1, 1, 1)
    return -(slopes * distances(pos, pos)[:, None] / alibi.divisor(torch.float32)).abs()


def dense_dpb_bias(dpb: flexpos.DPB, pos: Tensor) -> Tensor:
    """(B, H, L, L) ``-MLP((p_q - p_k) / divide)``, the MLP run on every element."""
    x = (distances(pos, pos) / dpb.divisor(torch.float32))[..., None]
    for layer in dpb.mlp:
        x = layer(x)
    return -x.permute(0, 3, 1, 2)


def dense_xl_bias(xl: flexpos.XL, q: Tensor, pos: Tensor) -> Tensor:
    """(B, H, L, L) ``(q_i + v) . r_ij``, r = embed_lin(sinusoid((p_i - p_j) / divide)) per head."""
    angles = (distances(pos, pos) / xl.divisor(torch.float32))[..., None] * xl.inv_freq
    r = xl.embed_lin(torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2))
    r = r.unflatten(-1, (xl.n_heads, -1))  # (B, L, L, H, D)
    qv = q.float() + xl.bias_r_r.view(1, xl.n_heads, 1, -1)
    return torch.einsum("bhqd,bqkhd->bhqk", qv, r)


def dense_rotate(rot: flexpos.Rotary, x: Tensor, pos: Tensor) -> Tensor:
    """Eager rotation of pairs (x_2m, x_2m+1) by ``p theta_m / divide``; x (B, H, L, D)."""
    angles = (pos.to(torch.float32) / rot.divisor(torch.float32))[:, None, :, None] * rot.thetas
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)


def window_keep(pos: Tensor, window: float) -> Tensor:
    """(B, 1, L, L) bool: ``|p_q - p_k| <= window``."""
    return (distances(pos, pos).abs() <= window)[:, None]


# --------------------------------------------------------------------------------------------
# Cases


@dataclass
class Setup:
    scheme: str
    length: int
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    backward: bool = False
    dense: str = "auto"
    window: float = 512.0
    backend: str = "auto"
    seed: int = 0


@dataclass
class Case:
    """Three zero-argument callables on the same inputs, each returning (B, H, L, D)."""

    flexpos: Callable[[], Tensor]
    dense: Callable[[], Tensor]
    floor: Callable[[], Tensor]
    dense_bytes: int
    leaves: list[Tensor]
    dense_label: str
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    flex_floor: Optional[Callable[[], Tensor]] = None  # flexpos with no positional module
    pos: Optional[Tensor] = None  # (B, L) positions of every path


def bio_available() -> bool:
    try:
        importlib.import_module("bio_attention.positional")
    except Exception:
        return False
    return True


def resolve_dense(kind: str) -> str:
    if kind == "auto":
        return "bio" if bio_available() else "formula"
    if kind == "bio" and not bio_available():
        raise SystemExit("--dense bio needs bio-attention (pip install bio-attention==0.1.15)")
    return kind


def irregular_positions(batch: int, length: int, generator: torch.Generator) -> Tensor:
    """(B, L) sorted int64 positions with gaps of 1-3: irregular, like genomic coordinates."""
    return torch.randint(1, 4, (batch, length), generator=generator).cumsum(-1)


def estimate_dense_bytes(s: Setup) -> int:
    """Upper estimate of the dense path's peak extra memory (calibrated on CPU, float32)."""
    n = s.batch * s.length * s.length  # elements of one (B, L, L) tensor
    per_head = n * s.heads * 4  # one float32 (B, NH, L, L) bias
    if s.scheme in ("alibi", "window"):
        extra = n * 12 + 2 * per_head + (n * 9 + per_head if s.scheme == "window" else 0)
    elif s.scheme == "dpb":
        extra = n * 12 + 3 * n * DPB_DIM * 4 + 2 * per_head
    elif s.scheme == "xl":
        dim = s.heads * s.head_dim
        extra = n * 12 + 4 * n * dim * 4 + 2 * per_head
    else:  # rotary: no L x L tensor
        extra = 0
    activations = 8 * s.batch * s.heads * s.length * s.head_dim * 4  # q, k, v copies, output, SDPA
    return int((extra + activations) * (2 if s.backward else 1)) + 32 * MIB


def build_case(s: Setup) -> Case:
    device, dtype = torch.device(s.device), DTYPES[s.dtype]
    gen = torch.Generator().manual_seed(s.seed)
    torch.manual_seed(s.seed)
    shape = (s.batch, s.heads, s.length, s.head_dim)
    q, k, v = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(3))
    if s.backward:
        for t in (q, k, v):
            t.requires_grad_(True)
    pos = irregular_positions(s.batch, s.length, gen).to(device)
    dense_kind = resolve_dense(s.dense)
    H, D = s.heads, s.head_dim

    def sdpa(qq: Tensor, kk: Tensor, vv: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        mask = None if bias is None else bias.to(qq.dtype)
        return F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask)

    modules: dict[str, torch.nn.Module] = {}
    mask_fn: Callable[[], Any] = lambda: None  # noqa: E731
    if s.scheme in ("alibi", "window"):
        fx = flexpos.ALiBi(H)
    elif s.scheme == "dpb":
        fx = flexpos.DPB(DPB_DIM, H, depth=DPB_DEPTH)
    elif s.scheme == "xl":
        fx = flexpos.XL(H * D, H)
    elif s.scheme == "rotary":
        fx = flexpos.Rotary(D)
    else:
        raise ValueError(f"unknown scheme {s.scheme!r}; choose from {', '.join(SCHEMES)}")
    if s.scheme == "window":
        mask_fn = lambda: flexpos.distance_window_mask(s.window, pos=pos)  # noqa: E731

    if dense_kind == "bio":
        from bio_attention import positional as bio

        # bio-attention's layout is (B, L, NH, H): views, as its layer would hand them over.
        qb, kb, vb = (t.transpose(1, 2) for t in (q, k, v))
        if s.scheme in ("alibi", "window"):
            bm = bio.ALiBi(H)

            def dense() -> Tensor:
                window_mask = None
                if s.scheme == "window":  # a bio-attention user passes it as an additive float mask
                    far = ~window_keep(pos, s.window)
                    window_mask = torch.zeros(far.shape, device=device).masked_fill(far, float("-inf"))
                return sdpa(q, k, v, bm.mod_mask(window_mask, qb, kb, vb, pos_q_k=pos))

        elif s.scheme == "dpb":
            bm = bio.DPB(DPB_DIM, H, depth=DPB_DEPTH)
            bm.load_state_dict(fx.state_dict())

            def dense() -> Tensor:
                return sdpa(q, k, v, bm.mod_mask(None, qb, kb, vb, pos_q_k=pos))

        elif s.scheme == "xl":
            bm = bio.XL(H * D, H)
            with torch.no_grad():
                fx.embed_lin.load_state_dict(bm.embed_lin.state_dict())
                fx.bias_r_w.copy_(bm.bias_r_w)
                # bio-attention's layer adds bias_r_w in mod_qkv and again inside mod_mask, so
                # its position term reads (q + 2u) . r: flexpos' v is set to 2u to match.
                fx.bias_r_r.copy_(2 * bm.bias_r_w)

            def dense() -> Tensor:
                q2, k2, v2 = bm.mod_qkv(qb, kb, vb, pos_q_k=pos)
                bias = bm.mod_mask(None, q2, k2, v2, pos_q_k=pos)
                return sdpa(q2.transpose(1, 2), k2.transpose(1, 2), v2.transpose(1, 2), bias)

        else:
            bm = bio.Rotary(D)

            def dense() -> Tensor:
                q2, k2, v2 = bm.mod_qkv(qb, kb, vb, pos_q_k=pos)
                return sdpa(q2.transpose(1, 2), k2.transpose(1, 2), v2.transpose(1, 2))

        bm.to(device)
        modules["dense"] = bm
        label = "bio-attention mod_qkv/mod_mask + SDPA"
    else:
        if s.scheme in ("alibi", "window"):

            def dense() -> Tensor:
                bias = dense_alibi_bias(fx, pos)
                if s.scheme == "window":
                    bias = bias.masked_fill(~window_keep(pos, s.window), float("-inf"))
                return sdpa(q, k, v, bias)

        elif s.scheme == "dpb":

            def dense() -> Tensor:
                return sdpa(q, k, v, dense_dpb_bias(fx, pos))

        elif s.scheme == "xl":

            def dense() -> Tensor:
                u = fx.bias_r_w.to(q.dtype).view(1, H, 1, D)
                return sdpa(q + u, k, v, dense_xl_bias(fx, q, pos))

        else:

            def dense() -> Tensor:
                return sdpa(dense_rotate(fx, q, pos), dense_rotate(fx, k, pos), v)

        label = "dense formula (flexpos.bench) + SDPA"

    fx.to(device)
    modules["flexpos"] = fx

    def run_flexpos() -> Tensor:
        return flexpos.attention(q, k, v, fx, pos=pos, mask=mask_fn(), backend=s.backend)

    def floor() -> Tensor:
        return sdpa(q, k, v)

    def flex_floor() -> Tensor:
        return flexpos.attention(q, k, v, backend=s.backend)

    return Case(run_flexpos, dense, floor, estimate_dense_bytes(s), [q, k, v], label, modules, flex_floor, pos)


# --------------------------------------------------------------------------------------------
# Running


@dataclass
class Row:
    scheme: str
    length: int
    batch: int
    heads: int
    head_dim: int
    dtype: str
    mode: str
    device: str
    dense_ms: Optional[float] = None
    flexpos_ms: Optional[float] = None
    floor_ms: Optional[float] = None
    speedup: Optional[float] = None
    dense_peak_mb: Optional[float] = None
    flexpos_peak_mb: Optional[float] = None
    floor_peak_mb: Optional[float] = None
    max_abs_diff: Optional[float] = None
    compile_s: Optional[float] = None
    dense_estimate_gib: Optional[float] = None
    dense_status: str = "ok"
    flexpos_status: str = "ok"
    window: Optional[float] = None


class Runner:
    """Runs the three paths of one case: forward only, or forward + backward."""

    def __init__(self, device: torch.device, backward: bool, leaves: Sequence[Tensor]) -> None:
        self.device, self.backward, self.leaves = device, backward, list(leaves)
        self.grad_out: Optional[Tensor] = None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def call(self, fn: Callable[[], Tensor]) -> tuple[Tensor, ...]:
        """Output (and input gradients when running backward), detached."""
        if not self.backward:
            with torch.no_grad():
                return (fn(),)
        for t in self.leaves:
            t.grad = None
        with torch.enable_grad():
            out = fn()
            if self.grad_out is None:
                gen = torch.Generator().manual_seed(1)
                self.grad_out = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
            out.backward(self.grad_out)
        grads = tuple(t.grad for t in self.leaves)
        for t in self.leaves:
            t.grad = None
        return (out.detach(), *grads)

    def first(self, fn: Callable[[], Tensor]) -> tuple[float, tuple[Tensor, ...]]:
        """(seconds, outputs) of a first call: compile and warm-up included."""
        self.sync()
        start = time.perf_counter()
        out = self.call(fn)
        self.sync()
        return time.perf_counter() - start, out

    def timed(self, fn: Callable[[], Tensor]) -> float:
        self.sync()
        start = time.perf_counter()
        self.call(fn)
        self.sync()
        return time.perf_counter() - start


def _short(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    return text[:90]


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(err).lower()


def _max_diff(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))


def _reset_compiled() -> None:
    torch._dynamo.reset()


def run_case(
    s: Setup,
    repeat: int,
    memory: PeakMemory,
    log: Callable[[str], None],
    slow_s: float = 5.0,
    flexpos_need: Optional[float] = None,
    fresh: bool = True,
) -> Row:
    """One (scheme, L): first calls (compile), max |difference|, interleaved timed runs, peaks.

    ``flexpos_need``: bytes flexpos is expected to take (from a smaller L); above 80% of the
    available memory flexpos is not run. ``fresh``: drop compiled code first (the first length
    of a scheme; later lengths reuse it, as dynamic shapes need no recompile).
    """
    device = torch.device(s.device)
    row = Row(s.scheme, s.length, s.batch, s.heads, s.head_dim, s.dtype,
              "fwd+bwd" if s.backward else "fwd", s.device,
              window=s.window if s.scheme == "window" else None)
    case = build_case(s)
    runner = Runner(device, s.backward, case.leaves)
    row.dense_estimate_gib = round(case.dense_bytes / GIB, 2)
    if fresh:
        _reset_compiled()
    tag = f"{s.scheme} L={s.length}"
    slow = " (the first compile takes ~15 s per variant on CPU)" if device.type == "cpu" else ""

    outputs: dict[str, tuple[Tensor, ...]] = {}
    first: dict[str, float] = {}
    paths = {"flexpos": case.flexpos, "dense": case.dense, "floor": case.floor}

    limit = available_bytes(device)
    if flexpos_need is not None and limit is not None and flexpos_need > 0.8 * limit:
        row.flexpos_status = (f"skipped: would need ~{flexpos_need / GIB:.1f} GiB "
                              "(extrapolated from its peaks at smaller L)")
        log(f"{tag}: flexpos {row.flexpos_status}")
        del paths["flexpos"]
    else:
        log(f"{tag}: flexpos first call, compiling{slow} ...")
        try:
            first["flexpos"], outputs["flexpos"] = runner.first(case.flexpos)
        except Exception as err:  # reported in the table; the case's compiled state is dropped
            row.flexpos_status = "error: " + _short(err)
            log(f"{tag}: flexpos failed: {_short(err)}")
            _reset_compiled()
            del paths["flexpos"]

    # On CPU a dense path that does not fit would swap or be killed; on CUDA it fails cleanly
    # with an out-of-memory error, so it is tried whatever the (upper) estimate says.
    if device.type == "cpu" and limit is not None and case.dense_bytes > 0.9 * limit:
        row.dense_status = f"skipped: would need {case.dense_bytes / GIB:.1f} GiB ({limit / GIB:.1f} GiB free)"
        log(f"{tag}: dense path {row.dense_status}")
        del paths["dense"]
    else:
        log(f"{tag}: dense path first call (estimated {case.dense_bytes / GIB:.2f} GiB) ...")
        try:
            first["dense"], outputs["dense"] = runner.first(case.dense)
        except Exception as err:
            row.dense_status = ("out of memory: " if _is_oom(err) else "error: ") + _short(err)
            log(f"{tag}: dense path failed: {row.dense_status}")
            del paths["dense"]
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    first["floor"], outputs["floor"] = runner.first(case.floor)

    if "flexpos" in outputs and "dense" in outputs:
        row.max_abs_diff = _max_diff(outputs["flexpos"], outputs["dense"])
    outputs.clear()
    gc.collect()

    # Round 0 also records each path's peak memory; paths slower than `slow_s` run only once.
    log(f"{tag}: timing {', '.join(paths)} (up to {repeat} interleaved runs each) ...")
    times: dict[str, list[float]] = {name: [] for name in paths}
    for round_ in range(repeat):
        for name, fn in paths.items():
            if round_ == 0:
                seconds, peak = memory.measure(lambda: runner.timed(fn))
                setattr(row, f"{name}_peak_mb", None if peak is None else round(peak, 1))
                times[name].append(seconds)
            elif times[name][0] < slow_s:
                times[name].append(runner.timed(fn))
    median = {name: statistics.median(t) for name, t in times.items()}
    row.flexpos_ms = _ms(median.get("flexpos"))
    row.dense_ms = _ms(median.get("dense"))
    row.floor_ms = _ms(median.get("floor"))
    if "flexpos" in median:
        row.compile_s = round(max(first["flexpos"] - median["flexpos"], 0.0), 2)
    if row.dense_ms and row.flexpos_ms:
        row.speedup = round(row.dense_ms / row.flexpos_ms, 2)
    gc.collect()
    return row


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else round(seconds * 1e3, 2)


# --------------------------------------------------------------------------------------------
# Reporting


COLUMNS = [
    ("scheme", "scheme", "<"),
    ("L", "length", ">"),
    ("dense ms", "dense_ms", ">"),
    ("flexpos ms", "flexpos_ms", ">"),
    ("speed-up", "speedup", ">"),
    ("dense peak MB", "dense_peak_mb", ">"),
    ("flexpos peak MB", "flexpos_peak_mb", ">"),
    ("max |diff|", "max_abs_diff", ">"),
    ("floor ms", "floor_ms", ">"),
    ("compile s", "compile_s", ">"),
]


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "speedup":
        return f"{value:.2f}x"
    if key == "max_abs_diff":
        return f"{value:.1e}"
    if key in ("dense_peak_mb", "flexpos_peak_mb"):
        return f"{value:,.0f}" if abs(value) >= 10 else f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return str(value)


def format_table(rows: Sequence[Row]) -> str:
    body = []
    for r in rows:
        cells = [_cell(key, getattr(r, key)) for _, key, _ in COLUMNS]
        notes = [] if r.window is None else [f"window {r.window:g}"]
        if r.dense_status != "ok":
            notes.append(f"dense {r.dense_status}")
        if r.flexpos_status != "ok":
            notes.append(f"flexpos {r.flexpos_status}")
        body.append((cells, "; ".join(notes)))
    widths = [max(len(h), *(len(c[i]) for c, _ in body)) if body else len(h) for i, (h, _, _) in enumerate(COLUMNS)]
    def line(cells: Sequence[str]) -> str:
        return "  ".join(f"{c:{a}{w}}" for c, w, (_, _, a) in zip(cells, widths, COLUMNS))
    out = [line([h for h, _, _ in COLUMNS]) + "  note", line(["-" * w for w in widths])]
    out += [(line(c) + ("  " + n if n else "")).rstrip() for c, n in body]
    return "\n".join(out)


def machine_facts(device: torch.device) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            facts["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        facts["cpu"] = platform.processor() or "unknown"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts["gpu"] = props.name
        facts["gpu_memory_gib"] = round(props.total_memory / GIB, 1)
        facts["cuda"] = torch.version.cuda
    try:
        from importlib.metadata import version

        facts["flexpos"] = version("flexpos")
        if bio_available():
            facts["bio_attention"] = version("bio-attention")
    except Exception:
        pass
    return facts


def plot_results(rows: Sequence[Row], path: str) -> None:
    """Time and peak memory vs L, log-log, one line per (scheme, path)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'flexpos[plot]'") from None
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    schemes = list(dict.fromkeys(r.scheme for r in rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {"dense": ("--", "s"), "flexpos": ("-", "o"), "floor": (":", "x")}
    for i, scheme in enumerate(schemes):
        mine = sorted((r for r in rows if r.scheme == scheme), key=lambda r: r.length)
        for kind, (style, marker) in styles.items():
            for ax, attr in ((ax_t, f"{kind}_ms"), (ax_m, f"{kind}_peak_mb")):
                pts = [(r.length, getattr(r, attr)) for r in mine if getattr(r, attr)]
                pts = [(x, y) for x, y in pts if y > 0]
                if kind == "floor" and i > 0 or not pts:
                    continue  # the floor is the same for every scheme
                label = "SDPA floor" if kind == "floor" else f"{scheme} {kind}"
                ax.plot(*zip(*pts), style, marker=marker, color="gray" if kind == "floor" else colors[i % len(colors)],
                        label=label)
    for ax, title, unit in ((ax_t, "time", "ms"), (ax_m, "peak memory growth", "MB")):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    r0 = rows[0]
    fig.suptitle(f"flexpos vs dense, {r0.device} {r0.dtype} {r0.mode}, B={r0.batch} H={r0.heads} D={r0.head_dim}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Command line


def foresee(seen: Sequence[tuple[int, float]], length: int) -> Optional[float]:
    """Bytes flexpos should need at ``length`` from its peaks (L, MiB) at smaller lengths.

    Grows as L**e, e measured between the last two lengths (clamped to 1..2), or 2 with one.
    """
    if not seen or seen[-1][0] >= length:
        return None
    (l1, p1), e = seen[-1], 2.0
    if len(seen) > 1 and seen[-2][0] < l1 and seen[-2][1] > 0:
        l0, p0 = seen[-2]
        e = min(2.0, max(1.0, math.log(p1 / p0) / math.log(l1 / l0)))
    return p1 * MIB * (length / l1) ** e


def _split_list(text: Sequence[str]) -> list[str]:
    return [item for part in text for item in part.replace(",", " ").split()]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m flexpos.bench",
        description="flexpos vs the dense path (materialised (B, NH, L, L) bias + SDPA), side by side.",
        epilog="Example: python -m flexpos.bench --schemes alibi dpb --lengths 1024 4096 --json out.json",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--lengths", nargs="+", default=None, metavar="L",
                   help=f"sequence lengths (default {' '.join(map(str, DEFAULT_LENGTHS))})")
    p.add_argument("--schemes", nargs="+", default=None, metavar="S",
                   help=f"any of {', '.join(SCHEMES)} (default {' '.join(SCHEMES)})")
    p.add_argument("--mode", choices=("fwd", "fwdbwd"), default="fwd", help="forward, or forward + backward")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--window", type=float, default=512.0, help="window of the 'window' scheme, in position units")
    p.add_argument("--dense", choices=("auto", "bio", "formula"), default="auto",
                   help="dense baseline: bio-attention's plugins, or the dense formulas in flexpos.bench")
    p.add_argument("--backend", choices=("auto", "flex", "chunked"), default="auto", help="flexpos backend")
    p.add_argument("--repeat", type=int, default=3,
                   help="timed runs per path, median reported (paths slower than 5 s run once)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="save the results and machine facts as JSON")
    p.add_argument("--plot", metavar="PATH", help="draw time and memory vs L (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    args.schemes = _split_list(args.schemes) if args.schemes else list(SCHEMES)
    bad = [s for s in args.schemes if s not in SCHEMES]
    if bad:
        p.error(f"unknown scheme(s) {', '.join(bad)}; choose from {', '.join(SCHEMES)}")
    try:
        args.lengths = [int(x) for x in _split_list(args.lengths)] if args.lengths else list(DEFAULT_LENGTHS)
    except ValueError:
        p.error("--lengths takes integers")
    if any(length < 1 for length in args.lengths) or args.repeat < 1:
        p.error("lengths and --repeat must be positive")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    backward = args.mode == "fwdbwd"
    dense_kind = resolve_dense(args.dense)
    memory = PeakMemory(device)
    facts = machine_facts(device)
    log: Callable[[str], None] = (lambda msg: None) if args.quiet else (
        lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True))

    where = facts.get("gpu") or f"{facts['cpu']} ({facts['torch_threads']} threads)"
    header = [
        f"flexpos bench: {device.type} {where}; torch {torch.__version__}; {args.dtype}; "
        f"{'forward + backward' if backward else 'forward'}; B={args.batch} H={args.heads} D={args.head_dim}",
        f"dense = {'bio-attention ' + facts.get('bio_attention', '') + ' mod_qkv/mod_mask' if dense_kind == 'bio' else 'dense formulas in flexpos.bench'}"
        f" -> (B, NH, L, L) float bias -> SDPA; floor = SDPA with no positional effect",
        f"positions: sorted irregular integers (gaps 1-3); memory: {memory.method}",
    ]
    if device.type == "cpu" and args.backend == "auto":
        header.append("CPU: flexpos runs its chunked backend (compiled bias per query chunk -> SDPA)")
    log(header[0])
    if device.type == "cpu":
        log("compiling on CPU is slow: each scheme compiles at its first length (~15 s cold, a few s from cache)")

    rows: list[Row] = []
    started = time.perf_counter()
    cases = [(scheme, length) for scheme in args.schemes for length in sorted(args.lengths)]
    seen: dict[str, list[tuple[int, float]]] = {}  # scheme -> [(L, flexpos peak MiB)]
    interrupted = False
    try:
        for i, (scheme, length) in enumerate(cases, 1):
            setup = Setup(scheme, length, args.batch, args.heads, args.head_dim, args.dtype, str(device),
                          backward, dense_kind, args.window, args.backend, args.seed)
            log(f"[{i}/{len(cases)}] {scheme} L={length}")
            row = run_case(setup, args.repeat, memory, log, flexpos_need=foresee(seen.get(scheme, []), length),
                           fresh=scheme not in seen)
            seen.setdefault(scheme, [])
            if row.flexpos_peak_mb and row.flexpos_peak_mb > 0:
                seen[scheme].append((length, row.flexpos_peak_mb))
            rows.append(row)
            log(f"{scheme} L={length}: dense {_cell('dense_ms', row.dense_ms)} ms, flexpos "
                f"{_cell('flexpos_ms', row.flexpos_ms)} ms, speed-up {_cell('speedup', row.speedup)}")
    except KeyboardInterrupt:  # a time limit (SIGINT): keep what finished
        interrupted = True
        log(f"interrupted: reporting the {len(rows)} finished case(s) of {len(cases)}")
    elapsed = time.perf_counter() - started

    print("\n".join(header))
    print(format_table(rows))
    if interrupted:
        print(f"INTERRUPTED after {len(rows)} of {len(cases)} cases")
    print(f"speed-up = dense ms / flexpos ms; peak = memory growth during one warm call; "
          f"compile s = first call - steady call; total {elapsed:.0f} s")
    if args.json:
        payload = {
            "command": " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]),
            "machine": facts,
            "settings": {
                "device": str(device), "dtype": args.dtype, "mode": args.mode, "batch": args.batch,
                "heads": args.heads, "head_dim": args.head_dim, "dense": dense_kind, "backend": args.backend,
                "repeat": args.repeat, "window": args.window, "memory_method": memory.method,
                "dpb": {"dim": DPB_DIM, "depth": DPB_DEPTH},
            },
            "results": [asdict(r) for r in rows],
            "elapsed_s": round(elapsed, 1),
            "interrupted": interrupted,
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        log(f"wrote {args.json}")
    if args.plot:
        plot_results(rows, args.plot)
        log(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
