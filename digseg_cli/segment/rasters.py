"""GeoTIFF inputs of `digseg segment`: which inputs are georeferenced rasters, and reading them window by window.

One job: tell a georeferenced TIFF from a picture by its header (GeoTIFF tags, read without decoding a pixel and
without the `geo` extra); with the extra (rasterio), open one (`open_raster`: size, CRS, transform, nodata, the
bands shown as RGB and their stretch to 8 bits) and read any window of it as the `[h,w,3]` uint8 RGB the model
takes, with that window's valid pixels (`RasterReader.read`). A rasterio failure is an `ImageReadError` naming
the file, so the input fails alone.

- Bands (`--bands 3,2,1`, 1-based): default the first three; a raster with fewer shows its first band as grey,
  as does `--bands 4`.
- 8-bit bands are used as they are; wider integer and float bands are stretched linearly from their 2nd to
  their 98th percentile onto 0–255 (clipped). The percentiles are taken once per raster, over the valid pixels of a
  sample of the whole raster (every n-th pixel of every n-th row, at most 1024 on the long side: from an
  overview of about that size when it has one, else the file's blocks read one at a time, so the sample never
  holds more than one block), so every window of a raster is stretched alike. A band with one value throughout
  reads as 0.
- GDAL's block cache is held to `GDAL_CACHE_BYTES` for the whole process from the first raster on (its default,
  5 % of RAM, had filled with a large raster's blocks while its stretch was sampled).
- No data: the GDAL mask of the chosen bands (their nodata value, an alpha band or a mask band) and, in float
  bands, non-finite values. No-data pixels read as black.

It knows nothing of models, outputs or runs; writing GeoTIFFs is `geotiff.py`'s job, the run of one raster
`georun.py`'s.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from digseg_cli.errors import UsageError
from digseg_cli.inference.images import ImageReadError, require_image_file

GEO_EXTRA = 'pip install "digseg[geo]"'
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic TIFF and BigTIFF, both byte orders
_GEO_TAGS = (33550, 33922, 34264, 34735)  # ModelPixelScale, ModelTiepoint, ModelTransformation, GeoKeyDirectory
STRETCH_PERCENTILES = (2.0, 98.0)
SAMPLE_SIDE = 1024  # the long side of the sample the percentiles come from
GDAL_CACHE_BYTES = 64 * 2**20  # GDAL's block cache, for the process (its default: 5 % of RAM)


@functools.cache
def geo_available() -> bool:
    """True when the `geo` extra's rasterio is installed: GeoTIFFs are then read and written as rasters."""
    return importlib.util.find_spec("rasterio") is not None


def require_geo(what: str, modules: tuple[str, ...] = ("rasterio",)) -> None:
    """A `UsageError` naming `what` and the extra to install when one of `modules` is missing."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"{what} needs the geo extra ({', '.join(missing)} not installed): {GEO_EXTRA}")


def parse_bands(text: str | None) -> tuple[int, ...] | None:
    """`--bands 3,2,1` → (3, 2, 1): three 1-based band numbers shown as red, green and blue, or one shown as grey."""
    if text is None or not str(text).strip():
        return None
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) not in (1, 3) or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise UsageError(
            f"`--bands` must be three band numbers (from 1) for red, green and blue, e.g. 3,2,1, or one band "
            f"shown as grey; got {text!r}"
        )
    return tuple(int(p) for p in parts)


# ------------------------------------------------------------------------------------------------- which inputs
def is_geotiff(path: str | os.PathLike[str]) -> bool:
    """True for a regular file that is a TIFF whose header carries GeoTIFF tags (read once per file version)."""
    try:
        info = os.stat(path)
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and _geotiff_header(os.fspath(path), info.st_mtime_ns, info.st_size)


@functools.lru_cache(maxsize=65536)
def _geotiff_header(path: str, mtime_ns: int, size: int) -> bool:
    try:
        with open(path, "rb") as f:
            if f.read(4) not in _TIFF_MAGIC:
                return False
        from PIL import TiffImagePlugin

        # The plugin parses the first directory only; `Image.open` would also refuse rasters over its pixel limit.
        with TiffImagePlugin.TiffImageFile(path) as im:
            return any(tag in im.tag_v2 for tag in _GEO_TAGS)
    except Exception:  # noqa: BLE001 - a TIFF Pillow cannot parse: rasterio may (else it is no GeoTIFF)
        return geo_available() and _rasterio_says_georeferenced(path)


def _rasterio_says_georeferenced(path: str) -> bool:
    import rasterio

    try:
        with rasterio.open(path) as src:
            return src.driver == "GTiff" and (src.crs is not None or not src.transform.is_identity)
    except _rasterio_errors():
        return False


def reads_as_raster(path: str | os.PathLike[str]) -> bool:
    """Whether an input is read as a georeferenced raster (a GeoTIFF, with the `geo` extra) or as a picture."""
    return geo_available() and is_geotiff(path)


def _rasterio_errors() -> tuple[type[Exception], ...]:
    from rasterio._err import CPLE_BaseError
    from rasterio.errors import RasterioError

    return (RasterioError, CPLE_BaseError)


@functools.cache
def hold_gdal_cache() -> None:
    """Hold GDAL's block cache to `GDAL_CACHE_BYTES` for the rest of the process (all threads: GDAL has one cache).
    Set once and never restored, so no thread's exit can give it back its default under a raster in progress."""
    from rasterio.env import set_gdal_config

    set_gdal_config("GDAL_CACHEMAX", GDAL_CACHE_BYTES)


def raster_env():
    """The GDAL settings a raster is segmented under: the held block cache, masks inside the GeoTIFFs written."""
    import rasterio

    hold_gdal_cache()
    return rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True)


def _first_line(exc: BaseException) -> str:
    """GDAL's own words: rasterio's "See previous exception" points at the cause, which says what failed."""
    while exc.__cause__ is not None and "previous exception" in str(exc):
        exc = exc.__cause__
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def raster_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(width, height) of a GeoTIFF from its header."""
    import rasterio

    require_image_file(path)
    try:
        with rasterio.open(path) as src:
            return src.width, src.height
    except _rasterio_errors() as exc:
        raise ImageReadError(path, f"not a readable GeoTIFF ({_first_line(exc)})") from None


def read_labels(path: str | os.PathLike[str]) -> np.ndarray:
    """A label GeoTIFF digseg wrote, whole: `[H,W]` uint8 (for `--rle`'s records)."""
    import rasterio

    try:
        with rasterio.open(path) as src:
            return src.read(1)
    except _rasterio_errors() as exc:
        raise ImageReadError(path, f"not a readable GeoTIFF ({_first_line(exc)})") from None


def raster_complete(path: str | os.PathLike[str]) -> bool:
    """An output GeoTIFF that opens (for `--skip-existing`: a broken one is made again)."""
    try:
        raster_size(path)
    except ImageReadError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ opening
@dataclass(frozen=True)
class RasterInfo:
    """A GeoTIFF input, opened once (`open_raster`): what its outputs and records take from it."""

    path: Path
    width: int
    height: int
    count: int  # bands in the file
    bands: tuple[int, ...]  # the bands shown as red, green, blue (one: grey), 1-based
    stretch: tuple[tuple[float, float] | None, ...]  # per chosen band: (2nd, 98th percentile), None for 8 bits
    crs: Any  # rasterio CRS, or None
    transform: Any  # affine.Affine, pixel → CRS
    nodata: float | None  # the input's nodata value (first chosen band), as recorded
    masked: bool  # pixels can be no data (a nodata value, alpha or mask band, float bands)

    def describe(self) -> dict[str, Any]:
        """The raster's part of the image's record."""
        return {
            "crs": self.crs.to_string() if self.crs is not None else None,
            "transform": [float(v) for v in tuple(self.transform)[:6]],
            "bands": list(self.bands),
            "band_count": self.count,
            "stretch": [list(s) if s is not None else None for s in self.stretch],
            "nodata": self.nodata,
        }

    def reader(self) -> RasterReader:
        return RasterReader(self)


def open_raster(path: str | os.PathLike[str], bands: tuple[int, ...] | None = None) -> RasterInfo:
    """Open a GeoTIFF input: its size, georeferencing and nodata, the bands it is shown with and their stretch."""
    import rasterio
    from rasterio.enums import MaskFlags

    require_image_file(path)
    hold_gdal_cache()
    try:
        with rasterio.open(path) as src:
            chosen = _choose_bands(src.count, bands, path)
            flags = [src.mask_flag_enums[b - 1] for b in chosen]
            floats = any(np.issubdtype(np.dtype(src.dtypes[b - 1]), np.floating) for b in chosen)
            masked = floats or any(list(f) != [MaskFlags.all_valid] for f in flags)
            nodata = src.nodatavals[chosen[0] - 1]
            stretch = _stretch_limits(src, chosen)
            return RasterInfo(
                Path(path), src.width, src.height, src.count, chosen, stretch, src.crs, src.transform,
                None if nodata is None else float(nodata), masked,
            )  # fmt: skip
    except _rasterio_errors() as exc:
        raise ImageReadError(path, f"not a readable GeoTIFF ({_first_line(exc)})") from None


def _choose_bands(count: int, bands: tuple[int, ...] | None, path) -> tuple[int, ...]:
    if bands is None:
        return (1, 2, 3) if count >= 3 else (1,)
    if max(bands) > count:
        asked = ",".join(map(str, bands))
        raise ImageReadError(path, f"--bands {asked} asks for band {max(bands)}, but the raster has {count}")
    return bands


def _stretch_limits(src, bands: tuple[int, ...]) -> tuple[tuple[float, float] | None, ...]:
    """Per band: None for 8-bit bands, else the (2nd, 98th) percentiles of its valid values in the sample."""
    wide = [b for b in bands if src.dtypes[b - 1] != "uint8"]
    if not wide:
        return (None,) * len(bands)
    sample = _sample(src, wide, step=max(1, math.ceil(max(src.height, src.width) / SAMPLE_SIDE)))
    limits = {}
    for band, values in zip(wide, sample, strict=True):
        values = values.astype(np.float64)[np.isfinite(values)]
        lo, hi = np.percentile(values, STRETCH_PERCENTILES) if values.size else (0.0, 0.0)
        limits[band] = (float(lo), float(hi))
    return tuple(limits.get(b) for b in bands)


def _sample(src, bands: list[int], step: int) -> list[np.ndarray]:
    """The valid values of every `step`-th pixel of every `step`-th row, per band (1-D each): a decimated read when
    the file has an overview GDAL reads it from (a factor from half the step to the step: at most twice the
    sample's side), else block by block at full resolution."""
    from rasterio.enums import Resampling

    if step > 1 and any(step / 2 <= f <= step for f in src.overviews(bands[0])):
        shape = (len(bands), math.ceil(src.height / step), math.ceil(src.width / step))
        whole = src.read(bands, out_shape=shape, masked=True, resampling=Resampling.nearest)
        return [np.ma.compressed(band) for band in whole]
    parts: list[list[np.ndarray]] = [[] for _ in bands]
    for _, window in src.block_windows(bands[0]):
        rows = np.arange((-window.row_off) % step, window.height, step)  # the window's rows ≡ 0 (mod step)
        cols = np.arange((-window.col_off) % step, window.width, step)
        if rows.size and cols.size:
            block = src.read(bands, window=window, masked=True)  # [B,h,w], one of the file's blocks
            for i, band in enumerate(block[:, rows][:, :, cols]):
                parts[i].append(np.ma.compressed(band))
    return [np.concatenate(p) if p else np.zeros(0) for p in parts]


# ------------------------------------------------------------------------------------------------ reading
class RasterReader:
    """An open GeoTIFF input, read window by window (one thread at a time)."""

    def __init__(self, info: RasterInfo) -> None:
        import rasterio

        self.info = info
        try:
            self.src = rasterio.open(info.path)
        except _rasterio_errors() as exc:
            raise ImageReadError(info.path, f"not a readable GeoTIFF ({_first_line(exc)})") from None

    def __enter__(self) -> RasterReader:
        return self

    def __exit__(self, *exc) -> None:
        self.src.close()

    def read(self, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray | None]:
        """The pixels of `box` = (top, left, h, w): `[h,w,3]` uint8 RGB and `[h,w]` bool valid (None: all valid)."""
        from rasterio.windows import Window

        top, left, h, w = box
        window = Window(left, top, w, h)
        info = self.info
        try:
            data = self.src.read(info.bands, window=window)  # [n,h,w] in the file's type
            masks = self.src.read_masks(info.bands, window=window) if info.masked else None
        except _rasterio_errors() as exc:
            where = f"rows {top}-{top + h}, columns {left}-{left + w}"
            raise ImageReadError(info.path, f"cannot read the pixels at {where} ({_first_line(exc)})") from None
        valid = None if masks is None else (masks > 0).all(0)
        if np.issubdtype(data.dtype, np.floating):
            finite = np.isfinite(data).all(0)
            valid = finite if valid is None else valid & finite
        channels = [_to_uint8(band, limits) for band, limits in zip(data, info.stretch, strict=True)]
        rgb = np.stack(channels * 3 if len(channels) == 1 else channels, axis=-1)  # [h,w,3]
        if valid is not None:
            rgb[~valid] = 0
        return rgb, valid


def _to_uint8(band: np.ndarray, limits: tuple[float, float] | None) -> np.ndarray:
    """One band → uint8: as it is for 8-bit bands, else linearly from (lo, hi) onto 0–255, clipped."""
    if limits is None:
        return band.astype(np.uint8, copy=False)
    lo, hi = limits
    if not hi > lo:
        return np.zeros(band.shape, np.uint8)
    scaled = (band.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.rint(np.clip(np.nan_to_num(scaled, nan=0.0), 0, 255)).astype(np.uint8)
