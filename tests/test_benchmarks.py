"""`benchmarks/run.py` (issue: Performance) and `benchmarks/train.py` (issue 18): the one-command benchmarks run
at tiny size and write their tables."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DIGSEG_OFFLINE": "1"}


def _bench(script: str, *args: str) -> subprocess.CompletedProcess:
    """`python benchmarks/SCRIPT ARGS` on one thread, offline; its stdout and stderr captured."""
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )


def test_quick_tiny_run_writes_the_table(tmp_path):
    out = tmp_path / "RESULTS.md"
    t0 = time.monotonic()
    done = _bench(
        "run.py",
        "--quick",
        "--size",
        "tiny",
        "--naive-steps",
        "3",
        "--tile-image",
        "96",
        "--demo",
        "tiny",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.monotonic() - t0 < 60
    text = out.read_text()
    assert text.startswith("# digseg performance results")
    section = text[text.index("## Run: `--size tiny`") :]
    assert section.strip() in done.stdout  # the same table on stdout and in the file
    for needle in (
        "**Machine:**",
        "torch 2",
        "torch threads",
        "usable cores",
        "| # | Measurement | Ours | Baseline | Ratio | Target | Met |",
    ):
        assert needle in text, needle
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| #")]
    items = {r.split("|")[1].strip() for r in rows}
    # 5: bf16 on CPUs with it, else "not measured"; g: the layout
    assert {"a", "b", "c", "d", "e", "f", "g", "2", "3", "4", "5"} <= items
    # fewer naive steps than 50: one measured row and one extrapolated row, clearly labelled
    assert any("measured with 3 steps" in r for r in rows)
    extrapolated = [r for r in rows if "extrapolated" in r]
    assert extrapolated and all("(extrap.)" in r for r in extrapolated)
    for r in rows:  # every row ends with a verdict column
        assert re.search(r"\| (yes|\*\*no\*\*|—|not measured)[^|]*\|$", r), r
    # --append adds a second section to the same file
    skip = "naive,marigold,floor,startup,folder,tiling,precision,layout"
    again = _bench(
        "run.py", "--quick", "--size", "tiny", "--skip", skip, "--demo", "tiny", "--out", str(out), "--append"
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert out.read_text().count("## Run: `--size tiny`") == 2


def _rows(text: str, part: str) -> list[list[str]]:
    """The cells of the table rows of part `part` ("1", "2") in a training section."""
    return [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith(f"| {part} |")]


def test_quick_training_run_writes_workers_rows_with_their_data_wait(tmp_path):
    out = tmp_path / "RESULTS.md"
    done = _bench("train.py", "--quick", "--size", "demo", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# digseg performance results")
    section = text[text.index("## Run: training, `--size demo`") :]
    assert section.strip() in done.stdout  # the same table on stdout and in the file
    for needle in ("**Machine:**", "torch threads", "| Workers |", "| Samples/s |", "| Data wait |"):
        assert needle in text, needle
    rows = _rows(text, "1")
    assert [r[4] for r in rows] == ["0", "2"]  # the Workers column: the same run with 0 and 2 workers
    for r in rows:
        model, batch, step, samples, wait, met = r[1], r[2], r[5], r[6], r[8], r[9]
        assert "compact `tiny`, 32 px" in model and batch == "8"
        assert re.fullmatch(r"\d+\.\d+ s", step) and float(samples) > 0, r
        assert re.fullmatch(r"\d+\.\d%", wait) and met in ("yes", "**no**"), r
    assert "2 workers / 0 workers:" in text  # their ratio, measured in the same run


@pytest.mark.slow
def test_quick_sd2_path_runs_rows_in_their_own_processes_with_and_without_checkpointing(tmp_path):
    """The SD-2 part's machinery on the tiny stand-in: a saved random model as `init`, one process per row."""
    out = tmp_path / "RESULTS.md"
    done = _bench("train.py", "--quick", "--size", "sd2", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _rows(out.read_text(), "2")
    assert [(r[2], r[3]) for r in rows] == [("1", "on"), ("1", "off")]
    assert all(r[7].endswith("iB") for r in rows), rows  # peak memory of each row's process
    assert "gradient checkpointing on / off:" in out.read_text()


def test_geotiff_memory_benchmark_runs_small(tmp_path):
    """`benchmarks/geotiff_memory.py` (issue 20) at a tiny size: the raster written block by block, segmented in
    blocks, its peak memory reported against the raster's size."""
    pytest.importorskip("rasterio")
    out = tmp_path / "RESULTS.md"
    done = _bench(
        "geotiff_memory.py", "--size", "256", "--model", "tiny", "--block", "128", "--vector", "geojson",
        "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# digseg performance results") and "## GeoTIFF memory: `--size 256`" in text
    for needle in ("**peak RSS of the run**", "| blocks, tile | 4, 32 px |", "its pixels as 8-bit RGB", "**Machine:**"):
        assert needle in text, needle
