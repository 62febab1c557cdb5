"""Procedurally generated aerial-like scenes with exact class masks, for tests, demos and CPU training.

A scene is painted back to front on varied bare ground (class 0, background — the "nothing here"
label, never a prompt): fields (5, large striped polygons in greens and golds), water (4, dark blue lakes
or rivers, darker in the middle), roads (1, grey curves from edge to edge, some thin, some with dashed
centre lines), buildings (3, rotated rectangles with gable shading and cast shadows) and trees (2,
clustered dark-green blobby canopies with highlights and shadows). Each scene draws a random subset of
classes, a scale factor, a sun direction, colour jitter, an illumination gradient and sensor noise, so
every prompt has images where its class is absent. The mask is exact: shadows and noise never change it.

Determinism: scene ``i`` of a dataset with seed ``s`` uses ``np.random.default_rng([s, i])`` only, so the
same seed gives byte-identical files (PNG carries no timestamps) and scenes can be made in any order.

Folder written by ``write_synth_dataset`` (DESIGN §5, the same layout users train from)::

    OUT/images/00000.png   RGB scene
    OUT/masks/00000.png    palette PNG whose indices are class ids (0 background)
    OUT/classes.json       {"classes": [{"id": 1, "name": "road", "synonyms": ["street", "highway"]}, ...],
                            "background": 0, "ignore_index": 255}

``classes.json`` keys: ``classes`` (list of ``id``, ``name``, optional ``synonyms`` list and optional
``color`` "#rrggbb"), ``background`` (the id meaning "no class", default 0) and ``ignore_index`` (mask value
excluded from training and scoring, default 255, ``null`` for none). ``digseg_cli.data.folders`` reads it.

This module knows only numpy and OpenCV drawing; it knows nothing of models, prompts or training.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from digseg_cli.data import synth_paint as paint
from digseg_cli.errors import UsageError
from digseg_cli.files import atomic_write_text
from digseg_cli.inference.images import write_image, write_label_png

log = logging.getLogger("digseg")

ROAD, TREE, BUILDING, WATER, FIELD = 1, 2, 3, 4, 5
SYNTH_CLASSES: dict = {
    "classes": [
        {"id": ROAD, "name": "road", "synonyms": ["street", "highway"]},
        {"id": TREE, "name": "tree", "synonyms": ["trees", "forest"]},
        {"id": BUILDING, "name": "building", "synonyms": ["house", "roof"]},
        {"id": WATER, "name": "water", "synonyms": ["river", "lake"]},
        {"id": FIELD, "name": "field", "synonyms": ["grass", "crop field"]},
    ],
    "background": 0,
    "ignore_index": 255,
}
# Mask colours for viewing (the indices are what count): soil black, road grey, tree dark green,
# building red, water blue, field yellow-green.
SYNTH_PALETTE = [(0, 0, 0), (160, 160, 160), (20, 110, 30), (220, 50, 40), (30, 90, 220), (190, 220, 60)]
# Probability that a scene contains each class.
_PRESENCE = {ROAD: 0.65, TREE: 0.65, BUILDING: 0.55, WATER: 0.45, FIELD: 0.55}

_SOILS = [
    (150, 120, 90),
    (170, 150, 120),
    (122, 102, 80),
    (160, 140, 112),
    (140, 130, 115),
    (182, 162, 128),
    (135, 110, 85),
    (155, 130, 105),
]
_CROPS = [(92, 140, 58), (128, 168, 78), (165, 175, 88), (200, 182, 100), (110, 158, 68), (150, 180, 70)]
_WATERS = [(28, 58, 98), (30, 78, 92), (38, 68, 78), (48, 80, 112), (22, 48, 80)]
_ROADS = [(96, 96, 100), (118, 118, 120), (135, 134, 132), (82, 84, 90), (160, 158, 152)]
_ROOFS = [(150, 150, 152), (92, 92, 98), (160, 72, 52), (182, 92, 62), (205, 203, 196), (112, 122, 138), (130, 60, 50)]
_CANOPIES = [(40, 80, 36), (50, 95, 42), (36, 70, 42), (60, 90, 40), (45, 85, 55)]


# --------------------------------------------------------------------------------------------------
# Layers, back to front


def _soil(rng: np.random.Generator) -> np.ndarray:
    """A soil colour: warm (red ≥ blue + 12) so that bare ground never looks like water."""
    c = paint.jitter(rng, _SOILS[rng.integers(len(_SOILS))], 14)
    c[2] = min(c[2], c[0] - 12)
    return c


def _ground(rng: np.random.Generator, s: int) -> np.ndarray:
    base = _soil(rng)
    tex = 0.07 * paint.fbm(rng, s) + 0.03 * rng.standard_normal((s, s)).astype(np.float32)
    img = base[None, None, :] * (1.0 + tex[:, :, None])
    # A second soil tone in patches (wet/dry ground), and sparse pebbles.
    other = _soil(rng)
    w = np.clip(paint.noise(rng, s, 40) * 0.8 + rng.uniform(-0.5, 0.5), 0, 1)[:, :, None]
    img = img * (1 - w) + other[None, None, :] * (1.0 + tex[:, :, None]) * w
    speck = rng.random((s, s)) < 0.01
    img[speck] *= rng.uniform(0.75, 1.2)
    return img.astype(np.float32)


def _fields(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray, sc: float) -> None:
    s = img.shape[0]
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    for _ in range(int(rng.integers(1, 4))):
        c = rng.uniform(0.1, 0.9, 2) * s
        k = int(rng.integers(4, 7))
        ang = np.sort(rng.uniform(0, 2 * np.pi, k))
        rad = rng.uniform(0.22, 0.5) * s * rng.uniform(0.75, 1.0, k)
        pts = c + np.stack([np.cos(ang) * rad, np.sin(ang) * rad], axis=1)
        region = np.zeros((s, s), np.uint8)
        paint.poly(region, pts)
        r = region.astype(bool)
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(3.0, 7.0) * sc
        stripes = np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period)
        tex = rng.uniform(0.08, 0.18) * stripes + 0.05 * paint.noise(rng, s, 24) + 0.03 * rng.standard_normal((s, s))
        paint.paint(img, r, paint.jitter(rng, _CROPS[rng.integers(len(_CROPS))], 12), tex.astype(np.float32))
        mask[r] = FIELD


def _water(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray, sc: float) -> np.ndarray:
    s = img.shape[0]
    region = np.zeros((s, s), np.uint8)
    if rng.random() < 0.5:  # river: a wide curve of varying width
        a, b = rng.choice(4, 2, replace=False)
        ctrl = np.stack(
            [
                paint.edge_point(rng, s, a),
                rng.uniform(0.2, 0.8, 2) * s,
                rng.uniform(0.2, 0.8, 2) * s,
                paint.edge_point(rng, s, b),
            ]
        )
        pts = paint.bezier(ctrl, 80)
        width = rng.uniform(4.0, 9.0) * sc * (1 + 0.35 * np.sin(np.linspace(0, rng.uniform(2, 8), 80)))
        for (x, y), r in zip(pts, width, strict=True):
            cv2.circle(region, (int(round(x)), int(round(y))), max(2, int(round(r))), 1, -1)
    else:  # lake: a thresholded noise blob fading out from a centre
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
        c = rng.uniform(0.2, 0.8, 2) * s
        rad = rng.uniform(0.15, 0.35) * s * sc**0.5
        d = np.sqrt((xx - c[0]) ** 2 + (yy - c[1]) ** 2) / rad
        region[(1.0 - d + 0.35 * paint.noise(rng, s, 20 * sc)) > 0] = 1
    r = region.astype(bool)
    depth = cv2.distanceTransform(region, cv2.DIST_L2, 3)
    depth = np.minimum(depth / (6.0 * sc), 1.0)
    tex = -0.25 * depth + 0.04 * paint.noise(rng, s, 10) + 0.015 * rng.standard_normal((s, s)).astype(np.float32)
    paint.paint(img, r, paint.jitter(rng, _WATERS[rng.integers(len(_WATERS))], 10) * 1.15, tex)
    mask[r] = WATER
    return r


def _roads(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray, sc: float) -> None:
    s = img.shape[0]
    color = paint.jitter(rng, _ROADS[rng.integers(len(_ROADS))], 10)
    first: np.ndarray | None = None
    for _ in range(int(rng.integers(1, 4))):
        a = int(rng.integers(4))
        start = (
            first[rng.integers(15, 65)] if (first is not None and rng.random() < 0.5) else paint.edge_point(rng, s, a)
        )
        end = paint.edge_point(rng, s, (a + int(rng.integers(1, 4))) % 4)
        mid = (start + end) / 2 + rng.normal(0, 0.15 * s, 2) * (rng.random() < 0.7)
        pts = paint.bezier(np.stack([start, mid, end]), 80)
        first = pts if first is None else first
        width = int(rng.integers(2, 4)) if rng.random() < 0.3 else int(round(rng.uniform(4, 8) * sc))
        region = np.zeros((s, s), np.uint8)
        cv2.polylines(region, [np.round(pts).astype(np.int32).reshape(-1, 1, 2)], False, 1, max(2, width))
        r = region.astype(bool)
        # Darker kerb shading under the road, then asphalt with fine grain.
        edge = cv2.dilate(region, np.ones((3, 3), np.uint8)).astype(bool) & ~r
        img[edge] *= 0.85
        paint.paint(img, r, color, 0.03 * rng.standard_normal((s, s)).astype(np.float32))
        if width >= 6 and rng.random() < 0.6:  # dashed centre line
            line = np.zeros((s, s), np.uint8)
            for j in range(0, 80, 6):
                seg = np.round(pts[j : j + 3]).astype(np.int32).reshape(-1, 1, 2)
                cv2.polylines(line, [seg], False, 1, 1)
            lm = line.astype(bool) & r
            img[lm] = np.array([235, 232, 220] if rng.random() < 0.6 else [230, 200, 80], np.float32)
        mask[r] = ROAD


def _buildings(
    rng: np.random.Generator, img: np.ndarray, mask: np.ndarray, sc: float, sun: np.ndarray, water: np.ndarray
) -> None:
    s = img.shape[0]
    base_angle = rng.uniform(0, 180)
    for _ in range(int(rng.integers(1, 9))):
        for _attempt in range(6):
            w, h = rng.uniform(6, 17, 2) * sc
            angle = base_angle + (rng.normal(0, 4) if rng.random() < 0.7 else rng.uniform(0, 90))
            c = rng.uniform(0.05, 0.95, 2) * s
            box = cv2.boxPoints(((float(c[0]), float(c[1])), (float(w), float(h)), float(angle)))
            region = np.zeros((s, s), np.uint8)
            paint.poly(region, box)
            r = region.astype(bool)
            if r.any() and not (r & water).any():
                break
        else:
            continue
        shadow = np.zeros((s, s), np.uint8)
        paint.poly(shadow, box + sun * rng.uniform(2.0, 4.5) * sc)
        img[shadow.astype(bool) & ~r] *= 0.55
        roof = paint.jitter(rng, _ROOFS[rng.integers(len(_ROOFS))], 12)
        tex = 0.03 * rng.standard_normal((s, s)).astype(np.float32)
        paint.paint(img, r, roof, tex)
        if rng.random() < 0.7:  # gable roof: the half facing away from the sun is darker
            long_axis = (
                (box[1] - box[0])
                if np.linalg.norm(box[1] - box[0]) >= np.linalg.norm(box[2] - box[1])
                else (box[2] - box[1])
            )
            normal = np.array([-long_axis[1], long_axis[0]], np.float32)
            yy, xx = np.nonzero(r)
            side = (xx - c[0]) * normal[0] + (yy - c[1]) * normal[1]
            facing = np.sign(normal @ -sun) or 1.0
            dark = (side * facing) < 0
            img[yy[dark], xx[dark]] *= 0.72
        else:  # flat roof: lighter parapet
            inner = cv2.erode(region, np.ones((3, 3), np.uint8)).astype(bool)
            img[r & ~inner] *= 1.15
        mask[r] = BUILDING


def _trees(
    rng: np.random.Generator, img: np.ndarray, mask: np.ndarray, sc: float, sun: np.ndarray, water: np.ndarray
) -> None:
    s = img.shape[0]
    centres: list[tuple[float, float, float]] = []
    for _ in range(int(rng.integers(1, 4))):
        c = rng.uniform(0, 1, 2) * s
        spread = rng.uniform(4, 18) * sc
        for _ in range(int(rng.integers(4, 30))):
            x, y = c + rng.normal(0, spread, 2)
            if 0 <= x < s and 0 <= y < s and water[int(y), int(x)]:
                continue
            centres.append((float(x), float(y), float(rng.uniform(2.0, 5.0) * sc)))
    if not centres:
        return
    shadow = np.zeros((s, s), np.uint8)
    canopy = np.zeros((s, s), np.uint8)
    light = np.zeros((s, s), np.uint8)
    for x, y, r in centres:
        ir = max(1, int(round(r)))
        cv2.circle(shadow, (int(round(x + sun[0] * r)), int(round(y + sun[1] * r))), ir, 1, -1)
    for i, (x, y, r) in enumerate(centres):
        ir = max(1, int(round(r)))
        cv2.circle(canopy, (int(round(x)), int(round(y))), ir, (i % 250) + 1, -1)
        cv2.circle(
            light,
            (int(round(x - sun[0] * r * 0.35)), int(round(y - sun[1] * r * 0.35))),
            max(1, int(round(r * 0.55))),
            1,
            -1,
        )
    c_mask = canopy > 0
    img[(shadow > 0) & ~c_mask] *= 0.5
    lut = np.stack([paint.jitter(rng, _CANOPIES[rng.integers(len(_CANOPIES))], 10) for _ in range(251)])
    tex = 0.12 * rng.standard_normal((s, s)).astype(np.float32) + 0.22 * (light.astype(np.float32) - 0.5)
    img[c_mask] = lut[canopy[c_mask]] * (1.0 + tex[c_mask])[:, None]
    mask[c_mask] = TREE


def _finish(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Illumination gradient, colour jitter, gamma, haze, blur and sensor noise → uint8."""
    s = img.shape[0]
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    g = rng.uniform(-0.12, 0.12, 2)
    illum = 1.0 + g[0] * (xx - 0.5) + g[1] * (yy - 0.5) + 0.05 * paint.noise(rng, s, 64)
    img = img * illum[:, :, None] * rng.uniform(0.93, 1.07, 3)[None, None, :] * rng.uniform(0.85, 1.12)
    if rng.random() < 0.25:  # haze
        img = img * 0.8 + np.array([170, 175, 185], np.float32) * 0.2
    img = 255.0 * (np.clip(img, 0, 255) / 255.0) ** rng.uniform(0.85, 1.2)
    if rng.random() < 0.5:
        img = cv2.GaussianBlur(img, (3, 3), rng.uniform(0.4, 0.8))
    img = img + rng.normal(0, rng.uniform(1.5, 5.0), img.shape).astype(np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def generate_scene(rng: np.random.Generator, size: int = 128, zoom: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One scene: ``(image [size,size,3] uint8 RGB, mask [size,size] uint8 class ids)``.

    Objects scale with ``size`` (a 64 px scene is a 128 px scene shrunk); ``zoom`` draws them ``zoom``
    times larger still, a closer view, so that small sizes keep roads and roofs several pixels wide.
    """
    if size < 16:
        raise UsageError(f"`size` must be at least 16 pixels, got {size}")
    if not 0.25 <= zoom <= 4.0:
        raise UsageError(f"`zoom` must be between 0.25 and 4, got {zoom}")
    sc = rng.uniform(0.7, 1.4) * size / 128.0 * zoom
    a = rng.uniform(0, 2 * np.pi)
    sun = np.array([np.cos(a), np.sin(a)], np.float32)
    present = {k for k, p in _PRESENCE.items() if rng.random() < p}
    if not present:
        present = {int(rng.choice(list(_PRESENCE)))}
    img = _ground(rng, size)
    mask = np.zeros((size, size), np.uint8)
    water = np.zeros((size, size), bool)
    if FIELD in present:
        _fields(rng, img, mask, sc)
    if WATER in present:
        water = _water(rng, img, mask, sc)
    if ROAD in present:
        _roads(rng, img, mask, sc)
        water &= mask == WATER
    if BUILDING in present:
        _buildings(rng, img, mask, sc, sun, water)
    if TREE in present:
        _trees(rng, img, mask, sc, sun, water)
    return _finish(rng, img), mask


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The generator that scene ``index`` of a dataset with ``seed`` uses."""
    return np.random.default_rng([int(seed), int(index)])


def make_scene_image(seed: int = 0, size: int = 128) -> np.ndarray:
    """The image of scene 0 of a dataset made with ``seed`` (a quick demo input)."""
    return generate_scene(scene_rng(seed, 0), size)[0]


@dataclass
class SynthSummary:
    """What ``write_synth_dataset`` wrote: folder, count, seconds, and how many images hold each class."""

    out_dir: Path
    n: int
    seconds: float
    images_with_class: dict[str, int] = field(default_factory=dict)


_OWN_FILE = re.compile(r"^\d{5,}\.png$")


def write_synth_dataset(
    out_dir: str | Path,
    n: int,
    seed: int,
    size: int = 128,
    progress: Callable[[int, int], None] | None = None,
    *,
    zoom: float = 1.0,
    overwrite: bool = False,
) -> SynthSummary:
    """Write ``n`` scenes to ``out_dir`` in the training-folder layout (see the module docstring).

    Refuses a non-empty ``out_dir`` unless ``overwrite``; with it, scene files left over from a larger
    earlier run (``images/NNNNN.png``, ``masks/NNNNN.png``) are removed so the folder holds exactly ``n``.
    ``progress(done, total)`` is called after each scene.
    """
    if n < 1:
        raise UsageError(f"`n` must be at least 1, got {n}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder; choose another output folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{out} is not empty; pass --overwrite to write into it or choose another folder")
    t0 = time.perf_counter()
    img_dir, mask_dir = out / "images", out / "masks"
    img_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(n - 1)))
    names = {f"{i:0{width}d}.png" for i in range(n)}
    for folder in (img_dir, mask_dir):
        for stale in folder.iterdir():
            if _OWN_FILE.match(stale.name) and stale.name not in names:
                stale.unlink()
    counts = dict.fromkeys(range(1, 6), 0)
    for i in range(n):
        image, mask = generate_scene(scene_rng(seed, i), size, zoom)
        name = f"{i:0{width}d}.png"
        write_image(img_dir / name, image)
        write_label_png(mask_dir / name, mask, SYNTH_PALETTE)
        for k in np.unique(mask):
            if k > 0:
                counts[int(k)] += 1
        if progress is not None:
            progress(i + 1, n)
    atomic_write_text(out / "classes.json", json.dumps(SYNTH_CLASSES, indent=2) + "\n")
    names_by_id = {c["id"]: c["name"] for c in SYNTH_CLASSES["classes"]}
    summary = SynthSummary(out, n, time.perf_counter() - t0, {names_by_id[k]: v for k, v in counts.items()})
    log.debug("synth: %d scenes of %d px in %.1f s", n, size, summary.seconds)
    return summary
