"""What a `digseg segment` run leaves on disk per image: its output files and their JSON records.

One job: name each input's output files (mirroring the input tree) and prove, before anything is written,
that no two inputs write one file (`check_outputs`) and that the output folder takes files
(`prepare_out_dir`); decide from the outputs already there whether an input is skipped or refused; write an
image's label map, overlay, binary masks, probabilities and confidence maps (`Segmented.confidence`), each
through `digseg_cli.files` (atomic, fsynced, the umask's permissions); and describe each input
(`ImageResult`) and the run (`RunSummary`), both schema `digseg.segment/1`.

It knows nothing of Typer, Rich, the model or how a run is scheduled (`run.py`); the `run.json` manifest is
`manifest.py`'s, the run-wide `sem_seg_predictions.json` `rle.py`'s, what the settings resolve to
`settings.py`'s, encoding pixels `inference/images.py`'s.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from digseg_cli.errors import UsageError
from digseg_cli.files import is_regular_file, remove_stale_temporaries, require_writable_folder
from digseg_cli.inference import images
from digseg_cli.inference.overlay import make_overlay
from digseg_cli.inference.prompts import (
    CONFIDENCE_SUFFIXES,
    CONFIDENCE_TIF_SUFFIXES,
    MASK_SUFFIX,
    MASK_TIF_SUFFIX,
    MAX_FILE_NAME_BYTES,
    OVERLAY_SUFFIX,
    PROB_SUFFIXES,
    PROB_TIF_SUFFIX,
    VECTOR_SUFFIXES,
    PromptClass,
    file_names,
    fit_name,
)
from digseg_cli.segment import rasters
from digseg_cli.segment.inputs import InputFile
from digseg_cli.segment.settings import ResolvedRun, SegmentSettings
from digseg_cli.segment.vectors import Georeference, RegionCollector, write_vectors

if TYPE_CHECKING:
    from digseg_cli.inference.calls import SegmentationOutput

SCHEMA = "digseg.segment/1"
log = logging.getLogger("digseg")


# ------------------------------------------------------------------------------------------------ results
@dataclass
class ImageResult:
    """The record of one input: JSON schema `digseg.segment/1`, `"type": "image"`.

    `classes[k]`: `fraction` of the image's valid pixels given to class k (its label in semantic mode, its own
    mask in multilabel mode) and `mean_confidence`, the mean probability over those pixels (None if none).
    `raster`: for a GeoTIFF input, its CRS, transform, bands and their stretch, nodata, `valid_fraction`, and
    how it was cut (`blocks`, tile `windows`, `windows_run`); None for pictures.
    """

    input: str
    relative_path: str
    status: str = "ok"  # ok | skipped | failed
    reason: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    classes: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    raster: dict[str, Any] | None = None

    def fail(self, reason: str) -> ImageResult:
        self.status, self.reason, self.outputs, self.classes, self.raster = "failed", reason, {}, [], None
        return self

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "type": "image", **dataclasses.asdict(self)}


@dataclass
class RunSummary:
    """What a run did. `status`: completed | stopped (--fail-fast) | interrupted (SIGINT, SIGTERM) |
    out-of-memory | output-error (full disk, read-only file system) | error."""

    out_dir: Path
    manifest: Path
    total: int
    status: str = "error"
    manifest_written: bool = False  # False: no run.json was written (an earlier one is kept as it was)
    processed: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    wall_s: float = 0.0
    peak_memory_bytes: int | None = None
    peak_memory_kind: str = ""
    backoffs: list[str] = field(default_factory=list)
    # Seconds spent reading, in the model and writing, summed over the images (run.json's `timings`).
    timings: dict[str, float] = field(default_factory=lambda: {"read_s": 0.0, "model_s": 0.0, "write_s": 0.0})
    # Many processes (`shard.py`): a row per rank, the ranks that failed ("rank 1 (host): <line>"), and whether
    # this process shows the run (the first does; the others hold the merged summary for their exit code).
    ranks: list[dict[str, Any]] | None = None
    rank_errors: list[str] = field(default_factory=list)
    reports: bool = True

    @property
    def images_per_s(self) -> float:
        return self.processed / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def not_processed(self) -> int:
        return self.total - self.processed - self.skipped - len(self.failed)

    @property
    def exit_code(self) -> int:
        from digseg_cli.errors import EXIT_OK, EXIT_PARTIAL

        return EXIT_PARTIAL if self.failed or self.not_processed or self.rank_errors else EXIT_OK

    def to_json(self) -> dict[str, Any]:
        many = {} if self.ranks is None else {"processes": self.ranks, "rank_errors": self.rank_errors}
        return {
            **many,
            "schema": SCHEMA,
            "type": "summary",
            "status": self.status,
            "inputs": self.total,
            "processed": self.processed,
            "skipped": self.skipped,
            "failed": len(self.failed),
            "not_processed": self.not_processed,
            "failures": [{"input": r, "reason": why} for r, why in self.failed],
            "wall_s": round(self.wall_s, 3),
            "images_per_s": round(self.images_per_s, 3),
            "peak_memory_bytes": self.peak_memory_bytes,
            "peak_memory_kind": self.peak_memory_kind,
            "backoffs": self.backoffs,
            "out_dir": str(self.out_dir),
            "manifest": str(self.manifest),
        }


def output_paths(
    out_dir: Path, item: InputFile, classes: Sequence[PromptClass], settings: SegmentSettings, *, members: int = 1
) -> dict[str, Any]:
    """`{"mask": path, "overlay": path, "binary": {class: path}, "probs": {class: path}, "confidence": path,
    "margin": path, "spread": path, "vector": path}` for one input, as the settings ask (`spread` only with
    `members` > 1, the ensemble's size); a GeoTIFF read as a raster (`rasters.reads_as_raster`) writes GeoTIFFs
    (`.mask.tif`, `.<class>.tif`, `.<class>.prob.tif`, `.confidence.tif`, ...) where a picture writes PNGs.

    A stem too long for a file name with its suffix is shortened by `prompts.fit_name` (class names already are).
    """
    base = Path(out_dir) / item.key

    def at(suffix: str) -> Path:
        return base.parent / (fit_name(base.name, MAX_FILE_NAME_BYTES - len(suffix.encode("utf-8"))) + suffix)

    names = file_names(classes)
    raster = rasters.reads_as_raster(item.path)
    paths: dict[str, Any] = {"mask": at(MASK_TIF_SUFFIX if raster else MASK_SUFFIX)}
    if settings.overlay:
        paths["overlay"] = at(OVERLAY_SUFFIX)
    if settings.save_binary or settings.mode == "multilabel":
        ext = ".tif" if raster else ".png"
        paths["binary"] = {c.name: at(f".{n}{ext}") for c, n in zip(classes, names, strict=True)}
    if settings.save_probs:
        ext = PROB_TIF_SUFFIX if raster else PROB_SUFFIXES[settings.probs_format]
        paths["probs"] = {c.name: at(f".{n}{ext}") for c, n in zip(classes, names, strict=True)}
    if settings.save_confidence:
        maps = [m for m in CONFIDENCE_SUFFIXES if m != "spread" or members > 1]
        suffixes = CONFIDENCE_TIF_SUFFIXES if raster else CONFIDENCE_SUFFIXES
        paths.update({m: at(suffixes[m]) for m in maps})
    if settings.vector:
        paths["vector"] = at(VECTOR_SUFFIXES[settings.vector])
    return paths


def _flat(paths: Mapping[str, Any]) -> list[Path]:
    return [p for v in paths.values() for p in (v.values() if isinstance(v, Mapping) else [v])]


def check_outputs(
    files: Sequence[InputFile],
    out_dir: Path,
    classes: Sequence[PromptClass],
    settings: SegmentSettings,
    *,
    members: int = 1,
) -> list[InputFile]:
    """The inputs of a run once every output file name is known, before anything is written: an input that is
    itself one of the run's outputs (a mask of an earlier run in the output folder) is left out with a
    warning; two inputs that would write one file, or a file where another needs a folder, are a `UsageError`
    naming both."""
    out_dir = Path(os.path.abspath(out_dir))
    owner: dict[Path, InputFile] = {}
    for item in files:
        for path in _flat(output_paths(out_dir, item, classes, settings, members=members)):
            if (other := owner.setdefault(path, item)) is not item:
                raise UsageError(f"{other.path} and {item.path} would both write {path}: rename one of them")
    folders = {parent: owner[p] for p in owner for parent in p.relative_to(out_dir).parents}
    for path, item in owner.items():
        if (other := folders.get(path.relative_to(out_dir))) is not None:
            raise UsageError(f"{item.path} would write {path}, a folder the outputs of {other.path} need: rename one")
    kept = []
    for item in files:
        if (maker := owner.get(Path(os.path.abspath(item.path)))) is not None:
            log.warning("skipping %s: it is an output of %s in this run's output folder", item.path, maker.path)
        else:
            kept.append(item)
    return kept


def prepare_out_dir(out_dir: Path) -> Path:
    """Before the model is loaded: the output folder exists and takes a file (else a one-line `UsageError`),
    and the temporary files of killed runs are gone from it."""
    require_writable_folder(out_dir, "--out")
    _remove_stale(out_dir)
    return out_dir


def remove_stale_below(out_dir: Path, paths: Sequence[Mapping[str, Any]]) -> None:
    """Remove killed runs' temporary files from every folder this run writes into (the tree below --out)."""
    for folder in {p.parent for each in paths for p in _flat(each)} - {out_dir}:
        _remove_stale(folder)


def _remove_stale(folder: Path) -> None:
    for path in remove_stale_temporaries(folder):
        log.info("removed %s, left behind by a killed run", path)


def _complete(path: Path) -> bool:
    """An output that is really there: a regular file, not empty, and, for the label PNG, one that decodes."""
    if not is_regular_file(path) or path.stat().st_size == 0:
        return False
    if path.name.endswith(MASK_SUFFIX):
        try:
            images.read_mask(path)
        except images.ImageReadError:
            return False
    return rasters.raster_complete(path) if path.name.endswith(MASK_TIF_SUFFIX) else True


def existing_verdict(paths: Mapping[str, Any], settings: SegmentSettings) -> tuple[str, str] | None:
    """("skipped"|"failed", reason) when existing outputs decide the input's fate, else None."""
    wanted = _flat(paths)
    existing = [p for p in wanted if p.exists()]
    if not existing or settings.overwrite:
        return None
    if settings.skip_existing:  # all there and sound: skip; some missing, empty or broken: redo them all
        done = len(existing) == len(wanted) and all(_complete(p) for p in wanted)
        return ("skipped", "outputs exist (--skip-existing)") if done else None
    more = f" +{len(existing) - 1}" if len(existing) > 1 else ""
    return "failed", f"outputs exist ({existing[0]}{more}): pass --overwrite or --skip-existing"


class ClassTally:
    """Per class, its pixels and the sum of its probability over them, and the valid pixels, block by block."""

    def __init__(self, classes: int) -> None:
        self.area, self.prob_sum, self.valid = np.zeros(classes, np.int64), np.zeros(classes), 0

    def add(self, regions: np.ndarray, probs: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Regions `[K,h,w]` bool and probabilities `[K,h,w]` of an image or a block; `valid` `[h,w]` (None: all)."""
        self.valid += regions[0].size if valid is None else int(valid.sum())
        for k in range(len(regions)):
            self.area[k] += int(regions[k].sum())
            self.prob_sum[k] += float(probs[k][regions[k]].sum(dtype=np.float64))

    def records(self, resolved: ResolvedRun, thresholds: Sequence[float]) -> list[dict[str, Any]]:
        """`ImageResult.classes`: per class, its label, threshold, share of the valid pixels and mean confidence."""
        return [
            {
                "name": c.name,
                "label": k + 1,
                "threshold": thresholds[k],
                "fraction": int(self.area[k]) / self.valid if self.valid else 0.0,
                "mean_confidence": float(self.prob_sum[k] / self.area[k]) if self.area[k] else None,
            }
            for k, c in enumerate(resolved.classes)
        ]


@dataclass(frozen=True)
class Segmented:
    """One segmented image on its way to disk."""

    image: np.ndarray  # [H,W,3] uint8
    probs: np.ndarray  # [K,H,W] float32 in [0, 1]
    labels: np.ndarray  # [H,W] uint8, 0 = background, k = class k
    regions: np.ndarray  # [K,H,W] bool: each class's pixels (its label, or its own mask in multilabel mode)
    spread: np.ndarray | None = None  # [K,H,W] float32: each class's std across the ensemble members

    @classmethod
    def from_output(cls, image: np.ndarray, out: SegmentationOutput, mode: str) -> Segmented:
        """The pipeline's tensors as the arrays the outputs and records are made of."""
        probs = out.probs.float().numpy()  # [K,H,W] in [0,1]
        labels = out.labels.numpy().astype(np.uint8)  # [H,W], 0 = background, k = class k
        if mode == "multilabel":
            regions = out.masks.numpy()  # [K,H,W] bool, each class thresholded alone
        else:
            regions = labels[None] == np.arange(1, len(probs) + 1, dtype=np.uint8)[:, None, None]  # [K,H,W]
        spread = None if out.spread is None else out.spread.float().numpy()
        return cls(image, probs, labels, regions, spread)

    def confidence(self) -> dict[str, np.ndarray]:
        """`--save-confidence`'s maps, each `[H,W]` in [0, 1]: `confidence`, the probability of the winning class
        (the largest of the K, whether or not it reaches its threshold); `margin`, that minus the runner-up's
        (with one class, the runner-up counts as 0); `spread`, the winning class's standard deviation across the
        ensemble members (when there are two or more)."""
        ranked = np.sort(self.probs, axis=0)  # [K,H,W], ascending per pixel
        runner_up = ranked[-2] if len(ranked) > 1 else np.zeros_like(ranked[-1])
        maps = {"confidence": ranked[-1], "margin": ranked[-1] - runner_up}
        if self.spread is not None:
            winner = self.probs.argmax(0)[None]  # [1,H,W]
            maps["spread"] = np.take_along_axis(self.spread, winner, 0)[0]
        return maps

    def masked(self, valid: np.ndarray | None) -> Segmented:
        """No-data pixels (`valid` False) as label 0, in no class's region, with probability (and spread) 0."""
        if valid is not None:
            self.labels[~valid], self.regions[:, ~valid], self.probs[:, ~valid] = 0, False, 0.0
            if self.spread is not None:
                self.spread[:, ~valid] = 0.0
        return self

    def class_records(self, resolved: ResolvedRun, thresholds: Sequence[float]) -> list[dict[str, Any]]:
        """`ImageResult.classes` (`ClassTally.records`) of the whole image."""
        tally = ClassTally(len(resolved.classes))
        tally.add(self.regions, self.probs)
        return tally.records(resolved, thresholds)


def write_outputs(
    paths: Mapping[str, Any], seg: Segmented, resolved: ResolvedRun, settings: SegmentSettings, source: str = ""
) -> float:
    """Write one image's outputs (worker thread); each file appears atomically under its final name. `source`: the
    input, as the `--vector` file names it."""
    t0 = time.perf_counter()
    images.write_label_png(paths["mask"], seg.labels, resolved.palette)
    if "overlay" in paths:
        overlay = make_overlay(seg.image, seg.labels, resolved.palette, resolved.names, settings.overlay_alpha)
        images.write_image(paths["overlay"], overlay, settings.jpeg_quality)
    for k, path in enumerate(paths.get("binary", {}).values()):
        images.write_binary_png(path, seg.regions[k])
    for k, path in enumerate(paths.get("probs", {}).values()):
        if settings.probs_format == "png16":
            images.write_png16(path, seg.probs[k])
        else:
            images.write_npy(path, seg.probs[k])
    if "confidence" in paths:
        maps = seg.confidence()
        for name in (m for m in CONFIDENCE_SUFFIXES if m in paths):
            if name not in maps:
                raise ValueError("the pipeline gave no ensemble spread (`spread=True`) for the spread map")
            images.write_png16(paths[name], maps[name])
    if "vector" in paths:
        collector = RegionCollector(*seg.labels.shape, min_pixels=settings.min_area or 0.0)
        collector.add((0, 0, *seg.labels.shape), seg.regions, seg.probs)
        write_regions(paths["vector"], collector, resolved, settings, source=source)
    return time.perf_counter() - t0


def write_regions(
    path: Path, collector: RegionCollector, resolved: ResolvedRun, settings: SegmentSettings, **kw
) -> None:
    """The `--vector` file of one input from its collected regions: `source` (the input) and `geo` (a
    `vectors.Georeference`; pixel coordinates when absent) as `kw`."""
    write_vectors(
        path,
        collector.regions(),
        resolved.classes,
        geo=kw.get("geo") or Georeference(),
        fmt=settings.vector,
        simplify=settings.simplify,
        min_area=settings.min_area,
        shared_borders=settings.mode == "semantic",
        source=kw["source"],
    )
