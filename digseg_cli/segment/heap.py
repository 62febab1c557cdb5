"""Keeping the C heap from holding a raster's freed blocks: glibc's malloc, set and trimmed for a raster run.

One job: `map_large_allocations()` once before a raster's blocks and `return_freed_memory()` after each. Why:
glibc's malloc raises its mmap threshold each time a large allocation is freed, so after the first raster
block every block's multi-MiB arrays (numpy's, torch's, GDAL's) come from the heap rather than from mappings of
their own. Freed there, they stay resident as fragments that later blocks of other sizes cannot reuse, and the
process grew with the raster, not the block: 546 MiB above the model at 4096², 1.7 GiB at 20000², where
Python's own arrays peaked at 229 and 271 MiB (`benchmarks/RESULTS.md`). A fixed threshold maps each large
allocation and unmaps it when freed; `malloc_trim(0)` returns the heap's free pages between blocks. Elsewhere
(macOS, musl, Windows) both do nothing: those allocators do not keep memory this way, and none has the calls.
"""

from __future__ import annotations

import ctypes
import functools
import platform

LARGE_ALLOCATION = 4 * 2**20  # bytes: a 1024² float32 map, the size of a block's arrays (its tiles' are smaller)
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc's malloc.h)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc, else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def map_large_allocations(threshold: int = LARGE_ALLOCATION) -> bool:
    """From now on, allocations of `threshold` bytes or more get mappings of their own (glibc, process-wide: the
    threshold no longer moves); True when it could be set."""
    libc = _glibc()
    return libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1


def return_freed_memory() -> bool:
    """Return the C heap's free pages to the system (glibc); True when it could be asked."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
