"""``digseg eval`` through Typer's CliRunner: --predictions, --check, the model path (patched), exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from layouts import write_cityscapes, write_predictions
from PIL import Image
from typer.testing import CliRunner

from digseg_cli.cli.app import app
from digseg_cli.inference.seeds import image_seed

runner = CliRunner()


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def user_folder(root: Path, classes_in_masks: int = 3) -> Path:
    rng = np.random.default_rng(1)
    for i in range(3):
        _png(root / f"images/{i}.png", rng.integers(0, 255, (8, 8, 3), np.uint8))
        _png(root / f"masks/{i}.png", rng.integers(0, classes_in_masks, (8, 8)).astype(np.uint8))
    (root / "classes.txt").write_text("road\ntree\n")
    return root


def test_predictions_scoring_through_the_cli(tmp_path):
    layout = write_cityscapes(tmp_path / "data", n=3)
    preds = write_predictions(layout, tmp_path / "preds", wrong=0.0)  # perfect (ignore pixels hold 0: not scored)
    out = tmp_path / "report"
    res = runner.invoke(
        app,
        [
            "eval",
            "--dataset",
            "cityscapes",
            "--data-root",
            str(tmp_path / "data"),
            "--predictions",
            str(preds),
            "--out",
            str(out),
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    printed = json.loads(res.stdout)
    written = json.loads((out / "metrics.json").read_text())
    assert printed["metrics"] == written["metrics"] and printed["per_class"] == written["per_class"]
    assert written["metrics"]["miou"] == pytest.approx(1.0) and written["num_classes"] == 19
    assert written["absent_rule"] == "detectron2" and written["settings"]["predictions"] == str(preds)
    for name in ("per_class.csv", "per_image.csv", "confusion_matrix.csv", "confusion_matrix.png", "report.md"):
        assert (out / name).is_file(), name
    assert "1.0000" in res.stderr  # the Rich table shows the same numbers (4 decimals)


def test_predictions_of_another_size_exit_2_unless_resize_predictions(tmp_path):
    data = user_folder(tmp_path / "data")
    for i in range(3):  # labels are 8x8; the predictions 4x4 (every other pixel)
        mask = np.asarray(Image.open(data / f"masks/{i}.png"))[::2, ::2]
        _png(tmp_path / f"preds/{i}.png", mask)
    args = ["eval", "-d", str(data), "--predictions", str(tmp_path / "preds"), "--out", str(tmp_path / "report")]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2, refused.output
    assert (
        f"{tmp_path / 'preds'}/0.png is 4x4, its label 8x8" in refused.stderr
        and "--resize-predictions" in refused.stderr
    )
    assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.output
    resized = runner.invoke(app, [*args, "--resize-predictions", "--json"])
    assert resized.exit_code == 0, resized.output
    assert json.loads(resized.stdout)["num_images"] == 3
    wrong = runner.invoke(app, ["eval", "-d", str(data), "--resize-predictions", "--check"])
    assert wrong.exit_code == 2 and "applies to `--predictions` only" in wrong.stderr


def test_absent_rule_option_changes_the_number(tmp_path):
    folder = user_folder(tmp_path / "mine", classes_in_masks=2)  # "tree" (2) is never in the ground truth ...
    preds = tmp_path / "preds"
    for i in range(3):
        pred = np.asarray(Image.open(folder / f"masks/{i}.png")).copy()
        pred[0, :] = 2  # ... but predicted
        _png(preds / f"{i}.png", pred)
    nums = {}
    for rule in ("detectron2", "mmseg"):
        res = runner.invoke(
            app,
            [
                "eval",
                "-d",
                str(folder),
                "--predictions",
                str(preds),
                "--absent-rule",
                rule,
                "--out",
                str(tmp_path / rule),
                "--json",
            ],
        )
        assert res.exit_code == 0, res.output
        nums[rule] = json.loads(res.stdout)
    assert nums["mmseg"]["absent_rule"] == "mmseg"
    assert nums["mmseg"]["metrics"]["miou"] < nums["detectron2"]["metrics"]["miou"]
    assert not nums["detectron2"]["per_class"][2]["counted"] and nums["mmseg"]["per_class"][2]["counted"]
    assert nums["detectron2"]["per_class"][0]["name"] == "background"


def test_check_reports_and_exit_codes(tmp_path):
    write_cityscapes(tmp_path / "data", n=2)
    ok = runner.invoke(app, ["eval", "-d", "cityscapes", "--data-root", str(tmp_path / "data"), "--check", "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["images"] == 2
    missing = runner.invoke(app, ["eval", "-d", "ade20k", "--data-root", str(tmp_path / "none"), "--check"])
    assert missing.exit_code == 7
    gone = runner.invoke(
        app, ["eval", "-d", "cityscapes", "--data-root", str(tmp_path / "none"), "--predictions", str(tmp_path)]
    )
    assert gone.exit_code == 7 and "cityscapes-dataset.com" in gone.stderr
    manual = runner.invoke(app, ["eval", "-d", "ade20k-full", "--data-root", str(tmp_path), "--download"])
    assert manual.exit_code == 7 and "request_data" in manual.stderr
    assert runner.invoke(app, ["eval", "-d", "nope"]).exit_code == 2
    assert runner.invoke(app, ["eval", "-d", "cityscapes", "--absent-rule", "voc"]).exit_code == 2
    assert runner.invoke(app, ["eval", "-d", "cityscapes", "--tile", "maybe"]).exit_code == 2


class FakePipe:
    """Stands in for DigsegPipeline: records its calls and returns probabilities at half size."""

    device, dtype = torch.device("cpu"), torch.float32

    class config:  # noqa: N801
        prompt_template = "{name}"

    def __init__(self, note: str | None = None):
        self.calls, self.notes, self.note = [], [], note  # `note`: what the pipeline says on its first call

    def resolve_decoder(self, decoder):
        return "vae" if decoder == "auto" else decoder

    resolve_encoder = resolve_decoder  # no fast parts: auto is the VAE's

    def __call__(self, image, prompts, **kw):
        self.calls.append((image.shape, prompts, kw))
        if self.note and len(self.calls) == 1:
            self.notes.append(self.note)
        g = torch.Generator().manual_seed(kw["seed"])

        class Out:
            probs = torch.rand(len(prompts), image.shape[0] // 2, image.shape[1] // 2, generator=g)

        return Out()


def test_model_path_records_settings(tmp_path, monkeypatch):
    import digseg_cli.inference.pipeline as pipeline

    pipe = FakePipe(note="the VAE gave non-finite values in float16; it runs in float32 from now on")
    seen = {}

    def fake_load(name, *, device=None, dtype=None, **_):
        seen.update(name=name, device=device, dtype=dtype)
        return pipe

    monkeypatch.setattr(pipeline, "load_pipeline", fake_load)
    folder = user_folder(tmp_path / "mine")
    out = tmp_path / "report"
    res = runner.invoke(
        app,
        [
            "eval",
            "-d",
            str(folder),
            "--weights",
            "my-ckpt",
            "--limit",
            "2",
            "--steps",
            "1",
            "--short-side",
            "16",
            "--prompt-template",
            "a photo of {name}",
            "--seed",
            "5",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert seen == {"name": "my-ckpt", "device": "auto", "dtype": None}
    assert len(pipe.calls) == 2 and pipe.calls[0][0] == (16, 16, 3)  # resized to the short side first
    assert pipe.calls[0][1] == [["road"], ["tree"]] and pipe.calls[0][2]["prompt_template"] == "a photo of {name}"
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_images"] == 2
    assert m["settings"]["steps"] == 1 and m["settings"]["short_side"] == 16 and m["settings"]["weights"] == "my-ckpt"
    assert m["settings"]["decoder"] == "vae" and pipe.calls[0][2]["decoder"] == "vae"
    assert m["settings"]["encoder"] == "vae" and pipe.calls[0][2]["encoder"] == "vae"
    assert m["settings"]["precision_fallbacks"] == [pipe.note]  # said during the run, recorded at its end
    assert m["settings"]["precision"] == "fp32"  # named as run.json and --precision name it
    assert [c[2]["seed"] for c in pipe.calls] == [image_seed(5, "0"), image_seed(5, "1")]  # seed + image name


def test_refuge_official_bmp_predictions(tmp_path):
    base = tmp_path / "data/refuge2"
    gt = np.full((8, 8), 255, np.uint8)
    gt[2:6, 2:6] = 128
    gt[3:5, 3:5] = 0
    _png(base / "REFUGE-Test400/T0001.jpg", np.zeros((8, 8, 3), np.uint8))
    Image.fromarray(gt).save((base / "REFUGE-Test-GT").mkdir(parents=True) or base / "REFUGE-Test-GT/T0001.bmp")
    preds = tmp_path / "preds"
    preds.mkdir()
    Image.fromarray(gt).save(preds / "T0001.bmp")  # the challenge's submission format
    res = runner.invoke(
        app,
        [
            "eval",
            "-d",
            "refuge2",
            "--data-root",
            str(tmp_path / "data"),
            "--predictions",
            str(preds),
            "--out",
            str(tmp_path / "r"),
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    assert m["metrics"]["dice_disc"] == 1.0 and m["metrics"]["dice_cup"] == 1.0
    assert m["headline"]["name"].startswith("mean per-image Dice") and m["split"] == "test"


def test_two_processes_under_accelerate_launch_give_the_one_process_metrics(tmp_path):
    import os
    import subprocess
    import sys

    rng = np.random.default_rng(2)
    for i in range(5):  # 5 images: rank 0 scores 3, rank 1 scores 2
        _png(tmp_path / f"data/images/{i}.png", rng.integers(0, 255, (32, 32, 3), np.uint8))
        _png(tmp_path / f"data/masks/{i}.png", rng.integers(0, 3, (32, 32)).astype(np.uint8))
    (tmp_path / "data/classes.txt").write_text("road\ntree\n")
    args = ["eval", "--dataset", str(tmp_path / "data"), "--weights", "tiny", "--json", "--device", "cpu"]
    one = runner.invoke(app, [*args, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    # On a machine without GPUs, accelerate's torchrun launcher is `--multi_gpu`; the ranks join over gloo.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "DIGSEG_OFFLINE": "1"}
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "digseg_cli",
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr
    printed = json.loads(two.stdout)  # one JSON object: only rank 0 prints
    written = json.loads((tmp_path / "two/metrics.json").read_text())
    assert written["shard"] == {"rank": 0, "world_size": 2, "all_reduced": True}
    expected = json.loads((tmp_path / "one/metrics.json").read_text())
    assert printed["metrics"] == written["metrics"] == expected["metrics"]
    assert written["per_class"] == expected["per_class"]
    assert (tmp_path / "two/confusion_matrix.csv").read_text() == (tmp_path / "one/confusion_matrix.csv").read_text()
    assert two.stderr.count("reports written to") == 1


def test_sigterm_ends_an_eval_as_ctrl_c_does_with_exit_130_and_one_line(tmp_path):
    """Commands without a run loop of their own (eval, decoder train, weights) end on SIGTERM as on Ctrl-C:
    exit 130 and one line, not a kill with 143. The signal is sent once eval has probed `--out`, which it does
    after reading the dataset and before loading the model: well inside the command, long before it ends."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from digseg_cli.data.synth import write_synth_dataset
    from digseg_cli.models.checkpoint import build_compact, save_checkpoint

    save_checkpoint(tmp_path / "ck", build_compact("tiny"))
    write_synth_dataset(tmp_path / "data", 40, seed=0, size=32)
    out = tmp_path / "eval"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIGSEG_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    command = ["eval", "-d", str(tmp_path / "data"), "--weights", str(tmp_path / "ck"), "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "digseg_cli", *command], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["error: interrupted"] and not (out / "metrics.json").exists()
