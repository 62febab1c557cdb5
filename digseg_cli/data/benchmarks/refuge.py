"""REFUGE / REFUGE2 adapter (optic disc and cup in fundus photographs); the user supplies the files.

One job: pair fundus images with their ground truth and decode it into nested labels 0 background,
1 disc rim, 2 cup, so that the disc *region* is every label ≥ 1 (disc ∪ cup, as the official evaluation
``gt < 255``) and the cup is label 2 (``gt == 0``). Reads the official zips extracted anywhere under the
folder (JPEG images, 8-bit BMP masks 0 cup / 128 rim / 255 background; the split is the folder name:
Training / Validation / Test) and the 7-rater mirror layout (``<id>/<id>_seg_{cup,disc}_{1..7}.png``,
majority vote). BMPs are read as grey levels through a lookup, never remapped in place. Nothing here
knows models or metrics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from digseg_cli.data.benchmarks.base import DatasetSpec, Item, MissingLayout, pair_by_stem, read_gray

_SPLIT_KEYS = {"test": ("test",), "val": ("validation", "val"), "train": ("training", "train")}


def _in_split(path: Path, root: Path, split: str) -> bool:
    folders = [p.lower() for p in path.relative_to(root).parts[:-1]]
    return any(key in f for f in folders for key in _SPLIT_KEYS[split])


def _items(root: Path, split: str) -> list[Item]:
    if not root.is_dir():
        raise MissingLayout(f"missing folder {root} (REFUGE files)")
    images: dict[str, Path] = {}
    labels: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.name.startswith(".") or not _in_split(path, root, split):
            continue
        suffix = path.suffix.lower()
        if suffix in (".jpg", ".jpeg") or (suffix == ".png" and "_seg_" not in path.name):
            images.setdefault(path.stem, path)
        elif suffix == ".bmp":
            labels[path.stem] = path
        elif path.name.endswith("_seg_cup_1.png"):
            labels.setdefault(path.name.removesuffix("_seg_cup_1.png"), path)
    if not images:
        raise MissingLayout(
            f"no {split} images under {root} (expected a folder whose name contains "
            f"{' or '.join(repr(k) for k in _SPLIT_KEYS[split])}, e.g. REFUGE-Test400/)"
        )
    return pair_by_stem(images, labels)


def _majority(files: list[Path]) -> np.ndarray:
    votes = []
    for f in files:
        raw = read_gray(f)
        votes.append(raw > (127 if raw.max(initial=0) > 1 else 0))
    return np.mean(votes, axis=0) >= 0.5


def _label(path: Path) -> np.ndarray:
    if path.suffix.lower() == ".bmp":
        grey = read_gray(path).astype(np.int64)
        disc, cup = grey < 255, grey == 0  # official: disc region = gt < 255, cup = gt == 0
    else:
        stem = path.name.removesuffix("_seg_cup_1.png")
        cup = _majority(sorted(path.parent.glob(f"{stem}_seg_cup_*.png")))
        disc = _majority(sorted(path.parent.glob(f"{stem}_seg_disc_*.png"))) | cup
    label = np.zeros(disc.shape, dtype=np.int64)
    label[disc] = 1
    label[cup] = 2
    return label


def _prediction(path: Path) -> np.ndarray:
    """A saved prediction: the official submission format (BMP 0 cup / 128 rim / 255 background) or our
    label ids 0 background / 1 rim / 2 cup (PNG)."""
    return _label(path) if path.suffix.lower() == ".bmp" else np.asarray(read_gray(path), dtype=np.int64)


REFUGE2 = DatasetSpec(
    name="refuge2",
    title="REFUGE / REFUGE2 (optic disc and cup)",
    class_names=("optic disc", "optic cup"),
    list_items=_items,
    load_label=_label,
    ignore_index=None,
    label_mode="nested",
    threshold=0.5,
    absent_rule="detectron2",
    headline="refuge_dice",
    splits=("test", "val", "train"),
    default_split="test",
    folder="refuge2",
    layout="the official zips unzipped side by side, e.g. REFUGE-Test400/…/T0001.jpg and REFUGE-Test-GT/…/T0001.bmp "
    "(0 cup, 128 rim, 255 background)",
    table_names=("background", "optic disc rim", "optic cup"),
    decode_prediction=_prediction,
    manual=(
        "REFUGE needs a grand-challenge.org account and acceptance of the challenge terms, so digseg does not "
        "download it (unofficial mirrors are not fetched). Get the images and ground truth from "
        "https://refuge.grand-challenge.org and unzip them into the refuge2 folder."
    ),
    protocol="official per-image Dice for disc (disc ∪ cup) and cup, averaged over images, plus vCDR MAE "
    "(ignaciorlando/refuge-evaluation); each structure thresholded on its own probability",
)
