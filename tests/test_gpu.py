"""On a CUDA GPU (issue: performance, item 5): half precision against fp32, and `segment`, `eval` and
`train` end to end on the card. Every test here is skipped where torch sees no CUDA device (CI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from digseg_cli.cli.app import app

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _demo_probs(dtype: torch.dtype, decoder: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The demo's probabilities `[N,K,H,W]` and labels `[N,H,W]` on 8 synthetic 128 px scenes, on cuda."""
    from digseg_cli.data.synth import generate_scene
    from digseg_cli.inference.pipeline import DigsegPipeline
    from digseg_cli.models.loader import load_model

    loaded = load_model("demo")  # a fresh fp32 copy per precision: casting one copy twice would round twice
    names = [c["name"] for c in loaded.config.classes]
    pipe = DigsegPipeline(loaded, "cuda", dtype)
    outs = [pipe(generate_scene(np.random.default_rng(7000 + i), 128)[0], names, decoder=decoder) for i in range(8)]
    return torch.stack([o.probs for o in outs]), torch.stack([o.labels for o in outs])


@pytest.fixture(scope="module")
def fp32_reference():
    """fp32 on the GPU with TF32 off (cuDNN rounds convolutions to TF32 by default)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return {decoder: _demo_probs(torch.float32, decoder) for decoder in ("vae", "fast")}
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _difference(fp32_reference, dtype: torch.dtype, decoder: str) -> dict[str, float]:
    ref, ref_labels = fp32_reference[decoder]
    probs, labels = _demo_probs(dtype, decoder)
    assert torch.isfinite(probs).all()
    diff = (probs - ref).abs().flatten()
    stats = {
        "max": diff.max().item(),
        "mean": diff.mean().item(),
        "p99": diff.kthvalue(int(diff.numel() * 0.99)).values.item(),
        "p99.9": diff.kthvalue(int(diff.numel() * 0.999)).values.item(),
        "labels_changed": (labels != ref_labels).float().mean().item(),
    }
    print(f"{dtype} {decoder}: " + ", ".join(f"{k} {v:.2e}" for k, v in stats.items()))
    return stats


@pytest.mark.parametrize("decoder", ["vae", "fast"])
def test_fp16_probabilities_are_within_1e_2_of_fp32_everywhere(fp32_reference, decoder):
    assert _difference(fp32_reference, torch.float16, decoder)["max"] <= 1e-2


@pytest.mark.parametrize("decoder", ["vae", "fast"])
def test_bf16_probabilities_are_within_1e_2_of_fp32_but_on_class_boundaries(fp32_reference, decoder):
    """bf16 keeps 8 significand bits (fp16 11), and the error is not one part's: on an H200 the largest
    difference was 8e-2 with either decoder (on a CPU, keeping the VAE or the U-Net in fp32 still left 6e-2).
    It sits on the few pixels a class boundary crosses: the mean is 3e-4 and 0.1 % of labels change. So
    this asserts the bound for 99 % of the values, and the mean and the labels, not the largest value
    (benchmarks/RESULTS.md reports that one)."""
    stats = _difference(fp32_reference, torch.bfloat16, decoder)
    assert stats["p99"] <= 1e-2 and stats["mean"] <= 1e-3 and stats["labels_changed"] <= 5e-3


def test_segment_runs_on_cuda_in_its_default_precision(tmp_path, monkeypatch):
    monkeypatch.setenv("DIGSEG_OFFLINE", "1")
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "segment",
            str(REPO / "examples" / "aerial-1.png"),
            "--prompt",
            "road, tree, building, water, field",
            "--device",
            "cuda",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads((out / "run.json").read_text())
    assert record["device"].startswith("cuda") and "bf" in str(record["precision"]), (
        record["device"],
        record["precision"],
    )
    assert any(p.name.endswith(".mask.png") for p in out.iterdir())


def test_a_folder_on_cuda_shares_calls_sized_from_free_memory(tmp_path):
    """Equal-size pictures share calls on a GPU (`--batch-size auto` sized from free memory) and each gets what
    it gets alone, up to float rounding (fp32, TF32 off)."""
    from PIL import Image

    from digseg_cli.data.synth import generate_scene
    from digseg_cli.inference.pipeline import load_pipeline
    from digseg_cli.inference.prompts import parse_prompts
    from digseg_cli.segment.run import run_segment
    from digseg_cli.segment.settings import SegmentSettings

    for i in range(6):
        Image.fromarray(generate_scene(np.random.default_rng(900 + i), 128)[0]).save(tmp_path / f"{i}.png")
    classes, _ = parse_prompts("road, tree, building, water, field")
    settings = dict(classes=tuple(classes), save_probs=True, probs_format="npy", overlay=False)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        pipe = load_pipeline("demo", device="cuda", dtype=torch.float32)
        run_segment(
            [str(tmp_path / f"{i}.png") for i in range(6)], tmp_path / "folder", pipe, SegmentSettings(**settings)
        )
        assert pipe.batch_size > 16  # sized from an H200's free memory
        alone = SegmentSettings(**settings, batch_size=5)  # one image's five pairs per call
        run_segment([str(tmp_path / "3.png")], tmp_path / "alone", pipe, alone)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    for name in ("road", "water"):
        grouped, single = (np.load(tmp_path / run / f"3.{name}.prob.npy") for run in ("folder", "alone"))
        np.testing.assert_allclose(grouped, single, atol=1e-4)


def test_eval_on_cuda_matches_the_cpu(tmp_path, monkeypatch):
    """The same 8 synthetic images scored on the CPU (fp32) and on the GPU (its default, bf16)."""
    monkeypatch.setenv("DIGSEG_OFFLINE", "1")
    miou = {}
    for device in ("cpu", "cuda"):
        result = runner.invoke(
            app,
            [
                "eval",
                "--dataset",
                "synth",
                "--weights",
                "demo",
                "--limit",
                "8",
                "--device",
                device,
                "--data-root",
                str(tmp_path / "data"),
                "--out",
                str(tmp_path / device),
            ],
        )
        assert result.exit_code == 0, result.output
        miou[device] = json.loads((tmp_path / device / "metrics.json").read_text())["metrics"]["miou"]
    print(f"eval mIoU on 8 images: cpu fp32 {miou['cpu']:.4f}, cuda bf16 {miou['cuda']:.4f}")
    assert miou["cuda"] == pytest.approx(miou["cpu"], abs=0.01)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_train_with_mixed_precision_on_cuda(tmp_path, precision):
    from digseg_cli import load_pipeline
    from digseg_cli.data.synth import write_synth_dataset

    data = tmp_path / "scenes"
    write_synth_dataset(data, 24, seed=11, size=32)
    out = tmp_path / "run"
    # A process of its own, as a user runs it: Accelerate fixes one mixed-precision mode per process.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "digseg_cli",
            "train",
            "--data",
            str(data),
            "--out",
            str(out),
            "--base",
            "tiny",
            "--batch-size",
            "4",
            "--lr",
            "1e-3",
            "--warmup-steps",
            "2",
            "--max-steps",
            "20",
            "--val-every",
            "10",
            "--save-every",
            "10",
            "--vae-steps",
            "10",
            "--precision",
            precision,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "DIGSEG_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and all(np.isfinite(losses)), records[-3:]
    assert [r["step"] for r in records if "val_miou" in r] == [10, 20]
    pipe = load_pipeline(out / "last", device="cuda")
    assert torch.isfinite(pipe(np.zeros((32, 32, 3), np.uint8), ["road"]).probs).all()
