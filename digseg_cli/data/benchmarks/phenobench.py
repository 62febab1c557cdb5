"""PhenoBench adapter (crop / weed semantics, val): soil, crop and weed with the partial classes merged.

One job: pair ``<split>/images/*.png`` with ``<split>/semantics/*.png`` and decode labels: 0 soil, 1 crop,
2 weed, 3 partial crop → 1, 4 partial weed → 2 (``phenobench-eval --task semantics``); nothing is ignored.
Masks are read as integers, never through a float transform. The official v1.1.0 zip (CC BY-SA 4.0) is
auto-downloadable; it unpacks to ``PhenoBench/{train,val,test}``. Nothing here knows models or metrics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from digseg_cli.data.benchmarks.base import (
    DatasetSpec,
    DownloadItem,
    Item,
    files_by_stem,
    need_dir,
    pair_by_stem,
    read_gray,
    remap,
)

_ZIP = "https://www.phenobench.org/data/PhenoBench-v110.zip"  # v1.1.0, linked from phenobench.org/dataset.html


def _base(root: Path) -> Path:
    return root / "PhenoBench" if (root / "PhenoBench").is_dir() else root


def _items(root: Path, split: str) -> list[Item]:
    base = _base(root) / split
    images = files_by_stem(need_dir(base / "images", "PhenoBench images"), "*.png")
    labels = files_by_stem(need_dir(base / "semantics", "PhenoBench semantics (test labels are hidden)"), "*.png")
    return pair_by_stem(images, labels)


def _label(path: Path) -> np.ndarray:
    raw = read_gray(path)
    out = remap(raw, {0: 0, 1: 1, 2: 2, 3: 1, 4: 2}, -1)
    if (out < 0).any():
        raise ValueError(f"unexpected semantic values {sorted(set(np.unique(raw).tolist()) - {0, 1, 2, 3, 4})}")
    return out


PHENOBENCH = DatasetSpec(
    name="phenobench",
    title="PhenoBench (semantic: soil, crop, weed)",
    class_names=("soil", "crop", "weed"),
    list_items=_items,
    load_label=_label,
    ignore_index=None,
    absent_rule="mmseg",
    headline="phenobench_miou",
    splits=("val", "train"),
    folder="phenobench",
    layout="PhenoBench/val/images/*.png and PhenoBench/val/semantics/*.png",
    download=(
        # size and md5 (the publisher's) agree in Precision-AI-Inc/agritune examples/datasets/prepare_phenobench.py
        # and 00x808080/smartspray-vision-controller docs/DATA.md. A sha256 appears in only one third-party
        # source, so it is not pinned: a wrong pin would fail every user after a 7.6 GB download.
        DownloadItem(_ZIP, "PhenoBench-v110.zip", size=7630658167, md5="5168bba762053725890478432cdbdb1d"),
    ),
    manual=(
        f"PhenoBench is CC BY-SA 4.0 (https://www.phenobench.org/dataset.html); by hand: download {_ZIP} "
        "(7.6 GB) and unzip it into the phenobench folder."
    ),
    protocol="IoU of soil, crop and weed accumulated over the split and their mean (phenobench-eval); "
    "partial crop/weed merged into crop/weed",
)
