"""The `sem_seg_predictions.json` of a `digseg segment --rle` run: every label map as COCO RLE records.

One job: hold a run's records by file name (the input's relative path: its record's `relative_path`, the path
its outputs mirror under the output folder), starting from the file an earlier run into the same folder left,
so that a resumed run loses nothing; take each image's records once its outputs are written (worker
threads); give a skipped image (`--skip-existing`) the records the earlier file holds for it, or encode them
from its label PNG when that file has none (a killed run writes no file); and write the file once,
atomically, when the run ends (also after Ctrl-C, out of memory or a full disk). Records of images this run
does not touch (other inputs, failed ones) are kept as they were; with `--overwrite` the earlier file is not
read, so it holds this run's images only. The records are those detectron2's `SemSegEvaluator` writes, one
per label value present in the label map: category id 0 is background (written wherever it occurs, so the
records cover every pixel), k the k-th class (`inference.coco_rle`).

It knows nothing of the model, scheduling or the other output files (`run.py`, `outputs.py`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from digseg_cli.errors import UsageError
from digseg_cli.files import not_regular_reason
from digseg_cli.inference import coco_rle, images
from digseg_cli.inference.prompts import MASK_TIF_SUFFIX
from digseg_cli.segment.rasters import read_labels

PREDICTIONS_NAME = "sem_seg_predictions.json"


class RleFile:
    """The records of one output folder's `sem_seg_predictions.json`, by file name, in file order."""

    def __init__(self, out_dir: Path, *, overwrite: bool) -> None:
        self.path = Path(out_dir) / PREDICTIONS_NAME
        self.by_name: dict[str, list[dict]] = {} if overwrite else _earlier(self.path)
        self._earlier_order = list(self.by_name)
        self.changed = False
        self._lock = threading.Lock()

    def put(self, file_name: str, labels: np.ndarray) -> None:
        """One image's records from its `[H,W]` label map (0 = background, k = class k); thread-safe."""
        records = coco_rle.encode_label_map(labels, file_name)
        with self._lock:
            self.by_name[file_name] = records
            self.changed = True

    def keep_skipped(self, file_name: str, mask: Path) -> None:
        """A skipped image keeps its earlier records; without any, they are encoded from its label PNG (or the
        label GeoTIFF of a raster)."""
        if file_name not in self.by_name:
            labels = read_labels(mask) if mask.name.endswith(MASK_TIF_SUFFIX) else images.read_mask(mask)
            self.put(file_name, labels)

    def write(self, order: Sequence[str]) -> bool:
        """Write the file when this run changed it: the earlier file's images first, in its order, then this
        run's new ones in input order. True when written."""
        if not self.changed:
            return False
        with self._lock:
            names = dict.fromkeys([*self._earlier_order, *order, *self.by_name])
            records = [r for name in names for r in self.by_name.get(name, ())]
        coco_rle.write_records(self.path, records)
        return True


def _earlier(path: Path) -> dict[str, list[dict]]:
    """The records an earlier run left in `path`, by file name; a `UsageError` when it cannot be read."""
    if not_regular_reason(path) == "does not exist":
        return {}
    try:
        records = coco_rle.read_records(path, "the earlier run's RLE file")
    except UsageError as exc:
        raise UsageError(f"{exc}: choose another --out, or pass --overwrite to replace it") from None
    found: dict[str, list[dict]] = {}
    for record in records:
        found.setdefault(record["file_name"], []).append(record)
    return found
