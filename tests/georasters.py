"""Small GeoTIFFs for the tests of GeoTIFF inputs (issue 20), written with rasterio as a GIS tool would write them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CRS = "EPSG:32633"  # UTM 33N: metres
ORIGIN = (500000.0, 4000000.0)  # west, north
PIXEL = 10.0  # metres
BORDER = 8  # no-data rows at the top and columns at the left


def write_geotiff(path: Path, *, size=96, count=3, dtype="uint16", nodata=0, seed=0, scale=3000.0) -> Path:
    """A `size`² UTM raster of random values with a no-data border (its `nodata` value there), tiled, compressed."""
    import rasterio
    from affine import Affine

    rng = np.random.default_rng(seed)
    data = (rng.random((count, size, size)) * scale + (1 if np.dtype(dtype).kind == "f" else 100)).astype(dtype)
    data[:, :BORDER, :] = nodata
    data[:, :, :BORDER] = nodata
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = dict(driver="GTiff", width=size, height=size, count=count, dtype=dtype, crs=CRS, nodata=nodata)
    profile.update(
        transform=Affine(PIXEL, 0, ORIGIN[0], 0, -PIXEL, ORIGIN[1]), tiled=True, blockxsize=32, blockysize=32
    )
    with rasterio.open(path, "w", compress="deflate", **profile) as dst:
        dst.write(data)
    return path
