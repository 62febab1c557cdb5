"""How a `digseg segment` run survives running out of device memory on one image.

One job: run the pipeline on an image and, on out-of-memory (CUDA, MPS or CPU), halve the U-Net batch (sticky for the
rest of the run), then tile smaller and smaller, noting each step; `OutOfMemoryError` when even a batch of one
and small tiles do not fit. The tiling rule is the pipeline's own (`plan.count_tiles`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
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
