"""Blocks of a large image keep their tile windows as a grid: every window once, in memory O(H + W)."""

from __future__ import annotations

import pytest

from digseg_cli.core.transforms import tile_count, tile_windows
from digseg_cli.inference.blocks import plan_blocks


@pytest.mark.parametrize(
    ("height", "width", "tile", "side"), [(100, 70, 32, 40), (257, 513, 48, 96), (50, 60, 0, 1024)]
)
def test_the_blocks_windows_are_the_images_windows(height, width, tile, side):
    windows = tile_windows(height, width, tile, 0.25) if tile else [(0, 0, height, width)]
    assert tile_count(height, width, tile, 0.25) == len(windows)
    blocks = plan_blocks(height, width, tile, 0.25, side)
    seen = [w for b in blocks for w in b.windows]
    assert set(seen) == set(windows)
    for b in blocks:  # a block's windows reach into its box, and its read box bounds them
        top, left, bh, bw = b.box
        for y, x, h, w in b.windows:
            assert y < top + bh and y + h > top and x < left + bw and x + w > left
            assert b.read[0] <= y and b.read[1] <= x
            assert y + h <= b.read[0] + b.read[2] and x + w <= b.read[1] + b.read[3]


def test_a_20000_px_raster_plans_its_blocks_without_a_window_list():
    # 32 px tiles at overlap 0.25 (stride 24): 833² = 693,889 windows; the blocks hold their grids, 34k numbers.
    blocks = plan_blocks(20000, 20000, 32, 0.25, 1024)
    assert tile_count(20000, 20000, 32, 0.25) == 833**2
    assert len(blocks) == 400
    assert sum(len(b.tops) + len(b.lefts) for b in blocks) < 40_000
    assert sum(len(b.tops) * len(b.lefts) for b in blocks) > 833**2  # straddling windows count once per block
