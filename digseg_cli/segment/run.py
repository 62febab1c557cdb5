"""Folder runs of `digseg segment`: inputs in, per-image label maps, overlays and probabilities out.

One job: run a `DigsegPipeline` on each input (from `inputs.expand_inputs`) with an order-independent seed,
back off on out-of-memory, hand the outputs to a background thread for writing and record a `run.json`
manifest (also when interrupted).

It knows nothing of Typer, Rich or how results are shown: it reports through the `progress` and `on_result`
callbacks and `logging.getLogger("digseg")`. What the settings resolve to is `settings.py`'s job, loading the
model `loading.py`'s, a run without the model (`--dry-run`) `plan.py`'s, finding the input files `inputs.py`'s,
decoding and encoding pixels `inference/images.py`'s, naming and writing the outputs, the per-image records and
the manifest `outputs.py`'s.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from digseg_cli.errors import DigsegError, InterruptedRunError, OutOfMemoryError
from digseg_cli.inference import images
from digseg_cli.segment.inputs import InputFile, expand_inputs, header_size, image_seed
from digseg_cli.segment.outputs import (
    ImageResult,
    RunOrigin,
    RunSummary,
    Segmented,
    existing_verdict,
    output_paths,
    peak_memory,
    write_manifest,
    write_outputs,
)
from digseg_cli.segment.plan import count_tiles
from digseg_cli.segment.settings import ResolvedRun, SegmentSettings, resolve_run

if TYPE_CHECKING:
    from digseg_cli.inference.pipeline import DigsegPipeline, Prompt, SegmentationOutput

log = logging.getLogger("digseg")

ProgressFn = Callable[[int, int, "str | None"], None]  # (done, total, current relative path or None)


# ------------------------------------------------------------------------------------------------- inputs
def _read(path: Path, max_pixels: int) -> tuple[Any, float]:
    """Decode one image (worker thread), refusing it before decoding when it is over `max_pixels`."""
    t0 = time.perf_counter()

    def check(w: int, h: int) -> None:
        if max_pixels and w * h > max_pixels:
            raise images.ImageReadError(
                path,
                f"{w}x{h} is {w * h / 1e6:.1f} MP, over --max-pixels {max_pixels / 1e6:g}"
                " MP: downscale it or raise --max-pixels (0 = no limit)",
            )

    try:
        size = header_size(path)  # refuse before decoding
    except Exception:  # noqa: BLE001 - read_image below names the problem precisely
        size = None
    if size is not None:
        check(*size)
    array = images.read_image(path)  # [H,W,3] uint8, EXIF orientation applied
    check(array.shape[1], array.shape[0])
    return array, time.perf_counter() - t0


def _input_files(inputs: Sequence[InputFile | str | Path], out_dir: Path, settings: SegmentSettings) -> list[InputFile]:
    """`InputFile`s as given, or raw paths/globs/`@lists` expanded (the output folder left out)."""
    files = list(inputs)
    if not files or not all(isinstance(f, InputFile) for f in files):
        files = expand_inputs([str(f) for f in files], recursive=settings.recursive, exclude=out_dir)
    return files


# ------------------------------------------------------------------------------------------ out of memory
def _smaller_tile(pipe: DigsegPipeline, tile: int | str, resolution: int | None, h: int, w: int) -> int | None:
    """The next tile size to try after an OOM: half the current tile (or of the processing size)."""
    from digseg_cli.core.transforms import tile_size_for

    res = pipe.config.default_resolution if resolution is None else resolution
    multiple = getattr(pipe.model, "size_multiple", 8)
    current = tile_size_for(tile, res, h, w)
    base = min(current or res or max(h, w), max(h, w))
    smaller = base // 2 // multiple * multiple
    return smaller if smaller >= 4 * multiple else None


def _pairs_in_use(pipe: DigsegPipeline, tile: int | str, call: Mapping[str, Any], h: int, w: int, n_texts: int) -> int:
    """How many (tile, prompt) pairs one U-Net call holds for this image: at most `batch_size`."""
    res = pipe.config.default_resolution if call.get("resolution") is None else call["resolution"]
    return min(pipe.batch_size, n_texts * count_tiles(h, w, tile, res, call.get("overlap", 0.25)))


def _infer(
    pipe: DigsegPipeline,
    image: np.ndarray,
    prompts: Sequence[Prompt],
    call: Mapping[str, Any],
    *,
    tile: int | str,
    rel: str,
    notes: list[str],
) -> SegmentationOutput:
    """Run the pipeline; on CUDA/MPS out-of-memory halve the batch, then tile smaller and smaller. What the
    pipeline changed on its own (fp32 after an overflow) joins `notes` too."""
    from digseg_cli.errors import is_out_of_memory

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


def _segmented(image: np.ndarray, out: SegmentationOutput, mode: str) -> Segmented:
    """The pipeline's tensors as the arrays the outputs and records are made of."""
    probs = out.probs.float().numpy()  # [K,H,W] in [0,1]
    labels = out.labels.numpy().astype(np.uint8)  # [H,W], 0 = background, k = class k
    if mode == "multilabel":
        regions = out.masks.numpy()  # [K,H,W] bool, each class thresholded alone
    else:
        regions = labels[None] == np.arange(1, len(probs) + 1, dtype=np.uint8)[:, None, None]  # [K,H,W]
    return Segmented(image, probs, labels, regions)


# ----------------------------------------------------------------------------------------------- the run
def run_segment(
    inputs: Sequence[InputFile | str | Path],
    out_dir: str | Path,
    pipe: DigsegPipeline,
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
    files = _input_files(inputs, out_dir, settings)
    resolved = resolve_run(pipe, settings)
    if settings.batch_size:
        pipe.batch_size = settings.batch_size
    run = _FolderRun(pipe, settings, resolved, files, out_dir, progress=progress, on_result=on_result)
    sha_job = run.start_sha256(weights_folder)
    error: DigsegError | None = None
    try:
        run.segment_all()
    except KeyboardInterrupt:
        run.summary.status = "interrupted"
    except OutOfMemoryError as exc:
        run.summary.status, error = "out-of-memory", exc
    finally:
        sha = run.finish(sha_job, t_start)
        origin = RunOrigin(started, weights, weights_folder, sha, arguments)
        write_manifest(run.summary, settings, resolved, pipe, origin)
    return _outcome(run.summary, error)


def _outcome(summary: RunSummary, error: DigsegError | None) -> RunSummary:
    """The summary of a run that ended by itself; an interrupted or out-of-memory run raises, carrying it."""
    if summary.status == "interrupted":
        error = InterruptedRunError(
            f"interrupted after {summary.processed} of {summary.total} images; "
            f"manifest written to {summary.manifest} (resume with --skip-existing)"
        )
    if error is not None:
        error.summary = summary  # type: ignore[attr-defined]
        raise error
    return summary


class _FolderRun:
    """One run's moving parts: inputs read ahead on worker threads, results waiting in input order for their
    writes, and the summary they are counted in."""

    def __init__(
        self,
        pipe: DigsegPipeline,
        settings: SegmentSettings,
        resolved: ResolvedRun,
        files: list[InputFile],
        out_dir: Path,
        *,
        progress: ProgressFn | None,
        on_result: Callable[[ImageResult], None] | None,
    ) -> None:
        self.pipe, self.settings, self.resolved, self.files, self.out_dir = pipe, settings, resolved, files, out_dir
        self.progress, self.on_result = progress, on_result
        self.summary = RunSummary(out_dir, out_dir / "run.json", len(files))
        self.pool = ThreadPoolExecutor(settings.workers + 1, thread_name_prefix="digseg-io")
        self.jobs: dict[int, tuple[dict, Future | None, tuple[str, str] | None]] = {}  # read-aheads by index
        self.pending: deque[tuple[ImageResult, Future | None]] = deque()  # results and their write jobs
        self.stop = False  # --fail-fast after a failure

    def start_sha256(self, weights_folder: str | Path | None) -> Future | None:
        """Digest the weights for the manifest on a worker thread while the run goes on."""
        if weights_folder is None:
            return None
        from digseg_cli.weights.store import weights_sha256

        return self.pool.submit(weights_sha256, weights_folder)

    def segment_all(self) -> None:
        """Each input in order: read ahead, segment or skip it, hand on what has been written."""
        for i, item in enumerate(self.files):
            if self.stop:
                self.summary.status = "stopped"
                break
            for j in range(i, i + self.settings.workers + 1):
                self.schedule(j)
            self.report(str(item.rel))
            self.pending.append(self.segment_or_skip(i, item))
            self.flush(block=False)
        else:
            self.summary.status = "completed"

    def schedule(self, i: int) -> None:
        """Decide input `i`'s fate from its existing outputs, else start reading it."""
        if i < len(self.files) and i not in self.jobs:
            paths = output_paths(self.out_dir, self.files[i], self.resolved.classes, self.settings)
            verdict = existing_verdict(paths, self.settings)
            job = None if verdict else self.pool.submit(_read, self.files[i].path, self.settings.max_pixels)
            self.jobs[i] = paths, job, verdict

    def segment_or_skip(self, i: int, item: InputFile) -> tuple[ImageResult, Future | None]:
        paths, job, verdict = self.jobs.pop(i)
        result = ImageResult(str(item.path), str(item.rel))
        if verdict is not None:
            result.status, result.reason = verdict
            return result, None
        return result, self.segment_one(item, job, paths, result)

    def segment_one(self, item: InputFile, job: Future, paths: dict, result: ImageResult) -> Future | None:
        """Read, segment and queue the writes of one image; fills `result`; returns the write job."""
        if (read := self._image(job, result)) is None:
            return None
        image, read_s = read
        result.height, result.width = image.shape[:2]
        result.seed = image_seed(self.settings.seed, item.rel)
        t0 = time.perf_counter()
        try:
            out = _infer(
                self.pipe,
                image,
                self.resolved.prompts,
                {**self.resolved.call, "seed": result.seed},
                tile=self.settings.tile,
                rel=str(item.rel),
                notes=result.warnings,
            )
        except DigsegError:
            raise  # a usage error holds for every image; out-of-memory after back-off ends the run
        except Exception as exc:  # noqa: BLE001 - one image must not end a 10k-image run
            log.debug("segmentation of %s failed", item.rel, exc_info=True)
            result.fail(f"segmentation failed: {type(exc).__name__}: {exc}")
            return None
        self.summary.backoffs.extend(result.warnings)
        model_s = time.perf_counter() - t0
        self.summary.timings["model_s"] += model_s
        seg = _segmented(image, out, self.settings.mode)
        result.classes = seg.class_records(self.resolved, out.thresholds)
        result.outputs = {
            key: ({n: str(p) for n, p in v.items()} if isinstance(v, Mapping) else str(v)) for key, v in paths.items()
        }
        result.timings = {"read": read_s, "model": model_s, **{k: v for k, v in out.timings.items() if k != "total"}}
        return self.pool.submit(write_outputs, paths, seg, self.resolved, self.settings)

    def _image(self, job: Future, result: ImageResult) -> tuple[np.ndarray, float] | None:
        """The decoded image `[H,W,3]` uint8 and its read time, or None with `result` failed."""
        try:
            image, read_s = job.result()
        except images.ImageReadError as exc:
            result.fail(exc.reason)
            return None
        except Exception as exc:  # MemoryError on a huge file, a decoder bug...
            result.fail(f"cannot read: {type(exc).__name__}: {exc}")
            return None
        self.summary.timings["read_s"] += read_s
        return image, read_s

    def flush(self, block: bool) -> None:
        """Hand finished results on, in input order: all of them when `block`, else those written or overdue."""
        while self.pending and (
            block
            or self.pending[0][1] is None
            or self.pending[0][1].done()
            or len(self.pending) > self.settings.workers
        ):
            result, job = self.pending.popleft()
            if job is not None:
                try:
                    result.timings["write"] = job.result()
                    self.summary.timings["write_s"] += result.timings["write"]
                except (OSError, ValueError, DigsegError) as exc:
                    result.fail(f"cannot write outputs: {exc}")
            self.count(result)
            if self.on_result is not None:
                self.on_result(result)
            self.report(None)

    def count(self, result: ImageResult) -> None:
        summary = self.summary
        if result.status == "ok":
            summary.processed += 1
        elif result.status == "skipped":
            summary.skipped += 1
        else:
            summary.failed.append((result.relative_path, result.reason or "unknown error"))
            log.debug("failed: %s: %s", result.relative_path, result.reason)
            self.stop = self.stop or self.settings.fail_fast

    def report(self, current: str | None) -> None:
        if self.progress is not None:
            s = self.summary
            self.progress(s.processed + s.skipped + len(s.failed), s.total, current)

    def finish(self, sha_job: Future | None, t_start: float) -> str | None:
        """Stop reading ahead, hand on what is done and measure the run; the weights' digest, when it is ready
        (an interrupted run does not wait for it)."""
        for _, job, _ in self.jobs.values():
            if job is not None:
                job.cancel()
        self.flush(block=True)
        summary = self.summary
        if self.stop and summary.status == "completed":
            summary.status = "stopped"
        summary.wall_s = time.perf_counter() - t_start
        summary.peak_memory_bytes, summary.peak_memory_kind = peak_memory(getattr(self.pipe, "device", None))
        sha = None
        if sha_job is not None and (sha_job.done() or summary.status != "interrupted"):
            try:
                sha = sha_job.result()
            except OSError as exc:
                sha = f"unavailable ({exc})"
        self.pool.shutdown(wait=summary.status != "interrupted", cancel_futures=True)
        return sha
