"""Label maps as COCO run-length encoding, in detectron2's `sem_seg_predictions.json` format, both ways.

One job: turn one image's label map into the records detectron2's `SemSegEvaluator` writes
(`encode_label_map`: one record per label value present, `{"file_name", "category_id", "segmentation":
{"size": [h, w], "counts": str}}`, each mask encoded by `pycocotools.mask.encode` from a Fortran-ordered
`[H,W,1]` uint8 array and its counts decoded to UTF-8); read a file of such records back, refusing a
malformed one in one line naming the record (`read_records`); write one atomically (`write_records`,
compact JSON like detectron2's); and turn one image's records back into a label map (`decode_records`), so
every pixel must be covered exactly once (detectron2's records partition the image: background is a record
like any other label).

Category ids are label values unless the caller gives a table (`category_ids[label]` = the dataset's id, as
detectron2's `stuff_dataset_id_to_contiguous_id` does for COCO-Stuff). pycocotools is the optional extra
`digseg[coco]`: without it every entry point is one `UsageError` saying how to install it
(`require_pycocotools`). It knows nothing of runs, datasets or scores (`segment.rle`, `evaluate.predictions`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any

import numpy as np

from digseg_cli.errors import DatasetError, UsageError
from digseg_cli.files import atomic_write_text, read_settings_file

INSTALL_HINT = 'pip install "digseg[coco]"'


def require_pycocotools(what: str) -> ModuleType:
    """`pycocotools.mask`, or a one-line `UsageError` saying that `what` needs it and how to install it."""
    try:
        import pycocotools.mask as mask_util
    except ImportError:
        raise UsageError(f"{what} needs pycocotools (COCO RLE): {INSTALL_HINT}") from None
    return mask_util


def encode_label_map(
    labels: np.ndarray, file_name: str, category_ids: Sequence[int] | None = None
) -> list[dict[str, Any]]:
    """`[H,W]` integer labels → one record per label value present, in increasing order (0 included)."""
    mask_util = require_pycocotools("writing COCO RLE")
    labels = np.asarray(labels)
    records = []
    for label in np.unique(labels):
        mask = np.asfortranarray((labels == label).astype(np.uint8)[:, :, None])  # [H,W,1], column-major
        rle = mask_util.encode(mask)[0]
        category = int(label) if category_ids is None else int(category_ids[int(label)])
        segmentation = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("utf-8")}
        records.append({"file_name": file_name, "category_id": category, "segmentation": segmentation})
    return records


def write_records(path: Path, records: Sequence[Mapping[str, Any]]) -> Path:
    """Write a list of records atomically as compact JSON (one line, as detectron2 writes it)."""
    return atomic_write_text(path, json.dumps(list(records), separators=(",", ":")))


def _record_problem(record: Any) -> str | None:
    """What is wrong with one record's shape, or None."""
    if not isinstance(record, Mapping):
        return f"must be an object, got {type(record).__name__}"
    missing = [k for k in ("file_name", "category_id", "segmentation") if k not in record]
    if missing:
        return f"has no {', '.join(missing)}"
    seg = record["segmentation"]
    size = seg.get("size") if isinstance(seg, Mapping) else None
    if not isinstance(record["file_name"], str) or not PurePosixPath(record["file_name"].replace("\\", "/")).stem:
        return "file_name must be an image's file name"
    if not isinstance(record["category_id"], int) or isinstance(record["category_id"], bool):
        return f"category_id must be an integer, got {record['category_id']!r:.40}"
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        return 'segmentation must be COCO RLE: {"size": [height, width], "counts": "..."}'
    if not isinstance(seg.get("counts"), str):
        return "segmentation.counts must be a string (compressed COCO RLE)"
    return None


def read_records(path: Path, what: str = "predictions file") -> list[dict[str, Any]]:
    """The records of a `sem_seg_predictions.json`; a `UsageError` naming the file (and the record) when it is not
    valid JSON, not a list, or a record is not `{file_name, category_id, segmentation: COCO RLE}`."""
    data = read_settings_file(path, what)
    if not isinstance(data, list):
        raise UsageError(f"{what} {path} must hold a JSON list of records, got {type(data).__name__}")
    for i, record in enumerate(data):
        if (problem := _record_problem(record)) is not None:
            raise UsageError(f"{what} {path}: record {i} {problem}")
    return data


def decode_records(
    records: Sequence[Mapping[str, Any]], where: str, label_of: Mapping[int, int] | None = None
) -> np.ndarray:
    """One image's records → `[H,W]` int64 labels (`label_of[category_id]`, else the id itself). A
    `DatasetError` naming `where` when the records differ in size, overlap, leave pixels uncovered or hold a
    category id `label_of` does not know."""
    mask_util = require_pycocotools(f"reading {where}")
    sizes = {tuple(r["segmentation"]["size"]) for r in records}
    if len(sizes) != 1:
        raise DatasetError(f"{where}: its records have different sizes {sorted(sizes)}")
    (height, width) = sizes.pop()
    labels = np.full((height, width), -1, dtype=np.int64)
    for record in records:
        category = record["category_id"]
        if label_of is not None and category not in label_of:
            raise DatasetError(f"{where}: category_id {category} is not one of this dataset's categories")
        try:
            mask = mask_util.decode(dict(record["segmentation"]))  # [H,W] uint8
        except ValueError:
            mask = None
        if mask is None or mask.max(initial=0) > 1:  # pycocotools leaves some malformed counts undetected
            raise DatasetError(f"{where}: the RLE counts of category_id {category} do not decode to a mask")
        mask = mask.astype(bool)
        if (labels[mask] >= 0).any():
            raise DatasetError(f"{where}: the masks of its records overlap (category_id {category})")
        labels[mask] = category if label_of is None else label_of[category]
    if (uncovered := int((labels < 0).sum())) > 0:
        raise DatasetError(
            f"{where}: {uncovered} of {labels.size} pixels are in no record "
            "(every pixel needs a category: one record per label present, background included)"
        )
    return labels
