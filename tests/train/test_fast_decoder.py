"""The fast mask decoder (issue: Performance): shapes and range, checkpoint round trip, the pipeline's
`decoder=` switch, and `digseg decoder train` end to end on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from digseg_cli.cli.app import app
from digseg_cli.core.fast_decoder import FastMaskDecoder
from digseg_cli.errors import UsageError
from digseg_cli.inference.pipeline import DigsegPipeline, load_model
from digseg_cli.models.checkpoint import load_checkpoint


@pytest.mark.parametrize("factor", [1, 4, 8])
def test_shape_and_range(factor):
    dec = FastMaskDecoder(4, factor, width=16, blocks=1).eval()
    probs = dec(torch.randn(3, 4, 5, 7) * 10)
    assert probs.shape == (3, 5 * factor, 7 * factor)
    assert probs.dtype == torch.float32 and 0 <= probs.min() and probs.max() <= 1
    assert sum(p.numel() for p in FastMaskDecoder(4, 8).parameters()) < 500_000  # the brief: ~0.1–0.5 M


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_rejects_a_scale_factor_that_is_not_a_power_of_two(kind):
    from digseg_cli.core.fast_encoder import FastImageEncoder

    with pytest.raises(ValueError, match="power of 2"):
        {"decoder": FastMaskDecoder, "encoder": FastImageEncoder}[kind](4, 6)


@pytest.fixture()
def tiny_with_fast(tiny_with):
    return tiny_with("fast_decoder")


def test_save_load_round_trip(tiny_with_fast):
    pipe, folder = tiny_with_fast
    assert (folder / "fast_decoder" / "config.json").is_file()
    assert (folder / "fast_decoder" / "model.safetensors").is_file()
    again = load_checkpoint(folder).model
    again.to_memory_format(pipe.memory_format)  # a bare model is contiguous; the pipeline's is channels_last
    z = torch.randn(2, 4, 4, 4)
    assert torch.equal(again.decode_probs_fast(z), pipe.model.decode_probs_fast(z))
    # Without fast_decoder/ a checkpoint loads, and a mismatched one is refused: test_fast_encoder.py, both parts.


def test_pipeline_decoder_switch(tiny_with_fast):
    pipe, _ = tiny_with_fast
    image = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    fast = pipe(image, ["road", "tree"], decoder="fast")
    vae = pipe(image, ["road", "tree"], decoder="vae")
    assert fast.probs.shape == vae.probs.shape == (2, 40, 48)
    assert not torch.equal(fast.probs, vae.probs)
    # auto: the VAE until the checkpoint records a passed accuracy check, then the fast decoder.
    assert pipe.resolve_decoder("auto") == "vae"
    pipe.config.evaluation["fast_decoder"] = {"passed": True}
    assert pipe.resolve_decoder("auto") == "fast"
    assert torch.equal(pipe(image, ["road", "tree"], decoder="auto").probs, fast.probs)
    # tiled inference goes through the same decoder
    tiled = pipe(image, ["road"], decoder="fast", tile=32)
    assert tiled.probs.shape == (1, 40, 48)
    with pytest.raises(UsageError, match="vae, fast or auto"):
        pipe(image, ["road"], decoder="taesd")


def test_fast_needs_a_fast_decoder():
    pipe = DigsegPipeline(load_model("tiny"))
    image = np.zeros((32, 32, 3), np.uint8)
    assert pipe.resolve_decoder("auto") == "vae"
    with pytest.raises(UsageError, match="decoder train"):
        pipe(image, ["road"], decoder="fast")


def test_decoder_train_command_on_a_tiny_model(tmp_path):
    base = DigsegPipeline(load_model("tiny")).save_pretrained(tmp_path / "tiny")
    out = tmp_path / "with-fast"
    result = CliRunner().invoke(
        app,
        [
            "decoder",
            "train",
            "--weights",
            str(base),
            "--out",
            str(out),
            "--steps",
            "3",
            "--pool",
            "2",
            "--val-limit",
            "2",
            "--width",
            "8",
            "--blocks",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    config = json.loads((out / "digseg_config.json").read_text())
    ev = config["evaluation"]["fast_decoder"]
    for key in ("miou_vae", "miou_fast", "miou_change_points", "passed", "decode_speedup", "tolerance_points"):
        assert key in ev, key
    assert ev["images"] == 2 and ev["passed"] == (abs(ev["miou_change_points"]) <= 0.5)
    assert load_checkpoint(out).model.fast_decoder is not None
    # the source checkpoint is untouched, and --out is not overwritten without --overwrite
    assert not (base / "fast_decoder").exists()
    again = CliRunner().invoke(app, ["decoder", "train", "--weights", str(base), "--out", str(out), "--steps", "1"])
    assert again.exit_code != 0 and "overwrite" in again.output


def test_segment_and_eval_record_the_decoder_they_used(tiny_with_fast, tmp_path):
    from PIL import Image

    from digseg_cli.data.synth import write_synth_dataset

    _, folder = tiny_with_fast
    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(image)

    def segment(out: str, *extra: str) -> str:
        result = CliRunner().invoke(
            app, ["segment", str(image), "-p", "road", "--weights", str(folder), "--out", str(tmp_path / out), *extra]
        )
        assert result.exit_code == 0, result.output
        return json.loads((tmp_path / out / "run.json").read_text())["resolved"]["decoder"]

    assert segment("auto-unchecked") == "vae"  # no passed accuracy check recorded: auto keeps the VAE decoder
    config_file = folder / "digseg_config.json"
    config = json.loads(config_file.read_text())
    config.setdefault("evaluation", {})["fast_decoder"] = {"passed": True}
    config_file.write_text(json.dumps(config))
    assert segment("auto-passed") == "fast"
    assert segment("vae", "--decoder", "vae") == "vae"
    data = write_synth_dataset(tmp_path / "data", n=2, seed=0, size=32).out_dir
    result = CliRunner().invoke(
        app,
        ["eval", "--dataset", str(data), "--weights", str(folder), "--decoder", "vae", "--out", str(tmp_path / "eval")],
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["settings"]["decoder"] == "vae"


@pytest.mark.parametrize("part", ["decoder", "encoder"])
def test_distill_help_does_not_import_torch(part):
    import subprocess
    import sys

    code = (
        f"import sys\nsys.argv = ['digseg', '{part}', 'train', '--help']\nfrom digseg_cli.cli.app import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "assert 'torch' not in sys.modules\n"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
