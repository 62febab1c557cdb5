"""PASCAL-Context adapters: PC-59 (without background) and PC-459, on VOC2010 images.

One job: find the validation files and decode labels into train ids. PC-59 reads the detectron2-style
conversion ``annotations_detectron2/pc59_val/*.png`` (0…58, background 255; SAN/CAT-Seg) or mmseg's
``SegmentationClassContext/*.png`` (0 background, 1…59; reduce_zero_label). PC-459 reads
``annotations_detectron2/pc459_val/*.tif`` (uint16 0…458) or, when SciPy is installed, the official
``trainval/*.mat`` ``LabelMap`` − 1 directly. Building the PC-59 PNGs from ``trainval_merged.json`` needs
pycocotools and is left to the CAT-Seg/SAN scripts. Nothing here knows models or metrics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from digseg_cli.datasets import classnames
from digseg_cli.datasets.base import (
    DatasetSpec,
    DownloadItem,
    Item,
    MissingLayout,
    files_by_stem,
    keep_listed,
    need_dir,
    pair_by_label,
    read_raw,
    read_split_file,
    reduce_zero_label,
)

_VOC = "VOCdevkit/VOC2010"
_DOWNLOADS = (
    DownloadItem("http://host.robots.ox.ac.uk/pascal/VOC/voc2010/VOCtrainval_03-May-2010.tar",
                 "VOCtrainval_03-May-2010.tar"),
    DownloadItem("https://roozbehm.info/pascal-context/trainval.tar.gz", "trainval.tar.gz", extract_to=_VOC),
    DownloadItem("https://codalabuser.blob.core.windows.net/public/trainval_merged.json", "trainval_merged.json",
                 extract=False, extract_to=_VOC),
)
_CONVERT = (
    "then write the validation labels with CAT-Seg's datasets/prepare_pascal_context_59.py / _459.py "
    "(github.com/cvlab-kaist/CAT-Seg; needs pycocotools and scipy) into VOC2010/annotations_detectron2/"
)


def _voc(root: Path) -> Path:
    return root / _VOC if (root / _VOC).is_dir() else root


def _restrict(items: list[Item], voc: Path) -> list[Item]:
    ids = read_split_file(voc / "pascalcontext_val.txt")
    return items if ids is None else [it for it in items if it.stem in set(ids)]


def _pc59_items(root: Path, split: str) -> list[Item]:
    voc = _voc(root)
    images = files_by_stem(need_dir(voc / "JPEGImages", "VOC2010 images"), "*.jpg")
    for sub in ("annotations_detectron2/pc59_val", "SegmentationClassContext"):
        if (voc / sub).is_dir():
            labels = files_by_stem(voc / sub, "*.png")
            if sub == "SegmentationClassContext":
                labels = keep_listed(labels, read_split_file(voc / "ImageSets/SegmentationContext/val.txt"))
            return pair_by_label(labels, images, voc / "JPEGImages")
    raise MissingLayout(f"missing folder {voc / 'annotations_detectron2/pc59_val'} (PC-59 labels); " + _CONVERT)


def _pc59_label(path: Path) -> np.ndarray:
    raw = read_raw(path)
    if path.parent.name == "SegmentationClassContext":
        return reduce_zero_label(raw, 255)  # mmseg: 0 background → 255, 1…59 → 0…58
    return np.asarray(raw, dtype=np.int64)  # detectron2: already 0…58, background 255


def _pc459_items(root: Path, split: str) -> list[Item]:
    voc = _voc(root)
    images = files_by_stem(need_dir(voc / "JPEGImages", "VOC2010 images"), "*.jpg")
    conv = voc / "annotations_detectron2/pc459_val"
    if conv.is_dir():
        labels = files_by_stem(conv, "*.tif")
    elif (voc / "trainval").is_dir():
        try:
            import scipy.io  # noqa: F401
        except ImportError:
            raise MissingLayout(
                f"{voc / 'trainval'} holds the official .mat labels, which need SciPy to read: "
                "`pip install scipy`, or " + _CONVERT
            ) from None
        labels = files_by_stem(voc / "trainval", "*.mat")
        ids = read_split_file(voc / "pascalcontext_val.txt")
        if ids is None:
            raise MissingLayout(
                f"missing {voc / 'pascalcontext_val.txt'} (the 5,104 validation ids, from CAT-Seg datasets/)"
            )
        labels = keep_listed(labels, ids)
    else:
        raise MissingLayout(f"missing folder {conv} (PC-459 labels) and {voc / 'trainval'} (official .mat files)")
    return _restrict(pair_by_label(labels, images, voc / "JPEGImages"), voc)


def _pc459_label(path: Path) -> np.ndarray:
    if path.suffix == ".mat":
        import scipy.io

        return np.asarray(scipy.io.loadmat(path)["LabelMap"], dtype=np.int64) - 1  # 1…459 → 0…458
    return np.asarray(read_raw(path), dtype=np.int64)


_COMMON = dict(splits=("val",), short_side=640, max_side=2560, folder="pascal-context", download=_DOWNLOADS,
               manual="Official source: https://www.cs.stanford.edu/~roozbeh/pascal-context/; " + _CONVERT + ".")

PASCAL_CONTEXT_59 = DatasetSpec(
    name="pascal-context-59",
    title="PASCAL-Context 59",
    class_names=classnames.PC59,
    list_items=_pc59_items,
    load_label=_pc59_label,
    ignore_index=255,
    layout="VOCdevkit/VOC2010/JPEGImages/*.jpg and VOCdevkit/VOC2010/annotations_detectron2/pc59_val/*.png",
    protocol="dataset-level mIoU over 59 classes without background (background = ignore 255), val",
    **_COMMON,
)

PASCAL_CONTEXT_459 = DatasetSpec(
    name="pascal-context-459",
    title="PASCAL-Context 459",
    class_names=classnames.PC459,
    list_items=_pc459_items,
    load_label=_pc459_label,
    ignore_index=65535,
    layout="VOCdevkit/VOC2010/JPEGImages/*.jpg and VOCdevkit/VOC2010/annotations_detectron2/pc459_val/*.tif (uint16)",
    protocol="dataset-level mIoU over 459 classes, val; ignore 65535 (SAN; no pixel is ignored in practice)",
    **_COMMON,
)
