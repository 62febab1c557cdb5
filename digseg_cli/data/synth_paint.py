"""Drawing primitives for the synthetic scenes (`data.synth`): smooth noise, fractal textures, colour jitter,
Bézier curves and filled polygons, on a float32 RGB image in 0..255 and uint8 masks.

Pure numpy and OpenCV: what to draw, and where, is `data.synth`'s job.
"""

from __future__ import annotations

import cv2
import numpy as np


def noise(rng: np.random.Generator, size: int, cell: float) -> np.ndarray:
    """Smooth noise ``[size,size]`` with features about ``cell`` pixels wide, roughly unit variance."""
    n = max(2, int(round(size / max(cell, 1.0))) + 2)
    grid = rng.standard_normal((n, n)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)


def fbm(rng: np.random.Generator, size: int, cells: tuple[float, ...] = (48, 16, 6)) -> np.ndarray:
    out = np.zeros((size, size), np.float32)
    for i, cell in enumerate(cells):
        out += noise(rng, size, cell) * (0.6**i)
    return out


def jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: float) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3), 0, 255).astype(np.float32)


def paint(img: np.ndarray, region: np.ndarray, color: np.ndarray, tex: np.ndarray | float = 0.0) -> None:
    """``img[region] = color * (1 + tex)`` with ``tex`` a ``[S,S]`` relative brightness map or scalar."""
    shade = 1.0 + (tex[region] if isinstance(tex, np.ndarray) else tex)
    img[region] = color[None, :] * np.asarray(shade, np.float32).reshape(-1, 1)


def bezier(p: np.ndarray, n: int) -> np.ndarray:
    """Points of a Bézier curve with control points ``p`` ``[k,2]``, sampled ``n`` times → ``[n,2]``."""
    t = np.linspace(0.0, 1.0, n)[None, :, None]  # [1,n,1]
    pts = np.broadcast_to(p.astype(np.float64)[:, None, :], (len(p), n, 2))  # [k,n,2]
    while len(pts) > 1:  # de Casteljau
        pts = (1 - t) * pts[:-1] + t * pts[1:]
    return pts[0]


def edge_point(rng: np.random.Generator, size: int, side: int) -> np.ndarray:
    u = rng.uniform(0.05, 0.95) * size
    m = 6.0
    return np.array([(u, -m), (size + m, u), (u, size + m), (-m, u)][side])


def poly(mask: np.ndarray, pts: np.ndarray, value: int = 1) -> None:
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32).reshape(-1, 1, 2)], value)
