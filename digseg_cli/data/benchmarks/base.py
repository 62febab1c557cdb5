"""What every benchmark adapter shares: the spec record, the sample, the lazy dataset and label helpers.

One job: describe a benchmark (classes, ignore value, protocol, layout, how to get it) and read its
files into ``Sample``s (``digseg_cli.data.folders.Sample``: stem, ``HxWx3`` uint8 image, ``HxW`` int64
label in train ids with the ignore value). Family modules only say where the files are and how a label
file decodes. This module knows nothing of models, metrics or the command line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from digseg_cli.data.folders import Sample  # the one labelled-image type, shared with user folders
from digseg_cli.errors import DatasetError

log = logging.getLogger("digseg")

ENV_DATA_ROOT = "DIGSEG_DATA_ROOT"
HEADLINES = ("miou", "road_iou", "refuge_dice", "phenobench_miou")


def default_data_root() -> Path:
    """``$DIGSEG_DATA_ROOT``, else ``platformdirs.user_data_dir("digseg")/datasets``."""
    env = os.environ.get(ENV_DATA_ROOT)
    if env:
        return Path(env).expanduser()
    try:
        import platformdirs

        base = Path(platformdirs.user_data_dir("digseg"))
    except ImportError:  # pragma: no cover - platformdirs is a declared dependency
        base = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "digseg"
    return base / "datasets"


@dataclass(frozen=True)
class DownloadItem:
    """One official file: fetched to ``<root>/.downloads/<filename>``, then extracted into ``<root>/<extract_to>``
    (or, when ``extract`` is false, moved to ``<root>/<extract_to>/<filename>``)."""

    url: str
    filename: str
    sha256: str | None = None  # None: none published (then md5, else the size and a complete transfer, are checked)
    size: int | None = None
    md5: str | None = None  # where the publisher (or the only public source) gives an md5 rather than a sha256
    extract: bool = True
    extract_to: str = "."


@dataclass(frozen=True)
class Item:
    """One image of a split on disk; ``label`` is None when its ground truth file is missing."""

    stem: str
    image: Path
    label: Path | None


@dataclass(frozen=True)
class DatasetSpec:
    """A benchmark: classes, protocol, layout and how to obtain it.

    ``class_names`` are the prompts. ``label_mode`` says how a label map is built from ``[K,H,W]`` probs
    and what the label ids mean:

    - ``argmax``: closed set, label k = class k (K classes; ``ignore_index`` unlabelled);
    - ``background``: label 0 = background, k+1 = class k where the top probability reaches
      ``threshold`` (K+1 classes);
    - ``nested``: structures nested outer → inner (REFUGE disc ⊃ cup): label k+1 where prompt k reaches
      ``threshold``, inner prompts win; so "disc" is every label ≥ 1.
    """

    name: str
    title: str
    class_names: tuple[str, ...] | None
    list_items: Callable[[Path, str], list[Item]] = field(compare=False, repr=False)
    load_label: Callable[[Path], np.ndarray] = field(compare=False, repr=False)
    ignore_index: int | None = 255
    label_mode: str = "argmax"
    threshold: float = 0.5
    absent_rule: str = "detectron2"
    headline: str = "miou"
    splits: tuple[str, ...] = ("val",)
    default_split: str = "val"
    short_side: int | None = None  # protocol test-time short side (None: the image as it is)
    max_side: int | None = None
    folder: str = ""  # sub-folder of the data root
    layout: str = ""  # expected layout, shown when files are missing
    download: tuple[DownloadItem, ...] = ()
    manual: str = ""  # how to get the data by hand (always shown when it is missing)
    synonym_sep: str | None = None  # split a class string into synonyms (A-847 WordNet strings)
    synonyms: tuple[tuple[str, ...], ...] | None = None  # per class: extra prompts whose scores are averaged
    table_names: tuple[str, ...] | None = None  # names of label ids when they differ from the prompts
    protocol: str = ""  # one line: what the headline number is and whose protocol it follows
    # builds derived files in the dataset folder (a no-op once they exist): run on first use and after a download
    prepare: Callable[[Path], None] | None = field(default=None, compare=False, repr=False)
    # reads a saved prediction file into label ids when the benchmark has its own submission format
    decode_prediction: Callable[[Path], np.ndarray] | None = field(default=None, compare=False, repr=False)
    # the dataset's category id of each label id, where it has its own (detectron2's stuff_dataset_id_to_contiguous_id):
    # the `category_id` of COCO RLE predictions (`eval --predictions FILE.json`); None: category id = label id
    category_ids: tuple[int, ...] | None = None

    @property
    def label_names(self) -> tuple[str, ...]:
        """Names of the label ids 0..C-1 (what the confusion matrix rows mean)."""
        if self.table_names is not None:
            return self.table_names
        names = self.class_names or ()
        return names if self.label_mode == "argmax" else ("background", *names)

    @property
    def prompts(self) -> list[list[str]]:
        """Per class, its prompt texts: the name (or its ``synonym_sep`` parts) plus ``synonyms``."""
        out = []
        for i, name in enumerate(self.class_names or ()):
            texts = [t.strip() for t in name.split(self.synonym_sep)] if self.synonym_sep else [name]
            if self.synonyms is not None:
                texts += [s for s in self.synonyms[i] if s not in texts]
            out.append([t for t in texts if t])
        return out

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def root(self, data_root: Path | str | None = None) -> Path:
        base = Path(data_root).expanduser() if data_root is not None else default_data_root()
        return base / self.folder if self.folder else base

    def how_to_get(self, root: Path) -> str:
        """The message for a missing dataset: official source, steps, expected layout."""
        parts = [f"{self.title} was not found at {root}."]
        if self.download:
            parts.append(f"Run `digseg eval --dataset {self.name} --download` to fetch it from the official source.")
        if self.manual:
            parts.append(self.manual)
        if self.layout:
            parts.append(f"Expected layout under {root}: {self.layout.rstrip('.')}.")
        parts.append(f"Point --data-root (or ${ENV_DATA_ROOT}) at the folder that holds '{self.folder or root.name}'.")
        return " ".join(parts)


class BenchmarkDataset(Sequence[Sample]):
    """The labelled items of one split; samples are read lazily, one file pair per ``[i]``."""

    def __init__(self, spec: DatasetSpec, root: Path, split: str, items: list[Item]):
        self.spec, self.root, self.split = spec, root, split
        self.items = [it for it in items if it.label is not None and it.image.is_file()]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        from digseg_cli.inference.images import ImageReadError, read_image

        item = self.items[index]
        try:
            image = read_image(item.image)
        except ImageReadError as exc:
            raise DatasetError(str(exc)) from None
        assert item.label is not None
        try:
            label = np.asarray(self.spec.load_label(item.label), dtype=np.int64)
        except DatasetError:
            raise
        except Exception as exc:  # noqa: BLE001 - any decoder failure names the file
            raise DatasetError(f"cannot read label {item.label}: {exc}") from None
        if label.shape != image.shape[:2]:
            raise DatasetError(
                f"label {item.label} is {label.shape[1]}x{label.shape[0]} but image {item.image} is "
                f"{image.shape[1]}x{image.shape[0]}"
            )
        return Sample(item.stem, image, label)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]


# ------------------------------------------------------------------------------------------------
# Label decoding helpers (wide int types everywhere: uint8/uint16 wrap-around is deliberate upstream)


def read_raw(path: Path) -> np.ndarray:
    """The stored values of a label file, no colour conversion: palette → indices, 16-bit stays 16-bit."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("RGB", "RGBA"):
            return np.asarray(im.convert("RGB"))
        return np.asarray(im).copy()


def read_gray(path: Path) -> np.ndarray:
    """A mask as one channel: grey files as stored; RGB files by their first channel."""
    arr = read_raw(path)
    return arr[..., 0] if arr.ndim == 3 else arr


def remap(values: np.ndarray, table: dict[int, int], default: int) -> np.ndarray:
    """Map integer values through ``table``; every value not in it becomes ``default`` (int64 out)."""
    values = np.asarray(values, dtype=np.int64)
    size = max(int(values.max(initial=0)), max(table, default=0)) + 1
    lut = np.full(size, default, dtype=np.int64)
    for src, dst in table.items():
        lut[src] = dst
    neg = values < 0
    out = lut[np.where(neg, 0, values)]
    out[neg] = default
    return out


def reduce_zero_label(values: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """mmseg/detectron2 ``reduce_zero_label``: 0 → ignore, v → v − 1 (int64, no wrap-around)."""
    values = np.asarray(values, dtype=np.int64)
    return np.where(values == 0, ignore_index, values - 1)


def pair_by_stem(images: dict[str, Path], labels: dict[str, Path]) -> list[Item]:
    """Items for every image stem (sorted), with its label path or None (image-driven splits)."""
    return [Item(stem, images[stem], labels.get(stem)) for stem in sorted(images)]


def pair_by_label(labels: dict[str, Path], images: dict[str, Path], image_dir: Path, ext: str = ".jpg") -> list[Item]:
    """Items for every label stem (sorted) — for splits defined by their label folder; a missing image keeps
    its expected path (``check_layout`` reports it, the dataset skips it)."""
    return [Item(stem, images.get(stem, image_dir / f"{stem}{ext}"), labels[stem]) for stem in sorted(labels)]


def files_by_stem(folder: Path, pattern: str, suffix_to_strip: str = "") -> dict[str, Path]:
    """``{stem: path}`` for ``folder.rglob(pattern)``, the stem cut before ``suffix_to_strip`` when given."""
    out: dict[str, Path] = {}
    if not folder.is_dir():
        return out
    for path in sorted(folder.rglob(pattern)):
        if path.name.startswith("."):
            continue
        name = path.name
        stem = name[: -len(suffix_to_strip)] if suffix_to_strip and name.endswith(suffix_to_strip) else path.stem
        out[stem] = path
    return out


def keep_listed(files: dict[str, Path], ids: Sequence[str] | None) -> dict[str, Path]:
    """The entries of ``files`` whose stem a split file lists (``read_split_file``); all of them when ``ids`` is
    None."""
    if ids is None:
        return files
    listed = set(ids)
    return {stem: path for stem, path in files.items() if stem in listed}


def need_dir(path: Path, what: str) -> Path:
    """``path`` if it is a folder, else a ``DatasetError`` naming it (caught by ``check_layout``)."""
    if not path.is_dir():
        raise MissingLayout(f"missing folder {path} ({what})")
    return path


def read_split_file(path: Path) -> list[str] | None:
    """Ids listed one per line (blank lines and ``#`` comments skipped), or None if the file is absent."""
    if not path.is_file():
        return None
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return [Path(i).stem.removesuffix("_sat") for i in ids]


class MissingLayout(DatasetError):
    """A folder or file of the official layout is missing (the data was not put in place)."""
