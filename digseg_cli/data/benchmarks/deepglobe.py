"""DeepGlobe 2018 adapters: road extraction (binary) and land cover (RGB-coded, 6 classes + unknown).

One job: pair ``<id>_sat.jpg`` with ``<id>_mask.png`` in the labelled ``train/`` folder and decode masks.
Road masks are binarised at 128 (they are not pure 0/255); land-cover colours are binarised per channel
at 128 and looked up, with *unknown* (black) ignored — an explicit choice, as the sources do not settle
it. Only the labelled train tiles have masks, so papers score a 1,530-tile split of them (Batra et al.
2019); put that id list in ``test.txt`` beside ``train/`` to use it, otherwise every labelled tile is
scored (logged). Login-gated: the user supplies the files. Nothing here knows models or metrics.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from digseg_cli.data.benchmarks.base import (
    DatasetSpec,
    Item,
    files_by_stem,
    keep_listed,
    need_dir,
    pair_by_stem,
    read_raw,
    read_split_file,
    remap,
)

log = logging.getLogger("digseg")

LANDCOVER_CLASSES = ("urban land", "agriculture land", "rangeland", "forest land", "water", "barren land")
# (R, G, B) each binarised at 128 → code 4R + 2G + B → train id; unknown (0, 0, 0) and stray codes → 255.
_LANDCOVER_CODES = {3: 0, 6: 1, 5: 2, 2: 3, 1: 4, 7: 5}


def _items(root: Path, split: str) -> list[Item]:
    base = root
    images = files_by_stem(need_dir(base / "train", "DeepGlobe labelled tiles"), "*_sat.jpg", "_sat.jpg")
    labels = files_by_stem(base / "train", "*_mask.png", "_mask.png")
    if split != "all":
        ids = read_split_file(base / f"{split}.txt")
        if ids is None:
            log.warning(
                "%s not found: scoring all %d labelled tiles (not the 1,530-tile split papers use)",
                base / f"{split}.txt",
                len(images),
            )
        else:
            images = keep_listed(images, ids)
    return pair_by_stem(images, labels)


def _road_label(path: Path) -> np.ndarray:
    raw = read_raw(path).astype(np.int64)
    grey = raw.mean(axis=2) if raw.ndim == 3 else raw
    return (grey >= 128).astype(np.int64)  # 0 background, 1 road


def _landcover_label(path: Path) -> np.ndarray:
    raw = read_raw(path)
    if raw.ndim != 3:
        raise ValueError("DeepGlobe land-cover masks are RGB colour-coded PNGs")
    bits = (raw[..., :3] >= 128).astype(np.int64)
    code = bits[..., 0] * 4 + bits[..., 1] * 2 + bits[..., 2]  # [H,W] in 0…7
    return remap(code, _LANDCOVER_CODES, 255)


_MANUAL = (
    "DeepGlobe needs a login (CodaLab https://competitions.codalab.org/competitions/18467, or "
    "{kaggle} with your own API token) and has no redistribution licence, so "
    "digseg does not download it. Unzip it so that train/<id>_sat.jpg and train/<id>_mask.png sit in the "
    "{folder} folder."
)

DEEPGLOBE_ROAD = DatasetSpec(
    name="deepglobe",
    title="DeepGlobe Road Extraction",
    class_names=("road",),
    list_items=_items,
    load_label=_road_label,
    ignore_index=None,
    label_mode="background",
    threshold=0.5,
    headline="road_iou",
    splits=("test", "val", "train", "all"),
    default_split="test",
    folder="deepglobe-road",
    layout="train/<id>_sat.jpg + train/<id>_mask.png; optional test.txt listing the 1,530 test ids",
    manual=_MANUAL.format(
        kaggle="Kaggle: `kaggle datasets download balraj98/deepglobe-road-extraction-dataset`", folder="deepglobe-road"
    ),
    protocol="road IoU = TP/(TP+FP+FN) of the road class over all test pixels (CoANet), GT binarised at 128; "
    "the 2-class mIoU is reported separately and is not comparable",
)

DEEPGLOBE_LANDCOVER = DatasetSpec(
    name="deepglobe-landcover",
    title="DeepGlobe Land Cover",
    class_names=LANDCOVER_CLASSES,
    list_items=_items,
    load_label=_landcover_label,
    ignore_index=255,
    splits=("all", "val", "test"),
    default_split="all",
    folder="deepglobe-landcover",
    layout="train/<id>_sat.jpg + train/<id>_mask.png (RGB colour codes); optional val.txt / test.txt id lists",
    manual=_MANUAL.format(kaggle="a Kaggle mirror", folder="deepglobe-landcover"),
    protocol="dataset-level mIoU over 6 land-cover classes; 'unknown' (black) is ignored (255)",
)
