"""Folder-format benchmarks: a user's training folder given by path, and ``synth`` (fresh synthetic scenes).

One job: turn a folder in the training layout (``images/``, ``masks/``, ``classes.json|txt``; read by
``digseg_cli.data.folders``) into a ``DatasetSpec`` whose labels are contiguous: 0 background, k+1 the k-th class
of the class file (in file order), 255 the ignore value. ``synth`` writes a split of digseg's synthetic
aerial scenes with a seed that training never uses (``SYNTH_SEED``) into the data root the first time it is
asked for, then reads it like any user folder. Nothing here knows models or metrics.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from digseg_cli.data.benchmarks.base import DatasetSpec, Item, MissingLayout, remap

log = logging.getLogger("digseg")

SYNTH_SEED = 1_000_003  # never used for training data
SYNTH_SIZE = 128
SYNTH_COUNT = 64
_FOLDER_LAYOUT = "images/<stem>.png, masks/<stem>.png (class-index or 0/255), classes.json or classes.txt"


def spec_from_classes(classes, *, name: str, title: str, folder: str, prepare=None, manual: str = "") -> DatasetSpec:
    """A spec over a training-layout folder whose classes are ``classes`` (a ``digseg_cli.data.folders.ClassList``)."""
    from digseg_cli.data.folders import scan_folder
    from digseg_cli.inference.images import read_mask

    table = {classes.background: 0, **{c.id: i + 1 for i, c in enumerate(classes)}}
    ignore = None if classes.ignore_index is None else 255
    if classes.ignore_index is not None:
        table[classes.ignore_index] = 255
    if len(classes) + 1 > 255 and ignore is not None:
        raise MissingLayout(f"{name}: more than 254 classes are not supported with an ignore value")

    def list_items(root: Path, split: str) -> list[Item]:
        if not root.is_dir():
            raise MissingLayout(f"missing folder {root} ({_FOLDER_LAYOUT})")
        scan = scan_folder(root)
        pairs = scan.pairs
        if split != "all":
            pairs = [p for p in pairs if p.stem.split("/")[0] == split]
        items = [Item(p.stem, p.image, p.mask) for p in pairs]
        items += [Item(Path(s).stem, root / s, None) for s in scan.images_without_masks]
        return items

    def load_label(path: Path) -> np.ndarray:
        raw = np.asarray(classes.map_mask(read_mask(path)), dtype=np.int64)
        out = remap(raw, table, -1)
        if (out < 0).any():
            bad = sorted(set(np.unique(raw[out < 0]).tolist()))[:10]
            raise ValueError(
                f"mask values {bad} are neither the background ({classes.background}), a class id "
                f"{list(classes.ids)} nor the ignore value ({classes.ignore_index})"
            )
        return out

    return DatasetSpec(
        name=name,
        title=title,
        class_names=tuple(c.name for c in classes),
        synonyms=tuple(tuple(c.synonyms) for c in classes),
        list_items=list_items,
        load_label=load_label,
        ignore_index=ignore,
        label_mode="background",
        splits=("all", "train", "val", "test"),
        default_split="all",
        folder=folder,
        layout=_FOLDER_LAYOUT,
        manual=manual,
        prepare=prepare,
        protocol="dataset-level mIoU over background + classes; label k+1 where class k has the top probability "
        "and reaches the threshold, else background",
    )


def user_folder_spec(path: Path | str, class_name: str | None = None) -> DatasetSpec:
    """The spec of a user folder in the training format (``class_name``: 0/255 binary masks of one class)."""
    from digseg_cli.data.folders import read_classes

    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise MissingLayout(f"dataset folder {root} does not exist")
    return spec_from_classes(
        read_classes(root, class_name), name=str(path), title=f"folder {root.name}", folder=str(root)
    )


def _synth_writer(count: int, seed: int, size: int):
    """``prepare`` of a synth spec: generate its scenes into the folder on first use (atomically: a
    temporary folder renamed into place)."""

    def write(root: Path) -> None:
        if root.is_dir() and (root / "classes.json").is_file():
            return
        from digseg_cli.data.synth import write_synth_dataset

        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
        try:
            log.info("writing %d synthetic scenes (seed %d, %d px) to %s", count, seed, size, root)
            write_synth_dataset(tmp, count, seed, size, overwrite=True)
            if root.exists():
                shutil.rmtree(root)
            os.replace(tmp, root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    return write


def synth_spec(name: str = "synth", *, count: int | None = None, seed: int | None = None, size: int | None = None):
    """A split of the synthetic scenes, generated on first use under the data root: ``synth`` (the default:
    ``SYNTH_COUNT`` scenes with ``SYNTH_SEED``, which training never uses) or another named set."""
    from digseg_cli.data.folders import classes_from_obj
    from digseg_cli.data.synth import SYNTH_CLASSES

    count = SYNTH_COUNT if count is None else count
    seed = SYNTH_SEED if seed is None else seed
    size = SYNTH_SIZE if size is None else size
    return spec_from_classes(
        classes_from_obj(SYNTH_CLASSES, "digseg_cli.data.synth"),
        name=name,
        title=f"synthetic aerial scenes ({count}, seed {seed}, {size} px)",
        folder=f"synth/seed{seed}-n{count}-s{size}",
        prepare=_synth_writer(count, seed, size),
        manual="It is generated on the fly; nothing to download.",
    )


def is_folder_spec(spec: DatasetSpec) -> bool:
    """Whether a spec reads a folder in the training layout (a user folder, the synth sets)."""
    return spec.layout == _FOLDER_LAYOUT
