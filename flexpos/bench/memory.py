"""Peak memory growth of one call: CUDA allocator statistics on GPU; on Linux CPUs the peak
resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) after glibc has returned its
free heap pages (``malloc_trim``), so every page the call touches counts, heap or mmap."""

from __future__ import annotations

import ctypes
import gc
import os
import sys
import threading
import time
from typing import Any, Callable, Optional

import torch

MIB = 2**20
GIB = 2**30


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
            import psutil

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
