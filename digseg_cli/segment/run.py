"""Folder runs of `digseg segment`: inputs in, per-image label maps, overlays and probabilities out.

One job: run a `DigsegPipeline` on each input (from `inputs.expand_inputs`) with an order-independent seed,
back off on out-of-memory (`backoff.py`), hand the outputs to background threads for writing, stop cleanly on
SIGINT/SIGTERM or a full disk, and record a `run.json` manifest (`manifest.py`) on every path.

It knows nothing of Typer, Rich or how results are shown: it reports through the `progress` and `on_result`
callbacks and `logging.getLogger("digseg")`. What the settings resolve to is `settings.py`'s job, loading the
model `loading.py`'s, a run without the model (`--dry-run`) `plan.py`'s, finding the input files `inputs.py`'s,
decoding and encoding pixels `inference/images.py`'s, naming and writing the outputs and the per-image records
`outputs.py`'s, the checks before the first image `preflight.py`'s, the manifest `manifest.py`'s, the run's
`sem_seg_predictions.json` (`--rle`) `rle.py`'s, which pictures share a model call (on a GPU) `groups.py`'s.
"""

from __future__ import annotations

import errno
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from digseg_cli.errors import DigsegError, OutOfMemoryError, OutputUnwritableError
from digseg_cli.inference import images
from digseg_cli.inference.stopping import BackgroundPool, StopSignals
from digseg_cli.inference.warmup import warm_up
from digseg_cli.segment import groups
from digseg_cli.segment.backoff import infer
from digseg_cli.segment.georun import raster_job
from digseg_cli.segment.inputs import InputFile, image_seed, read_input
from digseg_cli.segment.manifest import (
    MANIFEST_NAME,
    RunOrigin,
    describe,
    outcome,
    peak_memory,
    record_run,
    written,
)
from digseg_cli.segment.outputs import (
    ImageResult,
    RunSummary,
    Segmented,
    existing_verdict,
    write_outputs,
)
from digseg_cli.segment.preflight import output_paths_of, prepare_run
from digseg_cli.segment.rasters import RasterInfo
from digseg_cli.segment.rle import RleFile
from digseg_cli.segment.settings import ResolvedRun, SegmentSettings, resolve_run

if TYPE_CHECKING:
    from digseg_cli.inference.pipeline import DigsegPipeline
    from digseg_cli.segment.shard import Shard

log = logging.getLogger("digseg")

ProgressFn = Callable[[int, int, "str | None"], None]  # (done, total, current relative path or None)
# A write failing so says every later write will: the run stops at the first one.
_OUTPUT_GONE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


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
    shard: Shard | None = None,
) -> RunSummary:
    """Segment every input with `pipe` and write outputs under `out_dir`, mirroring the input tree.

    `inputs` are `InputFile`s from `expand_inputs`, or raw paths/globs/`@lists` expanded here. Before the first
    image: no two inputs may write one file, the folder must take files, and a `run.json` already there must
    be of the same run (`manifest.continue_or_refuse`). Per input, `on_result` gets an `ImageResult` (in input
    order) and `progress(done, total, current)` is called. A file that cannot be read, is too large or whose
    outputs exist (without `overwrite`) fails alone and the run goes on (`fail_fast` stops it). `run.json` is
    written at the end, also after SIGINT/SIGTERM (then `InterruptedRunError`), out-of-memory after back-off
    (`OutOfMemoryError`) and a full disk (`OutputUnwritableError`); each carries `.summary`.

    `shard` (`shard.join_shard`, under `accelerate launch`/`torchrun`): this process segments its share of the
    inputs; the first process gets every rank's records (`on_result`, in input order, once all have finished)
    and writes `run.json` for the whole run; every process returns (or raises with) the merged summary.
    """
    out_dir = Path(out_dir)
    started, t_start = datetime.now(timezone.utc), time.perf_counter()
    resolved = resolve_run(pipe, settings)
    origin = RunOrigin(started, weights, weights_folder, None, arguments)

    def prepare() -> tuple[list[InputFile], dict | None, list[dict], RleFile | None]:
        return prepare_run(inputs, out_dir, pipe, settings, resolved, origin)

    # Many processes: every rank checks, none starts before all have passed (`Shard.agree`); then its share.
    files, previous, earlier, rle = prepare() if shard is None else shard.agree(prepare)
    if settings.batch_size:
        pipe.batch_size = settings.batch_size
    records: list[ImageResult] = []  # many processes: this rank's, for the first to hand on in input order
    mine, report = (files, on_result) if shard is None else (shard.mine(files), records.append)
    run = _FolderRun(pipe, settings, resolved, mine, out_dir, progress=progress, on_result=report, rle=rle)
    sha_job = run.start_sha256(weights_folder if shard is None or shard.main else None)
    error: BaseException | None = None
    with StopSignals() as run.signals:
        try:
            run.segment_all()
        except KeyboardInterrupt:
            run.summary.status = "interrupted"
        except OutOfMemoryError as exc:
            run.summary.status, error = "out-of-memory", exc
        except Exception as exc:
            if shard is None:
                raise
            run.summary.status, error = "error", exc  # the other ranks hear of it before it is raised
        finally:
            origin = RunOrigin(started, weights, weights_folder, run.finish(sha_job, t_start), arguments)
            error, summary = error or run.output_error(), run.summary
            if shard is not None:
                error = shard.combine(summary, records, error, files, rle=rle, on_result=on_result)
            if shard is None or shard.main:
                if rle is not None:  # this run's records, once (a run that changed none leaves the file as it was)
                    error = written(lambda: rle.write([str(f.rel) for f in files]), str(rle.path), error)
                head = describe(settings, resolved, pipe, origin)
                error = record_run(summary, head, earlier, previous is not None, error)
            if shard is not None:
                summary, error = shard.share(summary, error)
    return outcome(summary, error)


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
        rle: RleFile | None = None,
    ) -> None:
        self.pipe, self.settings, self.resolved, self.files, self.out_dir = pipe, settings, resolved, files, out_dir
        self.progress, self.on_result = progress, on_result
        self.summary = RunSummary(out_dir, out_dir / MANIFEST_NAME, len(files))
        # Daemon threads, ended by `finish` on every path: a stuck read cannot keep the process alive.
        self.pool = BackgroundPool(settings.workers + 1, "digseg-io")
        self.digest = BackgroundPool(1, "digseg-sha256")  # not waited for when the run is interrupted
        self.signals = StopSignals()  # replaced by the entered one in `run_segment`
        self.jobs: dict[int, tuple[dict, Future | None, tuple[str, str] | None]] = {}  # read-aheads by index
        self.pending: deque[tuple[ImageResult, Future | None]] = deque()  # results and their write jobs
        self.stop = False  # --fail-fast after a failure
        self.unwritable: tuple[str, OSError] | None = None  # (input, error) of the first write the disk refused
        self.rle = rle  # --rle: the run's sem_seg_predictions.json, records taken as images are written
        self.batch_sized = False  # whether `--batch-size auto` has been sized (`groups.py`, on a GPU)
        self.warmup_s: float | None = None  # --compile's warm-up seconds once `model_ready` made it

    def start_sha256(self, weights_folder: str | Path | None) -> Future | None:
        """Digest the weights for the manifest on a worker thread while the run goes on."""
        if weights_folder is None:
            return None
        from digseg_cli.weights.store import weights_sha256

        return self.digest.submit(weights_sha256, weights_folder)

    def model_ready(self) -> None:
        """Before the model's first image, once: --compile's calls that compile (`warm_up`; none when every
        input is skipped). The run's wall time leaves them out; run.json's `compile.warmup_s` has them."""
        if self.warmup_s is None:
            self.warmup_s = warm_up(self.pipe, self.resolved.prompts, self.resolved.call)

    def segment_all(self) -> None:
        """The inputs in order: read ahead, segment (equal-size pictures several per call, `groups.py`) or skip
        them, hand on what has been written."""
        i = 0
        while i < len(self.files):
            if self.signals.requested:  # SIGINT or SIGTERM: the images in hand are done, stop here
                self.summary.status = "interrupted"
                break
            if self.unwritable is not None:
                self.summary.status = "output-error"
                break
            if self.stop:
                self.summary.status = "stopped"
                break
            for j in range(i, i + self.settings.workers + 1):
                self.schedule(j)
            group = groups.group_from(self, i)
            for j in group:
                self.report(str(self.files[j].rel))
            if len(group) == 1:
                self.pending.append(self.segment_or_skip(i, self.files[i]))
            else:
                self.pending.extend(groups.segment_group(self, group))
            self.flush(block=False)
            i += len(group)
        else:
            self.summary.status = "completed"

    def schedule(self, i: int) -> None:
        """Decide input `i`'s fate from its existing outputs, else start reading it."""
        if i < len(self.files) and i not in self.jobs:
            paths = output_paths_of(self.out_dir, self.files[i], self.resolved, self.settings)
            verdict = existing_verdict(paths, self.settings)
            job = None if verdict else self.pool.submit(read_input, self.files[i].path, self.settings)
            self.jobs[i] = paths, job, verdict

    def segment_or_skip(self, i: int, item: InputFile) -> tuple[ImageResult, Future | None]:
        paths, job, verdict = self.jobs.pop(i)
        result = ImageResult(str(item.path), str(item.rel))
        if verdict is not None:
            result.status, result.reason = verdict
            if self.rle is not None and result.status == "skipped":
                try:
                    self.rle.keep_skipped(str(item.rel), paths["mask"])
                except images.ImageReadError as exc:
                    log.warning("no RLE records for %s: %s", item.rel, exc)
            return result, None
        return result, self.segment_one(item, job, paths, result)

    def describe(self, item: InputFile, paths: dict, result: ImageResult) -> None:
        """What `result` records before its image is segmented: its seed and the files it will write."""
        result.seed = image_seed(self.settings.seed, item.rel)
        result.outputs = {
            key: ({n: str(p) for n, p in v.items()} if isinstance(v, Mapping) else str(v)) for key, v in paths.items()
        }
        if self.rle is not None:
            result.outputs["rle"] = str(self.rle.path)

    def segment_one(self, item: InputFile, job: Future, paths: dict, result: ImageResult) -> Future | None:
        """Read, segment and queue the writes of one image; fills `result`; returns the write job."""
        if (read := self._image(job, result)) is None:
            return None
        image, read_s = read
        self.describe(item, paths, result)
        self.model_ready()
        t0 = time.perf_counter()
        try:
            if isinstance(image, RasterInfo):  # segmented and written block by block, here
                result.timings["read"], run = read_s, (self.resolved, self.settings)
                job = raster_job(self.pipe, image, paths, result, run=run, stop=self.stop_asked, rle=self.rle)
                self.summary.timings["read_s"] += result.timings["read"] - read_s
                self.summary.timings["model_s"] += result.timings.get("model", 0.0)
                return job
            result.height, result.width = image.shape[:2]
            out = infer(
                self.pipe,
                image,
                self.resolved.prompts,
                {**self.resolved.call, "seed": result.seed},
                tile=self.settings.tile,
                rel=str(item.rel),
                notes=result.warnings,
            )
        except images.ImageReadError as exc:  # a raster's window that cannot be read
            result.fail(exc.reason)
            return None
        except DigsegError:
            raise  # a usage error holds for every image; out-of-memory after back-off ends the run
        except Exception as exc:  # noqa: BLE001 - one image must not end a 10k-image run
            log.debug("segmentation of %s failed", item.rel, exc_info=True)
            result.fail(f"segmentation failed: {type(exc).__name__}: {exc}")
            return None
        finally:
            self.summary.backoffs.extend(result.warnings)
        model_s = time.perf_counter() - t0
        self.summary.timings["model_s"] += model_s
        return self.hand_on(item, image, out, paths, result, timings=(read_s, model_s))

    def hand_on(self, item: InputFile, image, out, paths: dict, result: ImageResult, *, timings) -> Future:
        """A segmented image's classes and timings into `result`, its files queued for writing: the write job."""
        read_s, model_s = timings
        seg = Segmented.from_output(image, out, self.settings.mode)
        result.classes = seg.class_records(self.resolved, out.thresholds)
        result.timings = {"read": read_s, "model": model_s, **{k: v for k, v in out.timings.items() if k != "total"}}
        return self.pool.submit(self._write, paths, seg, item)

    def _write(self, paths: dict, seg: Segmented, item: InputFile) -> float:
        """Write one image's files, then take its RLE records (worker thread); the seconds it took."""
        t0 = time.perf_counter()
        write_outputs(paths, seg, self.resolved, self.settings, str(item.path))
        if self.rle is not None:
            self.rle.put(str(item.rel), seg.labels)
        return time.perf_counter() - t0

    def stop_asked(self) -> bool:
        return bool(self.signals.requested)

    def _image(self, job: Future, result: ImageResult) -> tuple[np.ndarray | RasterInfo, float] | None:
        """The decoded image `[H,W,3]` uint8 (or an opened GeoTIFF) and its read time, or None with `result` failed."""
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
                except OSError as exc:
                    result.fail(f"cannot write outputs: {exc.strerror or exc}")
                    if exc.errno in _OUTPUT_GONE and self.unwritable is None:
                        self.unwritable = result.relative_path, exc
                except (ValueError, DigsegError) as exc:
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
        """Stop reading ahead, hand on what is done, end the I/O threads and measure the run; the weights'
        digest, when it is ready (an interrupted run does not wait for it)."""
        for _, job, _ in self.jobs.values():
            if job is not None:
                job.cancel()
        try:
            self.flush(block=True)
        finally:
            self.pool.shutdown(wait_queued=False, timeout=30)  # queued reads cancelled; a running one ends
        summary = self.summary
        if summary.status == "completed" and (self.stop or self.unwritable is not None):
            summary.status = "output-error" if self.unwritable is not None else "stopped"
        summary.wall_s = time.perf_counter() - t_start - (self.warmup_s or 0.0)
        summary.peak_memory_bytes, summary.peak_memory_kind = peak_memory(getattr(self.pipe, "device", None))
        sha = None
        if sha_job is not None and (sha_job.done() or summary.status != "interrupted"):
            try:
                sha = sha_job.result()
            except OSError as exc:
                sha = f"unavailable ({exc})"
        self.digest.shutdown(wait_queued=False, timeout=None if sha_job is None or sha_job.done() else 0)
        return sha

    def output_error(self) -> OutputUnwritableError | None:
        """The error that ends a run whose output folder stopped taking files, or None."""
        if self.unwritable is None:
            return None
        rel, exc = self.unwritable
        s = self.summary
        return OutputUnwritableError(
            f"{exc.strerror or exc} writing the outputs of {rel} in {self.out_dir}: stopped after {s.processed} "
            f"of {s.total} images; free space (or choose another --out) and rerun with --skip-existing"
        )
