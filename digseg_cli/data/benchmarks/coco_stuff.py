"""COCO-Stuff-171 adapter (val2017): official images + stuffthingmaps, auto-downloadable.

One job: find the files of a split and map label values to the 171 contiguous train ids. The official
``annotations/<split>/*.png`` hold COCO-Stuff id − 1 (0…181, 255 unlabelled); the 11 thing ids without
masks are skipped by a lookup table (the same as CAT-Seg ``prepare_coco_stuff.py`` and mmseg
``coco_stuff164k.py``); COCO RLE predictions name each train id by its COCO-Stuff id (``category_ids``), as
detectron2's ``stuff_dataset_id_to_contiguous_id`` does. An already converted ``annotations_detectron2/<split>``
is read as is. Masks are read as stored indices, never converted to RGB. Nothing here knows models or metrics.
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
    remap,
)

# Stored values (COCO-Stuff id − 1) that have no masks: things 12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91.
_UNUSED = {11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90}
STUFF_TO_TRAIN = {v: i for i, v in enumerate(v for v in range(182) if v not in _UNUSED)}  # 171 entries
assert len(STUFF_TO_TRAIN) == 171


def _base(root: Path) -> Path:
    for name in ("coco-stuff", "coco"):
        if (root / name / "images").is_dir():
            return root / name
    return root


def _items(root: Path, split: str) -> list[Item]:
    base = _base(root)
    sub = f"{split}2017"
    images = files_by_stem(need_dir(base / "images" / sub, "COCO images"), "*.jpg")
    for ann in ("annotations_detectron2", "annotations"):
        if (base / ann / sub).is_dir():
            return pair_by_stem(images, files_by_stem(base / ann / sub, "*.png"))
    raise MissingLayout(f"missing folder {base / 'annotations' / sub} (COCO-Stuff stuffthingmaps)")


def _label(path: Path) -> np.ndarray:
    raw = read_raw(path)
    if raw.ndim != 2:
        raise ValueError("COCO-Stuff label maps are single-channel index PNGs (this one decodes to RGB)")
    if path.parent.parent.name == "annotations_detectron2":
        return np.asarray(raw, dtype=np.int64)
    return remap(raw, STUFF_TO_TRAIN, 255)


COCO_STUFF = DatasetSpec(
    name="coco-stuff",
    title="COCO-Stuff-171",
    class_names=classnames.COCO_STUFF171,
    list_items=_items,
    load_label=_label,
    ignore_index=255,
    splits=("val", "train"),
    short_side=640,
    max_side=2560,
    category_ids=tuple(v + 1 for v in STUFF_TO_TRAIN),  # COCO-Stuff ids, 1-based: detectron2's records
    folder="coco-stuff",
    layout="images/val2017/*.jpg and annotations/val2017/*.png (stuffthingmaps_trainval2017)",
    download=(
        # size and sha256 from tensorflow/datasets tensorflow_datasets/url_checksums/coco2017.txt (and coco.txt).
        DownloadItem(
            "http://images.cocodataset.org/zips/val2017.zip",
            "val2017.zip",
            extract_to="images",
            size=815585330,
            sha256="4f7e2ccb2866ec5041993c9cf2a952bbed69647b115d0f74da7ce8f4bef82f05",
        ),
        # no published checksum was found for the stuffthingmaps zip (nightrome/cocostuff README gives none).
        DownloadItem(
            "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/stuffthingmaps_trainval2017.zip",
            "stuffthingmaps_trainval2017.zip",
            extract_to="annotations",
        ),
    ),
    manual="Official source: https://github.com/nightrome/cocostuff (COCO images: https://cocodataset.org).",
    protocol="dataset-level mIoU over 171 classes on val2017, ignore 255 (in-domain for COCO-Stuff-trained models)",
)
