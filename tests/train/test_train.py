"""`digseg train` (issue: train): checkpoints and metrics, resume after SIGKILL, SIGTERM, two processes,
and fine-tuning from an SD-format base."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from digseg_cli.cli.app import app

runner = CliRunner()
TINY = ["--base", "tiny", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "2", "--seed", "3"]


@pytest.fixture(scope="module")
def synth32(tmp_path_factory) -> Path:
    from digseg_cli.data.synth import write_synth_dataset

    folder = tmp_path_factory.mktemp("synth") / "scenes"
    write_synth_dataset(folder, 24, seed=11, size=32)
    return folder


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DIGSEG_OFFLINE": "1"}


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "digseg_cli", "train", *args]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for part in (
        "unet/diffusion_pytorch_model.safetensors",
        "text_pathway/model.safetensors",
        "text_encoder/model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ):
        out.update({f"{part}:{k}": v for k, v in load_file(str(folder / part)).items()})
    return out


def test_train_writes_checkpoints_metrics_and_config(synth32, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(synth32),
            "--out",
            str(out),
            *TINY,
            "--max-steps",
            "6",
            "--val-every",
            "3",
            "--save-every",
            "3",
            "--vae-steps",
            "2",
            "--ema",
            "0.9",
        ],
    )
    assert result.exit_code == 0, result.output
    for name in (
        "config.json",
        "metrics.csv",
        "metrics.jsonl",
        "last/trainer_state.safetensors",
        "last/trainer_state.json",
        "last/digseg_config.json",
        "best/digseg_config.json",
    ):
        assert (out / name).exists(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_miou" in r] == [3, 6]
    config = json.loads((out / "last" / "digseg_config.json").read_text())
    assert config["objective"] == "one-step" and [c["name"] for c in config["classes"]][:2] == ["road", "tree"]
    assert config["training"]["step"] == 6
    from digseg_cli import load_pipeline

    pipe = load_pipeline(out / "best")
    assert pipe(torch.zeros(32, 32, 3, dtype=torch.uint8).numpy(), ["road"]).probs.shape == (1, 32, 32)
    # A second run into the same folder must not silently overwrite the first.
    again = runner.invoke(app, ["train", "--data", str(synth32), "--out", str(out), *TINY, "--max-steps", "1"])
    assert again.exit_code == 2 and "--resume" in again.output


def test_bf16_training_on_a_cpu_without_bf16_instructions_notes_that_it_is_emulated(synth32, tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState

    from digseg_cli.inference import device

    monkeypatch.setattr(device, "cpu_has_bf16", lambda: False)
    # Accelerate keeps one mixed-precision setting per process: this test's bf16 must not meet the other
    # in-process runs' fp32, before or after it.
    AcceleratorState._reset_state()
    try:
        result = runner.invoke(
            app,
            [
                "train",
                "--data",
                str(synth32),
                "--out",
                str(tmp_path / "run"),
                *TINY,
                "--max-steps",
                "1",
                "--val-every",
                "1",
                "--vae-steps",
                "0",
                "--cpu",
                "--precision",
                "bf16",
            ],
        )
    finally:
        AcceleratorState._reset_state()
    assert result.exit_code == 0, result.output
    assert "emulates bf16" in result.stderr


def test_data_check_runs_first_and_stops_with_exit_7(tmp_path):
    from digseg_cli.data.synth import write_synth_dataset

    data = tmp_path / "bad"
    write_synth_dataset(data, 4, seed=0, size=32)
    (data / "masks" / "00001.png").unlink()  # an image without its mask
    (data / "images" / "00002.png").write_bytes(b"not an image")
    result = runner.invoke(
        app, ["train", "--data", str(data), "--out", str(tmp_path / "run"), *TINY, "--max-steps", "1"]
    )
    assert result.exit_code == 7
    assert "00001" in result.output and "00002" in result.output and "Traceback" not in result.output


def _wait_for_checkpoint(out: Path, proc: subprocess.Popen, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    config = out / "last" / "digseg_config.json"
    while time.monotonic() < deadline:
        if config.exists():
            return json.loads(config.read_text())["training"]["step"]
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.01)
    raise AssertionError("no checkpoint appeared")


def test_resume_after_sigkill_with_loader_workers_ends_with_the_same_weights(synth32, tmp_path):
    """The uninterrupted run reads its batches in the training process, the killed and resumed one in two
    loader workers: the same weights."""
    args = [
        "--data",
        str(synth32),
        *TINY,
        "--max-steps",
        "40",
        "--save-every",
        "4",
        "--val-every",
        "0",
        "--deterministic",
        "--cpu",
    ]
    full = tmp_path / "full"
    subprocess.run(_cmd(*args, "--out", str(full)), env=_env(), check=True, capture_output=True, timeout=300)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _cmd(*args, "--workers", "2", "--out", str(killed)),
        env=_env(),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    step = _wait_for_checkpoint(killed, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert step < 40, "the run finished before it could be killed"
    assert json.loads((killed / "last" / "digseg_config.json").read_text())["training"]["step"] < 40
    subprocess.run(
        _cmd(*args, "--out", str(killed), "--resume"), env=_env(), check=True, capture_output=True, timeout=300
    )

    a, b = _weights(full / "last"), _weights(killed / "last")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run diverged from the uninterrupted one"
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "metrics after the resume point were written twice"


def test_sigterm_writes_a_checkpoint_and_exits_130_then_resume_extends(synth32, tmp_path):
    out = tmp_path / "run"
    args = ["--data", str(synth32), *TINY, "--val-every", "0", "--save-every", "1000", "--cpu"]
    proc = subprocess.Popen(
        _cmd(*args, "--out", str(out), "--max-steps", "100000"),
        env=_env(),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (out / "metrics.csv").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # let it take a few steps
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    step = json.loads((out / "last" / "digseg_config.json").read_text())["training"]["step"]
    assert 0 < step < 100000
    # The command the message suggests, plus a longer --max-steps: the run's own settings are reused.
    done = subprocess.run(
        _cmd("--out", str(out), "--resume", "--max-steps", str(step + 2)), env=_env(), capture_output=True, timeout=300
    )
    assert done.returncode == 0, done.stderr.decode()
    resumed = json.loads((out / "last" / "digseg_config.json").read_text())["training"]
    assert resumed["step"] == step + 2
    assert resumed["settings"]["data"] == str(synth32) and resumed["settings"]["lr"] == 1e-3


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_in_the_vae_stage_writes_the_model_and_exits_130(synth32, tmp_path, sig):
    out = tmp_path / "run"
    args = ["--data", str(synth32), *TINY, "--vae-steps", "100000", "--max-steps", "2", "--val-every", "0", "--cpu"]
    proc = subprocess.Popen(
        _cmd(*args, "--out", str(out)),
        env=_env(),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        # A shell starts background jobs (this test run, perhaps) with SIGINT ignored, and digseg leaves an
        # ignored signal ignored: the child gets the default a terminal's user has.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not (out / "config.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(3.0)  # the model is built and the VAE stage under way (or about to be: a signal waits for it)
    proc.send_signal(sig)
    stderr = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 130, stderr
    assert "in the VAE stage after" in stderr and "--init" in stderr and "Traceback" not in stderr
    training = json.loads((out / "last" / "digseg_config.json").read_text())["training"]
    assert 1 <= training["vae_steps_done"] < 100000 and training["step"] == 0
    assert not (out / "last" / "trainer_state.pt").exists()  # nothing of a U-Net stage to resume
    if sig == signal.SIGTERM:  # the command the message suggests starts the U-Net stage from it
        done = subprocess.run(
            _cmd("--data", str(synth32), *TINY, "--init", str(out / "last"), "--out", str(tmp_path / "next"))
            + ["--max-steps", "1", "--val-every", "0", "--cpu"],
            env=_env(),
            capture_output=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr.decode()


def test_two_processes_end_with_identical_weights(synth32, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "digseg_cli",
        "-v",
        "train",
        "--data",
        str(synth32),
        "--out",
        str(out),
        *TINY,
        "--batch-size",
        "2",
        "--max-steps",
        "4",
        "--val-every",
        "2",
        "--save-every",
        "2",
        "--cpu",
    ]
    done = subprocess.run(cmd, env=_env(), capture_output=True, timeout=300)
    stderr = done.stderr.decode()
    assert done.returncode == 0, stderr
    assert "all 2 processes hold identical weights" in stderr
    assert stderr.count("done: 4 steps") == 1  # only the main process reports
    assert json.loads((out / "last" / "digseg_config.json").read_text())["training"]["step"] == 4


def test_finetune_from_tiny_sd_base_keeps_vae_and_text_encoder_frozen(synth32, tiny_sd_base, tmp_path):
    out = tmp_path / "sd-run"
    result = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(synth32),
            "--out",
            str(out),
            "--base",
            str(tiny_sd_base),
            "--resolution",
            "32",
            "--batch-size",
            "2",
            "--max-steps",
            "3",
            "--val-every",
            "0",
            "--lr",
            "1e-3",
            "--objective",
            "diffusion",
        ],
    )
    assert result.exit_code == 0, result.output
    config = json.loads((out / "last" / "digseg_config.json").read_text())
    assert config["base_model"] == str(tiny_sd_base) and config["prediction_type"] == "epsilon"

    def both(part: str) -> tuple[dict, dict]:
        return load_file(str(out / "last" / part)), load_file(str(tiny_sd_base / part))

    for frozen in ("text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        tuned, base = both(frozen)
        assert tuned.keys() == base.keys() and all(torch.equal(tuned[k], base[k]) for k in base), frozen
    # ... while the U-Net trains: every tensor the base shares with it (conv_in is widened) moved.
    tuned, base = both("unet/diffusion_pytorch_model.safetensors")
    shared = [k for k in base if tuned[k].shape == base[k].shape]
    assert len(shared) == len(base) - 1  # conv_in.weight: 4 → 8 input channels
    unchanged = [k for k in shared if torch.equal(tuned[k], base[k])]
    assert not unchanged, unchanged


def test_finetune_with_init_does_not_inherit_the_parents_scores_or_fast_decoder_check(synth32, tmp_path):
    """A model fine-tuned from a checkpoint records only what its own run measured: the parent's scores
    and its fast decoder's passed check (measured on other weights) are gone, so `--decoder auto` is vae."""
    from digseg_cli.core.fast_decoder import FastMaskDecoder
    from digseg_cli.inference.pipeline import DigsegPipeline, load_model

    parent = load_model("tiny")
    parent.model.fast_decoder = FastMaskDecoder(parent.model.latent_channels, parent.model.vae_scale_factor, width=8)
    parent.config.evaluation = {
        "val_miou": 0.97,
        "val_step": 4400,
        "synth": {"miou": 0.95, "decoder": "fast"},
        "fast_decoder": {"passed": True, "miou_change_points": 0.1},
    }
    parent_dir = DigsegPipeline(parent).save_pretrained(tmp_path / "parent")
    assert DigsegPipeline(load_model(parent_dir)).resolve_decoder("auto") == "fast"  # the parent's check counts

    out = tmp_path / "tuned"
    result = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(synth32),
            "--out",
            str(out),
            "--init",
            str(parent_dir),
            *TINY[2:],
            "--max-steps",
            "2",
            "--val-every",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    val = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "val_miou" in line]
    for kind in ("last", "best"):
        evaluation = json.loads((out / kind / "digseg_config.json").read_text())["evaluation"]
        assert evaluation == {"val_miou": val[-1]["val_miou"], "val_step": 2}, kind
    image = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(image)
    seg = runner.invoke(
        app, ["segment", str(image), "-p", "road", "--weights", str(out / "best"), "--out", str(tmp_path / "seg")]
    )
    assert seg.exit_code == 0, seg.output
    assert json.loads((tmp_path / "seg" / "run.json").read_text())["resolved"]["decoder"] == "vae"


def test_validation_miou_is_what_digseg_eval_reports_for_the_same_weights(synth32, tmp_path):
    """Training validates with `digseg eval`'s scorer: its number for best/ is eval's, to the last digit."""
    from digseg_cli.data.synth import write_synth_dataset

    val = write_synth_dataset(tmp_path / "val", 5, seed=12, size=32).out_dir
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(synth32),
            "--val",
            str(val),
            "--out",
            str(out),
            *TINY,
            "--max-steps",
            "2",
            "--val-every",
            "2",
            "--objective",
            "diffusion",
        ],
    )
    assert result.exit_code == 0, result.output
    record = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    evaluated = runner.invoke(
        app,
        ["eval", "--dataset", str(val), "--weights", str(out / "best"), "--seed", "3", "--out", str(tmp_path / "eval")],
    )
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert record["val_miou"] == metrics["metrics"]["miou"]
    assert record["val_iou"] == {c["name"]: c["iou"] for c in metrics["per_class"]}


def test_foreground_weight_weighs_the_latent_pixels_the_target_covers(monkeypatch):
    """`--foreground-weight 5`: latent pixels under the target weigh 5, the rest 1 (1 = no weight at all)."""
    from digseg_cli.core import diffusion
    from digseg_cli.inference.pipeline import load_model
    from digseg_cli.train.loss import batch_loss

    loaded = load_model("tiny")
    model, f = loaded.model, loaded.model.vae_scale_factor
    seen = []
    monkeypatch.setattr(
        diffusion, "training_loss", lambda *a, weight=None, **k: seen.append(weight) or torch.tensor(0.0)
    )
    target = torch.zeros(2, 1, 32, 32)
    target[0, :, :8, :8] = 1  # the top-left 8x8 pixels of the first image; the second is empty
    target[1, :, 9:10, 9:10] = 1  # one pixel: its latent pixel counts as covered
    ids = loaded.tokenizer(
        ["road", "road"], padding="max_length", max_length=loaded.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    batch = {"pixel_values": torch.zeros(2, 3, 32, 32), "target": target, "input_ids": ids}
    sched = diffusion.make_scheduler(loaded.scheduler_config)
    for w in (1.0, 5.0):
        batch_loss(model, batch, sched, objective="one-step", foreground_weight=w)
    plain, weighted = seen
    assert plain is None
    expected = torch.ones(2, 1, 32 // f, 32 // f)
    expected[0, :, : 8 // f, : 8 // f] = 5
    expected[1, :, 9 // f, 9 // f] = 5
    assert torch.equal(weighted, expected)


def fresh_small_on_the_demos_vae(folder: Path) -> Path:
    """A checkpoint of a fresh compact `small` (U-Net, text encoder and pathway as `build_components` makes
    them) whose VAE is the demo's trained one, as an SD base brings its trained VAE."""
    from digseg_cli.models.checkpoint import save_checkpoint
    from digseg_cli.models.loader import load_model

    fresh, demo = load_model("small"), load_model("demo")
    fresh.model.vae.load_state_dict(demo.model.vae.state_dict())
    fresh.model.vae.register_to_config(scaling_factor=demo.model.vae.config.scaling_factor)
    return save_checkpoint(folder, fresh)


LEARNING_STEPS = 600


@pytest.mark.slow
def test_a_fresh_small_unet_on_the_demos_vae_reaches_validation_miou_0_4(tmp_path, one_torch_thread):
    """The U-Net stage of a compact base from scratch (U-Net, text encoder and pathway fresh) on synth
    scenes, on the demo's trained VAE, as training from an SD base starts on SD's VAE; stage 1 (the VAE from
    scratch) is tested on its own above (`test_the_vae_stage_learns_...`), because both stages together
    took 15 minutes of the 2-core CPU (600 VAE steps, 900 U-Net steps, 40 tiled validation images), more than
    the whole suite may take.

    Measured, 1 thread per run, validation as `digseg eval` scores it (synonyms included) on 8 held-out
    scenes, with training seeds 0-4: 0.525, 0.592, 0.617, 0.549, 0.567 on an AVX2 CPU (on 16 scenes the same
    checkpoints scored 0.541, 0.557, 0.591, 0.567, 0.583, at 35 s more of the suite's time); seed 4 alone took
    423 s, 333 of them training. The test runs on one torch thread, as measured, and is then the same
    computation on every run of one CPU (two threads sum in another order, and the training's path moves with
    it); another CPU's kernels move the path too: seed 0 scored 0.463 on an AVX-512 CPU. Those were on the earlier
    demo's VAE; on the retrained demo's (issue 19), seed 0 scored 0.548 on the AVX-512 CPU. Hence the bar of 0.4.
    At 64 px buildings are about one latent pixel wide and stay near 0 IoU; background, water and field
    carry the mean."""
    from digseg_cli.data.synth import write_synth_dataset

    write_synth_dataset(tmp_path / "scenes", 400, seed=0, size=128)
    init = fresh_small_on_the_demos_vae(tmp_path / "init")
    options = {
        "--data": tmp_path / "scenes",
        "--out": tmp_path / "run",
        "--init": init,
        "--resolution": 64,
        "--max-steps": LEARNING_STEPS,
        "--batch-size": 8,
        "--lr": "1e-3",
        "--warmup-steps": 30,
        "--val-every": LEARNING_STEPS,
        "--val-limit": 8,
        "--save-every": LEARNING_STEPS,
        "--ema": 0.99,
        "--foreground-weight": 5,
        "--seed": 0,
    }
    result = runner.invoke(app, ["train", *(str(x) for pair in options.items() for x in pair)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    validation = [r for r in records if "val_miou" in r]
    assert validation[-1]["step"] == LEARNING_STEPS
    assert validation[-1]["val_miou"] >= 0.4, validation[-1]


def test_the_vae_stage_learns_to_reconstruct_images_and_masks_and_calibrates_its_scale(synth32, one_torch_thread):
    """Stage 1 of a compact base on its own (the slow learning test starts from the demo's trained VAE): a
    fresh tiny VAE, 150 steps, reconstructs held-out images and masks with a fraction of its first error
    (measured: 0.065-0.070 of it with training seeds 0, 1 and 2; the test asks for under 0.25)."""
    from digseg_cli.models.loader import load_model
    from digseg_cli.train.samples import SegmentationTrainDataset
    from digseg_cli.train.sources import pairs_source, prepare_data
    from digseg_cli.train.vae_stage import calibrate_latent_scale, train_vae

    classes, train_pairs, val_pairs = prepare_data(synth32, None, class_name=None, val_split=0.25, seed=0)
    dataset = SegmentationTrainDataset([pairs_source(train_pairs, classes)], 32, seed=0)
    held_out = SegmentationTrainDataset([pairs_source(val_pairs, classes)], 32, seed=0, augment=False)
    torch.manual_seed(0)
    vae = load_model("tiny").model.vae

    @torch.no_grad()
    def error() -> float:
        x = torch.stack([held_out[i]["pixel_values"] for i in range(len(held_out))])  # [n,3,32,32]
        m = torch.stack([held_out[i]["target"] for i in range(len(held_out))]).expand(-1, 3, -1, -1) * 2 - 1
        both = torch.cat([x, m])
        return float(((vae.decode(vae.encode(both).latent_dist.mean).sample - both) ** 2).mean())

    before = error()
    done = train_vae(vae, dataset, steps=150, batch_size=8, lr=1e-3, seed=0, device="cpu", emit=lambda e: None)
    after = error()
    assert done == 150 and after < 0.25 * before, (before, after)
    calibrate_latent_scale(vae, dataset, "cpu")
    assert 0 < vae.config.scaling_factor != 1.0
