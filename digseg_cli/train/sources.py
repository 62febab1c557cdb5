"""Where a run's training samples come from: user folders and benchmarks by name, each with its vocabulary.

One job: turn `--data` and the `--dataset NAME|PATH[:WEIGHT]` entries into `TrainSource`s. A source reads
(image `HxWx3` uint8, label `HxW` int) pairs by index and says what its labels mean: each class's prompts
and the label values that count as it, and the ignore value. A user folder is checked (`digseg data check`'s
check) and split as before; a benchmark reads its train split through the same loaders and label decoding
as `digseg eval` (`digseg_cli.data.benchmarks.catalog`), and validates on its own validation split. The
class list a checkpoint records is the union of the sources' classes, each with the datasets it came
from. Sampling, augmentation and prompts are `train.samples`'; scoring is `train.validate`'s.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from digseg_cli.data.vocabulary import word_key
from digseg_cli.errors import DatasetError, UsageError

log = logging.getLogger("digseg")

# The split a benchmark trains on, and the splits its validation prefers, in order.
TRAIN_SPLIT = "train"
VALIDATION_SPLITS = ("val", "test")


@dataclass(frozen=True)
class TrainClass:
    """One class a source annotates: its prompts (name first) and the label values that are this class
    (one value, except nested structures: REFUGE's disc is the rim and the cup inside it)."""

    name: str
    prompts: tuple[str, ...]
    values: tuple[int, ...]


@dataclass
class TrainSource:
    """One dataset of a run: `read(i)` → (image, label), its classes, ignore value and mixture weight.

    `validation` is what `train.validate.Validation` scores for it: (spec, samples) or None."""

    name: str
    kind: str  # "folder" | "benchmark"
    classes: tuple[TrainClass, ...]
    ignore_index: int | None
    weight: float
    reader: Any  # Sequence of (image, label) by index: a folder's pairs or a benchmark split
    validation: tuple[Any, Any] | None = None
    cache: bool = False  # keep decoded pairs in memory (small user folders, as before)
    _cache: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.reader)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if index in self._cache:
            return self._cache[index]
        pair = self.reader[index]
        if self.cache:
            self._cache[index] = pair
        return pair


class _FolderReader:
    """A checked folder's pairs as (image, class-id mask)."""

    def __init__(self, pairs, classes):
        self.pairs, self.classes = list(pairs), classes

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        from digseg_cli.data.folders import load_pair

        return load_pair(self.pairs[index], self.classes)


class _BenchmarkReader:
    """A benchmark split as (image, train-id label)."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        sample = self.samples[index]
        return sample.image, sample.label


def parse_entry(entry: str) -> tuple[str, float]:
    """`NAME_OR_PATH[:WEIGHT]` → (name or path, weight); a weight must be a positive number. A path that
    itself contains `:` (e.g. `C:\\data`) is read whole when what follows the last `:` is no number."""
    head, sep, tail = entry.rpartition(":")
    if not sep or not head:
        return entry, 1.0
    try:
        weight = float(tail)
    except ValueError:
        return entry, 1.0
    if not weight > 0 or weight == float("inf"):
        raise UsageError(f"`--dataset {entry}`: the weight after ':' must be a positive number, got {tail!r}")
    return head, weight


def open_sources(s) -> list[TrainSource]:
    """The sources of run settings `s` (`TrainSettings`): `--data` first, then each `--dataset` in order."""
    entries = ([(str(s.data), 1.0)] if s.data is not None else []) + [parse_entry(e) for e in s.datasets]
    if not entries:
        raise UsageError("give --data FOLDER or --dataset NAME (a benchmark, or a folder of image/mask pairs)")
    if s.val is not None and s.data is None:
        raise UsageError("`--val` is the validation folder of --data; a --dataset benchmark validates on its own split")
    sources = [_open_one(s, name, weight, first=i == 0) for i, (name, weight) in enumerate(entries)]
    names = [src.name for src in sources]
    if len(set(names)) != len(names):
        raise UsageError(f"a dataset is given twice: {', '.join(names)} (give each once, with a weight)")
    return sources


def _open_one(s, name: str, weight: float, *, first: bool) -> TrainSource:
    """`--data`, a folder path, or a catalog name (a bare name the catalog knows is the benchmark, even where
    a folder of that name exists: write `./NAME` for the folder)."""
    from digseg_cli.data.benchmarks import catalog
    from digseg_cli.data.benchmarks.local import is_folder_spec

    path = Path(name).expanduser()
    is_folder = (s.data is not None and first) or (
        path.is_dir() and name.lower() not in catalog.DATASETS and name.lower() not in catalog.ALIASES
    )
    if is_folder:
        return folder_source(s, path, weight, val=s.val if first and s.data is not None else None)
    spec = catalog.get_spec(name)
    if is_folder_spec(spec):  # the synth sets: generated once, then read as the user folder they are
        root = spec.root(s.data_root)
        spec.prepare(root)
        source = folder_source(s, root, weight, val=None)
        source.name = spec.name
        return source
    return benchmark_source(spec, weight, data_root=s.data_root)


def folder_source(s, folder: Path, weight: float, *, val: Path | None) -> TrainSource:
    """A user folder: checked, its classes read, split into train and validation pairs (or `val`'s pairs)."""
    classes, train_pairs, val_pairs = prepare_data(
        folder, val, class_name=s.class_name, val_split=s.val_split, seed=s.seed
    )
    source = pairs_source(train_pairs, classes, name=str(folder), weight=weight)
    source.validation = _folder_validation(classes, val_pairs, Path(val or folder))
    return source


def pairs_source(pairs, classes, *, name: str = "folder", weight: float = 1.0, cache: bool = True) -> TrainSource:
    """Checked pairs of a folder with its `ClassList` as a source (decoded pairs cached in memory unless
    `cache` is false)."""
    return TrainSource(
        name=name,
        kind="folder",
        classes=tuple(TrainClass(c.name, tuple(c.prompts), (c.id,)) for c in classes),
        ignore_index=classes.ignore_index,
        weight=weight,
        reader=_FolderReader(pairs, classes),
        cache=cache,
    )


def prepare_data(
    data: Path, val: Path | None, *, class_name: str | None, val_split: float, seed: int
) -> tuple[Any, list, list]:
    """(classes, training pairs, validation pairs) of a checked folder; the validation pairs are `val`'s,
    else a `val_split` share of `data` chosen by `seed`. A folder that fails the check raises
    `DatasetError` naming its first problems."""
    from digseg_cli.data import folders
    from digseg_cli.data.check import check_folder

    report = check_folder(data, class_name=class_name)
    if not report.ok:
        more = len(report.problems) - 5
        shown = "; ".join(report.problems[:5]) + (f" (and {more} more)" if more > 0 else "")
        raise DatasetError(f"{data} failed the data check: {shown}. Run `digseg data check {data}` for the full report")
    classes = folders.read_classes(data, class_name=class_name)
    pairs = folders.find_pairs(data)
    if val:
        val_report = check_folder(val, class_name=class_name)
        if not val_report.ok:
            raise DatasetError(f"{val} failed the data check: {val_report.problems[0]}")
        return classes, pairs, folders.find_pairs(val)
    train_pairs, val_pairs = folders.split_pairs(pairs, val_split, seed)
    return classes, train_pairs, val_pairs


def _folder_validation(classes, pairs, root: Path):
    from digseg_cli.data.benchmarks.base import BenchmarkDataset, Item
    from digseg_cli.data.benchmarks.local import spec_from_classes

    if not pairs:
        return None
    spec = spec_from_classes(classes, name=str(root), title=f"validation pairs of {root.name}", folder=str(root))
    items = [Item(p.stem, p.image, p.mask) for p in pairs]
    return spec, BenchmarkDataset(spec, root, "val", items)


def benchmark_source(spec, weight: float, *, data_root: Path | None) -> TrainSource:
    """A benchmark by name: its train split, decoded as `digseg eval` decodes it; validation on its own
    validation split. Missing data is `DatasetError` (exit 7) saying how to get it."""
    from digseg_cli.data.benchmarks import catalog

    if TRAIN_SPLIT not in spec.splits:
        trainable = sorted(n for n, d in catalog.DATASETS.items() if TRAIN_SPLIT in d.splits)
        raise UsageError(
            f"{spec.name} has no training split in digseg (it is an evaluation benchmark); "
            f"train on one of {', '.join(trainable)}, or a folder"
        )
    train = catalog.open_dataset(spec, split=TRAIN_SPLIT, data_root=data_root)
    val_split = next((v for v in VALIDATION_SPLITS if v in spec.splits), None)
    validation = None
    if val_split is not None:
        try:
            validation = spec, catalog.open_dataset(spec, split=val_split, data_root=data_root)
        except DatasetError as exc:  # a train split without its validation split trains, unvalidated
            log.warning("%s: no %s split to validate on (%s); training unvalidated", spec.name, val_split, exc)
    return TrainSource(
        name=spec.name,
        kind="benchmark",
        classes=benchmark_classes(spec),
        ignore_index=spec.ignore_index,
        weight=weight,
        reader=_BenchmarkReader(train),
        validation=validation,
    )


def benchmark_classes(spec) -> tuple[TrainClass, ...]:
    """A spec's classes with the label values that are each: `argmax` label k = class k; `background` label
    k+1; `nested` (outer → inner) label k+1 and every inner label."""
    prompts = spec.prompts
    n = len(prompts)
    if spec.label_mode == "argmax":
        values = [(k,) for k in range(n)]
    elif spec.label_mode == "background":
        values = [(k + 1,) for k in range(n)]
    elif spec.label_mode == "nested":
        values = [tuple(range(k + 1, n + 1)) for k in range(n)]
    else:  # pragma: no cover - the catalog's specs use these three
        raise DatasetError(f"{spec.name}: label mode {spec.label_mode!r} cannot be trained on")
    return tuple(TrainClass(p[0], tuple(p), v) for p, v in zip(prompts, values, strict=True))


def with_synonyms(sources: list[TrainSource], vocabulary) -> list[TrainSource]:
    """The sources with each class's prompts extended by the words `vocabulary` (`data.vocabulary.Vocabulary`)
    lists for its name; classes it does not list keep theirs."""
    out = []
    for src in sources:
        classes = tuple(
            dataclasses.replace(c, prompts=tuple(dict.fromkeys((*c.prompts, *vocabulary.synonyms_of(c.name)))))
            for c in src.classes
        )
        out.append(dataclasses.replace(src, classes=classes, _cache=src._cache))
    return out


def union_classes(sources: list[TrainSource]) -> list[dict]:
    """The checkpoint's class list: every source's classes, merged by name (case and spaces ignored), with
    the union of their prompts and the datasets each came from. One folder alone keeps its own ids."""
    ids = [c.values[0] for c in sources[0].classes] if len(sources) == 1 and sources[0].kind == "folder" else None
    merged: dict[str, dict] = {}
    for src in sources:
        for c in src.classes:
            key = word_key(c.name)
            entry = merged.setdefault(key, {"name": c.name, "synonyms": [], "sources": []})
            entry["synonyms"] += [p for p in c.prompts if p != entry["name"] and p not in entry["synonyms"]]
            if src.name not in entry["sources"]:
                entry["sources"].append(src.name)
    out = list(merged.values())
    for i, entry in enumerate(out):
        entry["id"] = ids[i] if ids is not None else i + 1
    return [{"id": e["id"], "name": e["name"], "synonyms": e["synonyms"], "sources": e["sources"]} for e in out]
