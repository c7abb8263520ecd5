"""pipeline.memory: worker processes keep freed tile buffers instead of faulting fresh pages in for every tile."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

ROUNDS = 50
SIZE = 2**20  # a buffer the size of a 640² colour tile (numpy asks for huge pages from 4 MB on: not these)
PAGES = SIZE // 4096

# A fresh interpreter: first glibc's low default threshold, held fixed as it was in worker processes (which map and
# unmap every buffer above it), then keep_freed_buffers(); page faults over ROUNDS 1 MB buffers in each state.
PROBE = textwrap.dedent(
    f"""
    import ctypes, ctypes.util, resource
    import numpy as np
    from pipeline.memory import M_MMAP_THRESHOLD, keep_freed_buffers

    def faults():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range({ROUNDS}):
            np.ones({SIZE}, np.uint8)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    assert ctypes.CDLL(ctypes.util.find_library("c")).mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    low = faults()
    assert keep_freed_buffers()
    print(low, faults())
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_freed_buffers_are_reused_instead_of_faulted_in_again():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    mapped_each_time, kept = map(int, out.split())
    assert mapped_each_time >= ROUNDS * PAGES * 0.9  # every buffer's pages faulted in afresh
    assert kept <= PAGES * 2  # the first buffer's pages, then the same memory again


WHOLE = 64 * 2**20  # a whole decoded image's buffer: above the largest threshold glibc serves from the heap

# A fresh interpreter: keep_freed_buffers() (a whole image's buffer still mapped and unmapped each time), then
# keep_all_freed_memory(); page faults over a few whole-image buffers in each state.
WHOLE_PROBE = textwrap.dedent(
    f"""
    import resource
    import numpy as np
    from pipeline.memory import keep_all_freed_memory, keep_freed_buffers

    def faults():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(4):
            np.ones({WHOLE}, np.uint8)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    assert keep_freed_buffers()
    mapped = faults()
    assert keep_all_freed_memory()
    np.ones({WHOLE}, np.uint8)  # the first one's pages are fresh
    print(mapped, faults())
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_whole_image_buffers_are_reused_when_all_freed_memory_is_kept():
    out = subprocess.run([sys.executable, "-c", WHOLE_PROBE], capture_output=True, text=True, check=True).stdout
    mapped_each_time, kept = map(int, out.split())
    # numpy asks for huge pages from 4 MB on, so a buffer may fault in 2 MB at a time: counted in those
    assert mapped_each_time >= 4 * WHOLE // 2**21
    assert kept < mapped_each_time / 4
