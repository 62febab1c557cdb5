"""The `run.json` manifest of a `digseg segment` output folder: what made the outputs there, run by run.

One job: record a run (schema `digseg.run/1`: arguments, settings and what they resolved to, weights,
versions, device, precision, counts, timings) and decide whether a new run into a folder that already holds
one continues it. A run continues an earlier one only when its outputs mean the same (`identity`: the
weights, the classes and their labels, thresholds and file names, the precision and the settings that change
pixels); otherwise it is refused before any image is read, unless `--overwrite`. The earlier runs' manifests
are kept, oldest first, in `earlier_runs`; a run that wrote nothing leaves an existing `run.json` as it was.

It knows nothing of Typer, Rich, how a run is scheduled (`run.py`) or the per-image files (`outputs.py`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from digseg_cli.errors import DigsegError, InterruptedRunError, OutputUnwritableError, UsageError
from digseg_cli.files import atomic_write_json, not_regular_reason
from digseg_cli.inference.prompts import (
    MASK_SUFFIX,
    MASK_TIF_SUFFIX,
    OVERLAY_SUFFIX,
    PROB_SUFFIXES,
    PROB_TIF_SUFFIX,
    VECTOR_SUFFIXES,
    file_names,
)
from digseg_cli.segment.rle import PREDICTIONS_NAME
from digseg_cli.segment.settings import ResolvedRun, SegmentSettings

if TYPE_CHECKING:
    from digseg_cli.inference.pipeline import DigsegPipeline
    from digseg_cli.segment.outputs import RunSummary

MANIFEST_SCHEMA = "digseg.run/1"
MANIFEST_NAME = "run.json"
PROBABILITY_SCALE = (
    "linear 0-65535: probability = value / 65535 (16-bit PNG: probabilities, confidence, margin, spread; uint16 "
    "GeoTIFF for GeoTIFF inputs); float32 in [0, 1] (npy; float32 GeoTIFF for GeoTIFF inputs)"
)
# The settings that change what an output file holds; the others (--workers, --skip-existing, ...) do not.
CONTENT_SETTINGS = (
    "mode",
    "seed",
    "tile",
    "overlap",
    "overlay",
    "overlay_alpha",
    "save_binary",
    "save_probs",
    "probs_format",
    "save_confidence",
    "rle",
    "jpeg_quality",
    "bands",
    "vector",
    "min_area",
    "simplify",
)
_NOT_MEANING = ("batch_size", "seed_rule")  # resolved values that do not change what a label means
RESOLVED_BEFORE = {"encoder": "vae"}  # resolved values a manifest of an older digseg lacks: what it ran then


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


def describe(settings: SegmentSettings, resolved: ResolvedRun, pipe: DigsegPipeline, origin: RunOrigin) -> dict:
    """Everything the manifest says of a run but its counts and timings (the same before and after it)."""
    from digseg_cli.inference.compiling import compile_record  # torch is loaded by now: there is a pipeline
    from digseg_cli.inference.device import PRECISION_NAMES

    cfg, classes = pipe.config, resolved.classes
    return {
        "schema": MANIFEST_SCHEMA,
        "command": "segment",
        "started": origin.started.isoformat(timespec="seconds"),
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
            "encoder": resolved.call["encoder"],
        },
        "weights": {
            "name": origin.weights,
            "folder": None if origin.weights_folder is None else str(origin.weights_folder),
            "sha256": origin.sha256,
            "base_model": cfg.base_model,
        },
        "versions": versions(),
        "device": str(pipe.device),
        "precision": PRECISION_NAMES.get(pipe.dtype),
        "compile": compile_record(pipe),  # --compile: backend, warm-up seconds, parts that went back to eager
        "probability_scale": PROBABILITY_SCALE,
        "outputs": {
            "mask": f"<rel>{MASK_SUFFIX}: palette PNG; 0 = background, k = class k (see resolved.labels)",
            "overlay": f"<rel>{OVERLAY_SUFFIX}: label colours over the image, with a legend",
            "binary": "<rel>.<class>.png: 0/255 per class (--save-binary; always in multilabel mode)",
            "probs": f"<rel>.<class>{'|'.join(PROB_SUFFIXES.values())}: per-class probability (--save-probs)",
            "confidence": "<rel>.confidence.png: the winning (largest) class probability, 16-bit (--save-confidence)",
            "margin": "<rel>.margin.png: the winner's probability less the runner-up's (0 with one class), 16-bit",
            "spread": "<rel>.spread.png: the winner's standard deviation across the ensemble members (ensemble > 1)",
            "rle": f"{PREDICTIONS_NAME}: detectron2 SemSegEvaluator records of every label map, COCO RLE; "
            "category_id = label value (0 background, k class k), file_name = <rel> (--rle)",
            "geotiff": f"GeoTIFF inputs: <rel>{MASK_TIF_SUFFIX}, <rel>.<class>.tif, <rel>.<class>{PROB_TIF_SUFFIX}, "
            "<rel>.confidence|margin|spread.tif: the same as GeoTIFFs with the input's CRS and transform; no-data "
            "pixels 0 and masked",
            "vector": f"<rel>{'|'.join(VECTOR_SUFFIXES.values())}: one polygon per connected region per class "
            "(--vector)",
        },
    }


def identity(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What the outputs of a run mean, from its manifest (or `describe`): two runs with the same identity may
    share a folder. Read from the recorded fields, so manifests written before it existed compare too."""
    weights = {k: v for k, v in (manifest.get("weights") or {}).items() if k != "sha256"}  # digested later
    recorded = {**RESOLVED_BEFORE, **(manifest.get("resolved") or {})}
    resolved = {k: v for k, v in recorded.items() if k not in _NOT_MEANING}
    settings = manifest.get("settings") or {}
    found = {"weights": weights, "resolved": resolved, "precision": manifest.get("precision")}
    # A setting a manifest of an older digseg lacks had its default there (no --save-confidence, no --rle).
    defaults = {f.name: f.default for f in dataclasses.fields(SegmentSettings)}
    found["settings"] = {k: settings.get(k, defaults[k]) for k in CONTENT_SETTINGS}
    return json.loads(json.dumps(found, default=str))  # tuples → lists, as a manifest read back has them


def _differences(before: Mapping[str, Any], now: Mapping[str, Any], where: str = "") -> list[str]:
    found = []
    for key in [*before, *(k for k in now if k not in before)]:  # the identity's order: weights first
        a, b, name = before.get(key), now.get(key), f"{where}{key}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            found += _differences(a, b, f"{name}.")
        elif a != b:
            found.append(f"{name} {_short(a)} there, {_short(b)} now")
    return found


def _short(value: Any) -> str:
    if isinstance(value, list) and value and all(isinstance(v, Mapping) and "name" in v for v in value):
        value = [v["name"] for v in value]  # classes: their names say which they are
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def read_previous(out_dir: Path) -> dict[str, Any] | None:
    """The manifest already in `out_dir`, or None; a `UsageError` when there is a `run.json` digseg cannot read."""
    path = Path(out_dir) / MANIFEST_NAME
    if (reason := not_regular_reason(path)) == "does not exist":
        return None
    try:
        if reason is not None:
            raise OSError(reason)
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path} ({exc}): choose another --out (digseg will not replace it)") from None
    if not isinstance(data, dict) or data.get("schema") != MANIFEST_SCHEMA:
        raise UsageError(f"{path} is not a digseg segment manifest: choose another --out (digseg will not replace it)")
    return data


def continue_or_refuse(previous: dict | None, head: Mapping[str, Any], out_dir: Path, overwrite: bool) -> list[dict]:
    """The earlier runs the new manifest keeps (`previous` and its own earlier ones, oldest first); a
    `UsageError` naming what differs when `previous` made outputs of another meaning and not `overwrite`."""
    if previous is None:
        return []
    differs = _differences(identity(previous), identity(head))
    if differs and not overwrite:
        more = f" (+{len(differs) - 2} more)" if len(differs) > 2 else ""
        raise UsageError(
            f"{out_dir} holds the outputs of another run ({'; '.join(differs[:2])}{more}): "
            "choose another --out, or pass --overwrite to replace them (run.json keeps the earlier record)"
        )
    return [*previous.get("earlier_runs", []), {k: v for k, v in previous.items() if k != "earlier_runs"}]


def write_manifest(summary: RunSummary, head: Mapping[str, Any], earlier: list[dict], replaces: bool) -> bool:
    """Write `run.json` (`summary.manifest`) atomically: `head` (from `describe`), the counts and timings, and the
    `earlier` runs. A run that wrote no image leaves the manifest it `replaces` as it was; True when written."""
    if replaces and summary.processed == 0:
        return False
    manifest = {
        **head,
        "status": summary.status,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
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
        "earlier_runs": earlier,
    }
    if summary.ranks is not None:  # many processes (`shard.py`): each rank's share and how it ended
        manifest["processes"] = {"world_size": len(summary.ranks), "ranks": summary.ranks}
        manifest["rank_errors"] = summary.rank_errors
    atomic_write_json(summary.manifest, manifest)
    return True


def written(write: Callable[[], Any], what: str, error: DigsegError | None) -> DigsegError | None:
    """Call `write`; when it fails, the run's error (or a new one) says in its one line that `what` was not written."""
    try:
        write()
    except OSError as exc:
        if error is None:
            return OutputUnwritableError(f"cannot write {what}: {exc.strerror or exc}")
        error.args = (f"{error}; {what} could not be written either ({exc.strerror or exc})",)
    return error


def record_run(summary: RunSummary, head: dict, earlier: list[dict], replaces: bool, error: DigsegError | None):
    """Write the manifest; when even that fails, the run's error (or a new one) says so in its one line."""

    def write() -> None:
        summary.manifest_written = write_manifest(summary, head, earlier, replaces)

    return written(write, f"the manifest {summary.manifest}", error)


def _manifest_note(summary: RunSummary) -> str:
    if summary.manifest_written:
        return f"manifest written to {summary.manifest}"
    return f"{summary.manifest} left as it was (this run wrote no image)"


def outcome(summary: RunSummary, error: DigsegError | None) -> RunSummary:
    """The summary of a run that ended by itself; an interrupted, out-of-memory or output-error run raises,
    carrying it."""
    if summary.status == "interrupted":
        error = InterruptedRunError(
            f"interrupted after {summary.processed} of {summary.total} images; "
            f"{_manifest_note(summary)} (resume with --skip-existing)"
        )
    if error is not None:
        error.summary = summary  # type: ignore[attr-defined]
        raise error
    return summary
