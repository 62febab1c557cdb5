"""CLI tests for GeoTIFF inputs and polygons (`digseg segment --bands/--vector/--min-area/--simplify`, issue 20):
exit codes, one-line errors, the records, `--dry-run` and `-o -` with a raster."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from georasters import CRS
from georasters import write_geotiff as geotiff
from typer.testing import CliRunner

from digseg_cli.cli.app import app

pytest.importorskip("rasterio")
pytest.importorskip("pyogrio")
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _run(*args: str, **kw):
    return runner.invoke(app, ["segment", *args, "--weights", "tiny"], **kw)


def test_a_geotiff_gives_geotiffs_polygons_and_records(tmp_path):
    src = geotiff(tmp_path / "in/scene.tif", count=4)
    out = tmp_path / "out"
    result = _run(str(src), "-p", "road, tree", "--bands", "3,2,1", "--vector", "gpkg", "--min-area", "200",
                  "--simplify", "5", "--save-probs", "--json", "--out", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    record, summary = (json.loads(line) for line in result.stdout.splitlines())
    assert record["status"] == "ok" and summary["processed"] == 1
    assert record["raster"]["bands"] == [3, 2, 1] and record["raster"]["crs"] == CRS
    assert {k: v.split("/")[-1] for k, v in record["outputs"].items() if isinstance(v, str)} == {
        "mask": "scene.mask.tif",
        "overlay": "scene.overlay.jpg",
        "vector": "scene.regions.gpkg",
    }
    assert record["outputs"]["probs"]["road"].endswith("scene.road.prob.tif")
    import pyogrio

    info = pyogrio.read_info(out / "scene.regions.gpkg")
    assert info["features"] > 0 and "32633" in info["crs"]
    assert json.loads(info["layer_metadata"]["DIGSEG_MIN_AREA"]) == 200
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["settings"]["bands"] == [3, 2, 1] and manifest["settings"]["vector"] == "gpkg"
    # Another polygon setting is another run: refused before anything is read.
    again = _run(str(src), "-p", "road, tree", "--bands", "3,2,1", "--vector", "gpkg", "--save-probs",
                 "--skip-existing", "--out", str(out))  # fmt: skip
    assert again.exit_code == 2 and "min_area" in again.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bands", "3,2"], "`--bands` must be three band numbers"),
        (["--bands", "0,1,2"], "`--bands` must be three band numbers"),
        (["--min-area", "10"], "`--min-area` needs --vector"),
        (["--vector", "geojson", "--simplify", "-2"], "`--simplify` must be ≥ 0"),
        (["--vector", "shp"], "'shp' is not one of"),
    ],
)
def test_bad_geo_options_are_one_line_and_exit_2(tmp_path, args, message):
    src = geotiff(tmp_path / "scene.tif")
    result = _run(str(src), "-p", "road", "--out", str(tmp_path / "out"), *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out/scene.mask.tif").exists()


def test_vector_without_the_geo_extra_is_one_line(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyogrio" else real(name, *a))
    src = geotiff(tmp_path / "scene.tif")
    result = _run(str(src), "-p", "road", "--vector", "gpkg", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert '--vector needs the geo extra (pyogrio not installed): pip install "digseg[geo]"' in result.stderr


def test_a_damaged_raster_is_its_failure_line_and_exit_1(tmp_path):
    data = geotiff(tmp_path / "good.tif").read_bytes()
    (tmp_path / "in").mkdir()
    (tmp_path / "in/broken.tif").write_bytes(data[:400] + b"\0" * (len(data) - 400))
    result = _run(str(tmp_path / "in"), "-p", "road", "--out", str(tmp_path / "out"))
    assert result.exit_code == 1, result.output
    failed = [line for line in result.stderr.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and failed[0].startswith("failed: broken.tif: not a readable GeoTIFF (")
    assert "CPLE_" not in result.stderr and "Traceback" not in result.output  # GDAL's own warnings kept quiet


def test_dry_run_and_stdout_with_a_geotiff(tmp_path):
    src = geotiff(tmp_path / "scene.tif", size=120)
    plan = _run(str(src), "-p", "road", "--dry-run", "--json", "--out", str(tmp_path / "out"))
    assert plan.exit_code == 0, plan.output
    row = json.loads(plan.stdout.splitlines()[0])
    assert (row["width"], row["height"], row["mask"].split("/")[-1]) == (120, 120, "scene.mask.tif")
    piped = _run("-", "-p", "road", "-o", "-", input=src.read_bytes())
    assert piped.exit_code == 0, piped.stderr
    import rasterio

    with rasterio.open(io.BytesIO(piped.stdout_bytes)) as mask:
        assert mask.crs == CRS and mask.shape == (120, 120) and set(np.unique(mask.read(1))) <= {0, 1}
