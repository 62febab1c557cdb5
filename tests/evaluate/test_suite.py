"""``digseg eval --suite``: fixture benchmarks in their official layouts (tests/layouts.py), scored from saved
label maps, give one table whose numbers are the single evaluations' own, beside the paper's; what is absent
is listed with how to get it; a benchmark that fails is recorded and the suite exits 1."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from layouts import mask, write_ade20k, write_cityscapes, write_coco_stuff, write_pascal_context, write_predictions
from typer.testing import CliRunner

from digseg_cli.cli.app import app
from digseg_cli.data.benchmarks import catalog as D
from digseg_cli.evaluate.suite import SOURCES, SUITES

runner = CliRunner()


def _suite(tmp_path: Path, name: str, *extra: str):
    args = ["eval", "--suite", name, "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "out"), *extra]
    return runner.invoke(app, args)


def _single(tmp_path: Path, dataset: str, predictions: Path) -> dict:
    """What one ``digseg eval --dataset X --predictions`` prints."""
    args = ["eval", "-d", dataset, "--data-root", str(tmp_path / "data"), "--predictions", str(predictions)]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "single" / dataset), "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_open_vocab_suite_from_predictions_is_the_single_evaluations_beside_the_paper(tmp_path):
    data, preds = tmp_path / "data", tmp_path / "preds"
    layouts = [write_ade20k(data, n=3, seed=1), *write_pascal_context(data, n=3, seed=2).values()]  # no A-847
    for layout in layouts:
        write_predictions(layout, preds / layout.dataset, seed=3)
    res = _suite(tmp_path, "open-vocab", "--predictions", str(preds), "--json")
    assert res.exit_code == 0, res.output
    table = json.loads((tmp_path / "out/suite.json").read_text())
    assert json.loads(res.stdout) == table
    rows = {e["dataset"]: e for e in table["benchmarks"]}
    assert list(rows) == ["ade20k-full", "pascal-context-459", "ade20k", "pascal-context-59"]  # the paper's order
    for layout in layouts:
        single = _single(tmp_path, layout.dataset, preds / layout.dataset)
        (line,) = rows[layout.dataset]["results"]
        assert rows[layout.dataset]["status"] == "scored" and line["metric"] == "miou"
        assert line["ours"] == single["metrics"]["miou"] and 0.0 < line["ours"] < 1.0  # the same number, not 0 or 1
        assert line["ours_percent"] == round(100 * single["metrics"]["miou"], 2)
        written = json.loads((tmp_path / "out" / layout.dataset / "metrics.json").read_text())
        assert written["metrics"] == single["metrics"]  # the usual reports, one folder per benchmark
    assert {e["dataset"]: e["results"][0]["paper"] for e in table["benchmarks"]} == {
        "ade20k-full": 19.9,
        "pascal-context-459": 29.2,
        "ade20k": 43.2,
        "pascal-context-59": 68.4,
    }
    assert table["missing"] == ["ade20k-full"] and table["failed"] == []
    missing = rows["ade20k-full"]
    assert missing["status"] == "missing" and missing["results"][0]["ours"] is None
    assert missing["message"].startswith("ADE20K-full (A-847) was not found") and "request_data" in missing["message"]
    md = (tmp_path / "out/suite.md").read_text()
    a150 = next(line for line in md.splitlines() if line.startswith("| A-150 |"))
    assert f"| {rows['ade20k']['results'][0]['ours_percent']:.2f} | 43.2 |" in a150 and "| claimed |" in a150
    assert "| A-847 | ade20k-full | open vocabulary | miou | missing | 19.9 | claimed |" in md
    assert "## Missing on this machine" in md and "request_data" in md and "not checked against the paper" in md
    assert "benchmark 1 of 3: pascal-context-459 (PC-459)" in res.stderr and "benchmark 3 of 3" in res.stderr


def test_paper_suite_records_a_failed_benchmark_and_exits_1(tmp_path):
    data, preds = tmp_path / "data", tmp_path / "preds"
    ade, coco, city = write_ade20k(data, seed=4), write_coco_stuff(data, seed=5), write_cityscapes(data, seed=6)
    for layout in (ade, coco, city):
        write_predictions(layout, preds / layout.dataset, seed=7)
    stem = coco.stems()[0]
    mask(preds / f"coco-stuff/{stem}.png", np.zeros((4, 4), np.uint8))  # the wrong size: that benchmark fails
    res = _suite(tmp_path, "paper", "--predictions", str(preds))
    assert res.exit_code == 1, res.output
    table = json.loads((tmp_path / "out/suite.json").read_text())
    rows = {e["dataset"]: e for e in table["benchmarks"]}
    assert len(rows) == 9 and table["failed"] == ["coco-stuff"]
    assert set(table["missing"]) == set(rows) - {"ade20k", "coco-stuff", "cityscapes"}
    assert rows["coco-stuff"]["exit_code"] == 2 and f"{stem}.png is 4x4, its label 8x8" in rows["coco-stuff"]["message"]
    assert rows["cityscapes"]["status"] == "scored"  # the benchmark after the failed one still ran
    semantic, open_vocab = rows["ade20k"]["results"]  # one run, two published numbers
    assert (semantic["paper"], open_vocab["paper"]) == (58.6, 43.2) and semantic["ours"] == open_vocab["ours"]
    assert semantic["paper_source"] == "aggregator" and "unverified" in table["sources"]["aggregator"]
    assert [r["paper"] for r in rows["refuge2"]["results"]] == [None, None]  # none published: said, not invented
    assert (
        rows["deepglobe"]["results"][0]["metric"] == "road_iou" and rows["phenobench"]["results"][0]["paper"] == 76.66
    )
    md = (tmp_path / "out/suite.md").read_text()
    assert "## Failed" in md and "one evaluation run with two published numbers" in md
    assert "coco-stuff failed:" in res.stderr


def test_suite_and_dataset_together_is_a_usage_error(tmp_path):
    res = _suite(tmp_path, "open-vocab", "--dataset", "ade20k")
    assert res.exit_code == 2 and "`--suite` and `--dataset` cannot be combined" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output
    for extra in (["--split", "val"], ["--check"]):
        wrong = _suite(tmp_path, "open-vocab", *extra)
        assert wrong.exit_code == 2 and "cannot be combined with `--suite`" in wrong.stderr
    assert _suite(tmp_path, "nope").exit_code == 2
    neither = runner.invoke(app, ["eval", "--data-root", str(tmp_path)])
    assert neither.exit_code == 2 and "`--dataset NAME`" in neither.stderr and "`--suite NAME`" in neither.stderr
    assert not (tmp_path / "out").exists()


def test_a_suite_with_nothing_present_is_exit_7_in_one_line(tmp_path):
    res = _suite(tmp_path, "open-vocab")
    assert res.exit_code == 7, res.output
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("error: no benchmark of suite open-vocab is on this machine")
    for name in ("ade20k-full", "pascal-context-459", "ade20k", "pascal-context-59"):
        assert f"{name}: " in line
    assert "request_data" in line and "--download" in line  # the catalog's own how-to-get text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", sorted(SUITES))
def test_the_suite_table_names_real_benchmarks_and_sources(name):
    benchmarks = SUITES[name]
    assert len(benchmarks) == {"open-vocab": 4, "paper": 9}[name]
    for bench in benchmarks:
        spec = D.get_spec(bench.dataset)
        assert spec.name == bench.dataset  # a catalog name, not an alias: it is also a folder name
        for published in bench.published:
            assert published.source in SOURCES and published.metric
            assert published.metric == "miou" or spec.headline in ("road_iou", "refuge_dice", "phenobench_miou")


def test_a_suite_scoring_a_model_loads_it_once_and_scores_as_single_evaluations(tmp_path, monkeypatch):
    from layouts import write_pascal_context_59

    from digseg_cli.inference import pipeline

    write_cityscapes(tmp_path / "data", n=1, seed=8)
    write_pascal_context_59(tmp_path / "data", n=1, seed=9)
    loads = []
    real_load = pipeline.load_pipeline
    monkeypatch.setattr(pipeline, "load_pipeline", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    fast = ["-w", "tiny", "--limit", "1", "--short-side", "0", "--tile", "off"]  # 8x8 images as they are
    res = _suite(tmp_path, "paper", *fast)
    assert res.exit_code == 0, res.output
    assert len(loads) == 1  # one model for the three benchmarks, not one each
    table = json.loads((tmp_path / "out/suite.json").read_text())
    scored = [e["dataset"] for e in table["benchmarks"] if e["status"] == "scored"]
    assert scored == ["cityscapes", "pascal-context-459", "pascal-context-59"]  # PC-59 and PC-459: one release
    for dataset in ("cityscapes", "pascal-context-59"):
        args = ["eval", "-d", dataset, "--data-root", str(tmp_path / "data"), *fast]
        single = runner.invoke(app, [*args, "--out", str(tmp_path / "single" / dataset), "--json"])
        assert single.exit_code == 0, single.output
        written = json.loads((tmp_path / "out" / dataset / "metrics.json").read_text())
        assert written["metrics"] == json.loads(single.stdout)["metrics"], dataset  # shared scores as fresh
    assert len(loads) == 3
