"""One GeoTIFF input of a `digseg segment` run: segmented, written and recorded block by block.

One job: `segment_raster` reads a raster window by window (`rasters.py`), segments each block through the
pipeline's own tiling (`inference/blocks.py`: what one call on the whole raster would give, whatever the block
size), sets its no-data pixels to label 0, writes every output GeoTIFF block by block (`geotiff.py`), and gathers
as it goes the class statistics over the valid pixels, the overlay preview and the polygons (`vectors.py`). Memory
holds one block and its tiles, never the raster. Once the GeoTIFFs are complete it writes the overlay and the
polygons, and fills the input's record. A stop (SIGINT, SIGTERM) between blocks abandons the raster: its outputs
are not written (a rerun with `--skip-existing` does it again).

It knows nothing of scheduling or of pictures: `run.py` hands it a raster that `rasters.open_raster` opened.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import numpy as np

from digseg_cli.inference.blocks import Block, BlockSegmentation
from digseg_cli.segment.backoff import infer_block
from digseg_cli.segment.geotiff import GeoTiffOutputs, OverlayPreview
from digseg_cli.segment.heap import map_large_allocations, return_freed_memory
from digseg_cli.segment.outputs import ClassTally, ImageResult, Segmented, write_regions
from digseg_cli.segment.rasters import RasterInfo, raster_env, read_labels
from digseg_cli.segment.settings import ResolvedRun, SegmentSettings
from digseg_cli.segment.vectors import Georeference, RegionCollector

if TYPE_CHECKING:
    from digseg_cli.inference.pipeline import DigsegPipeline


def segment_raster(
    pipe: DigsegPipeline,
    info: RasterInfo,
    paths: Mapping[str, Any],
    result: ImageResult,
    *,
    run: tuple[ResolvedRun, SegmentSettings],
    stop: Callable[[], bool],
) -> dict[str, float]:
    """Segment the raster `info` and write its outputs at `paths` (`outputs.output_paths`); fill `result` (its
    seed already set) and return the seconds spent reading, in the model and writing. `stop()` is asked before
    each block; when it says so, `KeyboardInterrupt` leaves no output behind."""
    resolved, settings = run
    blocks = BlockSegmentation(
        pipe, resolved.prompts, info.height, info.width, tile=settings.tile, block=settings.raster_block,
        **{**resolved.call, "seed": result.seed},
    )  # fmt: skip
    geo = Georeference(info.transform, info.crs)
    tally = ClassTally(len(resolved.classes))
    preview = OverlayPreview(info.height, info.width) if "overlay" in paths else None
    min_pixels = (settings.min_area or 0.0) / geo.pixel_area
    regions = RegionCollector(info.height, info.width, min_pixels=min_pixels) if "vector" in paths else None
    spent = {"read": 0.0, "model": 0.0, "write": 0.0}
    outputs = GeoTiffOutputs(paths, info, resolved.palette, names=resolved.names, probs_format=settings.probs_format)
    map_large_allocations()  # with the trim after each block: memory bounded by the block, not the raster
    with raster_env(), info.reader() as reader, outputs:
        for block in blocks.blocks:
            if stop():
                raise KeyboardInterrupt
            t0 = time.perf_counter()
            pixels, valid = reader.read(block.read)
            t1 = time.perf_counter()
            predict = functools.partial(blocks.predict, block, pixels, valid)
            out = infer_block(pipe, predict, rel=result.relative_path, notes=result.warnings)
            t2 = time.perf_counter()
            image, valid = _inside(block, pixels, valid)
            seg = Segmented.from_output(image, out, settings.mode).masked(valid)
            outputs.write(block.box, seg, valid)
            tally.add(seg.regions, seg.probs, valid)
            if preview is not None:
                preview.add(block.box, image, seg.labels)
            if regions is not None:
                regions.add(block.box, seg.regions, seg.probs)
            spent["read"], spent["model"] = spent["read"] + t1 - t0, spent["model"] + t2 - t1
            spent["write"] += time.perf_counter() - t2
            del pixels, valid, image, out, seg  # before the next block is read: one block in memory, not two
            return_freed_memory()  # else the heap keeps every block's freed arrays as fragments (heap.py)
    t0 = time.perf_counter()
    if preview is not None:
        preview.write(paths["overlay"], resolved.palette, resolved.names, settings.overlay_alpha, settings.jpeg_quality)
    if regions is not None:
        write_regions(paths["vector"], regions, resolved, settings, geo=geo, source=info.path)
    spent["write"] += time.perf_counter() - t0
    result.classes = tally.records(resolved, blocks.call.thresholds)
    result.raster = {
        **info.describe(),
        "valid_fraction": tally.valid / (info.width * info.height),
        "blocks": len(blocks.blocks),
        "tile": blocks.tile,
        "windows": blocks.grid_windows,
        "windows_run": blocks.windows_run,
    }
    return spent


def _inside(block: Block, pixels: np.ndarray, valid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The block's own pixels (and valid pixels) out of those its windows read."""
    top, left, h, w = block.box
    rows, cols = (
        slice(top - block.read[0], top - block.read[0] + h),
        slice(left - block.read[1], left - block.read[1] + w),
    )
    return pixels[rows, cols], None if valid is None else valid[rows, cols]


def raster_job(
    pipe: DigsegPipeline, info: RasterInfo, paths: Mapping[str, Any], result: ImageResult, *, rle=None, **run
) -> Future:
    """`segment_raster` (`run`: its `run` and `stop`), then the raster's records into `rle` (`--rle`'s `RleFile`),
    from the label map it wrote, read whole (1 byte a pixel), as a finished write job: its result the seconds spent
    writing, or the `OSError` a write met, so that the run treats a write the disk refused as for any image.
    `result.timings` gets the reading (the opening's seconds, already there, included) and the model's."""
    result.height, result.width = info.height, info.width
    opened = result.timings.get("read", 0.0)
    done: Future = Future()
    try:
        spent = segment_raster(pipe, info, paths, result, **run)
        if rle is not None:
            rle.put(result.relative_path, read_labels(paths["mask"]))
    except OSError as exc:
        done.set_exception(exc)
        return done
    result.timings = {"read": opened + spent["read"], "model": spent["model"]}
    done.set_result(spent["write"])
    return done
