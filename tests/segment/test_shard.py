"""`digseg segment` under `accelerate launch`: two CPU processes (gloo) give what one process gives, and a rank
interrupted alone is named by the first."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from digseg_cli.cli.app import app
from digseg_cli.segment.inputs import InputFile
from digseg_cli.segment.outputs import RunSummary
from digseg_cli.segment.shard import Shard, ended_early, error_line, timeout_s

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")
ARGS = ["--prompt", "road, tree", "--weights", "tiny", "--device", "cpu", "--json"]
# What differs between runs whatever the processes: when and how long, where the outputs went, who ran them.
NOT_COMPARED = {"started", "finished", "timings", "peak_memory", "arguments", "processes", "rank_errors", "versions"}


def _images(folder: Path, n: int, name: str = "img{}.png") -> Path:
    rng = np.random.default_rng(5)
    for i in range(n):
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), np.uint8)).save(folder / name.format(i))
    return folder


def _launch(*args: str) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of `digseg segment ARGS` under `accelerate launch` with two CPU
    processes (the ranks join over gloo)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "DIGSEG_OFFLINE": "1"}
    launch = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--dynamo_backend", "no"]
    return [*command, "-m", "digseg_cli", "segment", *args], env


def _two(*args: str) -> subprocess.CompletedProcess:
    command, env = _launch(*args)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


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
    ran = RunSummary(Path("out"), Path("out/run.json"), 4, status="completed", processed=4)
    stopped = RunSummary(Path("out"), Path("out/run.json"), 4, status="interrupted", processed=1)
    assert ended_early(ran, None) is None and ended_early(stopped, None) == (130, "interrupted after 1 of its 4 images")
    assert ended_early(stopped, RuntimeError("boom")) == (1, "RuntimeError: boom")


def _rank_process(launcher: subprocess.Popen, rank: int, deadline: float) -> int:
    """The pid of the launcher's worker process of `rank` (its environment says RANK=<rank>)."""
    wanted = f"RANK={rank}".encode()
    while time.monotonic() < deadline and launcher.poll() is None:
        for proc in Path("/proc").iterdir():
            try:
                parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if parent == launcher.pid and wanted in (proc / "environ").read_bytes().split(b"\0"):
                    return int(proc.name)
            except (OSError, ValueError, IndexError):  # not a process, or one that ended meanwhile
                continue
        time.sleep(0.05)
    raise AssertionError(f"no process of rank {rank} under the launcher")


def _wait_for(path: Path, launcher: subprocess.Popen, deadline: float) -> None:
    while not path.exists():
        assert launcher.poll() is None and time.monotonic() < deadline, f"{path.name} was never written"
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds rank 1's process through /proc")
def test_a_rank_interrupted_alone_is_named_and_the_run_exits_130(tmp_path):
    """SIGTERM to rank 1 alone once it has written an image: rank 1 stops after the image in hand, rank 0 goes
    through its share and names rank 1 in the summary and `run.json`; every process exits 130 (interrupted), as
    the launcher's report says. A broken input of rank 1 fails alone before that, and its rank goes on."""
    n = 60  # rank 0: img00, img02, ...; rank 1: img01 (broken), img03, ...: 28 images still to go when signalled
    images = _images(tmp_path / "in", n, "img{:02d}.png")
    (images / "img01.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    command, env = _launch(str(images), *ARGS, "--out", str(out))
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "start_new_session": True}
    launcher = subprocess.Popen(command, env=env, **pipes)
    try:
        deadline = time.monotonic() + 240
        rank1 = _rank_process(launcher, 1, deadline)
        _wait_for(out / "img03.mask.png", launcher, deadline)  # rank 1's first image written
        os.kill(rank1, signal.SIGTERM)
        stdout, stderr = launcher.communicate(timeout=240)
    finally:
        if launcher.poll() is None:  # the test failed first: end the launcher and its ranks (its own session)
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.communicate()
    # Each process exits with the run's code; the launcher exits 1 and lists them.
    assert launcher.returncode == 1, stderr
    codes = re.findall(r"rank\s+: (\d+) \(local_rank: \d+\)\s+exitcode\s+: (-?\d+)", stderr)
    assert sorted(codes) == [("0", "130"), ("1", "130")], stderr
    assert stderr.count("error: interrupted after") == 2
    printed = _lines(stdout)
    summary, records = printed[-1], {r["relative_path"]: r for r in printed[:-1]}
    rank0, rank1_row = summary["processes"]
    done = rank1_row["processed"]  # images rank 1 finished before it stopped: img03 at least, not all 29
    assert 1 <= done < n // 2 - 1, summary
    named = f"rank 1 ({socket.gethostname()}): interrupted after {done} of its {n // 2} images"
    assert summary["rank_errors"] == [named] and rank1_row["error"] == named.split(": ", 1)[1]
    assert (rank1_row["status"], rank1_row["failed"]) == ("interrupted", 1)
    assert (rank0["status"], rank0["processed"], rank0["failed"], rank0["error"]) == ("completed", n // 2, 0, None)
    assert (summary["status"], summary["processed"], summary["failed"]) == ("interrupted", n // 2 + done, 1)
    assert summary["not_processed"] == n // 2 - 1 - done
    assert "failed rank" in stderr and stderr.count("images/s") == 1  # rank 0's table names it too
    # The good rank's outputs written and recorded; of rank 1, its broken input and the images it finished.
    ok = [f"img{i:02d}.png" for i in range(0, n, 2)] + [f"img{i:02d}.png" for i in range(3, 3 + 2 * done, 2)]
    assert sorted(records) == sorted([*ok, "img01.png"])
    assert records["img01.png"]["status"] == "failed" and all(records[name]["status"] == "ok" for name in ok)
    masks = {p.name.removesuffix(".mask.png") + ".png" for p in out.glob("*.mask.png")}
    assert masks == set(ok) and all((out / name.replace(".png", ".overlay.jpg")).exists() for name in ok)
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["rank_errors"] == [named]
    assert manifest["processes"]["ranks"] == summary["processes"]
    assert manifest["counts"] == {k: summary[k] for k in ("inputs", "processed", "skipped", "failed", "not_processed")}
    assert [f["input"] for f in manifest["failures"]] == ["img01.png"]
    # What the error line says: one process resumes the run with --skip-existing and does only what was left.
    again = runner.invoke(app, ["segment", str(images), *ARGS, "--skip-existing", "--out", str(out)])
    assert again.exit_code == 1, again.output  # img01.png is still broken
    resumed = _lines(again.stdout)[-1]
    assert (resumed["processed"], resumed["skipped"], resumed["failed"]) == (n // 2 - 1 - done, n // 2 + done, 1)
