"""The C heap does not keep a raster's freed blocks (`segment/heap.py`): glibc's malloc set and trimmed."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from digseg_cli.segment.heap import LARGE_ALLOCATION, map_large_allocations, return_freed_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
MiB = 2**20
ROOT = Path(__file__).resolve().parents[2]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _arrays_between_pins(size: int, count: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`count` touched arrays of `size` bytes, each followed by a small one that is kept: as a block's arrays
    and the next block's smaller ones, which pin freed heap pages in place (plain free() cannot return them)."""
    arrays, pins = [], []
    for _ in range(count):
        arrays.append(np.ones(size, np.uint8))
        pins.append(np.ones(64 * 2**10, np.uint8))
    return arrays, pins


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's; other allocators are left alone")
def test_freed_block_arrays_leave_the_resident_set():
    first = np.ones(LARGE_ALLOCATION, np.uint8)  # freed: glibc's moving threshold puts smaller ones on the heap
    del first
    arrays, pins = _arrays_between_pins(LARGE_ALLOCATION * 3 // 4, 60)  # 180 MiB
    del arrays
    before = _rss()
    assert return_freed_memory()
    assert before - _rss() > 100 * MiB, "the trim returned less than half of the freed arrays"
    del pins


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_large_allocations_are_unmapped_when_freed():
    # In a fresh process: glibc serves large allocations from free heap space before it maps any, so a heap that
    # other tests left full of free chunks would hide what the threshold does.
    code = textwrap.dedent(
        f"""
        import numpy as np
        from digseg_cli.segment.heap import LARGE_ALLOCATION, map_large_allocations
        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * 4096
        assert map_large_allocations()
        first = np.ones(4 * LARGE_ALLOCATION, np.uint8)  # would have moved the threshold above the next arrays
        del first
        arrays, pins = [], []
        for _ in range(30):  # 150 MiB, each array followed by a small one that is kept
            arrays.append(np.ones(LARGE_ALLOCATION + {MiB}, np.uint8))
            pins.append(np.ones(64 * 2**10, np.uint8))
        before = rss()
        del arrays  # no trim: each had a mapping of its own
        print(before - rss())
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert int(out.stdout) > 120 * MiB


@pytest.mark.skipif(GLIBC, reason="on glibc the calls are made")
def test_other_allocators_are_left_alone():
    assert return_freed_memory() is False
    assert map_large_allocations() is False
