"""Images too large for memory, segmented block by block through the pipeline's own tiling.

One job: cut an image into blocks (`plan_blocks`) and segment each one (`BlockSegmentation.predict`) from only the
pixels its tile windows cover. The windows are the whole image's (`transforms.tile_grid`), each block takes
those that overlap it and blends them as the whole image would (`tiling.blend_windows`), so every pixel's
probabilities and label are the ones a single call on the whole image gives, whatever the block size; memory
holds one block, its windows' pixels and one batch of tiles. The price: a window that straddles a block's edge
runs once for each block it overlaps (`windows_run` counts them). Windows with no valid pixel under them (no-data
areas of a raster) are not run.

It knows nothing of files or rasters: the caller reads each block's pixels (`Block.read`) and writes its results
(`segment/georun.py` does both for GeoTIFFs).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from digseg_cli.core import transforms
from digseg_cli.inference.tiling import Box, blend_windows

if TYPE_CHECKING:
    from digseg_cli.inference.calls import SegmentationOutput
    from digseg_cli.inference.pipeline import DigsegPipeline, Prompt

MIN_BLOCK = 1024  # pixels per side of a block, at the least
BLOCK_TILES = 8  # a block is this many tiles per side: windows straddling its edges run twice (~27 % more calls)
BLOCK_ALIGN = 256  # the tiles of the GeoTIFFs digseg writes: blocks fill whole ones


def block_side(tile: int) -> int:
    """The default side of a block for tiles of `tile` pixels: 8 tiles, rounded up to 256, at least 1024."""
    return max(MIN_BLOCK, -(-BLOCK_TILES * tile // BLOCK_ALIGN) * BLOCK_ALIGN)


@dataclass(frozen=True)
class Block:
    """One block of an image: the `box` it gives results for, the tile windows that reach into it (`windows`, in
    the image's order) and the pixels they `read` (their bounding box; the whole image when it is not tiled).
    The windows are kept as their grid (`tops` × `lefts`, all `size`): a raster's blocks hold O(H + W) numbers,
    not one tuple per window."""

    box: Box
    read: Box
    tops: tuple[int, ...]
    lefts: tuple[int, ...]
    size: tuple[int, int]  # (h, w) of every window

    @property
    def windows(self) -> tuple[Box, ...]:
        h, w = self.size
        return tuple((y, x, h, w) for y in self.tops for x in self.lefts)


def plan_blocks(height: int, width: int, tile: int, overlap: float, side: int) -> list[Block]:
    """The blocks of an image, row by row: `side`² pixels each (less at the right and bottom edges); one block
    for an image that is not tiled (`tile` 0), whatever its size."""
    if not tile:
        whole = (0, 0, height, width)
        return [Block(whole, whole, (0,), (0,), (height, width))]
    tops, lefts, th, tw = transforms.tile_grid(height, width, tile, overlap)
    blocks = []
    for top in range(0, height, side):
        bh = min(side, height - top)
        ys = tuple(y for y in tops if y < top + bh and y + th > top)
        for left in range(0, width, side):
            bw = min(side, width - left)
            xs = tuple(x for x in lefts if x < left + bw and x + tw > left)
            read = (ys[0], xs[0], ys[-1] + th - ys[0], xs[-1] + tw - xs[0])
            blocks.append(Block((top, left, bh, bw), read, ys, xs, (th, tw)))
    return blocks


class BlockSegmentation:
    """One image of `height`×`width` pixels and its prompts, segmented block by block.

    `call` takes the pipeline's keyword arguments (steps, ensemble, seed, resolution, threshold, overlap,
    prompt_template, decoder, encoder); `tile` is auto|off|N as for a call on the whole image; `block` is the side of a
    block in pixels (default `block_side`). The settings are checked and the prompts resolved once, here."""

    def __init__(
        self,
        pipe: DigsegPipeline,
        prompts: Sequence[Prompt],
        height: int,
        width: int,
        *,
        tile: int | str = "auto",
        block: int | None = None,
        **call,
    ) -> None:
        self.pipe = pipe
        self.call = pipe.prepare(prompts, **call)
        self.tile = transforms.tile_size_for(tile, self.call.run.resolution, height, width)
        side = block or block_side(self.tile)
        self.blocks = plan_blocks(height, width, self.tile, self.call.run.overlap, side)
        # The image's tile windows (what one call on the whole image runs), and those run so far: a window
        # straddling blocks counts once per block, one over no data not at all.
        self.grid_windows = transforms.tile_count(height, width, self.tile, self.call.run.overlap)
        self.windows_run = 0

    @torch.no_grad()
    def predict(self, block: Block, pixels: np.ndarray, valid: np.ndarray | None = None) -> SegmentationOutput:
        """The pipeline's output over `block.box`: `pixels` are `[h,w,3]` uint8 of `block.read`, `valid` `[h,w]` bool
        of the same pixels (None: all valid). Its timings are this block's."""
        t_start = time.perf_counter()
        top, left = block.read[:2]

        def covers_data(window: Box) -> bool:
            y, x, h, w = window
            return valid is None or bool(valid[y - top : y - top + h, x - left : x - left + w].any())

        windows = [w for w in block.windows if covers_data(w)]
        self.windows_run += len(windows)
        region = torch.from_numpy(np.ascontiguousarray(pixels))  # [h,w,3] uint8, on the CPU

        def crop(y: int, x: int, h: int, w: int) -> torch.Tensor:  # [1,3,h,w] in [-1,1] on the device
            part = region[y - top : y - top + h, x - left : x - left + w].permute(2, 0, 1)[None]
            return part.to(self.pipe.device, torch.float32) / 127.5 - 1

        timings: dict[str, float] = {}

        def predict(text) -> torch.Tensor:  # [T,h,w]
            run = self.call.run
            return blend_windows(
                self.pipe, crop, windows, block.box, text=text, tile=self.tile, run=run, timings=timings
            )

        if windows:
            probs = self.pipe.predict_finite(predict, self.call)
        else:  # no data anywhere in the block: nothing to run
            maps = len(self.call.texts) + len(self.call.run.groups or ())  # probabilities (and variances)
            probs = torch.zeros((maps, block.box[2], block.box[3]), device=self.pipe.device)
        return self.pipe.finish(probs, self.call, timings, t_start)
