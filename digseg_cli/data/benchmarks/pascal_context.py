"""PASCAL-Context adapters: PC-59 (without background) and PC-459, on VOC2010 images.

One job: find the validation files, build them from the official release once, and decode labels into
train ids. The official annotations are ``VOC2010/trainval/<id>.mat`` (field ``LabelMap``, 459 ids, 1-based).
``convert_labels`` writes the validation split from them, the first time a PASCAL-Context dataset is used
or right after ``--download``, into ``annotations_detectron2/`` (the SAN/CAT-Seg layout):

- ``pc459_val/<id>.tif``: uint16 ``LabelMap − 1`` (0…458; a 0 in ``LabelMap`` would become 65535, SAN's ignore);
- ``pc59_val/<id>.png``: uint8 0…58 for the 59 classes, 255 (ignore) for background and every other id.

The validation ids are those of ``pascalcontext_val.txt`` (CAT-Seg's list) when present, else VOC2010's
``ImageSets/Main/val.txt`` (the 5,105 val images of PASCAL-Context). Conversions made elsewhere are read as
they are: CAT-Seg/SAN ``annotations_detectron2/*`` and mmseg ``SegmentationClassContext/*.png`` (0 background,
1…59; reduce_zero_label). Nothing here knows models or metrics.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from pathlib import Path

import numpy as np

from digseg_cli.data.benchmarks import classnames
from digseg_cli.data.benchmarks.base import (
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
from digseg_cli.errors import DatasetError

log = logging.getLogger("digseg")

_VOC = "VOCdevkit/VOC2010"
_DOWNLOADS = (
    # md5 from pytorch/vision torchvision/datasets/voc.py (DATASET_YEAR_DICT["2010"]); no sha256 is published.
    DownloadItem(
        "http://host.robots.ox.ac.uk/pascal/VOC/voc2010/VOCtrainval_03-May-2010.tar",
        "VOCtrainval_03-May-2010.tar",
        md5="da459979d0c395079b5c75ee67908abb",
    ),
    # the 459-class .mat annotations: no published checksum was found.
    DownloadItem("https://roozbehm.info/pascal-context/trainval.tar.gz", "trainval.tar.gz", extract_to=_VOC),
)

# The 59 classes as 1-based PASCAL-Context ids (``labels.txt``), in PC-59 label order: label k is PC59_IDS[k].
# The same ids, sorted, as ``_mapping`` in CAT-Seg datasets/prepare_pascal_context_59.py, SAN
# datasets/prepare_pcontext_sem_seg_59cls.py and mmseg tools/dataset_converters/pascal_context.py
# (there applied to the Detail API masks, whose category ids are these 459 ids); 397 "table" is "diningtable".
PC59_IDS = (
    2,
    9,
    18,
    19,
    22,
    23,
    25,
    31,
    33,
    34,
    44,
    45,
    46,
    59,
    65,
    68,
    72,
    80,
    85,
    98,
    104,
    105,
    113,
    115,
    144,
    158,
    159,
    162,
    187,
    189,
    207,
    220,
    232,
    258,
    259,
    260,
    284,
    295,
    296,
    308,
    324,
    326,
    347,
    349,
    354,
    355,
    360,
    366,
    368,
    397,
    415,
    416,
    420,
    424,
    427,
    440,
    445,
    454,
    458,
)
_NUM_IDS = 459
_PC59_LUT = np.full(_NUM_IDS + 1, 255, dtype=np.uint8)  # LabelMap value → PC-59 label
_PC59_LUT[list(PC59_IDS)] = np.arange(len(PC59_IDS), dtype=np.uint8)
_OUTPUTS = {"pc459_val": ".tif", "pc59_val": ".png"}  # annotations_detectron2/<name>/<id><suffix>
_VAL_LISTS = ("pascalcontext_val.txt", "ImageSets/Main/val.txt")
_LOG_EVERY = 500
_HOW = (
    "put the official files in place (`digseg eval --dataset pc59 --download` fetches them): VOC2010 images in "
    "VOCdevkit/VOC2010/JPEGImages and trainval.tar.gz (https://www.cs.stanford.edu/~roozbeh/pascal-context/) "
    "unpacked into VOCdevkit/VOC2010/trainval; digseg converts the labels on first use"
)


def _voc(root: Path) -> Path:
    return root / _VOC if (root / _VOC).is_dir() else root


def _val_ids(voc: Path) -> list[str] | None:
    for name in _VAL_LISTS:
        ids = read_split_file(voc / name)
        if ids is not None:
            return ids
    return None


def pc459_labels(label_map: np.ndarray) -> np.ndarray:
    """PC-459 train ids of an official ``LabelMap``: v − 1 (0…458), and 0 → 65535 (uint16 wrap, SAN's ignore)."""
    values = np.asarray(label_map, dtype=np.int64)
    return np.where(values == 0, 65535, values - 1).astype(np.uint16)


def pc59_labels(label_map: np.ndarray) -> np.ndarray:
    """PC-59 train ids of an official ``LabelMap``: the 59 classes → 0…58, everything else → 255."""
    return _PC59_LUT[np.asarray(label_map, dtype=np.int64)]


def _read_label_map(path: Path) -> np.ndarray:
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        values = np.asarray(loadmat(path, variable_names=["LabelMap"])["LabelMap"])
    except (
        MatReadError,
        OSError,
        ValueError,
        NotImplementedError,
        KeyError,
    ) as exc:  # unreadable, v7.3, or no LabelMap
        raise DatasetError(f"cannot read LabelMap from {path} ({exc}); re-extract trainval.tar.gz") from None
    if values.ndim != 2 or values.size == 0:
        raise DatasetError(f"{path}: LabelMap must be a 2-D map; got shape {values.shape}")
    if values.min() < 0 or values.max() > _NUM_IDS:
        raise DatasetError(f"{path}: LabelMap ids must lie in 0…{_NUM_IDS}; got {values.min()}…{values.max()}")
    return values.astype(np.int64)


def convert_labels(root: Path) -> None:
    """Write the missing ``annotations_detectron2/{pc459_val,pc59_val}`` from ``trainval/*.mat`` (val ids only).

    A no-op when both folders exist, or when the .mat files or the validation list are absent (listing the
    split then says what is missing). Each folder is written under a temporary name beside it and renamed
    when complete, so an interrupted run leaves no partial folder behind (and a concurrent one is harmless).
    """
    voc = _voc(root)
    mats, out = voc / "trainval", voc / "annotations_detectron2"
    todo = [name for name in _OUTPUTS if not (out / name).is_dir()]
    ids = _val_ids(voc) if todo and mats.is_dir() else None
    stems = [stem for stem in ids or () if (mats / f"{stem}.mat").is_file()]
    if not stems:
        return
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    log.info(
        "converting %d PASCAL-Context validation labels from %s into %s (%s); done once",
        len(stems),
        mats,
        out,
        ", ".join(todo),
    )
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = {name: out / f".{name}.partial-{tag}" for name in todo}  # mkdir, not mkdtemp: keep the umask's mode
    try:
        for folder in tmp.values():
            folder.mkdir()
        for i, stem in enumerate(stems, 1):
            label_map = _read_label_map(mats / f"{stem}.mat")
            if "pc459_val" in tmp:
                Image.fromarray(pc459_labels(label_map)).save(tmp["pc459_val"] / f"{stem}.tif", format="TIFF")
            if "pc59_val" in tmp:
                Image.fromarray(pc59_labels(label_map)).save(tmp["pc59_val"] / f"{stem}.png", format="PNG")
            if i % _LOG_EVERY == 0 or i == len(stems):
                log.info("PASCAL-Context labels: %d/%d converted", i, len(stems))
        for name, folder in tmp.items():
            try:
                os.replace(folder, out / name)
            except OSError:
                if not (out / name).is_dir():  # else another process finished the same conversion first
                    raise
    finally:
        for folder in tmp.values():
            shutil.rmtree(folder, ignore_errors=True)


def _restrict(items: list[Item], voc: Path) -> list[Item]:
    ids = read_split_file(voc / "pascalcontext_val.txt")
    if ids is None:
        return items
    listed = set(ids)  # built once, not once per item
    return [it for it in items if it.stem in listed]


def _no_labels(voc: Path, sub: str, what: str) -> MissingLayout:
    """The error saying why ``annotations_detectron2/<sub>`` is missing (and could not be built)."""
    if (voc / "trainval").is_dir() and _val_ids(voc) is None:
        return MissingLayout(
            f"found {voc / 'trainval'} but no validation list: neither "
            f"{' nor '.join(str(voc / n) for n in _VAL_LISTS)} exists"
        )
    return MissingLayout(f"missing folder {voc / 'annotations_detectron2' / sub} ({what}); " + _HOW)


def _pc59_items(root: Path, split: str) -> list[Item]:
    voc = _voc(root)
    images = files_by_stem(need_dir(voc / "JPEGImages", "VOC2010 images"), "*.jpg")
    for sub in ("annotations_detectron2/pc59_val", "SegmentationClassContext"):
        if (voc / sub).is_dir():
            labels = files_by_stem(voc / sub, "*.png")
            if sub == "SegmentationClassContext":
                labels = keep_listed(labels, read_split_file(voc / "ImageSets/SegmentationContext/val.txt"))
            return pair_by_label(labels, images, voc / "JPEGImages")
    raise _no_labels(voc, "pc59_val", "PC-59 labels")


def _pc59_label(path: Path) -> np.ndarray:
    raw = read_raw(path)
    if path.parent.name == "SegmentationClassContext":
        return reduce_zero_label(raw, 255)  # mmseg: 0 background → 255, 1…59 → 0…58
    return np.asarray(raw, dtype=np.int64)  # detectron2: already 0…58, background 255


def _pc459_items(root: Path, split: str) -> list[Item]:
    voc = _voc(root)
    images = files_by_stem(need_dir(voc / "JPEGImages", "VOC2010 images"), "*.jpg")
    conv = voc / "annotations_detectron2/pc459_val"
    if not conv.is_dir():
        raise _no_labels(voc, "pc459_val", "PC-459 labels")
    labels = files_by_stem(conv, "*.tif")
    return _restrict(pair_by_label(labels, images, voc / "JPEGImages"), voc)


def _pc459_label(path: Path) -> np.ndarray:
    return np.asarray(read_raw(path), dtype=np.int64)  # uint16: 0…458, 65535 = ignore


_COMMON = dict(
    splits=("val",),
    short_side=640,
    max_side=2560,
    folder="pascal-context",
    download=_DOWNLOADS,
    prepare=convert_labels,
    manual="Official source: https://www.cs.stanford.edu/~roozbeh/pascal-context/; " + _HOW + ".",
)

PASCAL_CONTEXT_59 = DatasetSpec(
    name="pascal-context-59",
    title="PASCAL-Context 59",
    class_names=classnames.PC59,
    list_items=_pc59_items,
    load_label=_pc59_label,
    ignore_index=255,
    layout="VOCdevkit/VOC2010/JPEGImages/*.jpg and VOCdevkit/VOC2010/trainval/*.mat "
    "(converted on first use to VOCdevkit/VOC2010/annotations_detectron2/pc59_val/*.png)",
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
    layout="VOCdevkit/VOC2010/JPEGImages/*.jpg and VOCdevkit/VOC2010/trainval/*.mat "
    "(converted on first use to VOCdevkit/VOC2010/annotations_detectron2/pc459_val/*.tif, uint16)",
    protocol="dataset-level mIoU over 459 classes, val; ignore 65535 (SAN; no pixel is ignored in practice)",
    **_COMMON,
)
