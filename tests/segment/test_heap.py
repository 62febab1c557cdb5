"""The C heap does not keep a raster's freed blocks (`segment/heap.py`): glibc's malloc set and trimmed.

Each glibc check runs in a fresh interpreter: what the heap does with a free depends on what it already holds
(free chunks are reused before anything is mapped) and on the thread's arena, which a test worker's history
and threads would decide.
"""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from digseg_cli.segment.heap import map_large_allocations, return_freed_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
ROOT = Path(__file__).resolve().parents[2]

# A block's arrays, each followed by a small one that is kept (as the next block's smaller arrays do): they pin
# the freed pages in place, so plain free() cannot give them back. Prints the bytes that left the resident set
# when the arrays were freed (and `after_free` ran).
PATTERN = """
import numpy as np
from digseg_cli.segment.heap import LARGE_ALLOCATION, map_large_allocations, return_freed_memory

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

{setup}
first = np.ones(4 * LARGE_ALLOCATION, np.uint8)  # freed: glibc's moving threshold rises above the next arrays
del first
arrays, pins = [], []
for _ in range({count}):
    arrays.append(np.ones({size}, np.uint8))
    pins.append(np.ones(64 * 2**10, np.uint8))
before = rss()
del arrays
{after_free}
print(before - rss())
"""


def _returned(setup: str, after_free: str, size: int, count: int) -> int:
    code = textwrap.dedent(PATTERN).format(setup=setup, after_free=after_free, size=size, count=count)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return int(out.stdout)


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's; other allocators are left alone")
def test_freed_block_arrays_leave_the_resident_set():
    size = 3 * 2**20  # below the fixed threshold too: these stay on the heap whatever it is
    assert _returned("", "", size, 60) < 20 * 2**20  # free() alone keeps the 180 MiB
    assert _returned("", "assert return_freed_memory()", size, 60) > 150 * 2**20


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_large_allocations_are_unmapped_when_freed():
    size = 5 * 2**20  # above the fixed threshold: each array gets a mapping of its own
    assert _returned("", "", size, 30) < 20 * 2**20  # the moving threshold put them on the heap
    assert _returned("assert map_large_allocations()", "", size, 30) > 120 * 2**20  # 150 MiB, no trim


@pytest.mark.skipif(GLIBC, reason="on glibc the calls are made")
def test_other_allocators_are_left_alone():
    assert return_freed_memory() is False
    assert map_large_allocations() is False
