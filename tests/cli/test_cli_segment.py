"""CLI tests for `digseg segment`: exit codes, --json stream, existing outputs, EXIF, tree mirroring."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from digseg_cli.cli.app import app

runner = CliRunner()
SIZE = (40, 48)  # (H, W)


# The tiny model is far faster on one thread, and 2 spinning threads crawl on a busy 2-core runner.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _save(path: Path, seed: int, size=SIZE, exif=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8)
    Image.fromarray(array).save(path, **({"exif": exif} if exif is not None else {}))
    return path


def _run(*args: str):
    return runner.invoke(app, ["segment", *args, "--weights", "tiny"])


def test_folder_with_broken_files_exits_1_and_writes_the_good_ones(tmp_path):
    _save(tmp_path / "in/good.png", 1)
    _save(tmp_path / "in/sub/good.jpg", 2)
    (tmp_path / "in/broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "in/empty.jpg").write_bytes(b"")
    (tmp_path / "in/readme.txt").write_text("ignored: not an image by content or name")
    result = _run(str(tmp_path / "in"), "-r", "-p", "road, tree", "--out", str(tmp_path / "out"))
    assert result.exit_code == 1, result.output
    assert (tmp_path / "out/good.mask.png").exists() and (tmp_path / "out/sub/good.overlay.jpg").exists()
    failed = [line for line in result.stderr.splitlines() if line.startswith("failed:")]
    assert sorted(line.split(":")[1].strip() for line in failed) == ["broken.png", "empty.jpg"]
    assert "Traceback" not in result.output and "readme" not in result.output
    assert "processed" in result.stderr and result.stdout == ""  # summary table on stderr only
    assert re.search(r"peak memory +│ \d+\.\d [KMG]iB \(process peak RSS\)", result.stderr)  # binary units


def test_json_lines_on_stdout(tmp_path):
    _save(tmp_path / "in/a.png", 1)
    _save(tmp_path / "in/b.png", 2)
    result = _run(
        str(tmp_path / "in"),
        "-p",
        "road|street, tree",
        "--out",
        str(tmp_path / "out"),
        "--json",
        "--save-probs",
        "--threshold",
        "0.5,tree=0.4",
    )
    assert result.exit_code == 0, result.output
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    assert [o["type"] for o in objects] == ["image", "image", "summary"]
    assert all(o["schema"] == "digseg.segment/1" for o in objects)
    first = objects[0]
    assert first["relative_path"] == "a.png" and first["status"] == "ok"
    assert (first["width"], first["height"]) == (48, 40)
    assert [c["name"] for c in first["classes"]] == ["road", "tree"] and first["classes"][1]["threshold"] == 0.4
    assert Path(first["outputs"]["probs"]["road"]).name == "a.road.prob.png"
    assert all(Path(p).exists() for p in [first["outputs"]["mask"], *first["outputs"]["probs"].values()])
    assert objects[-1]["processed"] == 2 and objects[-1]["failed"] == 0
    manifest = json.loads((tmp_path / "out/run.json").read_text())
    assert manifest["arguments"]["prompt"] == ["road|street, tree"] and manifest["weights"]["name"] == "tiny"


def test_existing_outputs_need_overwrite_or_skip_existing(tmp_path):
    _save(tmp_path / "a.png", 1)
    args = [str(tmp_path / "a.png"), "-p", "road", "--out", str(tmp_path / "out")]
    assert _run(*args).exit_code == 0
    second = _run(*args)
    assert second.exit_code == 1 and "--overwrite" in second.stderr
    assert _run(*args, "--overwrite").exit_code == 0
    skipped = _run(*args, "--skip-existing", "--json")
    assert skipped.exit_code == 0 and json.loads(skipped.stdout.splitlines()[-1])["skipped"] == 1


def test_exif_orientation_gives_outputs_in_the_rotated_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40 wide x 48 high, displayed rotated by 90°: 48 wide x 40 high
    _save(tmp_path / "rot.jpg", 1, size=(48, 40), exif=exif)
    result = _run(str(tmp_path / "rot.jpg"), "-p", "road", "--out", str(tmp_path / "out"), "--save-binary")
    assert result.exit_code == 0, result.output
    for name in ("rot.mask.png", "rot.overlay.jpg", "rot.road.png"):
        assert Image.open(tmp_path / "out" / name).size == (48, 40)


def test_output_tree_mirrors_input_tree(tmp_path):
    for rel in ("x.png", "a/x.png", "b/x.png", "b/c/x.png"):
        _save(tmp_path / "in" / rel, 1)
    result = _run(str(tmp_path / "in"), "--recursive", "-p", "road", "--out", str(tmp_path / "out"), "--no-overlay")
    assert result.exit_code == 0, result.output
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png"))
    assert written == ["a/x.mask.png", "b/c/x.mask.png", "b/x.mask.png", "x.mask.png"]


def test_prompts_file_and_multilabel(tmp_path):
    _save(tmp_path / "a.png", 1)
    (tmp_path / "classes.yaml").write_text(
        "classes:\n  - name: road\n    synonyms: [street]\n    color: orange\n  - name: tree\n    threshold: 0.3\n"
    )
    result = _run(
        str(tmp_path / "a.png"),
        "--prompts",
        str(tmp_path / "classes.yaml"),
        "--mode",
        "multilabel",
        "--out",
        str(tmp_path / "out"),
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out/a.road.png").exists() and (tmp_path / "out/a.tree.png").exists()
    assert Image.open(tmp_path / "out/a.mask.png").getpalette()[3:6] == [255, 165, 0]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--device", "cuda"], 4, "not available"),
        (["--prompt", "find all roads"], 2, "noun phrase"),
        (["--threshold", "raod=0.3"], 2, "did you mean 'road'"),
        (["--tile", "huge"], 2, "--tile"),
        (["--decoder", "fast"], 2, "decoder train"),
        (["--prompt-template", "aerial photo"], 2, "`--prompt-template` must contain {name}"),
        (["--weights", "no-such-weights", "--offline"], 5, "no-such-weights"),
    ],
)
def test_exit_codes(tmp_path, args, code, message):
    if code == 4 and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _save(tmp_path / "a.png", 1)
    base = [str(tmp_path / "a.png"), "-p", "road", "--out", str(tmp_path / "out")]
    result = runner.invoke(app, ["segment", *base, *(["--weights", "tiny"] if "--weights" not in args else []), *args])
    assert result.exit_code == code, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "out/a.mask.png").exists()


def test_no_inputs_exits_3(tmp_path):
    (tmp_path / "empty").mkdir()
    result = _run(str(tmp_path / "empty"), "-p", "road")
    assert result.exit_code == 3 and "no images found" in result.stderr


def test_ctrl_c_writes_manifest_and_exits_130(tmp_path, monkeypatch):
    from digseg_cli.inference.pipeline import DigsegPipeline

    for name in ("a.png", "b.png"):
        _save(tmp_path / "in" / name, 1)
    original, calls = DigsegPipeline.__call__, []

    def interrupt_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DigsegPipeline, "__call__", interrupt_second)
    result = _run(str(tmp_path / "in"), "-p", "road", "--out", str(tmp_path / "out"))
    assert result.exit_code == 130, result.output
    assert json.loads((tmp_path / "out/run.json").read_text())["status"] == "interrupted"
    assert (tmp_path / "out/a.mask.png").exists() and "interrupted" in result.stderr


def test_dry_run_loads_no_model(tmp_path, monkeypatch):
    import digseg_cli.inference.pipeline

    monkeypatch.setattr(digseg_cli.inference.pipeline, "load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    _save(tmp_path / "a.png", 1, size=(40, 100))
    result = _run(str(tmp_path / "a.png"), "-p", "road", "--dry-run", "--json", "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    plan = [json.loads(line) for line in result.stdout.splitlines()]
    assert plan[0]["tiles"] > 1 and plan[0]["action"] == "segment"  # 100 px > 1.5 × 32 px: tiled
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("device", "code"), [("bogus", 2), ("mps", 4), ("cuda:7", 4)])
def test_dry_run_refuses_the_device_the_run_would_refuse(tmp_path, device, code):
    if code == 4 and (torch.cuda.device_count() > 7 or torch.backends.mps.is_available()):
        pytest.skip("this machine has the device")
    _save(tmp_path / "a.png", 1)
    args = [str(tmp_path / "a.png"), "-p", "road", "--out", str(tmp_path / "out"), "--device", device]
    planned, ran = _run(*args, "--dry-run"), _run(*args)
    assert planned.exit_code == ran.exit_code == code, planned.output
    assert planned.stderr == ran.stderr and len(planned.stderr.strip().splitlines()) == 1  # the same one line


def test_stdin_to_stdout_pipe(tmp_path):
    import io

    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(1).random((*SIZE, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    result = runner.invoke(
        app, ["segment", "-", "-p", "road, tree", "--weights", "tiny", "-o", "-"], input=buf.getvalue()
    )
    assert result.exit_code == 0, result.stderr
    mask = Image.open(io.BytesIO(result.stdout_bytes))
    assert mask.mode == "P" and mask.size == (SIZE[1], SIZE[0])
    assert runner.invoke(app, ["segment", "-", "a.png", "-p", "road", "--weights", "tiny"]).exit_code == 2


def test_subprocess_python_m(tmp_path):
    _save(tmp_path / "a.png", 1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIGSEG_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "digseg_cli",
            "segment",
            str(tmp_path / "a.png"),
            "--prompt",
            "road, tree",
            "--weights",
            "tiny",
            "--out",
            str(tmp_path / "out"),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines[0]["status"] == "ok" and lines[-1]["type"] == "summary"
    assert "device cpu" in proc.stderr and (tmp_path / "out/a.mask.png").exists()


def test_bf16_run_notes_that_reduced_precision_moves_boundaries(tmp_path, monkeypatch):
    """bf16 measurably changes labels (benchmarks/RESULTS.md row 5), so a bf16 run says so; fp32 does not.
    Shown as on a CPU with bf16 instructions, whatever this one has (the next test covers one without)."""
    from digseg_cli.inference import device

    monkeypatch.setattr(device, "cpu_has_bf16", lambda: True)
    image = _save(tmp_path / "in/a.png", 1)
    bf16 = _run(str(image), "-p", "road", "--device", "cpu", "--precision", "bf16", "--out", str(tmp_path / "bf16"))
    assert bf16.exit_code == 0, bf16.output
    assert "bf16 keeps fewer digits" in bf16.stderr and "the CPU default, --precision fp32, does not" in bf16.stderr
    assert json.loads((tmp_path / "bf16" / "run.json").read_text())["precision"] == "bf16"
    fp32 = _run(str(image), "-p", "road", "--device", "cpu", "--out", str(tmp_path / "fp32"))
    assert fp32.exit_code == 0 and "bf16 keeps" not in fp32.stderr


def test_bf16_on_a_cpu_without_bf16_instructions_notes_that_it_is_emulated(tmp_path, monkeypatch):
    """performance.md: without AVX512-BF16/AMX, torch emulates bf16 many times slower than fp32."""
    from digseg_cli.inference import device

    monkeypatch.setattr(device, "cpu_has_bf16", lambda: False)
    image = _save(tmp_path / "in/a.png", 1)
    result = _run(str(image), "-p", "road", "--device", "cpu", "--precision", "bf16", "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert "no bf16 instructions" in result.stderr and "emulates bf16" in result.stderr
    assert "bf16 keeps fewer digits" not in result.stderr  # one note: the one that matters more here
