"""Keep freed tile buffers in the process's heap instead of giving them back to the kernel after every tile.

glibc maps large buffers (a tile and its intermediates) with mmap and unmaps them when freed; it should raise that
threshold as it sees such frees, yet in a Celery worker process it did not, so every tile faulted in fresh zeroed
pages. Fixed thresholds end that (figures: docs/performance.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4


def keep_freed_buffers(mmap_threshold: int = 32 * 2**20, trim_threshold: int = 64 * 2**20) -> bool:
    """Serve buffers below `mmap_threshold` bytes from the heap, and give back only freed memory above
    `trim_threshold` at its top; both must be set, as setting one turns glibc's own adjustment off. Returns False
    where this is not glibc (the process keeps its allocator's defaults)."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))


def keep_all_freed_memory() -> bool:
    """Serve every buffer from the heap, whole decoded images too, and give none back: a process that handles one
    image after another then reuses the same pages instead of faulting fresh ones in for each (on a VM whose host
    takes freed memory back, a fresh page can cost 20 times its usual fault). For a process's own benchmark runs:
    its resident set stays at its peak. Returns False where this is not glibc."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def _mallopt() -> Any:
    """glibc's mallopt, or None elsewhere."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return None
