"""``digseg data check``: decode every image and mask of a training folder and name every bad file.

One job: run the folder check (pairing problems from ``data.scan_folder``, unreadable files, image/mask size
mismatches, label values outside the class list, image sizes, class balance) in a thread pool and gather it
into a ``CheckReport`` whose ``problems`` are one line per bad file.

It knows nothing of how folders are paired or class files parsed (``data.py``), of tensors, models or
training, nor of how the report is shown (CLI).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from digseg_cli.data.folders import ClassList, Pair, read_classes, scan_folder
from digseg_cli.inference.images import ImageReadError, read_image, read_mask


@dataclass
class ClassBalance:
    id: int
    name: str
    pixel_fraction: float
    images: int


@dataclass
class CheckReport:
    """Everything ``check_folder`` found; ``problems`` are one-line strings naming files, ``ok`` means none."""

    folder: str
    classes: list[dict[str, Any]]
    n_pairs: int = 0
    images_without_masks: list[str] = field(default_factory=list)
    masks_without_images: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    size_mismatches: list[tuple[str, list[int], list[int]]] = field(default_factory=list)  # (stem, [w,h], [w,h])
    bad_labels: list[tuple[str, list[int]]] = field(default_factory=list)  # (mask file, unexpected values)
    min_size: list[int] | None = None  # [w, h] of the smallest image (by area)
    max_size: list[int] | None = None
    balance: list[ClassBalance] = field(default_factory=list)  # background first, then each class
    warnings: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        out: list[str] = []
        if self.n_pairs == 0:
            out.append(f"no image/mask pairs found in {self.folder}")
        out += [f"image without mask: {f}" for f in self.images_without_masks]
        out += [f"mask without image: {f}" for f in self.masks_without_images]
        out += [f"duplicate stem (several files with one name): {f}" for f in self.duplicates]
        out += [f"unreadable: {f}: {why}" for f, why in self.unreadable]
        out += [f"size mismatch: {s}: image {i[0]}x{i[1]}, mask {m[0]}x{m[1]}" for s, i, m in self.size_mismatches]
        out += [f"unknown label values in {f}: {', '.join(map(str, v))}" for f, v in self.bad_labels]
        return out

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"], d["problems"] = self.ok, self.problems
        return d


def _check_one(pair: Pair, classes: ClassList, root: Path) -> dict[str, Any]:
    rel = lambda p: p.relative_to(root).as_posix()  # noqa: E731
    res: dict[str, Any] = {"pair": pair, "unreadable": []}
    image = mask = None
    try:
        image = read_image(pair.image)
    except ImageReadError as exc:
        res["unreadable"].append((rel(pair.image), exc.reason))
    try:
        mask = classes.map_mask(read_mask(pair.mask))
    except ImageReadError as exc:
        res["unreadable"].append((rel(pair.mask), exc.reason))
    if image is not None:
        res["image_size"] = [image.shape[1], image.shape[0]]
    if mask is not None:
        res["mask_size"] = [mask.shape[1], mask.shape[0]]
        values, counts = np.unique(mask, return_counts=True)
        res["counts"] = dict(zip(values.tolist(), counts.tolist(), strict=True))
        res["mask_rel"] = rel(pair.mask)
    return res


def check_folder(
    folder: str | Path,
    class_name: str | None = None,
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CheckReport:
    """Check a training folder and report every problem by file name (decodes every image and mask)."""
    root = Path(folder)
    scan = scan_folder(root)
    classes = read_classes(root, class_name)
    report = CheckReport(
        folder=str(root),
        classes=classes.to_json()["classes"],
        n_pairs=len(scan.pairs),
        images_without_masks=scan.images_without_masks,
        masks_without_images=scan.masks_without_images,
        duplicates=scan.duplicates,
    )
    valid = classes.valid_values()
    totals: dict[int, int] = {}
    n_images: dict[int, int] = {}
    sizes: list[list[int]] = []
    total = len(scan.pairs)
    workers = workers or min(8, (os.cpu_count() or 1) + 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done, res in enumerate(pool.map(lambda p: _check_one(p, classes, root), scan.pairs), start=1):
            report.unreadable += res["unreadable"]
            if "image_size" in res:
                sizes.append(res["image_size"])
            if "image_size" in res and "mask_size" in res and res["image_size"] != res["mask_size"]:
                report.size_mismatches.append((res["pair"].stem, res["image_size"], res["mask_size"]))
            counts = res.get("counts", {})
            bad = sorted(v for v in counts if v not in valid)
            if bad:
                report.bad_labels.append((res["mask_rel"], bad[:20]))
            for v, c in counts.items():
                totals[v] = totals.get(v, 0) + c
                n_images[v] = n_images.get(v, 0) + 1
            if progress is not None:
                progress(done, total)
    if sizes:
        report.min_size = min(sizes, key=lambda s: (s[0] * s[1], s))
        report.max_size = max(sizes, key=lambda s: (s[0] * s[1], s))
    counted = sum(c for v, c in totals.items() if v != classes.ignore_index)
    rows = [(classes.background, "background"), *((c.id, c.name) for c in classes)]
    for cid, name in rows:
        frac = totals.get(cid, 0) / counted if counted else 0.0
        report.balance.append(ClassBalance(cid, name, frac, n_images.get(cid, 0)))
        if cid != classes.background and report.n_pairs and not totals.get(cid):
            report.warnings.append(f"class {name!r} (id {cid}) appears in no mask")
    return report
