"""ADE20K adapters: SceneParse150 (A-150, auto-downloadable) and ADE20K-full (A-847, account-gated).

One job: find the official files of each split and decode their labels into train ids. A-150 reads the
challenge zip's 8-bit annotations and applies reduce_zero_label (0 → 255, v → v − 1). A-847 reads the
CAT-Seg/MaskFormer conversion (uint16 TIFF, 0…846, 65535 ignore); converting the raw ``_seg.png`` needs the
selection of 847 ADE ids, which this module does not know. Nothing here knows models or metrics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from digseg_cli.data.benchmarks import classnames
from digseg_cli.data.benchmarks.base import (
    DatasetSpec,
    DownloadItem,
    Item,
    MissingLayout,
    files_by_stem,
    need_dir,
    pair_by_stem,
    read_raw,
    reduce_zero_label,
)

_ADE150_SPLITS = {"val": "validation", "train": "training"}
_ADE150_ZIP = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"


def _ade150_items(root: Path, split: str) -> list[Item]:
    base = root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root
    sub = _ADE150_SPLITS[split]
    images = files_by_stem(need_dir(base / "images" / sub, "ADE images"), "*.jpg")
    labels = files_by_stem(need_dir(base / "annotations" / sub, "ADE annotations"), "*.png")
    return pair_by_stem(images, labels)


def _ade150_label(path: Path) -> np.ndarray:
    return reduce_zero_label(read_raw(path), 255)  # 0 = other → 255; 1…150 → 0…149


def _ade847_items(root: Path, split: str) -> list[Item]:
    base = root / "ADE20K_2021_17_01" if (root / "ADE20K_2021_17_01").is_dir() else root
    if not (base / "annotations_detectron2" / "validation").is_dir() and (base / "images" / "ADE").is_dir():
        raise MissingLayout(
            f"found the raw ADE20K-full release in {base} but not its A-847 conversion: run CAT-Seg's "
            "datasets/prepare_ade20k_full.py (github.com/cvlab-kaist/CAT-Seg) with DETECTRON2_DATASETS set to "
            f"{base.parent}; it writes images_detectron2/validation/*.jpg and annotations_detectron2/validation/*.tif"
        )
    images = files_by_stem(need_dir(base / "images_detectron2" / "validation", "A-847 images"), "*.jpg")
    labels = files_by_stem(need_dir(base / "annotations_detectron2" / "validation", "A-847 labels"), "*.tif")
    return pair_by_stem(images, labels)


def _ade847_label(path: Path) -> np.ndarray:
    return np.asarray(read_raw(path), dtype=np.int64)  # uint16: 0…846, 65535 = ignore


ADE20K = DatasetSpec(
    name="ade20k",
    title="ADE20K-150 (SceneParse150)",
    class_names=classnames.ADE150,
    list_items=_ade150_items,
    load_label=_ade150_label,
    ignore_index=255,
    splits=("val", "train"),
    short_side=640,
    max_side=2560,
    folder="ade20k",
    layout="ADEChallengeData2016/images/validation/ADE_val_*.jpg and "
    "ADEChallengeData2016/annotations/validation/ADE_val_*.png",
    download=(
        # size and sha256 from tensorflow/datasets tensorflow_datasets/url_checksums/ade20k.txt; the same values in
        # huggingface/datasets datasets/scene_parse_150/dataset_infos.json ("download_checksums").
        DownloadItem(
            _ADE150_ZIP,
            "ADEChallengeData2016.zip",
            size=967382037,
            sha256="7ff1be44964418441f542a7cc1e1a650e7dc0fc275f5d23252bc9bbdbc977b29",
        ),
    ),
    manual=f"Official source: http://sceneparsing.csail.mit.edu (zip: {_ADE150_ZIP}).",
    protocol="dataset-level mIoU over 150 classes, reduce_zero_label, ignore 255; "
    "open-vocab short side 640 (SAN/CAT-Seg)",
)

ADE20K_FULL = DatasetSpec(
    name="ade20k-full",
    title="ADE20K-full (A-847)",
    class_names=classnames.ADE847,
    list_items=_ade847_items,
    load_label=_ade847_label,
    ignore_index=65535,
    short_side=640,
    max_side=2560,
    folder="ade20k-full",
    layout="ADE20K_2021_17_01/images_detectron2/validation/*.jpg and "
    "ADE20K_2021_17_01/annotations_detectron2/validation/*.tif (uint16)",
    manual=(
        "ADE20K-full needs a registered and approved account, so digseg cannot download it: request it at "
        "http://groups.csail.mit.edu/vision/datasets/ADE20K/request_data/, unzip ADE20K_2021_17_01, then run "
        "CAT-Seg's datasets/prepare_ade20k_full.py to write the A-847 validation conversion (short side ≤ 512)."
    ),
    synonym_sep=", ",
    protocol="dataset-level mIoU over 847 classes on the converted validation labels (short side ≤ 512), ignore 65535",
)
