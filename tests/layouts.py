"""Tiny benchmark trees in their official layouts, written by the tests (no benchmark file is ever bundled).

One job: write a few random images and labels per split into the folders each catalog adapter reads
(``digseg_cli.data.benchmarks``) and hand back what a test needs: the ``--data-root`` to pass and, per
split, each image's label as the catalog decodes it (train ids, the benchmark's ignore value). Every
``write_*`` takes ``(root, n images per split, size, seed)``, writes the train and the validation split
and returns a ``Layout``; ``WRITERS`` maps catalog names to them. ``write_predictions`` writes label maps
that are right on most pixels, as a model's saved output. The one-file helpers (``img``, ``mask``,
``rgb_mask``) serve tests that need one odd file.

Labels are drawn in train-id space and encoded into each benchmark's file values through the catalog's
own tables (``STUFF_TO_TRAIN``, ``LABEL_TO_TRAIN``, ``PC59_IDS``), so a test that reads them back checks the
loaders' decoding, not a second copy of it. Import as ``from layouts import write_ade20k``: pyproject's
pytest ``pythonpath`` puts ``tests/`` on ``sys.path`` in every import mode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

H = W = 8  # the one-file helpers' size
Size = int | tuple[int, int]  # a side, or (height, width)


@dataclass
class Layout:
    """What a writer wrote: pass ``data_root`` as ``--data-root`` and ``dataset`` as ``--dataset``.

    ``labels[split][stem]``: the ``HxW`` int64 label as the catalog reads it (``"val"`` and ``"train"``)."""

    dataset: str
    data_root: Path
    labels: dict[str, dict[str, np.ndarray]]
    ignore_index: int | None

    def stems(self, split: str = "val") -> list[str]:
        return sorted(self.labels[split])


# ------------------------------------------------------------------------------------------ one file each
def img(path: Path, fmt: str | None = None, *, size: Size = (H, W), seed: int | None = None) -> Path:
    """A random RGB image (seeded by ``seed``, else by the path's length)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(path)) if seed is None else seed)
    Image.fromarray(rng.integers(0, 255, (*_hw(size), 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def mask(path: Path, values, mode: str | None = None, palette: bool = False) -> Path:
    """A single-channel label file: a 2-D ``values`` as it is, else an ``HxW`` map of zeros starting with
    ``values``; ``mode="I;16"`` for 16-bit, ``palette`` for an indexed PNG (as the stuffthingmaps are)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if mode == "I;16" else np.uint8
    if np.ndim(values) == 2:
        arr = np.asarray(values).astype(dtype)
    else:
        arr = np.zeros((H, W), dtype=dtype)
        flat = np.asarray(values).reshape(-1)
        arr.reshape(-1)[: flat.size] = flat
    im = Image.fromarray(arr)
    if palette:
        im = im.convert("P")
        im.putpalette([(i * 37) % 256 for i in range(768)])
    im.save(path)
    return path


def rgb_mask(path: Path, colours) -> Path:
    """An ``HxWx3`` colour-coded mask whose first pixels are ``colours``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((H, W, 3), dtype=np.uint8)
    for i, c in enumerate(colours):
        arr.reshape(-1, 3)[i] = c
    Image.fromarray(arr).save(path)
    return path


# ------------------------------------------------------------------------------------------------ labels
def _hw(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _random_labels(rng: np.random.Generator, size: Size, pool: Sequence[int], ignore: int | None) -> np.ndarray:
    """An ``HxW`` int64 map of a few values of ``pool`` (so classes recur across images), about 1/8 ``ignore``."""
    few = rng.choice(np.asarray(pool), size=min(4, len(pool)), replace=False)
    labels = rng.choice(few, size=_hw(size)).astype(np.int64)
    if ignore is not None:
        labels[rng.random(labels.shape) < 0.125] = ignore
    return labels


def _encode(labels: np.ndarray, table: dict[int, int], ignore: int, ignore_value: int) -> np.ndarray:
    """Train ids → file values through the inverse of the catalog's ``table`` (file value → train id)."""
    inverse = {train: value for value, train in sorted(table.items(), reverse=True)}  # the smallest value wins
    out = np.full(labels.shape, ignore_value, dtype=np.int64)
    for train, value in inverse.items():
        out[labels == train] = value
    out[labels == ignore] = ignore_value
    return out


Templates = dict[str, tuple[str, str, str]]  # split → (stem, image path, label path); "{i}" 1-based, "{stem}"


def _write_splits(layout: Layout, base: Path, make: Callable, templates: Templates, *, n, size, seed) -> Layout:
    """Per split, ``n`` images and labels at ``base / template``. ``make(rng)`` gives (train ids, file values,
    ``mask`` keywords); the train ids are recorded in ``layout.labels``."""
    for split, (stem_t, image_t, label_t) in templates.items():
        rng = np.random.default_rng([seed, 0 if split == "val" else 1])
        layout.labels[split] = {}
        for i in range(1, n + 1):
            stem = stem_t.format(i=i)
            img(base / image_t.format(stem=stem), size=size, seed=int(rng.integers(1 << 31)))
            train_ids, values, kw = make(rng)
            mask(base / label_t.format(stem=stem), values, **kw)
            layout.labels[split][stem] = train_ids
    return layout


# --------------------------------------------------------------------------------------------- benchmarks
def write_ade20k(root: Path, n: int = 2, size: Size = H, seed: int = 0) -> Layout:
    """ADE20K-150: ``ade20k/ADEChallengeData2016/{images,annotations}/{training,validation}``; 8-bit PNG, file
    value = class + 1, 0 = other (ignore 255 after reduce_zero_label)."""

    def make(rng):
        labels = _random_labels(rng, size, range(150), 255)
        return labels, np.where(labels == 255, 0, labels + 1), {}

    templates = {
        split: (f"ADE_{tag}_{{i:08d}}", f"images/{sub}/{{stem}}.jpg", f"annotations/{sub}/{{stem}}.png")
        for split, sub, tag in (("val", "validation", "val"), ("train", "training", "train"))
    }
    layout = Layout("ade20k", Path(root), {}, 255)
    return _write_splits(layout, Path(root) / "ade20k/ADEChallengeData2016", make, templates, n=n, size=size, seed=seed)


def write_ade20k_full(root: Path, n: int = 2, size: Size = H, seed: int = 0) -> Layout:
    """ADE20K-full (A-847) as CAT-Seg's ``prepare_ade20k_full.py`` converts it:
    ``ade20k-full/ADE20K_2021_17_01/{images,annotations}_detectron2/<split>``, uint16 TIFF 0…846, 65535 ignore.
    The converter writes only ``validation`` (A-847 is a test set); ``training`` is written in the same
    layout for training tests, and the catalog does not read it."""

    def make(rng):
        labels = _random_labels(rng, size, range(847), 65535)
        return labels, labels, {"mode": "I;16"}

    templates = {
        split: (
            f"ADE_{tag}_{{i:08d}}",
            f"images_detectron2/{sub}/{{stem}}.jpg",
            f"annotations_detectron2/{sub}/{{stem}}.tif",
        )
        for split, sub, tag in (("val", "validation", "val"), ("train", "training", "train"))
    }
    layout = Layout("ade20k-full", Path(root), {}, 65535)
    base = Path(root) / "ade20k-full/ADE20K_2021_17_01"
    return _write_splits(layout, base, make, templates, n=n, size=size, seed=seed)


def write_coco_stuff(root: Path, n: int = 2, size: Size = H, seed: int = 0) -> Layout:
    """COCO-Stuff-171: ``coco-stuff/{images,annotations}/{train2017,val2017}`` (stuffthingmaps): indexed PNG,
    file value = COCO-Stuff id − 1 (the 171 used ones), 255 unlabelled."""
    from digseg_cli.data.benchmarks.coco_stuff import STUFF_TO_TRAIN

    def make(rng):
        labels = _random_labels(rng, size, range(171), 255)
        return labels, _encode(labels, STUFF_TO_TRAIN, 255, 255), {"palette": True}

    templates = {
        split: ("{i:012d}", f"images/{split}2017/{{stem}}.jpg", f"annotations/{split}2017/{{stem}}.png")
        for split in ("val", "train")
    }
    layout = Layout("coco-stuff", Path(root), {}, 255)
    return _write_splits(layout, Path(root) / "coco-stuff", make, templates, n=n, size=size, seed=seed)


def write_cityscapes(root: Path, n: int = 2, size: Size = H, seed: int = 0) -> Layout:
    """Cityscapes: ``cityscapes/leftImg8bit/<split>/<city>/*_leftImg8bit.png`` and
    ``cityscapes/gtFine/<split>/<city>/*_gtFine_labelIds.png`` (raw ids; unlabelled 0 → ignore 255)."""
    from digseg_cli.data.benchmarks.cityscapes import LABEL_TO_TRAIN

    def make(rng):
        labels = _random_labels(rng, size, range(19), 255)
        return labels, _encode(labels, LABEL_TO_TRAIN, 255, 0), {}

    templates = {
        split: (
            f"{city}_000000_{{i:06d}}",
            f"leftImg8bit/{split}/{city}/{{stem}}_leftImg8bit.png",
            f"gtFine/{split}/{city}/{{stem}}_gtFine_labelIds.png",
        )
        for split, city in (("val", "lindau"), ("train", "aachen"))
    }
    layout = Layout("cityscapes", Path(root), {}, 255)
    return _write_splits(layout, Path(root) / "cityscapes", make, templates, n=n, size=size, seed=seed)


def write_label_map(path: Path, label_map: np.ndarray) -> Path:
    """A PASCAL-Context ``trainval/<id>.mat`` (field ``LabelMap``, 1-based ids), written as MATLAB would."""
    import scipy.io as sio

    path.parent.mkdir(parents=True, exist_ok=True)
    sio.savemat(path, {"LabelMap": np.asarray(label_map, dtype=np.uint16)}, do_compression=True)
    return path


def write_pascal_context(root: Path, n: int = 2, size: Size = H, seed: int = 0) -> dict[str, Layout]:
    """PASCAL-Context, the one official release both PC-59 and PC-459 read:
    ``pascal-context/VOCdevkit/VOC2010/{JPEGImages/*.jpg, trainval/*.mat, ImageSets/Main/{train,val}.txt}``.
    The catalog converts the validation labels on first use. Returns ``{"pascal-context-59": …,
    "pascal-context-459": …}``; each LabelMap mixes PC-59 classes with others and the rare 0 (unlabelled)."""
    from digseg_cli.data.benchmarks.pascal_context import PC59_IDS, pc59_labels, pc459_labels

    voc = Path(root) / "pascal-context/VOCdevkit/VOC2010"
    pc59 = Layout("pascal-context-59", Path(root), {}, 255)
    pc459 = Layout("pascal-context-459", Path(root), {}, 65535)
    pool = [*PC59_IDS[::7], 1, 3, 100, 459]  # 9 of the 59 classes and 4 ids outside them
    for split, year in (("val", 2008), ("train", 2009)):
        rng = np.random.default_rng([seed, 0 if split == "val" else 1])
        pc59.labels[split], pc459.labels[split] = {}, {}
        stems = [f"{year}_{i + 1:06d}" for i in range(n)]
        for stem in stems:
            img(voc / f"JPEGImages/{stem}.jpg", size=size, seed=int(rng.integers(1 << 31)))
            label_map = _random_labels(rng, size, pool, 0)  # 0: "unlabelled" in the official LabelMap
            write_label_map(voc / f"trainval/{stem}.mat", label_map)
            pc59.labels[split][stem] = pc59_labels(label_map).astype(np.int64)
            pc459.labels[split][stem] = pc459_labels(label_map).astype(np.int64)
        (voc / "ImageSets/Main").mkdir(parents=True, exist_ok=True)
        (voc / f"ImageSets/Main/{split}.txt").write_text("".join(f"{s}\n" for s in stems))
    return {pc59.dataset: pc59, pc459.dataset: pc459}


def write_pascal_context_59(root: Path, n: int = 2, size: Size = H, seed: int = 0) -> Layout:
    return write_pascal_context(root, n, size, seed)["pascal-context-59"]


def write_pascal_context_459(root: Path, n: int = 2, size: Size = H, seed: int = 0) -> Layout:
    return write_pascal_context(root, n, size, seed)["pascal-context-459"]


WRITERS: dict[str, Callable[..., Layout]] = {
    "ade20k": write_ade20k,
    "ade20k-full": write_ade20k_full,
    "coco-stuff": write_coco_stuff,
    "cityscapes": write_cityscapes,
    "pascal-context-59": write_pascal_context_59,
    "pascal-context-459": write_pascal_context_459,
}


def write_predictions(layout: Layout, folder: Path, split: str = "val", wrong: float = 0.25, seed: int = 0) -> Path:
    """``folder/<stem>.png`` for every image of ``split``: its label with ignore pixels set to 0 and about
    ``wrong`` of the pixels set to another label id (16-bit PNGs where ids pass 255)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, labels in layout.labels[split].items():
        valid = labels != layout.ignore_index if layout.ignore_index is not None else np.ones(labels.shape, bool)
        pred = np.where(valid, labels, 0)
        flip = rng.random(pred.shape) < wrong
        top = max(int(labels[valid].max(initial=0)) + 1, 2)  # ids stay among those the labels use
        pred[flip] = (pred[flip] + 1 + rng.integers(0, 3, int(flip.sum()))) % top
        mask(folder / f"{stem}.png", pred, mode="I;16" if pred.max() > 255 else None)
    return folder
