"""Folder runs of `digseg segment`: inputs in, per-image label maps, overlays and probabilities out.

One job: run a `DigsegPipeline` on each input (from `inputs.expand_inputs`) with an order-independent seed,
back off on out-of-memory, hand the outputs to a background thread for writing and record a `run.json`
manifest (also when interrupted); plan a run without the model for `--dry-run`.

It knows nothing of Typer, Rich or how results are shown: it reports through the `progress` and `on_result`
callbacks and `logging.getLogger("digseg")`. Parsing prompts is `prompts.py`'s job, finding the input files
`inputs.py`'s, decoding and encoding pixels `images.py`'s, naming and writing the outputs, the per-image
records and the manifest `segment_outputs.py`'s.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from digseg_cli.inference import images
from digseg_cli.models.config import DECODERS
from digseg_cli.errors import DigsegError, InterruptedRunError, OutOfMemoryError, UsageError
from digseg_cli.segment.inputs import InputFile, expand_inputs, header_size, image_seed
from digseg_cli.inference.prompts import PromptClass, classes_from_config
from digseg_cli.segment.outputs import (
    ImageResult,
    RunSummary,
    existing_verdict,
    output_paths,
    peak_memory,
    write_manifest,
    write_outputs,
)

log = logging.getLogger("digseg")

MODES = ("semantic", "multilabel")
PROBS_FORMATS = ("png16", "npy")
ProgressFn = Callable[[int, int, "str | None"], None]  # (done, total, current relative path or None)


# ----------------------------------------------------------------------------------------------- settings
def parse_tile(text: str | int | None) -> str | int:
    """`auto|off|N` → "auto", "off" or a tile size in pixels."""
    value = str(text if text is not None else "auto").strip().lower()
    if value in ("auto", "off"):
        return value
    if not value.isdigit() or int(value) < 8:
        raise UsageError(f"`--tile` must be auto, off or a size in pixels (≥ 8), got {text!r}")
    return int(value)


@dataclass(frozen=True)
class SegmentSettings:
    """Everything a folder run needs besides the model. `None` values resolve to the checkpoint's defaults;
    empty `classes` means the checkpoint's own class list (closed-set models)."""

    classes: tuple[PromptClass, ...] = ()
    thresholds: Mapping[str, float] = field(default_factory=dict)  # per-class overrides by class name
    threshold: float | None = None  # for classes without their own
    steps: int | None = None
    ensemble: int | None = None
    resolution: int | None = None
    mode: str = "semantic"  # semantic: argmax + threshold; multilabel: each class alone (+ binary masks)
    seed: int = 0
    tile: int | str = "auto"
    decoder: str = "auto"  # vae | fast | auto (fast when the checkpoint's distilled decoder passed its check)
    overlap: float = 0.25
    max_pixels: int = 100_000_000  # 0 = no limit
    prompt_template: str | None = None
    recursive: bool = False
    overlay: bool = True
    overlay_alpha: float = 0.5
    save_binary: bool = False
    save_probs: bool = False
    probs_format: str = "png16"
    overwrite: bool = False
    skip_existing: bool = False
    fail_fast: bool = False
    batch_size: int | None = None  # (tile, prompt) pairs per U-Net call; None = the pipeline's
    workers: int = 2  # I/O threads: reading ahead and writing behind
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"`mode` must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.decoder not in DECODERS:
            raise UsageError(f"`decoder` must be one of {', '.join(DECODERS)}, got {self.decoder!r}")
        if self.probs_format not in PROBS_FORMATS:
            raise UsageError(f"`probs_format` must be one of {', '.join(PROBS_FORMATS)}, got {self.probs_format!r}")
        if self.overwrite and self.skip_existing:
            raise UsageError("`--overwrite` and `--skip-existing` contradict each other: pick one")
        if not 0 <= self.overlap < 1:
            raise UsageError(f"`overlap` must be in [0, 1), got {self.overlap}")
        if not 0 <= self.overlay_alpha <= 1:
            raise UsageError(f"`overlay_alpha` must be in [0, 1], got {self.overlay_alpha}")
        if self.max_pixels < 0 or self.workers < 1 or (self.batch_size is not None and self.batch_size < 1):
            raise UsageError("`max_pixels` must be ≥ 0 (0 = no limit), `workers` and `batch_size` ≥ 1")
        if len(self.classes) > 255:
            raise UsageError(f"at most 255 classes fit a label PNG, got {len(self.classes)}")
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise UsageError(f"`threshold` must be in [0, 1], got {self.threshold}")
        parse_tile(self.tile)

    def resolve_classes(self, config_classes: Sequence[Mapping] | None = None) -> list[PromptClass]:
        """The classes to run, per-class thresholds applied; the checkpoint's own when none were given."""
        classes = list(self.classes) or classes_from_config(config_classes)
        if not classes:
            raise UsageError("no classes to segment: pass --prompt \"road, tree\" or --prompts classes.yaml "
                             "(this model has no built-in class list)")
        by_name = {c.name: c for c in classes}
        for name, value in self.thresholds.items():
            if name not in by_name:
                hint = difflib.get_close_matches(name, by_name, 1)
                known = f"; did you mean {hint[0]!r}?" if hint else f"; classes: {', '.join(by_name)}"
                raise UsageError(f"`--threshold {name}=…` names no class{known}")
            by_name[name] = dataclasses.replace(by_name[name], threshold=value)
        return list(by_name.values())


# ------------------------------------------------------------------------------------------------- inputs
def _read(path: Path, max_pixels: int) -> tuple[Any, float]:
    """Decode one image (worker thread), refusing it before decoding when it is over `max_pixels`."""
    t0 = time.perf_counter()

    def check(w: int, h: int) -> None:
        if max_pixels and w * h > max_pixels:
            raise images.ImageReadError(path, f"{w}x{h} is {w * h / 1e6:.1f} MP, over --max-pixels {max_pixels / 1e6:g}"
                                              " MP: downscale it or raise --max-pixels (0 = no limit)")

    try:
        size = header_size(path)  # refuse before decoding
    except Exception:  # noqa: BLE001 - read_image below names the problem precisely
        size = None
    if size is not None:
        check(*size)
    array = images.read_image(path)  # [H,W,3] uint8, EXIF orientation applied
    check(array.shape[1], array.shape[0])
    return array, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------ out of memory
def _smaller_tile(pipe, tile: int | str, resolution: int | None, h: int, w: int) -> int | None:
    """The next tile size to try after an OOM: half the current tile (or of the processing size)."""
    from digseg_cli.core.transforms import tile_size_for

    res = pipe.config.default_resolution if resolution is None else resolution
    multiple = getattr(pipe.model, "size_multiple", 8)
    current = tile_size_for(tile, res, h, w)
    base = min(current or res or max(h, w), max(h, w))
    smaller = base // 2 // multiple * multiple
    return smaller if smaller >= 4 * multiple else None


def _pairs_in_use(pipe, tile: int | str, call: dict, h: int, w: int, n_texts: int) -> int:
    """How many (tile, prompt) pairs one U-Net call holds for this image: at most `batch_size`."""
    res = pipe.config.default_resolution if call.get("resolution") is None else call["resolution"]
    return min(pipe.batch_size, n_texts * count_tiles(h, w, tile, res, call.get("overlap", 0.25)))


def _infer(pipe, image, prompts, call: dict, tile: int | str, rel: str, notes: list[str]):
    """Run the pipeline; on CUDA/MPS out-of-memory halve the batch, then tile smaller and smaller. What the
    pipeline changed on its own (fp32 after an overflow) joins `notes` too."""
    from digseg_cli.inference.device import is_out_of_memory

    n_texts = sum(1 if isinstance(p, str) else len(p) for p in prompts)
    while True:
        try:
            out = pipe(image, prompts, tile=tile, **call)
            changes = getattr(pipe, "notes", [])  # e.g. fp32 after an fp16 overflow; the pipeline logged them
            notes.extend(f"{note} (on {rel})" for note in changes)
            changes.clear()
            return out
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            h, w = image.shape[:2]
            if (in_use := _pairs_in_use(pipe, tile, call, h, w, n_texts)) > 1:
                pipe.batch_size = in_use // 2  # sticky for the rest of the run
                note = f"out of memory on {rel}: U-Net batch lowered to {pipe.batch_size}"
            elif (smaller := _smaller_tile(pipe, tile, call.get("resolution"), h, w)) is not None:
                tile, note = smaller, f"out of memory on {rel}: tiled inference with {smaller} px tiles"
            else:
                raise OutOfMemoryError(
                    f"out of memory on {pipe.device} for {rel} ({w}x{h}) even with a U-Net batch of 1 and small "
                    "tiles: try --resolution 256, --tile 256, --precision bf16/fp16, --ensemble 1, fewer classes "
                    "per run, or --device cpu"
                ) from None
            log.warning("%s", note)
            notes.append(note)


# ----------------------------------------------------------------------------------------------- the run
def run_segment(
    inputs: Sequence[InputFile | str | Path],
    out_dir: str | Path,
    pipe,
    settings: SegmentSettings,
    *,
    progress: ProgressFn | None = None,
    on_result: Callable[[ImageResult], None] | None = None,
    weights: str | None = None,
    weights_folder: str | Path | None = None,
    arguments: Mapping[str, Any] | None = None,
) -> RunSummary:
    """Segment every input with `pipe` and write outputs under `out_dir`, mirroring the input tree.

    `inputs` are `InputFile`s from `expand_inputs`, or raw paths/globs/`@lists` expanded here. Per input,
    `on_result` gets an `ImageResult` (in input order) and `progress(done, total, current)` is called.
    A file that cannot be read, is too large or whose outputs exist (without `overwrite`) fails alone and
    the run goes on (`fail_fast` stops it). `run.json` is written at the end, also on Ctrl-C (then
    `InterruptedRunError`) and on out-of-memory after back-off (`OutOfMemoryError`); both carry `.summary`.
    """
    out_dir = Path(out_dir)
    started, t_start = datetime.now(timezone.utc), time.perf_counter()
    files = list(inputs)
    if not files or not all(isinstance(f, InputFile) for f in files):
        files = expand_inputs([str(f) for f in files], recursive=settings.recursive, exclude=out_dir)
    # 0. Resolve classes, thresholds, colours and the pipeline's arguments once.
    classes = settings.resolve_classes(pipe.config.classes)
    default_thr = pipe.config.default_threshold if settings.threshold is None else settings.threshold
    thresholds = [default_thr if c.threshold is None else c.threshold for c in classes]
    prompts = [c.texts[0] if len(c.texts) == 1 else list(c.texts) for c in classes]
    names = [c.name for c in classes]
    palette = [(0, 0, 0)] + [c.color or d for c, d in zip(classes, images.default_palette(len(classes) + 1)[1:])]
    call = dict(steps=settings.steps, ensemble=settings.ensemble, resolution=settings.resolution,
                threshold=thresholds, overlap=settings.overlap, prompt_template=settings.prompt_template,
                decoder=pipe.resolve_decoder(settings.decoder))
    if settings.batch_size:
        pipe.batch_size = settings.batch_size
    summary = RunSummary(out_dir, out_dir / "run.json", len(files))
    totals = {"read_s": 0.0, "model_s": 0.0, "write_s": 0.0}
    pool = ThreadPoolExecutor(settings.workers + 1, thread_name_prefix="digseg-io")
    sha_job = None
    if weights_folder is not None:
        from digseg_cli.weights.store import weights_sha256

        sha_job = pool.submit(weights_sha256, weights_folder)
    jobs: dict[int, tuple[dict, Future | None, tuple[str, str] | None]] = {}
    pending: deque[tuple[ImageResult, Future | None]] = deque()
    stop = False

    def schedule(i: int) -> None:  # decide from existing outputs, else start reading ahead
        if i < len(files) and i not in jobs:
            paths = output_paths(out_dir, files[i], classes, settings)
            verdict = existing_verdict(paths, settings)
            jobs[i] = paths, None if verdict else pool.submit(_read, files[i].path, settings.max_pixels), verdict

    def flush(block: bool) -> None:  # hand finished results on, in input order
        nonlocal stop
        while pending and (block or pending[0][1] is None or pending[0][1].done() or len(pending) > settings.workers):
            result, job = pending.popleft()
            if job is not None:
                try:
                    result.timings["write"] = job.result()
                    totals["write_s"] += result.timings["write"]
                except (OSError, ValueError, DigsegError) as exc:
                    result.fail(f"cannot write outputs: {exc}")
            if result.status == "ok":
                summary.processed += 1
            elif result.status == "skipped":
                summary.skipped += 1
            else:
                summary.failed.append((result.relative_path, result.reason or "unknown error"))
                log.debug("failed: %s: %s", result.relative_path, result.reason)
                stop = stop or settings.fail_fast
            if on_result is not None:
                on_result(result)
            if progress is not None:
                progress(summary.processed + summary.skipped + len(summary.failed), summary.total, None)

    error: BaseException | None = None
    try:
        for i, item in enumerate(files):
            if stop:
                summary.status = "stopped"
                break
            for j in range(i, i + settings.workers + 1):
                schedule(j)
            paths, job, verdict = jobs.pop(i)
            if progress is not None:
                progress(summary.processed + summary.skipped + len(summary.failed), summary.total, str(item.rel))
            result = ImageResult(str(item.path), str(item.rel))
            write_job = None
            if verdict is not None:
                result.status, result.reason = verdict
            else:
                write_job = _segment_one(pipe, item, job, paths, result, prompts, call, classes, palette, names,
                                         settings, pool, totals, summary.backoffs)
            pending.append((result, write_job))
            flush(block=False)
        else:
            summary.status = "completed"
    except KeyboardInterrupt:
        summary.status = "interrupted"
    except OutOfMemoryError as exc:
        summary.status, error = "out-of-memory", exc
    finally:
        for _, job, _ in jobs.values():
            if job is not None:
                job.cancel()
        flush(block=True)
        if stop and summary.status == "completed":
            summary.status = "stopped"
        summary.wall_s = time.perf_counter() - t_start
        summary.peak_memory_bytes, summary.peak_memory_kind = peak_memory(getattr(pipe, "device", None))
        sha = None
        if sha_job is not None and (sha_job.done() or summary.status != "interrupted"):
            try:
                sha = sha_job.result()
            except OSError as exc:
                sha = f"unavailable ({exc})"
        pool.shutdown(wait=summary.status != "interrupted", cancel_futures=True)
        write_manifest(summary, settings, classes, thresholds, pipe, started=started, totals=totals, weights=weights,
                       weights_folder=weights_folder, sha=sha, arguments=arguments)
    if summary.status == "interrupted":
        exc = InterruptedRunError(f"interrupted after {summary.processed} of {summary.total} images; "
                                  f"manifest written to {summary.manifest} (resume with --skip-existing)")
        exc.summary = summary  # type: ignore[attr-defined]
        raise exc
    if error is not None:
        error.summary = summary  # type: ignore[attr-defined]
        raise error
    return summary


def _segment_one(pipe, item, job, paths, result, prompts, call, classes, palette, names, settings, pool, totals,
                 backoffs) -> Future | None:
    """Read, segment and queue the writes of one image; fills `result`; returns the write job."""
    try:
        image, read_s = job.result()
    except images.ImageReadError as exc:
        result.fail(exc.reason)
        return None
    except Exception as exc:  # MemoryError on a huge file, a decoder bug...
        result.fail(f"cannot read: {type(exc).__name__}: {exc}")
        return None
    totals["read_s"] += read_s
    result.height, result.width = image.shape[:2]
    result.seed = image_seed(settings.seed, item.rel)
    t0 = time.perf_counter()
    try:
        out = _infer(pipe, image, prompts, {**call, "seed": result.seed}, settings.tile, str(item.rel), result.warnings)
    except DigsegError:
        raise  # a usage error holds for every image; out-of-memory after back-off ends the run
    except Exception as exc:  # noqa: BLE001 - one image must not end a 10k-image run
        log.debug("segmentation of %s failed", item.rel, exc_info=True)
        result.fail(f"segmentation failed: {type(exc).__name__}: {exc}")
        return None
    backoffs.extend(result.warnings)
    model_s = time.perf_counter() - t0
    totals["model_s"] += model_s
    probs = out.probs.float().numpy()  # [K,H,W] in [0,1]
    labels = out.labels.numpy().astype(np.uint8)  # [H,W], 0 = background, k = class k
    if settings.mode == "multilabel":
        regions = out.masks.numpy()  # [K,H,W] bool, each class thresholded alone
    else:
        regions = labels[None] == np.arange(1, len(classes) + 1, dtype=np.uint8)[:, None, None]  # [K,H,W]
    for k, c in enumerate(classes):
        area = int(regions[k].sum())
        result.classes.append({
            "name": c.name, "label": k + 1, "threshold": out.thresholds[k], "fraction": area / regions[k].size,
            "mean_confidence": float(probs[k][regions[k]].mean()) if area else None,
        })
    result.outputs = {key: ({n: str(p) for n, p in v.items()} if isinstance(v, Mapping) else str(v))
                      for key, v in paths.items()}
    result.timings = {"read": read_s, "model": model_s, **{k: v for k, v in out.timings.items() if k != "total"}}
    return pool.submit(write_outputs, paths, image, probs, labels, regions, palette, names, settings)


# -------------------------------------------------------------------------------------------- dry run
def count_tiles(height: int, width: int, tile: int | str, resolution: int, overlap: float) -> int:
    """How many windows the pipeline runs for an image (1 = whole image), by the pipeline's own rule."""
    from digseg_cli.core.transforms import tile_size_for, tile_windows

    size = tile_size_for(tile, resolution, height, width)
    return len(tile_windows(height, width, size, overlap)) if size else 1


def plan_segment(files: Sequence[InputFile], out_dir: str | Path, settings: SegmentSettings,
                 classes: Sequence[PromptClass], *, resolution: int) -> list[dict[str, Any]]:
    """What a run would do per input (`--dry-run`), from file headers only: size, tiles, outputs, action."""
    rows = []
    for item in files:
        paths = output_paths(Path(out_dir), item, classes, settings)
        row: dict[str, Any] = {"input": str(item.path), "relative_path": str(item.rel), "mask": str(paths["mask"])}
        try:
            w, h = header_size(item.path)
            row.update(width=w, height=h, tiles=count_tiles(h, w, settings.tile, resolution, settings.overlap))
            too_big = settings.max_pixels and w * h > settings.max_pixels
            verdict = ("failed", "over --max-pixels") if too_big else existing_verdict(paths, settings)
        except images.ImageReadError as exc:
            verdict = ("failed", exc.reason)
        row["action"] = "segment" if verdict is None else f"{verdict[0]}: {verdict[1]}"
        rows.append(row)
    return rows
