"""How a `digseg segment` run survives running out of device memory on one image.

One job: run the pipeline on an image and, on out-of-memory (CUDA, MPS or CPU), halve the U-Net batch (sticky for the
rest of the run), then tile smaller and smaller, noting each step; `OutOfMemoryError` when even a batch of one
and small tiles do not fit. Several images in one call (`infer_batch`) that do not fit halve the batch and go
one by one. The tiling rule is the pipeline's own (`plan.count_tiles`). A block of a GeoTIFF
(`infer_block`) backs off its batch only: its tiles are the whole raster's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from digseg_cli.errors import OutOfMemoryError
from digseg_cli.segment.plan import count_tiles

if TYPE_CHECKING:
    from digseg_cli.inference.pipeline import DigsegPipeline, Prompt, SegmentationOutput

log = logging.getLogger("digseg")


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


def infer(
    pipe: DigsegPipeline,
    image: np.ndarray,
    prompts: Sequence[Prompt],
    call: Mapping[str, Any],
    *,
    tile: int | str,
    rel: str,
    notes: list[str],
) -> SegmentationOutput:
    """Run the pipeline; on out-of-memory (CUDA, MPS or CPU) halve the batch, then tile smaller and smaller. What the
    pipeline changed on its own (fp32 after an overflow) joins `notes` too."""
    n_texts = sum(1 if isinstance(p, str) else len(p) for p in prompts)
    h, w = image.shape[:2]
    now = {"tile": tile}

    def back_off() -> str:
        note = _lower_batch(pipe, _pairs_in_use(pipe, now["tile"], call, h, w, n_texts), rel)
        if note is None and (smaller := _smaller_tile(pipe, now["tile"], call.get("resolution"), h, w)) is not None:
            now["tile"], note = smaller, f"out of memory on {rel}: tiled inference with {smaller} px tiles"
        if note is None:
            raise OutOfMemoryError(
                f"out of memory on {pipe.device} for {rel} ({w}x{h}) even with a U-Net batch of 1 and small "
                "tiles: try --resolution 256, --tile 256, --precision bf16/fp16, --ensemble 1, fewer classes "
                "per run, or --device cpu"
            )
        return note

    return _retry(pipe, lambda: pipe(image, prompts, tile=now["tile"], **call), back_off, rel=rel, notes=notes)


def infer_batch(
    pipe: DigsegPipeline,
    images: Sequence[np.ndarray],
    prompts: Sequence[Prompt],
    call: Mapping[str, Any],
    *,
    seeds: Sequence[int],
    rels: Sequence[str],
    notes: list[str],
) -> list[SegmentationOutput] | None:
    """Equal-size images in shared calls (`inference.batches.segment_batch`); on out-of-memory the U-Net batch is
    halved (sticky) and None says: segment these one by one (`infer`, which backs off further)."""
    from digseg_cli.errors import is_out_of_memory
    from digseg_cli.inference.batches import segment_batch

    try:
        outs = segment_batch(pipe, images, prompts, seeds=seeds, **call)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        note = f"out of memory on a batch of {len(images)} images ({rels[0]} …): segmenting them one by one"
        lowered = _lower_batch(pipe, pipe.batch_size, rels[0])
        for line in (note, lowered) if lowered else (note,):
            log.warning("%s", line)
            notes.append(line)
        return None
    _pipeline_notes(pipe, ", ".join(rels), notes)
    return outs


def infer_block(pipe: DigsegPipeline, predict: Callable[[], SegmentationOutput], *, rel: str, notes: list[str]):
    """`predict()`, one block of a raster (`inference.blocks`); on out-of-memory halve the U-Net batch (sticky) and
    run it again. Its tiles are the whole raster's, so they cannot shrink here: a batch of one that does not fit
    is `OutOfMemoryError`."""

    def back_off() -> str:
        if (note := _lower_batch(pipe, pipe.batch_size, rel)) is None:
            raise OutOfMemoryError(
                f"out of memory on {pipe.device} for {rel} even with a U-Net batch of 1: try --tile 256 (or "
                "smaller), --precision bf16/fp16, --ensemble 1, fewer classes per run, or --device cpu"
            )
        return note

    return _retry(pipe, predict, back_off, rel=rel, notes=notes)


def _retry(pipe: DigsegPipeline, attempt: Callable[[], Any], back_off: Callable[[], str], *, rel: str, notes: list):
    """`attempt()` until it fits: after each out-of-memory (CUDA, MPS or CPU) `back_off()` changes something and
    says what (a note, logged), or raises `OutOfMemoryError`. What the pipeline changed on its own joins `notes`."""
    from digseg_cli.errors import is_out_of_memory

    while True:
        try:
            out = attempt()
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            try:
                note = back_off()
            except OutOfMemoryError as error:
                raise error from None
            log.warning("%s", note)
            notes.append(note)
            continue
        _pipeline_notes(pipe, rel, notes)
        return out


def _lower_batch(pipe: DigsegPipeline, in_use: int, rel: str) -> str | None:
    """Halve the U-Net batch (sticky for the rest of the run) and say so; None when it is 1 already."""
    if in_use <= 1:
        return None
    pipe.batch_size = in_use // 2
    return f"out of memory on {rel}: U-Net batch lowered to {pipe.batch_size}"


def _pipeline_notes(pipe: DigsegPipeline, rel: str, notes: list[str]) -> None:
    """What the pipeline changed on its own (fp32 after an fp16 overflow; it logged them) joins `notes`."""
    changes = getattr(pipe, "notes", [])
    notes.extend(f"{note} (on {rel})" for note in changes)
    changes.clear()
