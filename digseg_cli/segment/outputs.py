"""What a `digseg segment` run leaves on disk: per-image outputs, their JSON records and the `run.json` manifest.

One job: name each input's output files (mirroring the input tree) and decide from the ones already there
whether the input is skipped or refused; write an image's label map, overlay, binary masks and
probabilities, each atomically; describe each input (`ImageResult`) and the run (`RunSummary`), both
schema `digseg.segment/1`; and record the run in a `run.json` manifest (`digseg.run/1`).

It knows nothing of Typer, Rich, the model or how a run is scheduled (`run.py`); what the settings resolve to
is `settings.py`'s to say, encoding pixels `inference/images.py`'s.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from digseg_cli.files import atomic_write_json
from digseg_cli.inference import images
from digseg_cli.inference.overlay import make_overlay
from digseg_cli.inference.prompts import PromptClass, file_names
from digseg_cli.segment.inputs import InputFile
from digseg_cli.segment.settings import ResolvedRun, SegmentSettings

if TYPE_CHECKING:
    from digseg_cli.inference.pipeline import DigsegPipeline

SCHEMA = "digseg.segment/1"
MANIFEST_SCHEMA = "digseg.run/1"
PROBABILITY_SCALE = "linear 0-65535: probability = value / 65535 (16-bit PNG); float32 in [0, 1] (npy)"


# ------------------------------------------------------------------------------------------------ results
@dataclass
class ImageResult:
    """The record of one input: JSON schema `digseg.segment/1`, `"type": "image"`.

    `classes[k]`: `fraction` of the image's pixels given to class k (its label in semantic mode, its own
    mask in multilabel mode) and `mean_confidence`, the mean probability over those pixels (None if none).
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

    def fail(self, reason: str) -> ImageResult:
        self.status, self.reason, self.outputs, self.classes = "failed", reason, {}, []
        return self

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "type": "image", **dataclasses.asdict(self)}


@dataclass
class RunSummary:
    """What a run did. `status`: completed | stopped (--fail-fast) | interrupted | out-of-memory | error."""

    out_dir: Path
    manifest: Path
    total: int
    status: str = "error"
    processed: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    wall_s: float = 0.0
    peak_memory_bytes: int | None = None
    peak_memory_kind: str = ""
    backoffs: list[str] = field(default_factory=list)
    # Seconds spent reading, in the model and writing, summed over the images (run.json's `timings`).
    timings: dict[str, float] = field(default_factory=lambda: {"read_s": 0.0, "model_s": 0.0, "write_s": 0.0})

    @property
    def images_per_s(self) -> float:
        return self.processed / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def not_processed(self) -> int:
        return self.total - self.processed - self.skipped - len(self.failed)

    @property
    def exit_code(self) -> int:
        from digseg_cli.errors import EXIT_OK, EXIT_PARTIAL

        return EXIT_PARTIAL if self.failed or self.not_processed else EXIT_OK

    def to_json(self) -> dict[str, Any]:
        return {
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
    out_dir: Path, item: InputFile, classes: Sequence[PromptClass], settings: SegmentSettings
) -> dict[str, Any]:
    """`{"mask": path, "overlay": path, "binary": {class: path}, "probs": {class: path}}` for one input."""
    base = Path(out_dir) / item.key

    def at(suffix: str) -> Path:
        return base.parent / f"{base.name}{suffix}"

    names = file_names(classes)
    paths: dict[str, Any] = {"mask": at(".mask.png")}
    if settings.overlay:
        paths["overlay"] = at(".overlay.jpg")
    if settings.save_binary or settings.mode == "multilabel":
        paths["binary"] = {c.name: at(f".{n}.png") for c, n in zip(classes, names, strict=True)}
    if settings.save_probs:
        ext = ".prob.png" if settings.probs_format == "png16" else ".prob.npy"
        paths["probs"] = {c.name: at(f".{n}{ext}") for c, n in zip(classes, names, strict=True)}
    return paths


def _flat(paths: Mapping[str, Any]) -> list[Path]:
    return [p for v in paths.values() for p in (v.values() if isinstance(v, Mapping) else [v])]


def existing_verdict(paths: Mapping[str, Any], settings: SegmentSettings) -> tuple[str, str] | None:
    """("skipped"|"failed", reason) when existing outputs decide the input's fate, else None."""
    wanted = _flat(paths)
    existing = [p for p in wanted if p.exists()]
    if not existing or settings.overwrite:
        return None
    if settings.skip_existing:  # all there: skip; some missing (an interrupted write): redo them all
        return ("skipped", "outputs exist (--skip-existing)") if len(existing) == len(wanted) else None
    more = f" +{len(existing) - 1}" if len(existing) > 1 else ""
    return "failed", f"outputs exist ({existing[0]}{more}): pass --overwrite or --skip-existing"


@dataclass(frozen=True)
class Segmented:
    """One segmented image on its way to disk."""

    image: np.ndarray  # [H,W,3] uint8
    probs: np.ndarray  # [K,H,W] float32 in [0, 1]
    labels: np.ndarray  # [H,W] uint8, 0 = background, k = class k
    regions: np.ndarray  # [K,H,W] bool: each class's pixels (its label, or its own mask in multilabel mode)

    def class_records(self, resolved: ResolvedRun, thresholds: Sequence[float]) -> list[dict[str, Any]]:
        """`ImageResult.classes`: per class, its label, threshold, share of the pixels and mean confidence there."""
        records = []
        for k, c in enumerate(resolved.classes):
            area = int(self.regions[k].sum())
            records.append(
                {
                    "name": c.name,
                    "label": k + 1,
                    "threshold": thresholds[k],
                    "fraction": area / self.regions[k].size,
                    "mean_confidence": float(self.probs[k][self.regions[k]].mean()) if area else None,
                }
            )
        return records


def write_outputs(paths: Mapping[str, Any], seg: Segmented, resolved: ResolvedRun, settings: SegmentSettings) -> float:
    """Write one image's outputs (worker thread); each file appears atomically under its final name."""
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
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------ the manifest
def peak_memory(device=None) -> tuple[int | None, str]:
    """(bytes, what was measured): CUDA `max_memory_allocated`, else the process's peak resident set."""
    if device is not None and getattr(device, "type", "") == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated"
    try:
        import resource
        import sys
    except ImportError:  # Windows
        return None, "unavailable"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "process peak RSS"


def versions() -> dict[str, str | None]:
    """digseg and its main libraries' versions, plus digseg's git revision when run from a checkout."""
    import platform
    import subprocess
    from importlib import metadata

    from digseg_cli._version import __version__

    found: dict[str, str | None] = {"digseg": __version__, "python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    root = Path(__file__).resolve().parents[2]
    try:
        top = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
        lines = top.stdout.split()
        ok = top.returncode == 0 and len(lines) == 2 and Path(lines[0]).resolve() == root
        found["digseg_git_revision"] = lines[1] if ok else None
    except (OSError, subprocess.SubprocessError):
        found["digseg_git_revision"] = None
    return found


@dataclass(frozen=True)
class RunOrigin:
    """Where a run came from, for its manifest: when it started, the weights and the command's arguments."""

    started: datetime
    weights: str | None = None  # the name the user gave
    weights_folder: str | Path | None = None  # the local folder behind it (None for built-in compact models)
    sha256: str | None = None  # of the weights folder's files, or why it is unavailable
    arguments: Mapping[str, Any] | None = None


def write_manifest(
    summary: RunSummary, settings: SegmentSettings, resolved: ResolvedRun, pipe: DigsegPipeline, origin: RunOrigin
) -> None:
    """Write the run's `run.json` (`summary.manifest`) atomically: settings, resolved values, counts, timings."""
    manifest = _manifest(summary, settings, resolved, pipe, origin)
    summary.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(summary.manifest, manifest)


def _manifest(
    summary: RunSummary, settings: SegmentSettings, resolved: ResolvedRun, pipe: DigsegPipeline, origin: RunOrigin
) -> dict[str, Any]:
    from digseg_cli.inference.device import PRECISION_NAMES  # torch is loaded by now: there is a pipeline

    cfg, classes = pipe.config, resolved.classes
    precision = PRECISION_NAMES.get(pipe.dtype)
    return {
        "schema": MANIFEST_SCHEMA,
        "command": "segment",
        "status": summary.status,
        "started": origin.started.isoformat(timespec="seconds"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "arguments": dict(origin.arguments or {}),
        "settings": dataclasses.asdict(settings),
        "resolved": {
            "classes": [dataclasses.asdict(c) for c in classes],
            "thresholds": resolved.thresholds,
            "labels": {str(k + 1): c.name for k, c in enumerate(classes)} | {"0": "background"},
            "file_names": file_names(classes),
            "objective": cfg.objective,
            "steps": cfg.default_steps if settings.steps is None else settings.steps,
            "ensemble": cfg.default_ensemble if settings.ensemble is None else settings.ensemble,
            "resolution": cfg.default_resolution if settings.resolution is None else settings.resolution,
            "prompt_template": settings.prompt_template or cfg.prompt_template,
            "batch_size": pipe.batch_size,
            "seed_rule": "sha256(seed, file name)",
            "decoder": resolved.call["decoder"],
        },
        "weights": {
            "name": origin.weights,
            "folder": None if origin.weights_folder is None else str(origin.weights_folder),
            "sha256": origin.sha256,
            "base_model": cfg.base_model,
        },
        "versions": versions(),
        "device": str(pipe.device),
        "precision": precision,
        "counts": {
            "inputs": summary.total,
            "processed": summary.processed,
            "skipped": summary.skipped,
            "failed": len(summary.failed),
            "not_processed": summary.not_processed,
        },
        "failures": [{"input": r, "reason": why} for r, why in summary.failed],
        "backoffs": summary.backoffs,
        "timings": {
            "wall_s": round(summary.wall_s, 3),
            "images_per_s": round(summary.images_per_s, 3),
            **{k: round(v, 3) for k, v in summary.timings.items()},
        },
        "peak_memory": {"bytes": summary.peak_memory_bytes, "kind": summary.peak_memory_kind},
        "probability_scale": PROBABILITY_SCALE,
        "outputs": {
            "mask": "<rel>.mask.png: palette PNG; 0 = background, k = class k (see resolved.labels)",
            "overlay": "<rel>.overlay.jpg: label colours over the image, with a legend",
            "binary": "<rel>.<class>.png: 0/255 per class (--save-binary; always in multilabel mode)",
            "probs": "<rel>.<class>.prob.png|.prob.npy: per-class probability (--save-probs)",
        },
    }
