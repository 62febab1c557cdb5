"""GeoTIFF inputs and polygon outputs of `digseg segment` (issue 20): small rasters written with rasterio by each
test (`georasters.write_geotiff`: UTM, a no-data border), segmented with the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from georasters import BORDER, CRS, ORIGIN, PIXEL
from georasters import write_geotiff as _geotiff
from PIL import Image

from digseg_cli.errors import UsageError
from digseg_cli.inference import prompts
from digseg_cli.inference.images import default_palette
from digseg_cli.segment import rasters, vectors
from digseg_cli.segment import run as seg
from digseg_cli.segment.inputs import expand_inputs
from digseg_cli.segment.settings import SegmentSettings

rasterio = pytest.importorskip("rasterio")
shapely = pytest.importorskip("shapely")
pyogrio = pytest.importorskip("pyogrio")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _settings(**kw) -> SegmentSettings:
    classes, _ = prompts.parse_prompts(kw.pop("prompt", "road, tree"))
    return SegmentSettings(classes=tuple(classes), **kw)


@pytest.fixture(scope="module")
def pipe():
    from digseg_cli.inference.pipeline import load_pipeline

    return load_pipeline("tiny")


def _read(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """Band 1, its mask and what the file says of itself."""
    with rasterio.open(path) as src:
        about = dict(crs=src.crs, transform=src.transform, dtypes=src.dtypes, shape=src.shape, tags=src.tags(1))
        about["colormap"] = src.colormap(1) if src.dtypes[0] == "uint8" and src.count == 1 and about["tags"] else None
        return src.read(1), src.read_masks(1), about


# ----------------------------------------------------------------------------------------------- rasters
def test_geotiff_outputs_keep_crs_transform_and_nodata(tmp_path, pipe):
    src = _geotiff(tmp_path / "in/scene.tif")
    records = []
    settings = _settings(save_probs=True, save_binary=True)
    summary = seg.run_segment([str(src)], tmp_path / "out", pipe, settings, on_result=records.append)
    assert summary.processed == 1 and summary.exit_code == 0, summary.failed
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["run.json", "scene.mask.tif", "scene.overlay.jpg"]
        + [f"scene.{c}{s}" for c in ("road", "tree") for s in (".tif", ".prob.tif")]
    )  # no temporary or sidecar file left
    with rasterio.open(src) as ref:
        crs, transform = ref.crs, ref.transform
    labels, mask, info = _read(out / "scene.mask.tif")
    assert (info["crs"], info["transform"], info["dtypes"], info["shape"]) == (crs, transform, ("uint8",), (96, 96))
    valid = np.ones((96, 96), bool)
    valid[:BORDER], valid[:, :BORDER] = False, False
    np.testing.assert_array_equal(mask > 0, valid)  # the input's no-data as the outputs' mask band
    assert not labels[~valid].any() and set(np.unique(labels)) <= {0, 1, 2}
    assert info["tags"]["LABEL_2"] == "tree" and info["colormap"][1][:3] == default_palette(3)[1]
    probs, prob_mask, prob_info = _read(out / "scene.road.prob.tif")
    assert prob_info["dtypes"] == ("uint16",) and not probs[~valid].any() and (prob_mask > 0).sum() == valid.sum()
    binary, _, _ = _read(out / "scene.tree.tif")
    np.testing.assert_array_equal(binary == 255, labels == 2)
    # Class fractions count the valid pixels only; mean confidences match the probability GeoTIFF.
    rec = records[0].to_json()
    fractions = [c["fraction"] for c in rec["classes"]]
    np.testing.assert_allclose(fractions, [(labels[valid] == k).mean() for k in (1, 2)], atol=1e-9)
    assert abs(probs[labels == 1].mean() / 65535 - rec["classes"][0]["mean_confidence"]) < 1e-4
    raster = rec["raster"]
    assert raster["crs"] == CRS and raster["transform"][:3] == [PIXEL, 0.0, ORIGIN[0]] and raster["nodata"] == 0
    assert raster["bands"] == [1, 2, 3] and len(raster["stretch"]) == 3 and raster["stretch"][0][0] > 100
    assert raster["valid_fraction"] == pytest.approx(valid.mean())
    assert Path(rec["outputs"]["mask"]).name == "scene.mask.tif"
    manifest = json.loads((out / "run.json").read_text())
    assert "GeoTIFF" in manifest["outputs"]["geotiff"] and "GeoTIFF" in manifest["probability_scale"]


def test_blocks_give_what_the_whole_raster_gives(tmp_path, pipe):
    """Read and written window by window, the raster's results are the in-memory tiling's, whatever the block."""
    src = _geotiff(tmp_path / "scene.tif", seed=1)
    kw = dict(tile=32, save_probs=True, probs_format="npy", overlay=False, vector="geojson")
    records = []
    for name, block in (("one", None), ("many", 40)):
        summary = seg.run_segment(
            [str(src)], tmp_path / name, pipe, _settings(raster_block=block, **kw), on_result=records.append
        )
        assert summary.processed == 1, summary.failed
    one, many = (r.raster for r in records)
    assert (one["blocks"], many["blocks"]) == (1, 9) and many["windows_run"] > many["windows"] == one["windows_run"]
    labels = [_read(tmp_path / n / "scene.mask.tif")[0] for n in ("one", "many")]
    np.testing.assert_array_equal(*labels)
    road = [_read(tmp_path / n / "scene.road.prob.tif")[0] for n in ("one", "many")]
    np.testing.assert_allclose(*road, atol=1e-5)  # float32 GeoTIFF (npy)
    # The same as the pipeline on the whole stretched raster, held in memory.
    info = rasters.open_raster(src)
    with info.reader() as reader:
        image, valid = reader.read((0, 0, 96, 96))
    whole = pipe(image, ["road", "tree"], tile=32, seed=records[0].seed)
    np.testing.assert_allclose(whole.probs[0].numpy()[valid], road[0][valid], atol=1e-5)
    # The polygons do not depend on the blocks either: the pieces cut by block edges are joined.
    features = [json.loads((tmp_path / n / "scene.regions.geojson").read_text())["features"] for n in ("one", "many")]
    assert len(features[0]) == len(features[1]) > 0
    for a, b in zip(*features, strict=True):
        assert a["properties"] == pytest.approx(b["properties"], abs=1e-5)
        assert shapely.geometry.shape(a["geometry"]).equals(shapely.geometry.shape(b["geometry"]))


def test_bands_stretch_and_grey(tmp_path, pipe):
    five = _geotiff(tmp_path / "five.tif", count=5, seed=2)
    info = rasters.open_raster(five, (3, 2, 1))
    assert info.bands == (3, 2, 1) and info.masked and info.nodata == 0
    with info.reader() as reader:
        rgb, valid = reader.read((0, 0, 96, 96))
    with rasterio.open(five) as src:
        band3 = src.read(3).astype(np.float64)
    lo, hi = np.percentile(band3[BORDER:, BORDER:], (2, 98))  # the whole raster is smaller than the sample
    assert info.stretch[0] == pytest.approx((lo, hi))
    expected = np.rint(np.clip((band3 - lo) / (hi - lo) * 255, 0, 255))
    assert np.abs(rgb[..., 0][valid] - expected[valid]).max() <= 1 and not rgb[~valid].any()
    # A float band with NaN as no data is stretched too and shown as grey.
    grey = _geotiff(tmp_path / "grey.tif", count=1, dtype="float32", nodata=np.nan, scale=1.0)
    info = rasters.open_raster(grey)
    with info.reader() as reader:
        rgb, valid = reader.read((0, 0, 96, 96))
    assert info.bands == (1,) and (rgb[..., 0] == rgb[..., 2]).all() and valid.sum() == (96 - BORDER) ** 2
    assert rgb[valid].max() == 255 and rgb[valid].min() == 0
    # --bands: a bad value is a usage error; a band the raster lacks fails that input alone.
    assert rasters.parse_bands("3, 2,1") == (3, 2, 1) and rasters.parse_bands("4") == (4,)
    for bad in ("3,2", "0,1,2", "red", "1,2,3,4"):
        with pytest.raises(UsageError, match="--bands"):
            rasters.parse_bands(bad)
    summary = seg.run_segment([str(five)], tmp_path / "out", pipe, _settings(bands=(6, 2, 1)))
    assert summary.exit_code == 1 and "asks for band 6, but the raster has 5" in summary.failed[0][1]


def test_the_stretch_samples_block_by_block_or_from_an_overview(tmp_path, monkeypatch):
    # A sample of every 3rd pixel of every 3rd row (SAMPLE_SIDE 40 on 96 px): read block by block (32 px tiles)
    # it is exactly those pixels of the whole raster; from an overview, a decimated read of it.
    monkeypatch.setattr(rasters, "SAMPLE_SIDE", 40)
    path = _geotiff(tmp_path / "scene.tif", count=3, seed=3)
    with rasterio.open(path) as src:
        whole = src.read(masked=True)[:, ::3, ::3]
    want = [np.percentile(np.ma.compressed(b).astype(np.float64), (2, 98)) for b in whole]
    info = rasters.open_raster(path)
    assert [tuple(limits) for limits in info.stretch] == [pytest.approx(tuple(w)) for w in want]
    assert rasterio.env.get_gdal_config("GDAL_CACHEMAX") == rasters.GDAL_CACHE_BYTES  # held for the process
    with rasterio.open(path, "r+") as dst:
        dst.build_overviews([2], rasterio.enums.Resampling.nearest)  # GDAL reads the 3× sample from it
    with rasterio.open(path) as src:
        coarse = src.read(out_shape=(3, 32, 32), masked=True, resampling=rasterio.enums.Resampling.nearest)
    want = [np.percentile(np.ma.compressed(b).astype(np.float64), (2, 98)) for b in coarse]
    assert [tuple(limits) for limits in rasters.open_raster(path).stretch] == [pytest.approx(tuple(w)) for w in want]


def test_a_corrupt_raster_fails_alone(tmp_path, pipe):
    """Damaged pixels fail their input with GDAL's reason, when opened (16-bit: the stretch reads them) or in the
    middle of its blocks (8-bit), and leave none of its outputs behind."""
    _geotiff(tmp_path / "in/good.tif")
    for name, dtype in (("broken16", "uint16"), ("broken8", "uint8")):
        data = _geotiff(tmp_path / f"{name}.tif", dtype=dtype, scale=200.0).read_bytes()
        (tmp_path / f"in/{name}.tif").write_bytes(data[:400] + b"\0" * (len(data) - 400))  # header kept
    settings = _settings(raster_block=48)
    summary = seg.run_segment([str(tmp_path / "in")], tmp_path / "out", pipe, settings)
    assert summary.processed == 1 and summary.exit_code == 1
    reasons = dict(summary.failed)
    assert (
        reasons["broken16.tif"].startswith("not a readable GeoTIFF (")
        and "IReadBlock failed" in reasons["broken16.tif"]
    )
    assert reasons["broken8.tif"].startswith("cannot read the pixels at rows 0-")
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(("broken", ".digseg"))) == []


def test_skip_existing_and_a_stop_between_blocks(tmp_path, pipe):
    from digseg_cli.segment.georun import segment_raster
    from digseg_cli.segment.outputs import ImageResult, output_paths
    from digseg_cli.segment.settings import resolve_run

    src = _geotiff(tmp_path / "in/scene.tif")
    settings = _settings(vector="gpkg")
    assert seg.run_segment([str(src)], tmp_path / "out", pipe, settings).processed == 1
    again = seg.run_segment([str(src)], tmp_path / "out", pipe, _settings(vector="gpkg", skip_existing=True))
    assert again.skipped == 1
    (tmp_path / "out/scene.mask.tif").write_bytes(b"II*\0 not a GeoTIFF any more")  # broken: made again
    again = seg.run_segment([str(src)], tmp_path / "out", pipe, _settings(vector="gpkg", skip_existing=True))
    assert again.processed == 1 and rasters.raster_complete(tmp_path / "out/scene.mask.tif")
    # A stop asked for between blocks abandons the raster: none of its outputs appear, no temporary file stays.
    stopped = tmp_path / "stopped"
    item = expand_inputs([str(src)])[0]
    resolved = resolve_run(pipe, settings)
    paths = output_paths(stopped, item, resolved.classes, settings)
    asked = iter([False, True])
    result = ImageResult(str(src), "scene.tif", seed=0)
    blocked = _settings(vector="gpkg", raster_block=48)
    with pytest.raises(KeyboardInterrupt):
        segment_raster(pipe, rasters.open_raster(src), paths, result, run=(resolved, blocked), stop=lambda: next(asked))
    assert not stopped.exists() or not any(stopped.iterdir())


def test_without_the_geo_extra_a_geotiff_is_a_picture(tmp_path, pipe, monkeypatch, caplog):
    src = _geotiff(tmp_path / "scene.tif", dtype="uint8", scale=200.0)
    monkeypatch.setattr(rasters, "geo_available", lambda: False)
    monkeypatch.setattr(rasters, "require_geo", _missing)
    with caplog.at_level("WARNING", logger="digseg"):
        summary = seg.run_segment([str(src)], tmp_path / "out", pipe, _settings())
    assert summary.processed == 1 and (tmp_path / "out/scene.mask.png").exists()
    notes = [r.getMessage() for r in caplog.records if "georeferencing" in r.getMessage()]
    assert len(notes) == 1 and 'pip install "digseg[geo]"' in notes[0]
    for kw in (dict(vector="geojson"), dict(bands=(3, 2, 1))):
        with pytest.raises(UsageError, match=r'needs the geo extra .*pip install "digseg\[geo\]"'):
            _settings(**kw)


def _missing(what: str, modules=("rasterio",)) -> None:
    raise UsageError(f"{what} needs the geo extra (rasterio not installed): {rasters.GEO_EXTRA}")


def test_confidence_maps_and_rle_records_of_a_raster(tmp_path, pipe):
    """--save-confidence gives GeoTIFFs on the probabilities' scale, blocks or not; --rle encodes the label map."""
    pytest.importorskip("pycocotools")
    from digseg_cli.inference import coco_rle

    src = _geotiff(tmp_path / "scene.tif", seed=5)
    for name, block in (("one", None), ("many", 40)):
        settings = _settings(save_confidence=True, ensemble=2, rle=True, tile=32, raster_block=block, overlay=False)
        assert seg.run_segment([str(src)], tmp_path / name, pipe, settings).processed == 1
    maps = {}
    for name in ("one", "many"):
        for kind in ("confidence", "margin", "spread"):
            values, mask, about = _read(tmp_path / name / f"scene.{kind}.tif")
            assert about["crs"] == CRS and about["dtypes"] == ("uint16",) and not values[mask == 0].any()
            maps[name, kind] = values.astype(np.int64)
    for kind in ("confidence", "margin", "spread"):
        assert np.abs(maps["one", kind] - maps["many", kind]).max() <= 2  # a few 1/65535 steps of float noise
    assert (maps["one", "margin"] <= maps["one", "confidence"]).all() and maps["one", "spread"].any()
    records = coco_rle.read_records(tmp_path / "one/sem_seg_predictions.json")
    assert {r["file_name"] for r in records} == {"scene.tif"}
    labels = _read(tmp_path / "one/scene.mask.tif")[0]
    np.testing.assert_array_equal(coco_rle.decode_records(records, "scene.tif"), labels)


# ---------------------------------------------------------------------------------------------- polygons
def test_regions_join_across_blocks_keep_holes_and_follow_4_connectivity():
    """A ring (with its hole) cut by every block edge is one polygon; pixels touching at a corner are two."""
    mask = np.zeros((12, 12), bool)
    mask[1:9, 1:9] = True
    mask[3:6, 3:6] = False  # the hole
    mask[9, 9] = mask[10, 10] = True  # diagonal neighbours: separate regions
    probs = np.where(mask, 0.75, 0.1).astype(np.float32)
    found = []
    for side in (12, 4, 5):
        collector = vectors.RegionCollector(12, 12)
        for top in range(0, 12, side):
            for left in range(0, 12, side):
                box = (top, left, min(side, 12 - top), min(side, 12 - left))
                window = (slice(top, top + box[2]), slice(left, left + box[3]))
                collector.add(box, mask[window][None], probs[window][None])
        found.append(collector.regions())
    for regions in found:
        assert [r.pixels for r in regions] == [64 - 9, 1, 1]
        ring = regions[0].geom
        assert ring.geom_type == "Polygon" and len(ring.interiors) == 1 and ring.area == 55
        assert regions[0].prob_sum == pytest.approx(55 * 0.75)
        assert ring.equals(found[0][0].geom) and len(ring.exterior.coords) == 5  # corners only
    small = vectors.RegionCollector(12, 12, min_pixels=2)
    small.add((0, 0, 12, 12), mask[None], probs[None])
    assert [r.pixels for r in small.regions()] == [55]


def test_vectors_of_a_raster_geojson_rfc7946_and_gpkg(tmp_path, pipe):
    src = _geotiff(tmp_path / "scene.tif", seed=3)
    for fmt in ("geojson", "gpkg"):
        settings = _settings(vector=fmt, min_area=300.0, simplify=12.0, overlay=False)
        assert seg.run_segment([str(src)], tmp_path / fmt, pipe, settings).processed == 1
    collection = json.loads((tmp_path / "geojson/scene.regions.geojson").read_text())
    assert "crs" not in collection and collection["digseg"]["crs"] == CRS
    assert collection["digseg"]["coordinates"].startswith("WGS 84 longitude/latitude")
    features = collection["features"]
    assert features and all(f["properties"]["area"] >= 300 for f in features)
    assert all(f["properties"]["area"] == f["properties"]["pixels"] * PIXEL**2 for f in features)
    assert {f["properties"]["class"] for f in features} <= {"road", "tree"}
    assert all(0 < f["properties"]["mean_probability"] <= 1 and f["properties"]["prompt"] for f in features)
    geoms = [shapely.geometry.shape(f["geometry"]) for f in features]
    assert all(g.is_valid and g.exterior.is_ccw for g in geoms)  # RFC 7946 §3.1.6: exterior rings counter-clockwise
    lon, lat = np.array([c for g in geoms for c in g.exterior.coords]).T
    assert 14.9 < lon.min() and lon.max() < 15.1 and 36.0 < lat.min() and lat.max() < 36.2  # where UTM 33N puts it
    # GeoPackage: the raster's own CRS, the same regions (simplified as one coverage: no overlaps between them).
    info = pyogrio.read_info(tmp_path / "gpkg/scene.regions.gpkg")
    assert info["features"] == len(features) and "32633" in info["crs"] and info["geometry_type"] == "Polygon"
    _, _, table_geoms, fields = pyogrio.raw.read(tmp_path / "gpkg/scene.regions.gpkg")
    areas = fields[list(info["fields"]).index("area")]
    np.testing.assert_allclose(sorted(areas), sorted(f["properties"]["area"] for f in features))
    polygons = shapely.from_wkb(table_geoms)
    assert not any(
        polygons[i].intersection(polygons[j]).area > 1e-6
        for i in range(len(polygons))
        for j in range(i + 1, len(polygons))
    )
    x, y = np.array([c for g in polygons for c in g.exterior.coords]).T
    assert ORIGIN[0] <= x.min() and x.max() <= ORIGIN[0] + 96 * PIXEL and y.max() <= ORIGIN[1]


def test_vectors_of_a_picture_are_in_pixels_and_follow_the_label_map(tmp_path, pipe):
    rng = np.random.default_rng(4)
    Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(tmp_path / "photo.png")
    for mode in ("semantic", "multilabel"):
        settings = _settings(vector="geojson", overlay=False, mode=mode)
        assert seg.run_segment([str(tmp_path / "photo.png")], tmp_path / mode, pipe, settings).processed == 1
        collection = json.loads((tmp_path / mode / "photo.regions.geojson").read_text())
        assert collection["digseg"]["coordinates"].startswith("pixels") and collection["digseg"]["crs"] is None
        for k, name in enumerate(("road", "tree"), start=1):
            mine = [f for f in collection["features"] if f["properties"]["class"] == name]
            if mode == "semantic":
                region = np.asarray(Image.open(tmp_path / mode / "photo.mask.png")) == k
            else:
                region = np.asarray(Image.open(tmp_path / mode / f"photo.{name}.png")) == 255
            assert sum(f["properties"]["pixels"] for f in mine) == region.sum()
            assert sum(shapely.geometry.shape(f["geometry"]).area for f in mine) == pytest.approx(region.sum())


def test_polygon_options_are_checked(tmp_path):
    with pytest.raises(UsageError, match="`--min-area` needs --vector"):
        _settings(min_area=10.0)
    with pytest.raises(UsageError, match="`--simplify` must be ≥ 0"):
        _settings(vector="geojson", simplify=-1.0)
    with pytest.raises(UsageError, match="`vector` must be one of geojson, gpkg"):
        _settings(vector="shp")
