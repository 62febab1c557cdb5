"""Issue 17, `digseg segment`: what a hostile sweep found, as tables of inputs → exit code and one error line.

Each row builds its case in a fresh folder and runs the real CLI on the tiny model. Named pipes are guarded:
if anything opens one for reading, a watchdog writes to it (so the test ends instead of hanging) and the
test fails.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from digseg_cli.cli.app import app
from digseg_cli.files import TEMP_PREFIX

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _save(path: Path, seed: int = 1, size=(24, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8)).save(path)
    return path


def _segment(*args: str):
    return runner.invoke(app, ["segment", *args, "--weights", "tiny"])


def _one_error(result, code: int, fragment: str) -> None:
    """The exit code, exactly one `error:` line on stderr holding `fragment`, and no traceback."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == code, result.output
    assert len(errors) == 1 and fragment in errors[0], result.stderr
    assert "Traceback" not in result.output


@pytest.fixture
def fifo():
    """Make named pipes; fail the test if anything opened one for reading (after unblocking it)."""
    made, opened, stop = [], [], threading.Event()

    def watch() -> None:
        while not stop.wait(0.05):
            for path in made:
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # succeeds only while a reader has it open
                except OSError:
                    continue
                opened.append(path)
                os.close(fd)  # the reader gets end-of-file instead of waiting forever

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    def make(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
        made.append(path)
        return path

    yield make
    stop.set()
    watcher.join()
    assert not opened, f"named pipes were opened for reading: {opened}"


def _earlier_run(tmp: Path, *extra: str) -> list[str]:
    """A finished run of in/a.png into out/ with class road; the arguments of a rerun into it."""
    _save(tmp / "in/a.png")
    assert _segment(str(tmp / "in"), "-p", "road", "--out", str(tmp / "out"), *extra).exit_code == 0
    return [str(tmp / "in"), "--out", str(tmp / "out")]


def _read_only(tmp: Path) -> list[str]:
    (tmp / "ro").mkdir()
    _save(tmp / "a.png")
    (tmp / "ro").chmod(0o500)
    return [str(tmp / "a.png"), "-p", "road", "--out", str(tmp / "ro")]


# Each row: (case, builds the arguments in tmp_path, exit code, fragment of the one error line).
REFUSALS = [
    ("a named pipe given", lambda t, f: [str(f(t / "p.png")), "-p", "road", "--out", str(t / "o")], 2, "named pipe"),
    ("…in a dry run", lambda t, f: [str(f(t / "p.png")), "-p", "road", "--dry-run"], 2, "named pipe"),
    (
        "--out is a file",
        lambda t, f: [str(_save(t / "a.png")), "-p", "road", "--out", str(t / "a.png")],
        2,
        "is a file",
    ),
    (
        "--out below a file",
        lambda t, f: [str(_save(t / "a.png")), "-p", "road", "--out", str(t / "a.png/sub")],
        2,
        "Not a directory",
    ),
    pytest.param(
        "--out read-only",
        lambda t, f: _read_only(t),
        2,
        "Permission denied",
        marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders"),
    ),
    (
        "a file where another input's outputs need a folder",
        lambda t, f: [str(_save(t / "in/x.png")), str(_save(t / "in/x.mask.png/y.png")), "-p", "r", "-o", str(t / "o")],
        2,
        "rename one",
    ),
    ("other prompts, --skip-existing", lambda t, f: [*_earlier_run(t), "-p", "water", "--skip-existing"], 2, "road"),
    ("another seed", lambda t, f: [*_earlier_run(t), "-p", "road", "--seed", "3", "--skip-existing"], 2, "seed"),
    ("other weights", lambda t, f: [*_earlier_run(t), "-p", "road", "--skip-existing"], 2, "compact:small"),
    ("probabilities added", lambda t, f: [*_earlier_run(t), "-p", "road", "--save-probs"], 2, "save_probs"),
    ("a broken run.json", lambda t, f: [*_broken_manifest(t, "{not json"), "-p", "road"], 2, "cannot read"),
    ("someone else's run.json", lambda t, f: [*_broken_manifest(t, '{"a": 1}'), "-p", "road"], 2, "not a digseg"),
]


def _broken_manifest(tmp: Path, text: str) -> list[str]:
    _save(tmp / "in/a.png")
    (tmp / "out").mkdir()
    (tmp / "out/run.json").write_text(text)
    return [str(tmp / "in"), "--out", str(tmp / "out")]


@pytest.mark.parametrize(("case", "build", "code", "fragment"), REFUSALS, ids=lambda v: v if isinstance(v, str) else "")
def test_refused_with_one_line_and_nothing_written(tmp_path, fifo, case, build, code, fragment):
    args = build(tmp_path, fifo)
    weights = "small" if case == "other weights" else "tiny"
    manifest = tmp_path / "out/run.json"
    kept = manifest.read_bytes() if manifest.is_file() else None
    masks = {p: p.read_bytes() for p in tmp_path.rglob("*.mask.png") if p.is_file()}
    result = runner.invoke(app, ["segment", *args, "--weights", weights])
    _one_error(result, code, fragment)
    assert (manifest.read_bytes() if manifest.is_file() else None) == kept  # the record is never replaced
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.mask.png") if p.is_file()} == masks
    assert not list(tmp_path.rglob(f"{TEMP_PREFIX}*"))


# ------------------------------------------------------------------------------------ nothing is lost
def test_inputs_sharing_a_stem_each_keep_their_outputs(tmp_path):
    for i, name in enumerate(("a.png", "a.jpg", "a.png.png")):
        _save(tmp_path / "in" / name, seed=i)
    result = _segment(str(tmp_path / "in"), "-p", "road", "--out", str(tmp_path / "out"), "--json")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()][:-1]
    masks = [r["outputs"]["mask"] for r in records]
    assert sorted(Path(m).name for m in masks) == ["a.jpg.mask.png", "a.png.mask.png", "a.png.png.mask.png"]
    assert all(Path(m).is_file() for m in masks)


def test_a_named_pipe_in_a_folder_is_skipped_with_a_warning(tmp_path, fifo):
    _save(tmp_path / "in/good.png")
    fifo(tmp_path / "in/pipe.png")
    fifo(tmp_path / "in/pipe")  # no suffix: only its content could say image
    for extra in (["--dry-run"], []):
        result = _segment(str(tmp_path / "in"), "-p", "road", "--out", str(tmp_path / "out"), *extra)
        assert result.exit_code == 0, result.output
        assert result.stderr.count("is a named pipe") == 2 and "Traceback" not in result.output
    assert (tmp_path / "out/good.mask.png").is_file()


def test_data_check_reports_a_named_pipe(tmp_path, fifo):
    from digseg_cli.inference.images import write_label_png

    _save(tmp_path / "d/images/a.png")
    write_label_png(tmp_path / "d/masks/a.png", np.zeros((24, 32), np.uint8))
    fifo(tmp_path / "d/images/b.png")
    write_label_png(tmp_path / "d/masks/b.png", np.zeros((24, 32), np.uint8))
    (tmp_path / "d/classes.txt").write_text("1 road\n")
    result = runner.invoke(app, ["data", "check", str(tmp_path / "d"), "--json"])
    assert result.exit_code == 7, result.output
    assert json.loads(result.stdout)["unreadable"] == [["images/b.png", "is a named pipe"]]


def test_a_rerun_continues_the_run_and_keeps_its_record(tmp_path):
    args = _earlier_run(tmp_path)
    manifest = tmp_path / "out/run.json"
    _save(tmp_path / "in/b.png", seed=2)
    more = _segment(*args, "-p", "road", "--skip-existing", "--json")
    assert more.exit_code == 0, more.output
    first = json.loads(manifest.read_text())
    assert (first["counts"]["processed"], first["counts"]["skipped"], len(first["earlier_runs"])) == (1, 1, 1)
    nothing = _segment(*args, "-p", "road", "--skip-existing")  # all done: run.json stays as it was
    assert nothing.exit_code == 0 and json.loads(manifest.read_text()) == first
    other = _segment(*args, "-p", "water", "--overwrite")
    assert other.exit_code == 0, other.output
    latest = json.loads(manifest.read_text())
    assert latest["resolved"]["labels"]["1"] == "water"
    assert [r["resolved"]["labels"]["1"] for r in latest["earlier_runs"]] == ["road", "road"]
    assert all("earlier_runs" not in r for r in latest["earlier_runs"])  # flat history, oldest first


def test_out_inside_the_input_folder_never_segments_its_own_outputs(tmp_path):
    _save(tmp_path / "in/a.png")
    args = [str(tmp_path / "in"), "-p", "road", "--out", str(tmp_path / "in"), "--save-binary", "--save-probs"]
    assert _segment(*args).exit_code == 0
    again = _segment(*args, "--skip-existing", "--json")
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout.splitlines()[-1])
    assert (summary["inputs"], summary["skipped"]) == (1, 1)


@pytest.mark.parametrize("damage", [b"", b"\x89PNG\r\n\x1a\n not a mask"], ids=["empty", "broken"])
def test_skip_existing_redoes_an_empty_or_broken_mask(tmp_path, damage):
    args = _earlier_run(tmp_path)
    (tmp_path / "out/a.mask.png").write_bytes(damage)
    result = _segment(*args, "-p", "road", "--skip-existing", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["processed"] == 1
    assert Image.open(tmp_path / "out/a.mask.png").mode == "P"


def test_too_long_names_are_shortened_before_the_run(tmp_path):
    long_class, stem = "x" * 300, "é" * 120  # 240 bytes of stem: its outputs would pass 255 bytes
    _save(tmp_path / "in" / f"{stem}.png")
    result = _segment(
        str(tmp_path / "in"),
        "-p",
        f"road, {long_class}",
        "--out",
        str(tmp_path / "out"),
        "--save-binary",
        "--save-probs",
    )
    assert result.exit_code == 0, result.output
    names = [p.name for p in (tmp_path / "out").iterdir()]
    assert len(names) == 7 and all(len(n.encode()) <= 255 for n in names)  # mask, overlay, 2+2, run.json
    file_names = json.loads((tmp_path / "out/run.json").read_text())["resolved"]["file_names"]
    assert file_names[0] == "road" and len(file_names[1]) < 96 and "~" in file_names[1]


def test_every_output_follows_the_umask(tmp_path, monkeypatch):
    from digseg_cli import files

    old = os.umask(0o027)
    monkeypatch.setattr(files, "_umask", None)  # read again
    try:
        _save(tmp_path / "in/a.png")
        args = ["-p", "road", "--save-binary", "--save-probs"]
        assert _segment(str(tmp_path / "in"), *args, "--out", str(tmp_path / "out")).exit_code == 0
        assert (
            _segment(str(tmp_path / "in"), *args, "--probs-format", "npy", "-o", str(tmp_path / "npy")).exit_code == 0
        )
    finally:
        os.umask(old)
    written = [p for p in tmp_path.glob("*/*") if p.is_file() and p.parent.name != "in"]
    assert len(written) == 10 and {oct(p.stat().st_mode & 0o777) for p in written} == {"0o640"}


def test_temporaries_of_a_killed_run_are_removed(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    _save(tmp_path / "in/sub/a.png")
    stale = [tmp_path / f"out/{TEMP_PREFIX}{pid}-x.png", tmp_path / f"out/sub/{TEMP_PREFIX}{pid}-y.png"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    result = _segment(str(tmp_path / "in"), "-r", "-p", "road", "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert not any(p.exists() for p in stale) and (tmp_path / "out/sub/a.mask.png").is_file()


@pytest.mark.parametrize("manifest_fits", [True, False], ids=["manifest-written", "manifest-lost"])
def test_a_full_disk_stops_the_run_at_the_first_refused_write(tmp_path, monkeypatch, manifest_fits):
    from digseg_cli.inference import images
    from digseg_cli.segment import manifest

    writes, real = [], images.write_label_png

    def full_from_the_second(path, *args, **kwargs):
        writes.append(path)
        if len(writes) >= 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, *args, **kwargs)

    def no_room(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(images, "write_label_png", full_from_the_second)
    if not manifest_fits:
        monkeypatch.setattr(manifest, "atomic_write_json", no_room)
    for i in range(6):
        _save(tmp_path / f"in/{i}.png", seed=i)
    result = _segment(str(tmp_path / "in"), "-p", "road", "--out", str(tmp_path / "out"), "--workers", "1")
    fragment = "stopped after 1 of 6" if manifest_fits else "could not be written either"
    _one_error(result, 2, fragment)
    assert len(writes) < 6  # stopped, not every image run through the model
    assert not list(tmp_path.rglob(f"{TEMP_PREFIX}*"))
    if manifest_fits:
        recorded = json.loads((tmp_path / "out/run.json").read_text())
        assert recorded["status"] == "output-error" and recorded["counts"]["processed"] == 1
    else:
        assert not (tmp_path / "out/run.json").exists()


# ------------------------------------------------------------------------------------------ signals
def test_sigterm_ends_the_run_with_its_manifest_and_exit_130(tmp_path):
    """A real process: SIGTERM arrives mid-run; it finishes the image in hand, writes run.json, exits 130."""
    import signal
    import subprocess
    import sys

    for i in range(200):
        _save(tmp_path / f"in/{i:03d}.png", seed=i, size=(16, 16))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIGSEG_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    command = [sys.executable, "-m", "digseg_cli", "segment", str(tmp_path / "in"), "-p", "road", "--weights", "tiny"]
    proc = subprocess.Popen(
        [*command, "--out", str(tmp_path / "out")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not list((tmp_path / "out").glob("*.mask.png")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    recorded = json.loads((tmp_path / "out/run.json").read_text())
    assert recorded["status"] == "interrupted" and 1 <= recorded["counts"]["processed"] < 200
    assert len(list((tmp_path / "out").glob("*.mask.png"))) == recorded["counts"]["processed"]
    assert not list((tmp_path / "out").glob(f"{TEMP_PREFIX}*")) and "Traceback" not in stderr
    assert "interrupted after" in stderr


def test_sigint_finishes_the_image_in_hand_then_stops_with_130(tmp_path, monkeypatch):
    """A real SIGINT to this process during the second image's model call (the CLI runs in the main thread)."""
    import signal

    from digseg_cli.inference.pipeline import DigsegPipeline

    for name in ("a.png", "b.png", "c.png"):
        _save(tmp_path / "in" / name)
    original, calls = DigsegPipeline.__call__, []

    def signal_during_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DigsegPipeline, "__call__", signal_during_second)
    # A shell starts background jobs with SIGINT ignored (and the run then leaves it so): give this test the
    # handler an interactive shell gives.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = _segment(str(tmp_path / "in"), "-p", "road", "--out", str(tmp_path / "out"))
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handed back after the run
    finally:
        signal.signal(signal.SIGINT, inherited)
    _one_error(result, 130, "interrupted after 2 of 3 images")
    assert json.loads((tmp_path / "out/run.json").read_text())["counts"]["processed"] == 2
