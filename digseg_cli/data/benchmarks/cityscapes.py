"""Cityscapes adapter (19 train ids, val): account-gated, so the user supplies the files.

One job: find ``leftImg8bit``/``gtFine`` pairs of a split and decode labels to train ids, reading
``*_gtFine_labelTrainIds.png`` when present and otherwise mapping ``*_gtFine_labelIds.png`` through the
official lookup table (cityscapesScripts ``helpers/labels.py``; everything else → 255). It never stores
or asks for credentials. Nothing here knows models or metrics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from digseg_cli.data.benchmarks.base import DatasetSpec, Item, files_by_stem, need_dir, pair_by_stem, read_gray, remap

CITYSCAPES_CLASSES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
LABEL_TO_TRAIN = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}


def _items(root: Path, split: str) -> list[Item]:
    images = files_by_stem(
        need_dir(root / "leftImg8bit" / split, "Cityscapes images"), "*_leftImg8bit.png", "_leftImg8bit.png"
    )
    gt = need_dir(root / "gtFine" / split, "Cityscapes fine annotations")
    labels = files_by_stem(gt, "*_gtFine_labelIds.png", "_gtFine_labelIds.png")
    labels.update(files_by_stem(gt, "*_gtFine_labelTrainIds.png", "_gtFine_labelTrainIds.png"))  # preferred
    return pair_by_stem(images, labels)


def _label(path: Path) -> np.ndarray:
    raw = read_gray(path)
    if path.name.endswith("_labelTrainIds.png"):
        return np.asarray(raw, dtype=np.int64)
    return remap(raw, LABEL_TO_TRAIN, 255)


CITYSCAPES = DatasetSpec(
    name="cityscapes",
    title="Cityscapes (19 classes)",
    class_names=CITYSCAPES_CLASSES,
    list_items=_items,
    load_label=_label,
    ignore_index=255,
    splits=("val", "train"),
    short_side=1024,
    max_side=2560,
    folder="cityscapes",
    layout="leftImg8bit/val/<city>/*_leftImg8bit.png and gtFine/val/<city>/*_gtFine_labelIds.png",
    manual=(
        "Cityscapes needs an account (https://www.cityscapes-dataset.com/register/) and its licence forbids "
        "redistribution, so digseg does not download it. Log in at https://www.cityscapes-dataset.com/downloads/ "
        "and fetch gtFine_trainvaltest.zip and leftImg8bit_trainvaltest.zip (or `pip install cityscapesscripts` "
        "and run `csDownload gtFine_trainvaltest.zip leftImg8bit_trainvaltest.zip`, which asks for your own "
        "credentials), then unzip both into the cityscapes folder."
    ),
    protocol="dataset-level mIoU over 19 train ids on val (500 images, 2048x1024), ignore 255; FC-CLIP short side 1024",
)
