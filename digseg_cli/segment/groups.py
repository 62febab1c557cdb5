"""Which of a folder run's images share a model call, and segmenting such a group.

One job: from input i on, the inputs that are to be segmented, were read, are pictures (not GeoTIFFs segmented
block by block) of input i's size and fit in one call (`inference.batches.images_per_call`: on a CPU the tiles'
tuned budget, on a GPU the U-Net batch) form a group; `segment_group` runs them together and hands each on as
if it had been segmented alone. The first group on a GPU with `--batch-size auto` sizes the batch
(`batches.auto_batch_size`). A group that fails or does not fit goes one by one through the run's own path.

The run itself (reading ahead, writing, counting) is `run.py`'s `_FolderRun`, whose parts this uses.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from typing import Any

import numpy as np

from digseg_cli.errors import DigsegError
from digseg_cli.inference.batches import auto_batch_size, images_per_call
from digseg_cli.segment.backoff import infer_batch
from digseg_cli.segment.outputs import ImageResult

# `run` below is `run.py`'s `_FolderRun` (not imported: it imports this); its parts used here are its reading
# ahead (`jobs`, `schedule`), what it resolved (`pipe`, `resolved`, `settings`) and its steps for one image.
FolderRun = Any

log = logging.getLogger("digseg")


def _picture(run: FolderRun, i: int) -> np.ndarray | None:
    """Input i's decoded picture (waiting for its read), or None when it is skipped, unreadable or a GeoTIFF."""
    _, job, verdict = run.jobs[i]
    if verdict is not None or job is None:
        return None
    try:
        image, _ = job.result()
    except Exception:  # noqa: BLE001 - its failure is recorded when it is segmented alone
        return None
    return image if isinstance(image, np.ndarray) else None


def _per_call(run: FolderRun, image: np.ndarray) -> int:
    texts = sum(1 if isinstance(p, str) else len(p) for p in run.resolved.prompts)
    if run.settings.batch_size is None and not run.batch_sized and run.pipe.device.type == "cuda":
        run.model_ready()  # --compile's warm-up first: the probe then meets compiled shapes
        call = {**run.resolved.call, "seed": 0}
        run.pipe.batch_size = auto_batch_size(run.pipe, image, run.resolved.prompts, call)
        log.info("--batch-size auto: %d (image, prompt) pairs per U-Net call", run.pipe.batch_size)
    run.batch_sized = True
    return images_per_call(run.pipe, *image.shape[:2], texts, run.resolved.call.get("resolution"))


def group_from(run: FolderRun, i: int) -> list[int]:
    """Input i and the inputs after it that share its call (just [i] when it is not a picture to segment)."""
    first = _picture(run, i)
    if first is None:
        return [i]
    group = [i]
    for j in range(i + 1, min(i + _per_call(run, first), len(run.files))):
        run.schedule(j)
        picture = _picture(run, j)
        if picture is None or picture.shape[:2] != first.shape[:2]:
            break
        group.append(j)
    return group


def segment_group(run: FolderRun, group: list[int]) -> list[tuple[ImageResult, Future | None]]:
    """Segment equal-size pictures in shared calls and queue their writes; one by one when that fails."""
    items = [run.files[j] for j in group]
    taken = {j: run.jobs.pop(j) for j in group}
    results = [ImageResult(str(item.path), str(item.rel)) for item in items]
    reads = [taken[j][1].result() for j in group]  # (image, seconds): read already, by `group_from`
    for item, (paths, _, _), result in zip(items, taken.values(), results, strict=True):
        run.describe(item, paths, result)
    run.model_ready()
    t0, notes = time.perf_counter(), results[0].warnings
    try:
        outs = infer_batch(
            run.pipe,
            [image for image, _ in reads],
            run.resolved.prompts,
            run.resolved.call,
            seeds=[result.seed for result in results],
            rels=[str(item.rel) for item in items],
            notes=notes,
        )
    except DigsegError:
        raise  # a usage error holds for every image
    except Exception:  # noqa: BLE001 - then each image fails or succeeds alone
        log.debug("a batch of %d images failed; segmenting them one by one", len(group), exc_info=True)
        outs = None
    finally:
        run.summary.backoffs.extend(notes)
    if outs is None:
        run.jobs.update(taken)
        return [run.segment_or_skip(j, run.files[j]) for j in group]
    model_s = time.perf_counter() - t0
    run.summary.timings["model_s"] += model_s
    run.summary.timings["read_s"] += sum(read_s for _, read_s in reads)
    share = model_s / len(group)
    return [
        (result, run.hand_on(item, image, out, paths, result, timings=(read_s, share)))
        for item, (image, read_s), (paths, _, _), result, out in zip(
            items, reads, taken.values(), results, outs, strict=True
        )
    ]
