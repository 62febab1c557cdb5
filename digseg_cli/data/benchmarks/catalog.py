"""Benchmark registry: names → ``DatasetSpec``, opening a split, checking a layout, downloading.

One job: resolve ``--dataset NAME|PATH`` to a spec and its files under the data root, explain exactly how
to get a dataset that is missing (``DatasetError``, exit 7), check a layout without any model, and fetch
the datasets whose licence allows it. Per-benchmark layouts and label encodings live in the family
modules; metrics, models and the command line are elsewhere.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from digseg_cli.data.benchmarks.ade import ADE20K, ADE20K_FULL
from digseg_cli.data.benchmarks.base import (
    ENV_DATA_ROOT,
    BenchmarkDataset,
    DatasetSpec,
    DownloadItem,
    Item,
    MissingLayout,
    Sample,
    default_data_root,
)
from digseg_cli.data.benchmarks.cityscapes import CITYSCAPES
from digseg_cli.data.benchmarks.coco_stuff import COCO_STUFF
from digseg_cli.data.benchmarks.deepglobe import DEEPGLOBE_LANDCOVER, DEEPGLOBE_ROAD
from digseg_cli.data.benchmarks.local import synth_spec, user_folder_spec
from digseg_cli.data.benchmarks.pascal_context import PASCAL_CONTEXT_59, PASCAL_CONTEXT_459
from digseg_cli.data.benchmarks.phenobench import PHENOBENCH
from digseg_cli.data.benchmarks.refuge import REFUGE2
from digseg_cli.errors import DatasetError, UsageError

log = logging.getLogger("digseg")

DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in (
        ADE20K,
        ADE20K_FULL,
        CITYSCAPES,
        PASCAL_CONTEXT_59,
        PASCAL_CONTEXT_459,
        COCO_STUFF,
        DEEPGLOBE_ROAD,
        DEEPGLOBE_LANDCOVER,
        REFUGE2,
        PHENOBENCH,
        synth_spec(),
        # the demo's training scenes (`digseg data synth --n 2000 --seed 0 --size 128`): `train --recipe demo`
        synth_spec("synth-train", count=2000, seed=0, size=128),
    )
}
ALIASES = {
    "ade150": "ade20k",
    "a150": "ade20k",
    "ade847": "ade20k-full",
    "a847": "ade20k-full",
    "pc59": "pascal-context-59",
    "pc459": "pascal-context-459",
    "coco": "coco-stuff",
    "deepglobe-road": "deepglobe",
    "refuge": "refuge2",
}
DATASET_NAMES = tuple(DATASETS)


def get_spec(name_or_path: str, *, class_name: str | None = None) -> DatasetSpec:
    """The spec for a registry name (or alias), ``synth``, or a path to a folder in the training format."""
    key = ALIASES.get(name_or_path.lower(), name_or_path.lower())
    if key in DATASETS:
        return DATASETS[key]
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return user_folder_spec(path, class_name)
    if any(sep in name_or_path for sep in ("/", "\\")) or name_or_path.startswith("."):
        raise DatasetError(f"dataset folder {path} does not exist")
    raise UsageError(f"unknown dataset {name_or_path!r}; use one of {', '.join(DATASET_NAMES)} or a folder path")


def _check_split(spec: DatasetSpec, split: str | None) -> str:
    split = split or spec.default_split
    if split not in spec.splits:
        raise UsageError(f"`--split` for {spec.name} must be one of {', '.join(spec.splits)}; got {split!r}")
    return split


def open_dataset(
    spec: DatasetSpec, *, split: str | None = None, data_root: Path | str | None = None
) -> BenchmarkDataset:
    """The labelled samples of ``split``; a missing or empty dataset raises ``DatasetError`` saying how to get it."""
    split = _check_split(spec, split)
    root = spec.root(data_root)
    if spec.prepare is not None:
        spec.prepare(root)
    if not root.exists():
        raise DatasetError(spec.how_to_get(root))
    try:
        items = spec.list_items(root, split)
    except MissingLayout as exc:
        raise DatasetError(f"{exc}. {spec.how_to_get(root)}") from None
    dataset = BenchmarkDataset(spec, root, split, items)
    if len(dataset) == 0:
        raise DatasetError(f"no labelled {split} images found for {spec.name} in {root}. {spec.how_to_get(root)}")
    skipped = len(items) - len(dataset)
    if skipped:
        log.warning(
            "%s/%s: %d of %d images have no label file or no image file and are skipped "
            "(`digseg eval --check` lists them)",
            spec.name,
            split,
            skipped,
            len(items),
        )
    return dataset


@dataclass
class LayoutReport:
    """What ``check_layout`` found: counts, and every missing folder or file (the first 20 by name)."""

    dataset: str
    root: str
    split: str
    ok: bool
    images: int = 0
    labels: int = 0
    missing: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    hint: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def check_layout(
    spec: DatasetSpec,
    root: Path | str | None = None,
    *,
    split: str | None = None,
    data_root: Path | str | None = None,
    read_first: int = 1,
) -> LayoutReport:
    """Validate the layout without any model: list the files, name what is missing, decode the first
    ``read_first`` label files to catch encoding problems."""
    split = _check_split(spec, split)
    root = Path(root) if root is not None else spec.root(data_root)
    report = LayoutReport(spec.name, str(root), split, ok=False, hint=spec.how_to_get(root))
    if spec.prepare is not None:
        spec.prepare(root)
    if not root.exists():
        report.missing.append(f"{root} (the dataset folder)")
        return report
    try:
        items = spec.list_items(root, split)
    except MissingLayout as exc:
        report.missing.append(str(exc))
        return report
    report.images = sum(1 for it in items if it.image.is_file())
    report.labels = sum(1 for it in items if it.label is not None)
    no_label = [it for it in items if it.label is None]
    no_image = [it for it in items if not it.image.is_file()]
    report.missing += [f"label for {it.stem} ({it.image})" for it in no_label[:20]]
    report.missing += [f"image {it.image} (label {it.label})" for it in no_image[:20]]
    if len(no_label) > 20 or len(no_image) > 20:
        report.missing.append(f"… {len(no_label)} labels and {len(no_image)} images missing in all")
    dataset = BenchmarkDataset(spec, root, split, items)
    for i in range(min(read_first, len(dataset))):
        try:
            dataset[i]
        except DatasetError as exc:
            report.problems.append(str(exc))
    if len(dataset) == 0:
        report.problems.append(f"no labelled {split} images")
    report.ok = not report.missing and not report.problems
    if report.ok:
        report.hint = ""
    return report


def download_dataset(
    spec: DatasetSpec,
    *,
    data_root: Path | str | None = None,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> Path:
    """Fetch and extract the official files of an auto-downloadable dataset into its folder; return it.

    Datasets whose terms forbid automatic download raise ``DatasetError`` with the manual steps.
    Archives are verified (sha256, or md5 where that is all that is published) and extracted with
    ``safe_extract`` (no member may escape); then ``spec.prepare`` builds derived files and the layout of
    the default split is checked, so an upstream archive that changed shape fails here, not mid-evaluation.
    """
    root = spec.root(data_root)
    if not spec.download:
        if spec.prepare is not None:  # generated data (synth): nothing to fetch
            spec.prepare(root)
            return root
        raise DatasetError(
            f"{spec.title} cannot be downloaded automatically. {spec.manual} "
            f"Expected layout under {root}: {spec.layout.rstrip('.')}."
        )
    from digseg_cli.weights.archives import safe_extract
    from digseg_cli.weights.download import download_file

    cache = root / ".downloads"
    for item in spec.download:
        log.info("downloading %s", item.url)
        if item.sha256 is None and item.md5 is None:
            log.warning(
                "no published checksum for %s: only a complete transfer (and its size, if known) is verified",
                item.filename,
            )
        on_bytes = None if progress is None else (lambda done, total, _n=item.filename: progress(_n, done, total))
        archive = download_file(
            item.url, cache / item.filename, sha256=item.sha256, md5=item.md5, size=item.size, progress=on_bytes
        )
        target = (root / item.extract_to).resolve()
        done = cache / f"{item.filename}.extracted"
        if item.extract and not done.exists():
            log.info("extracting %s into %s", item.filename, target)
            safe_extract(archive, target)
            done.write_text(str(target) + "\n")
        elif not item.extract:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(archive, target / item.filename)
    if spec.prepare is not None:
        spec.prepare(root)
    try:
        spec.list_items(root, spec.default_split)
    except MissingLayout as exc:
        raise DatasetError(
            f"the downloaded {spec.title} files do not have the expected layout ({exc}); "
            f"expected under {root}: {spec.layout.rstrip('.')}."
        ) from None
    return root


__all__ = [
    "ALIASES",
    "DATASETS",
    "DATASET_NAMES",
    "ENV_DATA_ROOT",
    "BenchmarkDataset",
    "DatasetSpec",
    "DownloadItem",
    "Item",
    "LayoutReport",
    "Sample",
    "check_layout",
    "default_data_root",
    "download_dataset",
    "get_spec",
    "open_dataset",
]
