#!/usr/bin/env python
"""Peak memory of a GeoTIFF larger than memory, segmented window by window: `python benchmarks/geotiff_memory.py`.

Writes a synthetic GeoTIFF (default 20000×20000 pixels, three uint16 bands, UTM 33N at 10 m, a no-data border of
1/16 of each side; smooth fields plus noise), strip by strip with rasterio, tiled and DEFLATE-compressed, so it is
never in memory at once. Then segments it with the bundled demo model through `run_segment`, the library behind
`digseg segment` (the raster read, segmented and written as GeoTIFFs block by block), and reports the process's
peak resident set (VmHWM, reset after the raster is written), and the peak of the run's numpy arrays and Python
objects (tracemalloc; torch's tensors are not in it), against what the raster would take in memory: its pixels as
the model's 8-bit RGB, and its probabilities as float32, one map per class.

Issue 20 asks that peak memory be bounded by the tile batch, not the raster: run it at two sizes and the peak
stays put while the raster grows. The demo model on a CPU runs about 0.1 MP/s per class on one core: the default
size is for a GPU; `--size 3000` takes a few minutes on a laptop. The section goes to stdout and is appended to
`--out` (default benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from common import (
    HERE,
    current_rss,
    generated_line,
    machine,
    machine_line,
    markdown_table,
    peak_rss,
    publish,
    reset_peak_rss,
    s,
)

from digseg_cli.weights.store import human_size

STRIP = 512  # rows written at a time (and the file's tile side)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=20000, help="side of the square raster in pixels (default 20000)")
    p.add_argument("--prompt", default="water", help='classes, as --prompt of digseg segment (default "water")')
    p.add_argument("--model", default="demo", help="weights (default: the bundled demo; tiny for a smoke test)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--tile", default="auto", help="auto|N as digseg segment's --tile (default auto: the model's)")
    p.add_argument("--batch-size", type=int, help="(tile, prompt) pairs per model call (default: the pipeline's)")
    p.add_argument("--block", type=int, help="block side in pixels (default: 8 tiles, at least 1024)")
    p.add_argument("--vector", choices=("geojson", "gpkg"), help="also write the polygons")
    p.add_argument("--keep", type=Path, help="folder to keep the raster and outputs in (default: a temporary one)")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md", help="markdown file the section is appended to")
    return p.parse_args(argv)


def write_raster(path: Path, size: int) -> None:
    """The synthetic scene, `STRIP` rows at a time: sinusoid fields per band, noise, a no-data (0) border."""
    import rasterio
    from affine import Affine
    from rasterio.windows import Window

    border = size // 16
    rng = np.random.default_rng(0)
    profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint16", crs="EPSG:32633", nodata=0)
    profile.update(transform=Affine(10, 0, 500000, 0, -10, 4000000), tiled=True, blockxsize=STRIP, blockysize=STRIP)
    x = np.arange(size, dtype=np.float32)[None, :]
    with rasterio.open(path, "w", compress="deflate", BIGTIFF="IF_SAFER", **profile) as dst:
        for top in range(0, size, STRIP):
            h = min(STRIP, size - top)
            y = np.arange(top, top + h, dtype=np.float32)[:, None]
            strip = np.empty((3, h, size), np.uint16)
            for band, (fx, fy) in enumerate(((37.0, 53.0), (211.0, 97.0), (71.0, 401.0))):
                field = 1500 + 900 * np.sin(x / fx) * np.cos(y / fy) + rng.normal(0, 40, (h, size)).astype(np.float32)
                strip[band] = np.clip(field, 1, 65535)
            strip[:, : max(0, border - top)] = 0
            strip[:, :, :border] = 0
            dst.write(strip, window=Window(0, top, size, h))


def segment(path: Path, out: Path, a: argparse.Namespace) -> tuple[dict, object, dict]:
    """(the image's record, the run's summary, what was measured: RSS after loading the model, seconds, device)
    of one `run_segment`."""
    import pyogrio  # noqa: F401 - the libraries a run loads, loaded before the baseline: the peak above it is data
    import rasterio  # noqa: F401
    import scipy.ndimage  # noqa: F401
    import shapely  # noqa: F401

    from digseg_cli.inference.prompts import parse_prompts
    from digseg_cli.segment.loading import open_pipeline
    from digseg_cli.segment.run import run_segment
    from digseg_cli.segment.settings import SegmentSettings, parse_tile

    classes, _ = parse_prompts(a.prompt)
    loaded = open_pipeline(a.model, device=a.device)
    loaded_rss = current_rss()
    settings = SegmentSettings(
        classes=tuple(classes),
        tile=parse_tile(a.tile),
        raster_block=a.block,
        save_probs=True,
        vector=a.vector,
        batch_size=a.batch_size,
    )
    records = []
    tracemalloc.start()  # numpy's arrays (and Python's objects), not torch's: the run's own data
    t0 = time.perf_counter()
    summary = run_segment([str(path)], out, loaded.pipe, settings, on_result=records.append)
    seconds = time.perf_counter() - t0
    arrays = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    if not records or records[0].status != "ok":
        raise SystemExit(f"the run failed: {summary.failed}")
    return (
        records[0].to_json(),
        summary,
        {"loaded": loaded_rss, "seconds": seconds, "device": loaded.device, "arrays": arrays},
    )


def report(a: argparse.Namespace, rec: dict, summary, sizes: dict) -> str:
    raster, k, seconds = rec["raster"], len(rec["classes"]), sizes["seconds"]
    pixels = a.size * a.size
    rgb, probs = pixels * 3, pixels * 4 * k
    peak = sizes["peak"]
    rows = [
        ("raster", f"{a.size}×{a.size} px, 3 × uint16", f"{pixels / 1e6:.1f} MP; file {human_size(sizes['file'])}"),
        ("its pixels as 8-bit RGB", human_size(rgb), "what a picture read whole would hold"),
        (f"its probabilities, float32 × {k}", human_size(probs), "what one call on the whole raster would hold"),
        ("model loaded (RSS)", human_size(sizes["loaded"]), f"`{a.model}` and the geo libraries, before the run"),
        ("**peak RSS of the run**", f"**{human_size(peak)}**", f"{peak / rgb:.2f}× the RGB, {peak / probs:.2f}× probs"),
        ("peak above the loaded model", human_size(peak - sizes["loaded"]), "blocks, their tiles, GDAL's cache"),
        ("peak of numpy arrays and Python objects", human_size(sizes["arrays"]), "tracemalloc: a block's arrays"),
        ("blocks, tile", f"{raster['blocks']}, {raster['tile']} px", f"block side {sizes['block']} px"),
        ("tile windows run", f"{raster['windows_run']}", f"{raster['windows_run'] / raster['windows']:.2f}× the grid"),
        ("wall time", s(seconds), f"{pixels / 1e6 / seconds:.2f} MP/s with {k} class(es)"),
    ]
    if summary.peak_memory_kind.startswith("cuda"):
        rows.append(("peak GPU memory", human_size(summary.peak_memory_bytes), summary.peak_memory_kind))
    head = f"## GeoTIFF memory: `--size {a.size}` (`benchmarks/geotiff_memory.py`)\n\n"
    info = machine()
    return (
        head
        + generated_line(info)
        + "\n\n"
        + machine_line(info, sizes["device"])
        + "\n\n"
        + markdown_table(("Measurement", "Value", "Note"), rows)
        + "\n"
    )


def main(argv=None) -> int:
    a = parse(argv)
    from digseg_cli.inference.blocks import block_side

    with tempfile.TemporaryDirectory(prefix="digseg-geotiff-") as scratch:
        folder = a.keep or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "scene.tif"
        t0 = time.perf_counter()
        write_raster(path, a.size)
        print(f"wrote {path} ({human_size(path.stat().st_size)}) in {s(time.perf_counter() - t0)}")
        reset_peak_rss()
        rec, summary, sizes = segment(path, folder / "out", a)
        sizes.update(file=path.stat().st_size, peak=peak_rss())
        tile = rec["raster"]["tile"]
        sizes["block"] = a.block or (block_side(tile) if tile else a.size)
        publish(a.out, report(a, rec, summary, sizes), append=True)
    return 0 if math.isfinite(sizes["peak"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
