"""The polygons `digseg segment --vector geojson|gpkg` writes: one feature per connected region per class.

One job: find each class's connected regions (4-connected pixels, GDAL's polygonize rule; holes kept) block by
block (`RegionCollector.add`), with each one's pixel count and probability sum; join at the end the pieces that
block edges cut (`RegionCollector.regions`), so the polygons do not depend on how an image was cut; drop regions
under `--min-area`, simplify the rest (`--simplify`) and write them (`write_vectors`) atomically.

- Units: georeferenced rasters in their CRS (areas in its units², m² for a metric CRS), other images in pixels
  (x to the right, y down, from the image's top-left corner). `--min-area` and `--simplify` are in the same units.
- Regions: a class's label in semantic mode, its own mask in multilabel mode (classes may then overlap).
- `--simplify T`: shapely's coverage simplification (Visvalingam–Whyatt: vertices whose triangle is under about
  T² go) over all the image's regions at once (per class in multilabel mode), so borders regions share stay
  shared: no gaps, no overlaps. Without it, polygons follow the pixel edges exactly.
- Properties: `class`, `label`, `prompt` (the class's prompts, `|` between synonyms), `mean_probability` (the
  class's mean probability over the region's pixels), `area` (the region's pixels × a pixel's area, before
  simplification) and `pixels`.
- GeoJSON follows RFC 7946: georeferenced polygons are reprojected to WGS 84 longitude/latitude (no `crs`
  member), exterior rings counter-clockwise. Pixel-coordinate files are not geographic: their top-level `digseg`
  member says so (`coordinates`). GeoPackage keeps the raster's CRS (none for pixel coordinates); its layer
  metadata says the same.

It knows nothing of models or runs: `outputs.py` and `georun.py` feed it regions and probabilities.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from digseg_cli.files import atomic_path, atomic_write_text
from digseg_cli.inference.prompts import PromptClass

VECTOR_FORMATS = ("geojson", "gpkg")
VECTOR_SCHEMA = "digseg.polygons/1"
LAYER = "regions"
_FOUR = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)  # 4-connectivity, as `rasterio.features.shapes`
PIXEL_COORDINATES = "pixels: x to the right, y down, from the image's top-left corner (not geographic)"


@dataclass(frozen=True)
class Region:
    """A connected region of one class (or a piece of one a block edge cut), in the image's pixel coordinates."""

    cls: int  # 0-based class index
    geom: Any  # shapely Polygon, corners at integer pixel coordinates
    pixels: int
    prob_sum: float


class RegionCollector:
    """The regions of an image of `height`×`width` pixels, gathered block by block; those with fewer than
    `min_pixels` pixels are dropped (once a region is whole)."""

    def __init__(self, height: int, width: int, *, min_pixels: float = 0.0) -> None:
        self.height, self.width, self.min_pixels = height, width, min_pixels
        self.whole: list[Region] = []  # regions inside one block
        self.cut: list[Region] = []  # pieces touching an edge between blocks, joined by `regions`

    def add(self, box: tuple[int, int, int, int], regions: np.ndarray, probs: np.ndarray) -> None:
        """A block at `box` = (top, left, h, w): each class's pixels `[K,h,w]` bool and probabilities `[K,h,w]`."""
        from affine import Affine
        from rasterio.features import shapes
        from scipy import ndimage
        from shapely.geometry import shape

        top, left, h, w = box
        inner = (top > 0, top + h < self.height, left > 0, left + w < self.width)  # top, bottom, left, right
        for k in range(regions.shape[0]):
            comp, n = ndimage.label(regions[k], structure=_FOUR)  # [h,w] int32, 0 = not this class
            if n == 0:
                continue
            pixels = np.bincount(comp.ravel(), minlength=n + 1)
            sums = np.bincount(comp.ravel(), weights=probs[k].ravel().astype(np.float64), minlength=n + 1)
            cut = np.zeros(n + 1, bool)
            for is_inner, edge in zip(inner, (comp[0], comp[-1], comp[:, 0], comp[:, -1]), strict=True):
                cut[edge] |= is_inner
            cut[0] = False
            for geom, value in shapes(comp, mask=comp > 0, connectivity=4, transform=Affine.translation(left, top)):
                i = int(value)
                region = Region(k, shape(geom), int(pixels[i]), float(sums[i]))
                if cut[i]:
                    self.cut.append(region)
                elif region.pixels >= self.min_pixels:
                    self.whole.append(region)

    def regions(self) -> list[Region]:
        """Every region, the cut pieces joined (a piece belongs to the joined part its interior point lies in),
        in a fixed order: by class, then top to bottom and left to right; corners only, normalised."""
        import shapely

        found = list(self.whole)
        for k in sorted({r.cls for r in self.cut}):
            pieces = [r for r in self.cut if r.cls == k]
            parts = shapely.get_parts(shapely.union_all([r.geom for r in pieces]))
            inside, part = shapely.STRtree(parts).query(shapely.point_on_surface([r.geom for r in pieces]), "within")
            pixels, sums = np.zeros(len(parts), np.int64), np.zeros(len(parts))
            np.add.at(pixels, part, [pieces[i].pixels for i in inside])
            np.add.at(sums, part, [pieces[i].prob_sum for i in inside])
            found += [Region(k, g, int(n), float(s)) for g, n, s in zip(parts, pixels, sums, strict=True)]
        found = [r for r in found if r.pixels >= self.min_pixels]
        geoms = shapely.normalize(shapely.simplify([r.geom for r in found], 0.0))  # collinear vertices out
        found = [Region(r.cls, g, r.pixels, r.prob_sum) for r, g in zip(found, geoms, strict=True)]
        return sorted(found, key=lambda r: (r.cls, *(r.geom.bounds[1::-1]), -r.pixels))


@dataclass(frozen=True)
class Georeference:
    """How pixel coordinates become output coordinates: the raster's transform and CRS (None for pictures)."""

    transform: Any = None  # affine.Affine, pixel → CRS
    crs: Any = None  # rasterio CRS

    @property
    def pixel_area(self) -> float:
        t = self.transform
        return 1.0 if t is None else abs(t.a * t.e - t.b * t.d)

    @property
    def units(self) -> str:
        if self.transform is None:
            return "px"
        return self.crs.units_factor[0] if self.crs is not None else "CRS units"


def shaped(regions: Sequence[Region], geo: Georeference, *, simplify: float | None, shared_borders: bool) -> list:
    """The regions' polygons in output coordinates (the raster's CRS, or pixels), simplified by `simplify` (in those
    units) as one coverage (`shared_borders`: semantic mode) or one per class."""
    import shapely

    geoms = [r.geom for r in regions]
    if simplify:  # every pixel corner a vertex: borders that regions share have the same vertices on both sides
        geoms = list(shapely.segmentize(geoms, 1.0))
    if geo.transform is not None:
        t = geo.transform
        matrix, offset = np.array([[t.a, t.b], [t.d, t.e]]), np.array([t.c, t.f])
        geoms = list(shapely.transform(geoms, lambda xy: xy @ matrix.T + offset))
    if simplify and geoms:
        groups = [list(range(len(regions)))] if shared_borders else _by_class(regions)
        out = list(geoms)
        for group in groups:
            for i, g in zip(group, shapely.coverage_simplify([geoms[i] for i in group], simplify), strict=True):
                out[i] = g
        geoms = out
    return geoms


def _by_class(regions: Sequence[Region]) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(regions):
        groups.setdefault(r.cls, []).append(i)
    return list(groups.values())


def _properties(regions: Sequence[Region], classes: Sequence[PromptClass], geo: Georeference) -> list[dict]:
    return [
        {
            "class": classes[r.cls].name,
            "label": r.cls + 1,
            "prompt": "|".join(classes[r.cls].texts),
            "mean_probability": round(r.prob_sum / r.pixels, 6),
            "area": r.pixels * geo.pixel_area,
            "pixels": r.pixels,
        }
        for r in regions
    ]


def write_vectors(path: Path, regions: Sequence[Region], classes: Sequence[PromptClass], **kw) -> Path:
    """Write `regions` to `path` (GeoJSON or GPKG, by `fmt`): `geo` (a `Georeference`), `simplify`,
    `shared_borders`, `source` (the input, for the file's own description) and `min_area` as `kw`."""
    geo: Georeference = kw["geo"]
    geoms = shaped(regions, geo, simplify=kw.get("simplify"), shared_borders=kw["shared_borders"])
    props = _properties(regions, classes, geo)
    about = {
        "schema": VECTOR_SCHEMA,
        "source": str(kw["source"]),
        "coordinates": PIXEL_COORDINATES if geo.transform is None else f"the raster's CRS ({_crs_name(geo) or 'none'})",
        "crs": _crs_name(geo),
        "area_units": f"{geo.units}²",
        "min_area": kw.get("min_area"),
        "simplify": kw.get("simplify"),
        "connectivity": 4,
    }
    if kw["fmt"] == "gpkg":
        return _write_gpkg(path, geoms, props, geo, about)
    return _write_geojson(path, geoms, props, geo, about)


def _crs_name(geo: Georeference) -> str | None:
    if geo.crs is None:
        return None
    epsg = geo.crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else geo.crs.to_wkt()


def _write_geojson(path: Path, geoms: list, props: list[dict], geo: Georeference, about: dict) -> Path:
    import shapely
    from shapely.geometry import mapping

    digits = 3
    if geo.crs is not None:  # RFC 7946: WGS 84 longitude/latitude
        from rasterio.warp import transform_geom

        geoms = [shapely.geometry.shape(g) for g in transform_geom(geo.crs, "EPSG:4326", [mapping(g) for g in geoms])]
        about["coordinates"] = f"WGS 84 longitude/latitude (RFC 7946), reprojected from {about['crs']}"
        digits = 7  # about 1 cm
    geoms = shapely.orient_polygons(shapely.transform(geoms, lambda xy: np.round(xy, digits)))
    features = [
        {"type": "Feature", "id": i + 1, "geometry": mapping(g), "properties": p}
        for i, (g, p) in enumerate(zip(geoms, props, strict=True))
    ]
    collection = {"type": "FeatureCollection", "digseg": about, "features": features}
    return atomic_write_text(path, json.dumps(collection, separators=(",", ":"), ensure_ascii=False) + "\n")


def _write_gpkg(path: Path, geoms: list, props: list[dict], geo: Georeference, about: dict) -> Path:
    import pyogrio.raw
    import shapely

    names = ["class", "label", "prompt", "mean_probability", "area", "pixels"]
    types = [object, np.int32, object, np.float64, np.float64, np.int64]
    columns = [np.array([p[n] for p in props], dtype=t) for n, t in zip(names, types, strict=True)]
    multi = any(g.geom_type != "Polygon" for g in geoms)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pyogrio's "no crs" warning: pixel coordinates have none
        pyogrio.raw.write(
            str(tmp), np.array(shapely.to_wkb(geoms), dtype=object), columns, names, layer=LAYER, driver="GPKG",
            geometry_type="MultiPolygon" if multi else "Polygon", promote_to_multi=multi,
            crs=None if geo.crs is None else geo.crs.to_wkt(),
            layer_metadata={f"DIGSEG_{k.upper()}": json.dumps(v) if not isinstance(v, str) else v
                            for k, v in about.items()},
        )  # fmt: skip
    return Path(path)
