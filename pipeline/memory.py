"""Keep freed tile buffers in the process's heap instead of giving them back to the kernel after every tile.

glibc maps large buffers (a tile and its intermediates) with mmap and unmaps them when freed; it should raise that
threshold as it sees such frees, yet in a Celery worker process it did not, so every tile faulted in fresh zeroed
pages. Fixed thresholds end that (figures: docs/performance.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def keep_freed_buffers(mmap_threshold: int = 32 * 2**20, trim_threshold: int = 64 * 2**20) -> bool:
    """Serve buffers below `mmap_threshold` bytes from the heap, and give back only freed memory above
    `trim_threshold` at its top; both must be set, as setting one turns glibc's own adjustment off. Returns False
    where this is not glibc (the process keeps its allocator's defaults)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
