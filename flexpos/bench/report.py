"""The results: the printed table, the machine facts saved with the JSON, the optional plot."""

from __future__ import annotations

import datetime
import os
import platform
from importlib import metadata
from typing import Any, Sequence

import torch

import flexpos

from .cases import bio_available
from .memory import GIB
from .run import Row

COLUMNS = [
    ("scheme", "scheme", "<"),
    ("L", "length", ">"),
    ("dense ms", "dense_ms", ">"),
    ("flexpos ms", "flexpos_ms", ">"),
    ("speed-up", "speedup", ">"),
    ("dense peak MiB", "dense_peak_mb", ">"),
    ("flexpos peak MiB", "flexpos_peak_mb", ">"),
    ("max |diff|", "max_abs_diff", ">"),
    ("dense |diff|", "dense_abs_diff", ">"),  # shown where measured: float16/bfloat16
    ("floor ms", "floor_ms", ">"),
    ("compile s", "compile_s", ">"),
]


def cell(key: str, value: Any) -> str:
    """``value`` of the Row field ``key`` as printed in the table."""
    if value is None:
        return "-"
    if key == "speedup":
        return f"{value:.2f}x"
    if key in ("max_abs_diff", "dense_abs_diff"):
        return f"{value:.1e}"
    if key in ("dense_peak_mb", "flexpos_peak_mb"):
        return f"{value:,.0f}" if abs(value) >= 10 else f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return str(value)


def format_table(rows: Sequence[Row]) -> str:
    """The aligned table, one line per row, with a note column (window, skipped or failed paths)."""
    columns = [c for c in COLUMNS if c[1] != "dense_abs_diff" or any(r.dense_abs_diff is not None for r in rows)]
    body = []
    for r in rows:
        cells = [cell(key, getattr(r, key)) for _, key, _ in columns]
        notes = [] if r.window is None else [f"window {r.window:g}"]
        if r.dense_status != "ok":
            notes.append(f"dense {r.dense_status}")
        if r.flexpos_status != "ok":
            notes.append(f"flexpos {r.flexpos_status}")
        body.append((cells, "; ".join(notes)))
    widths = [max(len(h), *(len(c[i]) for c, _ in body)) if body else len(h) for i, (h, _, _) in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(f"{c:{a}{w}}" for c, w, (_, _, a) in zip(cells, widths, columns))
    out = [line([h for h, _, _ in columns]) + "  note", line(["-" * w for w in widths])]
    out += [(line(c) + ("  " + n if n else "")).rstrip() for c, n in body]
    return "\n".join(out)


def machine_facts(device: torch.device) -> dict[str, Any]:
    """Date, Python, torch, CPU (and GPU), package versions: saved with the results."""
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
    facts["flexpos"] = flexpos.__version__  # also when run from a checkout, not installed
    if bio_available():
        try:
            facts["bio_attention"] = metadata.version("bio-attention")
        except metadata.PackageNotFoundError:  # importable from a path, not installed
            facts["bio_attention"] = "unknown"
    return facts


PLOT_FORMATS = ("png", "pdf", "svg", "svgz", "eps", "ps", "jpg", "jpeg", "tif", "tiff", "webp")
"""File name endings ``--plot`` takes: formats matplotlib's Agg backend writes (with Pillow, its dependency)."""

PLOT_NEEDS = "--plot needs matplotlib: pip install matplotlib (or, from a checkout, pip install -e '.[plot]')"


def plot_results(rows: Sequence[Row], path: str) -> None:
    """Time and peak memory vs L, log-log, one line per (scheme, path)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        raise SystemExit(PLOT_NEEDS) from None
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
    for ax, title, unit in ((ax_t, "time", "ms"), (ax_m, "peak memory growth", "MiB")):
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
