"""A user's training folder: its class list, its image/mask pairs, a split (``data.check`` checks it).

Layout (DESIGN §5)::

    DIR/images/<stem>.<any image type>     (sub-folders allowed: images/train/a.jpg ↔ masks/train/a.png)
    DIR/masks/<stem>.png                   single-channel class indices, palette PNG (indices), or 0/255
    DIR/classes.json | classes.yaml | classes.txt

Pairs match by relative stem; when that fails, common suffixes are stripped (``x_sat.jpg`` ↔
``x_mask.png``). ``labels/`` or ``annotations/`` are accepted in place of ``masks/``.

Class files (the first found of ``classes.json``, ``classes.yaml``/``.yml``, ``classes.txt``):

- JSON/YAML, full form: ``{"classes": [{"id": 1, "name": "road", "synonyms": ["street"], "color": "#888"}],
  "background": 0, "ignore_index": 255}`` (``ignore_index: null`` for none); or a plain mapping
  ``{"1": "road", "2": "tree"}``; or a list of names ``["road", "tree"]`` (ids 1..n).
- Text, one class per line (blank lines and ``#`` comments skipped): ``1 road``, or
  ``1: road | street | highway`` (name, then synonyms), or just names (``road | street``) meaning ids 1..n.
- In every form a class named ``background`` (or with the background id) is the background, not a prompt:
  ``0 background`` lines are allowed, and a names-only list that starts with ``background`` counts from 0.

Binary folders need no class file: ``class_name="road"`` (CLI ``--class-name``) reads masks as 0/255
(threshold 128, so JPEG masks work; 0/1 masks are also accepted) with 255 → class 1.

``Sample`` (stem, image, label) is the one labelled-image type of the package: these folders and the
benchmark datasets (``digseg_cli.data.benchmarks``) both yield it, and scoring reads it.

This module knows files, names and pixel values; it knows nothing of tensors, models or prompts'
text templates (``digseg_cli.train.samples`` turns pairs into training samples).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from digseg_cli.errors import DatasetError, UsageError
from digseg_cli.files import read_settings_file, read_text_file
from digseg_cli.inference.images import ImageReadError, parse_color, read_image, read_mask
from digseg_cli.typecheck import check_type

MASK_DIR_NAMES = ("masks", "labels", "annotations")
CLASS_FILE_NAMES = ("classes.json", "classes.yaml", "classes.yml", "classes.txt")
# Files beside images that are neither images nor masks (world files, overviews, notes, archives).
_SIDE_CAR = frozenset(
    ".txt .json .yaml .yml .md .csv .xml .db .ini .prj .tfw .wld .pgw .jgw .aux .ovr .py .zip".split()
)
_IMAGE_SUFFIXES = ("_sat", "_img", "_image", "_rgb", "_leftImg8bit", "_input")
_MASK_SUFFIXES = tuple(
    "_mask _masks _label _labels _labelIds _gt _seg _segmentation _annotation _gtFine_labelTrainIds".split()
)


# --------------------------------------------------------------------------------------------------
# Classes


@dataclass(frozen=True)
class ClassSpec:
    """One promptable class: its mask value, name, synonyms (alternative prompts) and display colour."""

    id: int
    name: str
    synonyms: tuple[str, ...] = ()
    color: tuple[int, int, int] | None = None

    @property
    def prompts(self) -> tuple[str, ...]:
        return (self.name, *self.synonyms)


@dataclass(frozen=True)
class ClassList:
    """The classes of a folder. ``binary``: masks are 0/255 and 255 (or ≥ 128) means ``classes[0]``."""

    classes: tuple[ClassSpec, ...]
    background: int = 0
    ignore_index: int | None = 255
    binary: bool = False
    source: str = ""

    def __post_init__(self) -> None:
        ids = [c.id for c in self.classes]
        names = [c.name.lower() for c in self.classes]
        where = f" in {self.source}" if self.source else ""
        if not self.classes:
            raise DatasetError(f"no classes{where}")
        if len(set(ids)) != len(ids):
            raise DatasetError(f"duplicate class ids{where}: {sorted(i for i in set(ids) if ids.count(i) > 1)}")
        if len(set(names)) != len(names):
            raise DatasetError(f"duplicate class names{where}: {sorted({n for n in names if names.count(n) > 1})}")
        for c in self.classes:
            if c.id in (self.background, self.ignore_index) or c.id < 0:
                raise DatasetError(f"class {c.name!r} has id {c.id}: background, ignore or negative{where}")
            if not c.name.strip():
                raise DatasetError(f"class {c.id} has an empty name{where}")

    def __len__(self) -> int:
        return len(self.classes)

    def __iter__(self) -> Iterator[ClassSpec]:
        return iter(self.classes)

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(c.id for c in self.classes)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    def by_id(self, class_id: int) -> ClassSpec:
        for c in self.classes:
            if c.id == class_id:
                return c
        raise KeyError(class_id)

    def valid_values(self) -> set[int]:
        """Mask values that are allowed after ``map_mask``: background, class ids and the ignore value."""
        extra = {self.ignore_index} if self.ignore_index is not None else set()
        return {self.background, *self.ids, *extra}

    def map_mask(self, raw: np.ndarray) -> np.ndarray:
        """Raw mask values → class ids (only binary lists change anything: 0/255 or 0/1 → 0/``id``)."""
        if not self.binary:
            return raw
        on = raw >= 128 if int(raw.max(initial=0)) > 1 else raw >= 1
        return np.where(on, self.classes[0].id, self.background).astype(np.uint8)

    def to_json(self) -> dict[str, Any]:
        classes = []
        for c in self.classes:
            entry: dict[str, Any] = {"id": c.id, "name": c.name, "synonyms": list(c.synonyms)}
            if c.color is not None:
                entry["color"] = "#{:02x}{:02x}{:02x}".format(*c.color)
            classes.append(entry)
        return {"classes": classes, "background": self.background, "ignore_index": self.ignore_index}

    @classmethod
    def binary_class(cls, name: str) -> ClassList:
        """The class list of a folder of 0/255 masks of one class ``name``."""
        if not name.strip():
            raise UsageError("`--class-name` must not be empty")
        return cls((ClassSpec(1, name.strip()),), background=0, ignore_index=None, binary=True, source="--class-name")


def _is_background_name(name: str) -> bool:
    return name.strip().lower() in ("background", "_background_", "bg", "__background__")


def _spec(class_id: Any, name: Any, synonyms: Any = (), color: Any = None, *, where: str) -> ClassSpec:
    try:
        cid = int(class_id)
    except (TypeError, ValueError):
        raise DatasetError(f"class id {class_id!r} in {where} is not an integer") from None
    if not isinstance(name, str) or not name.strip():
        raise DatasetError(f"class {cid} in {where} needs a non-empty name")
    if isinstance(synonyms, str):
        synonyms = [synonyms]
    syns = tuple(
        s.strip()
        for s in check_type(synonyms or [], list[str], f"{where}: synonyms of class {cid}", error=DatasetError)
        if s.strip()
    )
    try:
        rgb = parse_color(color) if color is not None else None
    except UsageError as exc:
        raise DatasetError(f"class {name!r} in {where}: {exc}") from None
    return ClassSpec(cid, name.strip(), syns, rgb)


def classes_from_obj(obj: Any, where: str) -> ClassList:
    """Build a ``ClassList`` from parsed JSON/YAML in any of the documented forms."""
    background, ignore = 0, 255
    if isinstance(obj, dict) and "classes" in obj:
        background = check_type(obj.get("background", 0), int, f"{where}: background", error=DatasetError)
        ignore = check_type(obj.get("ignore_index", 255), int | None, f"{where}: ignore_index", error=DatasetError)
        unknown = set(obj) - {"classes", "background", "ignore_index"}
        if unknown:
            raise DatasetError(
                f"unknown keys in {where}: {sorted(unknown)} (allowed: classes, background, ignore_index)"
            )
        items = obj["classes"]
        if isinstance(items, dict):
            items = [{"id": k, "name": v} for k, v in items.items()]
        elif isinstance(items, list) and all(isinstance(v, str) for v in items):
            items = [{"id": i, "name": v} for i, v in enumerate(items, start=1)]
    elif isinstance(obj, dict):
        items = [{"id": k, "name": v} for k, v in obj.items()]
    elif isinstance(obj, list) and all(isinstance(v, str) for v in obj):
        start = 0 if obj and _is_background_name(obj[0]) else 1
        items = [{"id": i, "name": v} for i, v in enumerate(obj, start=start)]
    else:
        raise DatasetError(f"{where} must hold {{'classes': [...]}}, an id → name mapping or a list of names")
    specs = []
    for item in items:
        if not isinstance(item, dict) or "id" not in item or "name" not in item:
            raise DatasetError(f"each class in {where} needs 'id' and 'name', got {item!r}")
        extra = set(item) - {"id", "name", "synonyms", "color"}
        if extra:
            raise DatasetError(f"unknown class keys in {where}: {sorted(extra)} (allowed: id, name, synonyms, color)")
        spec = _spec(item["id"], item["name"], item.get("synonyms", ()), item.get("color"), where=where)
        if spec.id == background:  # e.g. {"0": "background"}: named, but not a prompt
            continue
        specs.append(spec)
    return ClassList(tuple(specs), background=background, ignore_index=ignore, source=where)


def parse_classes_txt(text: str, where: str = "classes.txt") -> ClassList:
    """Parse the text form (see the module docstring)."""
    rows: list[tuple[int | None, list[str]]] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.match(r"^(\d+)\s*[:\s]\s*(.+)$", line)
        cid = int(m.group(1)) if m else None
        rest = m.group(2) if m else line
        rows.append((cid, [p.strip() for p in rest.split("|") if p.strip()]))
    if not rows:
        raise DatasetError(f"{where} lists no classes")
    with_id = [r for r in rows if r[0] is not None]
    if with_id and len(with_id) != len(rows):
        raise DatasetError(f"{where} mixes lines with and without ids; give every line an id or none")
    if not with_id:
        start = 0 if _is_background_name(rows[0][1][0]) else 1
        rows = [(i, parts) for i, (_, parts) in enumerate(rows, start=start)]
    specs = [_spec(cid, parts[0], parts[1:], where=where) for cid, parts in rows]
    specs = [s for s in specs if s.id != 0]
    return ClassList(tuple(specs), source=where)


def read_classes(folder: str | Path, class_name: str | None = None) -> ClassList:
    """The class list of ``folder``: ``--class-name`` for binary masks, else its class file."""
    if class_name is not None:
        return ClassList.binary_class(class_name)
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"training folder {folder} does not exist")
    for name in CLASS_FILE_NAMES:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".txt"):
            return parse_classes_txt(read_text_file(path, "class file", error=DatasetError), str(path))
        obj = read_settings_file(path, "class file", error=DatasetError)
        return classes_from_obj(obj, str(path))
    raise DatasetError(
        f"no classes.json or classes.txt in {folder}; add one (e.g. a line '1 road' per class) "
        "or pass --class-name NAME for 0/255 binary masks"
    )


# --------------------------------------------------------------------------------------------------
# Pairs


class Pair(NamedTuple):
    """An image and its mask; ``stem`` is the relative path without suffix (``train/0001``)."""

    stem: str
    image: Path
    mask: Path


@dataclass
class FolderScan:
    pairs: list[Pair]
    images_without_masks: list[str]
    masks_without_images: list[str]
    duplicates: list[str]


def _files(root: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if name.startswith(".") or p.suffix.lower() in _SIDE_CAR:
                continue
            out.setdefault(p.relative_to(root).with_suffix("").as_posix(), []).append(p)
    return out


def _strip(key: str, suffixes: Sequence[str]) -> str:
    for s in sorted(suffixes, key=len, reverse=True):
        if key.endswith(s):
            return key[: -len(s)]
    return key


def _mask_dir(folder: Path) -> Path | None:
    for name in MASK_DIR_NAMES:
        if (folder / name).is_dir():
            return folder / name
    return None


def scan_folder(folder: str | Path) -> FolderScan:
    """Pair ``images/`` with ``masks/``; also return what did not pair and duplicated stems."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"training folder {folder} does not exist")
    img_root, mask_root = folder / "images", _mask_dir(folder)
    if not img_root.is_dir() or mask_root is None:
        raise DatasetError(f"{folder} must contain images/ and masks/ folders with matching file names")
    images, masks = _files(img_root), _files(mask_root)
    duplicates = [
        p.relative_to(folder).as_posix()
        for group in (images, masks)
        for ps in group.values()
        if len(ps) > 1
        for p in ps
    ]
    img = {k: v[0] for k, v in images.items()}
    msk = {k: v[0] for k, v in masks.items()}
    pairs = {k: Pair(k, img[k], msk[k]) for k in img.keys() & msk.keys()}
    left_img = {_strip(k, _IMAGE_SUFFIXES): k for k in img.keys() - pairs.keys()}
    left_msk = {_strip(k, _MASK_SUFFIXES): k for k in msk.keys() - pairs.keys()}
    for key in (left_img.keys() & left_msk.keys()) - pairs.keys():
        pairs[key] = Pair(key, img[left_img[key]], msk[left_msk[key]])
    paired_imgs = {p.image for p in pairs.values()}
    paired_masks = {p.mask for p in pairs.values()}
    return FolderScan(
        pairs=[pairs[k] for k in sorted(pairs)],
        images_without_masks=sorted(p.relative_to(folder).as_posix() for p in img.values() if p not in paired_imgs),
        masks_without_images=sorted(p.relative_to(folder).as_posix() for p in msk.values() if p not in paired_masks),
        duplicates=sorted(duplicates),
    )


def find_pairs(folder: str | Path) -> list[Pair]:
    """Image/mask pairs of ``folder``, sorted by stem (unpaired files are left out; see ``data.check.check_folder``)."""
    return scan_folder(folder).pairs


def split_pairs(pairs: Sequence[Pair], val_split: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Deterministic train/validation split: sort by stem, then a seeded permutation picks the val set."""
    if not 0.0 <= val_split < 1.0:
        raise UsageError(f"`--val-split` must be in [0, 1), got {val_split}")
    ordered = sorted(pairs, key=lambda p: p.stem)
    n = len(ordered)
    n_val = int(round(n * val_split))
    if val_split > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    else:
        n_val = 0
    chosen = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    return ([p for i, p in enumerate(ordered) if i not in chosen], [p for i, p in enumerate(ordered) if i in chosen])


def load_pair(pair: Pair, classes: ClassList) -> tuple[np.ndarray, np.ndarray]:
    """``(image HxWx3 uint8, mask HxW class ids)``; raises ``DatasetError`` naming the file on any problem."""
    try:
        image = read_image(pair.image)
        mask = classes.map_mask(read_mask(pair.mask))
    except ImageReadError as exc:
        raise DatasetError(str(exc)) from None
    if image.shape[:2] != mask.shape:
        (h, w), (mh, mw) = image.shape[:2], mask.shape
        raise DatasetError(f"size mismatch for {pair.stem}: image {w}x{h}, mask {mw}x{mh}")
    return image, mask


@dataclass
class Sample:
    """One labelled image, from a user folder or a benchmark: ``stem`` (its relative path without suffix, which
    also names its noise seed), ``image`` ``HxWx3`` uint8 RGB, ``label`` ``HxW`` int64 label ids (the ignore
    value where unlabelled)."""

    stem: str
    image: np.ndarray
    label: np.ndarray


def load_eval_pairs(pairs: Sequence[Pair], classes: ClassList | None = None) -> Iterator[Sample]:
    """Yield a ``Sample`` per pair, in order (masks mapped through ``classes`` when given)."""
    for pair in pairs:
        if classes is None:
            try:
                image, mask = read_image(pair.image), read_mask(pair.mask)
            except ImageReadError as exc:
                raise DatasetError(str(exc)) from None
        else:
            image, mask = load_pair(pair, classes)
        yield Sample(pair.stem, image, np.asarray(mask, dtype=np.int64))
