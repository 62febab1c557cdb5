"""The GeoTIFF outputs of a raster input, written block by block, and its overlay preview.

One job: open every GeoTIFF output of one raster (`GeoTiffOutputs`, a context manager), each under a temporary
name beside its final one (`files.atomic_path`); write each block's results into all of them; on a clean exit
close, fsync and rename them; on an exception remove them all, so a killed or failed raster leaves no output.
`OverlayPreview` gathers a decimated copy of the image and its labels as the blocks go by, for the overlay JPEG.

Every output has the input's size, CRS and transform, is tiled 256×256 and DEFLATE-compressed (BigTIFF when it
needs to be), and, when the input has no-data pixels, carries an internal mask band saying which: those pixels
are 0 in every output, and GIS tools show them as no data.

- label map `<stem>.mask.tif`: uint8, 0 = background, k = class k; the run's colours as its colour table and
  `LABEL_k=<class>` in its band's metadata;
- binary masks `<stem>.<class>.tif`: uint8 0/255;
- probabilities `<stem>.<class>.prob.tif`: uint16, probability = value / 65535 (the 16-bit PNG's rule; the
  default `--probs-format png16`) or float32 in [0, 1] (`--probs-format npy`);
- `--save-confidence`'s maps `<stem>.confidence.tif`, `.margin.tif` (and `.spread.tif` with an ensemble): uint16,
  value / 65535, as their PNGs.

It knows nothing of models or how a raster is cut into blocks (`georun.py`); reading rasters is `rasters.py`'s.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from digseg_cli.files import atomic_path
from digseg_cli.inference import images
from digseg_cli.inference.overlay import make_overlay
from digseg_cli.inference.prompts import CONFIDENCE_SUFFIXES
from digseg_cli.segment.rasters import RasterInfo, _rasterio_errors

if TYPE_CHECKING:
    from digseg_cli.segment.outputs import Segmented

TILE = 256
OVERLAY_MAX_SIDE = 2048  # the overlay JPEG of a raster is at most this long: a preview, not a map


def _as_os_error(exc: Exception, path: Path) -> OSError:
    """GDAL's write failures as the `OSError` the run maps to "cannot write outputs" (a full disk stops it)."""
    try:
        full = os.statvfs(path.parent).f_bavail == 0
    except OSError:
        full = False
    code = errno.ENOSPC if full else errno.EIO
    return OSError(code, f"{os.strerror(code)} ({str(exc).strip().splitlines()[0] if str(exc).strip() else exc})")


class GeoTiffOutputs:
    """The GeoTIFFs of one raster (`paths`: `outputs.output_paths`), open while its blocks are written."""

    def __init__(self, paths: Mapping[str, Any], info: RasterInfo, palette: Sequence[tuple[int, int, int]], **kw):
        self.paths, self.info, self.palette = paths, info, palette
        self.names: Sequence[str] = kw["names"]  # the classes, label 1 first
        self.probs_format: str = kw["probs_format"]
        self.stack = contextlib.ExitStack()
        self.labels = self.binary = self.probs = None
        self.confidence: dict[str, Any] = {}

    def __enter__(self) -> GeoTiffOutputs:
        try:
            self.labels = self._open(self.paths["mask"], "uint8")
            self.labels.write_colormap(1, {k: (*rgb, 255) for k, rgb in enumerate(self.palette)})
            tags = {"LABEL_0": "background", **{f"LABEL_{k + 1}": n for k, n in enumerate(self.names)}}
            self.labels.update_tags(1, **tags)
            self.binary = [self._open(p, "uint8") for p in self.paths.get("binary", {}).values()]
            dtype = "uint16" if self.probs_format == "png16" else "float32"
            self.probs = [self._open(p, dtype) for p in self.paths.get("probs", {}).values()]
            self.confidence = {m: self._open(self.paths[m], "uint16") for m in CONFIDENCE_SUFFIXES if m in self.paths}
        except _rasterio_errors() as exc:
            self.stack.__exit__(type(exc), exc, exc.__traceback__)
            raise _as_os_error(exc, Path(self.paths["mask"])) from None
        except BaseException:
            self.stack.close()
            raise
        return self

    def _open(self, path: Path, dtype: str):
        import rasterio

        tmp = self.stack.enter_context(atomic_path(path))  # renamed over `path` when the stack closes cleanly
        predictor = {"uint16": 2, "float32": 3}.get(dtype, 1)
        dst = rasterio.open(
            tmp, "w", driver="GTiff", width=self.info.width, height=self.info.height, count=1, dtype=dtype,
            crs=self.info.crs, transform=self.info.transform, tiled=True, blockxsize=TILE, blockysize=TILE,
            compress="deflate", predictor=predictor, BIGTIFF="IF_SAFER",
        )  # fmt: skip
        self.stack.callback(dst.close)  # runs before the rename: the file is complete when it gets its name
        return dst

    def write(self, box, seg: Segmented, valid: np.ndarray | None) -> None:
        """One block's results at `box` = (top, left, h, w): `seg` over the block, its no-data pixels already 0,
        and `valid` `[h,w]` bool (None: all valid)."""
        from rasterio.windows import Window

        top, left, h, w = box
        window = Window(left, top, w, h)
        layers = [(self.labels, seg.labels)]
        layers += [(ds, np.where(seg.regions[k], 255, 0).astype(np.uint8)) for k, ds in enumerate(self.binary or [])]
        for k, ds in enumerate(self.probs or []):
            layers.append((ds, images.quantize_probs(seg.probs[k]) if ds.dtypes[0] == "uint16" else seg.probs[k]))
        if self.confidence:
            maps = seg.confidence()
            layers += [(ds, images.quantize_probs(maps[m])) for m, ds in self.confidence.items()]
        try:
            for ds, array in layers:
                ds.write(array[None], window=window)
                if self.info.masked:
                    ds.write_mask(np.where(valid, 255, 0).astype(np.uint8), window=window)
        except _rasterio_errors() as exc:
            raise _as_os_error(exc, Path(self.paths["mask"])) from None

    def __exit__(self, *exc) -> None:
        try:
            self.stack.__exit__(*exc)
        except _rasterio_errors() as error:  # a flush the disk refused while closing
            raise _as_os_error(error, Path(self.paths["mask"])) from None


class OverlayPreview:
    """A decimated copy of a raster's pixels and labels (every `step`-th pixel; at most `OVERLAY_MAX_SIDE` on the
    long side), filled block by block, for the overlay JPEG."""

    def __init__(self, height: int, width: int) -> None:
        self.step = max(1, math.ceil(max(height, width) / OVERLAY_MAX_SIDE))
        shape = (math.ceil(height / self.step), math.ceil(width / self.step))
        self.image = np.zeros((*shape, 3), np.uint8)
        self.labels = np.zeros(shape, np.uint8)

    def add(self, box, image: np.ndarray, labels: np.ndarray) -> None:
        """A block's image `[h,w,3]` and labels `[h,w]` at `box` = (top, left, h, w)."""
        top, left = box[:2]
        dy, dx = (-top) % self.step, (-left) % self.step  # the first kept row and column inside the block
        rows, cols = slice((top + dy) // self.step, None), slice((left + dx) // self.step, None)
        part_image, part_labels = image[dy :: self.step, dx :: self.step], labels[dy :: self.step, dx :: self.step]
        h, w = part_labels.shape
        self.image[rows, cols][:h, :w] = part_image
        self.labels[rows, cols][:h, :w] = part_labels

    def write(self, path: Path, palette, names: Sequence[str], alpha: float, quality: int) -> None:
        overlay = make_overlay(self.image, self.labels, palette, names, alpha)
        images.write_image(path, overlay, quality)
