"""`digseg segment` under `accelerate launch`: two CPU processes (gloo) give what one process gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from digseg_cli.cli.app import app
from digseg_cli.segment.inputs import InputFile
from digseg_cli.segment.shard import Shard, error_line, timeout_s

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")
ARGS = ["--prompt", "road, tree", "--weights", "tiny", "--device", "cpu", "--json"]
# What differs between runs whatever the processes: when and how long, where the outputs went, who ran them.
NOT_COMPARED = {"started", "finished", "timings", "peak_memory", "arguments", "processes", "rank_errors", "versions"}


def _images(folder: Path, n: int) -> Path:
    rng = np.random.default_rng(5)
    for i in range(n):
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), np.uint8)).save(folder / f"img{i}.png")
    return folder


def _two(*args: str) -> subprocess.CompletedProcess:
    """`digseg segment ARGS` under `accelerate launch` with two CPU processes (the ranks join over gloo)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "DIGSEG_OFFLINE": "1"}
    launch = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--dynamo_backend", "no"]
    return subprocess.run(
        [*command, "-m", "digseg_cli", "segment", *args], env=env, capture_output=True, text=True, timeout=300
    )


def _lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def _record(record: dict, out: Path) -> dict:
    """An image record without its timings, its output paths relative to `out`."""
    text = json.dumps({k: v for k, v in record.items() if k != "timings"}).replace(str(out), "OUT")
    return json.loads(text)


def _manifest(out: Path) -> dict:
    data = json.loads((out / "run.json").read_text())
    return {k: v for k, v in data.items() if k not in NOT_COMPARED}


def test_two_processes_write_what_one_process_writes(tmp_path):
    images = _images(tmp_path / "in", 5)  # rank 0 segments img0, img2, img4; rank 1 img1, img3
    extra = ["--save-probs", "--rle"]
    one = runner.invoke(app, ["segment", str(images), *ARGS, *extra, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    two = _two(str(images), *ARGS, *extra, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr
    printed = _lines(two.stdout)  # one JSON stream: rank 0 prints every record, in input order, then the summary
    expected = _lines(one.stdout)
    assert [r["relative_path"] for r in printed[:-1]] == [f"img{i}.png" for i in range(5)]
    assert [_record(r, tmp_path / "two") for r in printed[:-1]] == [_record(r, tmp_path / "one") for r in expected[:-1]]
    summary = printed[-1]
    assert summary["type"] == "summary" and summary["processed"] == 5 and summary["rank_errors"] == []
    assert [(r["rank"], r["inputs"], r["processed"]) for r in summary["processes"]] == [(0, 3, 3), (1, 2, 2)]
    for i in range(5):
        for suffix in (".mask.png", ".road.prob.png", ".tree.prob.png", ".overlay.jpg"):
            name = f"img{i}{suffix}"
            assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert _manifest(tmp_path / "two") == _manifest(tmp_path / "one")
    written = json.loads((tmp_path / "two/run.json").read_text())
    assert written["processes"]["world_size"] == 2 and written["rank_errors"] == []
    rle = "sem_seg_predictions.json"
    assert json.loads((tmp_path / "two" / rle).read_text()) == json.loads((tmp_path / "one" / rle).read_text())
    assert two.stderr.count("images/s") == 1 and two.stderr.count("digseg segment:") == 1  # one table, one banner


def test_skip_existing_across_two_ranks_skips_exactly_the_done_inputs(tmp_path):
    images = _images(tmp_path / "in", 6)  # rank 0: img0, img2, img4; rank 1: img1, img3, img5
    out = tmp_path / "out"
    first = runner.invoke(app, ["segment", str(images), *ARGS, "--out", str(out)])
    assert first.exit_code == 0, first.output
    before = {p.name: p.read_bytes() for p in out.glob("*.mask.png")}
    for gone in ("img1.mask.png", "img4.overlay.jpg"):  # one input undone on each rank
        (out / gone).unlink()
    two = _two(str(images), *ARGS, "--skip-existing", "--out", str(out))
    assert two.returncode == 0, two.stderr
    printed = _lines(two.stdout)
    status = {r["relative_path"]: r["status"] for r in printed[:-1]}
    assert status == {f"img{i}.png": "ok" if i in (1, 4) else "skipped" for i in range(6)}
    assert (printed[-1]["processed"], printed[-1]["skipped"]) == (2, 4)
    assert {p.name: p.read_bytes() for p in out.glob("*.mask.png")} == before
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["counts"]["processed"] == 2 and manifest["counts"]["skipped"] == 4
    assert len(manifest["earlier_runs"]) == 1  # the first run's manifest, kept


def test_shares_error_lines_and_timeout():
    shard = Shard(1, 3, "host-b", None)
    files = [InputFile(Path(f"{i}.png"), Path(f"{i}.png")) for i in range(7)]
    assert [str(f.rel) for f in shard.mine(files)] == ["1.png", "4.png"]
    assert shard.name() == "rank 1 (host-b)" and shard.device_for("auto") == "auto"
    assert error_line(RuntimeError("boom\nmore")) == "RuntimeError: boom"
    assert timeout_s() > 0
