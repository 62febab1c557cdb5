"""Geometry on tensors: processing-resolution resize, padding to the model's multiple, tiles, flips.

Tensor-only (no PIL, no files). Every resize here is bilinear or nearest, never bicubic, because bicubic
is missing on MPS (performance.md §3.1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def processing_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """Size with the long side at `resolution` (aspect kept); 0 keeps the native size."""
    if resolution <= 0:
        return height, width
    scale = resolution / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """`[B,C,H,W]` → `[B,C,*size]`; antialiased when shrinking with bilinear."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    shrinking = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrinking)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Replicate-pad bottom/right so H and W are multiples of `multiple`; returns (padded, (pad_h, pad_w))."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")  # [B,C,H+ph,W+pw]
    return x, (ph, pw)


def unpad(x: torch.Tensor, pad: tuple[int, int]) -> torch.Tensor:
    ph, pw = pad
    return x[..., : x.shape[-2] - ph, : x.shape[-1] - pw]


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """mmseg slide windows along one axis: ⌈(L − tile)/stride⌉ + 1 windows, the last ending at the border."""
    if length <= tile:
        return [0]
    n = math.ceil((length - tile) / stride) + 1
    return [min(i * stride, length - tile) for i in range(n)]


def tile_size_for(tile: int | str | None, resolution: int, height: int, width: int) -> int:
    """The tile size the pipeline runs an `height`x`width` image with; 0 = the whole image at once.

    `tile` is None/"off"/0 (never tile), "auto" (tile at native scale when the image's long side exceeds
    1.5 × `resolution`; then the tile is `resolution`) or a size in pixels.
    """
    if tile in (None, "off", 0):
        return 0
    if tile == "auto":
        return resolution if resolution and max(height, width) > 1.5 * resolution else 0
    return int(tile)


def tile_grid(height: int, width: int, tile: int, overlap: float) -> tuple[list[int], list[int], int, int]:
    """The tile windows as a grid: (their tops, their lefts, h, w); `tile_windows` is every (top, left) pair.
    A grid is O(H + W) where the window list is O(H·W): a 20000² raster has 694k 32 px windows."""
    stride = max(1, int(round(tile * (1 - overlap))))
    return tile_starts(height, tile, stride), tile_starts(width, tile, stride), min(tile, height), min(tile, width)


def tile_count(height: int, width: int, tile: int, overlap: float) -> int:
    """How many tile windows `tile_windows` gives (1 for `tile` 0: the whole image, untiled)."""
    if not tile:
        return 1
    tops, lefts, _, _ = tile_grid(height, width, tile, overlap)
    return len(tops) * len(lefts)


def tile_windows(height: int, width: int, tile: int, overlap: float) -> list[tuple[int, int, int, int]]:
    """Windows `(top, left, h, w)` covering the image with `overlap` (fraction of the tile), row by row."""
    tops, lefts, th, tw = tile_grid(height, width, tile, overlap)
    return [(y, x, th, tw) for y in tops for x in lefts]


def feather_weights(h: int, w: int, ramp: int, device=None) -> torch.Tensor:
    """A `[h,w]` blending window: 1 inside, a raised-cosine ramp of `ramp` pixels at the borders.

    Never exactly 0, so pixels at the image border (covered by one tile only) keep their value.
    """

    def axis(n: int) -> torch.Tensor:
        pos = torch.arange(n, device=device, dtype=torch.float32)
        edge = torch.minimum(pos + 0.5, n - pos - 0.5)  # distance to the nearest border
        if ramp <= 0:
            return torch.ones(n, device=device)
        return 0.5 - 0.5 * torch.cos(math.pi * (edge / ramp).clamp(max=1.0))

    return (axis(h)[:, None] * axis(w)[None, :]).clamp_min(1e-3)  # [h,w]


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 flips/rotations (0 = identity) of `[...,H,W]`; 1–3 keep H,W; 4–7 swap them."""
    if k & 1:
        x = x.flip(-1)
    if k & 2:
        x = x.flip(-2)
    if k & 4:
        x = x.transpose(-1, -2)
    return x


def dihedral_inverse(x: torch.Tensor, k: int) -> torch.Tensor:
    if k & 4:
        x = x.transpose(-1, -2)
    if k & 2:
        x = x.flip(-2)
    if k & 1:
        x = x.flip(-1)
    return x
