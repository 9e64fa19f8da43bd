"""Peak memory, CPU time and one measured call: the measurement helpers every ``pertadapt bench`` uses."""

from __future__ import annotations

import ctypes
import gc
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

__all__ = ["cpu_seconds", "measure", "peak_rss_bytes", "peak_rss_mib"]

T = TypeVar("T")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``getrusage``; ``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def peak_rss_mib() -> float:
    """:func:`peak_rss_bytes` in MiB."""
    return peak_rss_bytes() / 2**20


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all its threads)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _vm_kb(key: str) -> int:
    """A ``/proc/self/status`` field in kB (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def measure(fn: Callable[[], T], device: str) -> tuple[T, float, float]:
    """Run ``fn`` once: its result, wall seconds and peak memory above the start (MiB).

    On CPU the peak is the resident set's high-water mark, reset first through ``/proc/self/clear_refs``
    after glibc has returned its free pages (``malloc_trim``), so that what an earlier run freed is not
    silently reused (Linux); on CUDA it is ``torch.cuda.max_memory_allocated``.

    Parameters
    ----------
    fn
        The measured call (no arguments).
    device
        ``cpu`` or ``cuda``.

    Returns
    -------
    tuple
        ``(fn(), seconds, peak_mib)``.
    """
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        base = _vm_kb("VmRSS") * 1024
    t0 = time.perf_counter()
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _vm_kb("VmHWM") * 1024
    return result, seconds, (peak - base) / 2**20
