"""`digseg data check` and `digseg data synth` through the real Typer app (and one real subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from typer.testing import CliRunner

from digseg_cli.cli.app import app
from digseg_cli.errors import EXIT_DATASET, EXIT_USAGE
from digseg_cli.inference.images import write_image, write_label_png

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, list(args))


def test_synth_then_check_ok(tmp_path):
    out = tmp_path / "syn"
    res = _run("data", "synth", str(out), "--n", "4", "--seed", "2", "--size", "32")
    assert res.exit_code == 0, res.output
    assert len(list((out / "images").iterdir())) == 4
    res = _run("data", "check", str(out))
    assert res.exit_code == 0, res.output
    assert "building" in res.output and "4 pairs" in res.output
    res = _run("data", "check", str(out), "--json")
    assert res.exit_code == 0
    report = json.loads(res.stdout)
    assert report["ok"] is True and report["n_pairs"] == 4 and report["problems"] == []


def test_synth_zoom_option(tmp_path):
    from digseg_cli.data.synth import generate_scene, scene_rng
    from digseg_cli.inference.images import read_mask

    res = _run("data", "synth", str(tmp_path / "z"), "--n", "1", "--seed", "4", "--size", "32", "--zoom", "2")
    assert res.exit_code == 0, res.output
    assert (read_mask(tmp_path / "z" / "masks" / "00000.png") == generate_scene(scene_rng(4, 0), 32, 2.0)[1]).all()
    assert _run("data", "synth", str(tmp_path / "y"), "--zoom", "9").exit_code == EXIT_USAGE


def test_synth_refuses_non_empty_folder(tmp_path):
    out = tmp_path / "syn"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    res = _run("data", "synth", str(out), "--n", "2", "--size", "32")
    assert res.exit_code == EXIT_USAGE
    assert "--overwrite" in res.output and "choose another folder" in res.output
    res = _run("data", "synth", str(out), "--n", "2", "--size", "32", "--overwrite")
    assert res.exit_code == 0, res.output
    assert (out / "mine.txt").read_text() == "keep"


def _faulty_folder(root):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("1 road\n")
    labels = np.zeros((8, 8), np.uint8)
    labels[:2] = 1
    for stem in ("ok", "lonely"):
        write_image(root / "images" / f"{stem}.png", np.zeros((8, 8, 3), np.uint8))
    write_label_png(root / "masks" / "ok.png", labels)
    write_label_png(root / "masks" / "ghost.png", labels)
    bad = labels.copy()
    bad[5, 5] = 42
    write_image(root / "images" / "weird.png", np.zeros((8, 8, 3), np.uint8))
    write_label_png(root / "masks" / "weird.png", bad)
    return root


def test_check_faulty_folder_exits_7_naming_files(tmp_path):
    root = _faulty_folder(tmp_path / "d")
    res = _run("data", "check", str(root))
    assert res.exit_code == EXIT_DATASET
    for name in ("images/lonely.png", "masks/ghost.png", "masks/weird.png: 42"):
        assert name in res.output
    res = _run("data", "check", str(root), "--json")
    assert res.exit_code == EXIT_DATASET
    report = json.loads(res.stdout)
    assert report["ok"] is False and len(report["problems"]) == 3


def test_check_missing_folder_and_class_file(tmp_path):
    res = _run("data", "check", str(tmp_path / "nope"))
    assert res.exit_code == EXIT_DATASET and "does not exist" in res.output
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    res = _run("data", "check", str(tmp_path))
    assert res.exit_code == EXIT_DATASET and "--class-name" in res.output


def test_python_m_subprocess(tmp_path):
    root = _faulty_folder(tmp_path / "d")
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "digseg_cli", "data", "check", str(root), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == EXIT_DATASET, proc.stderr
    assert json.loads(proc.stdout)["ok"] is False
    assert "3 problems" in proc.stderr
