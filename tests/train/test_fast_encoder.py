"""The fast image encoder (issue 21 item 3): shapes and layouts, checkpoint round trip, the pipeline's `encoder=`
switch and what `auto` picks, `digseg encoder train` end to end on a tiny model, and `--encoder` on the command
line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from digseg_cli.cli.app import app
from digseg_cli.core.fast_encoder import FastImageEncoder
from digseg_cli.errors import CheckpointError, UsageError
from digseg_cli.inference.pipeline import DigsegPipeline, load_model
from digseg_cli.models.checkpoint import load_checkpoint


@pytest.mark.parametrize("factor", [1, 4, 8])
def test_shape_and_layouts(factor):
    enc = FastImageEncoder(4, factor, width=16, blocks=1).eval()
    x = torch.rand(2, 3, 8 * factor, 4 * factor) * 2 - 1  # [2,3,H,W] in [-1,1]
    z = enc(x)
    assert z.shape == (2, 4, 8, 4) and z.dtype == torch.float32
    enc.to(memory_format=torch.channels_last)
    z_nhwc = enc(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(z_nhwc, z, atol=1e-5, rtol=1e-4)  # channels_last only reorders sums
    assert sum(p.numel() for p in FastImageEncoder(4, 8).parameters()) < 500_000


@pytest.fixture()
def tiny_with_fast(tiny_with):
    return tiny_with("fast_encoder")


def _set_record(folder, passed: bool | None) -> None:
    """Write (or, with None, remove) the checkpoint's fast-encoder accuracy record."""
    config_file = folder / "digseg_config.json"
    config = json.loads(config_file.read_text())
    evaluation = config.get("evaluation") or {}
    evaluation.pop("fast_encoder", None)
    if passed is not None:
        evaluation["fast_encoder"] = {"passed": passed, "miou_change_points": 0.1 if passed else -2.0}
    config_file.write_text(json.dumps({**config, "evaluation": evaluation}))


def test_save_load_round_trip(tiny_with_fast):
    pipe, folder = tiny_with_fast
    assert (folder / "fast_encoder" / "config.json").is_file()
    assert (folder / "fast_encoder" / "model.safetensors").is_file()
    again = load_checkpoint(folder).model
    assert again.fast_decoder is None and again.fast_encoder is not None
    again.to_memory_format(pipe.memory_format)  # a bare model is contiguous; the pipeline's is channels_last
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(again.encode_image_fast(x), pipe.model.encode_image_fast(x))
    assert pipe.model.encode_image_fast(x).shape == pipe.model.encode_image(x).shape


@pytest.mark.parametrize("part", ["fast_decoder", "fast_encoder"])
def test_each_fast_part_is_optional_and_loads_strictly(tiny_with, tmp_path, part):
    _, folder = tiny_with("fast_decoder", "fast_encoder")
    plain = tmp_path / "plain"
    shutil.copytree(folder, plain)
    shutil.rmtree(plain / part)
    again = load_checkpoint(plain).model
    assert getattr(again, part) is None
    assert all(getattr(again, other) is not None for other in ("fast_decoder", "fast_encoder") if other != part)
    cfg = json.loads((folder / part / "config.json").read_text())
    (folder / part / "config.json").write_text(json.dumps({**cfg, "blocks": cfg["blocks"] + 1}))
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(folder)


def test_auto_picks_the_fast_encoder_only_when_its_check_passed(tiny_with_fast):
    _, folder = tiny_with_fast
    image = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    picks = {}
    for passed in (None, False, True):
        _set_record(folder, passed)
        pipe = DigsegPipeline(load_checkpoint(folder))
        picks[passed] = pipe.resolve_encoder("auto")
        assert pipe.resolve_decoder("auto") == "vae"  # the other part keeps its own rule
    assert picks == {None: "vae", False: "vae", True: "fast"}
    fast = pipe(image, ["road", "tree"], encoder="fast")
    vae = pipe(image, ["road", "tree"], encoder="vae")
    assert fast.probs.shape == vae.probs.shape == (2, 40, 48)
    assert not torch.equal(fast.probs, vae.probs)
    assert torch.equal(pipe(image, ["road", "tree"]).probs, fast.probs)  # auto, passed: the fast encoder
    assert pipe(image, ["road"], encoder="fast", tile=32).probs.shape == (1, 40, 48)  # tiles encode the same way
    with pytest.raises(UsageError, match="vae, fast or auto"):
        pipe(image, ["road"], encoder="taesd")


def test_fast_needs_a_fast_encoder():
    pipe = DigsegPipeline(load_model("tiny"))
    assert pipe.resolve_encoder("auto") == "vae"
    with pytest.raises(UsageError, match="encoder train"):
        pipe(np.zeros((32, 32, 3), np.uint8), ["road"], encoder="fast")


def test_encoder_train_command_on_a_tiny_model(tmp_path):
    base = DigsegPipeline(load_model("tiny")).save_pretrained(tmp_path / "tiny")
    config = json.loads((base / "digseg_config.json").read_text())
    earlier = {"val_miou": 0.5, "with_another_fast_encoder": {"encoder": "fast", "miou": 0.4}}
    (base / "digseg_config.json").write_text(json.dumps({**config, "evaluation": earlier}))
    out = tmp_path / "with-fast"
    args = ["--steps", "3", "--pool", "2", "--val-limit", "2", "--width", "8", "--blocks", "1"]
    result = CliRunner().invoke(app, ["encoder", "train", "--weights", str(base), "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    evaluation = json.loads((out / "digseg_config.json").read_text())["evaluation"]
    assert set(evaluation) == {"val_miou", "fast_encoder"}  # a score made with another fast encoder is dropped
    ev = evaluation["fast_encoder"]
    for key in ("params", "miou_vae", "miou_fast", "miou_change_points", "tolerance_points", "passed"):
        assert key in ev, key
    assert ev["distillation"]["steps"] == 3 and ev["distillation"]["pool_images"] == 2
    assert ev["images"] == 2 and ev["decoder"] == "vae" and ev["encode_speedup"] > 0
    assert ev["passed"] == (abs(ev["miou_change_points"]) <= ev["tolerance_points"] == 0.5)
    reloaded = load_checkpoint(out).model
    assert sum(p.numel() for p in reloaded.fast_encoder.parameters()) == ev["params"]
    assert not (base / "fast_encoder").exists()  # the source checkpoint is untouched


def test_segment_and_eval_take_and_record_the_encoder(tiny_with_fast, tmp_path):
    from PIL import Image

    from digseg_cli.data.synth import write_synth_dataset

    _, folder = tiny_with_fast
    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(image)

    def segment(weights, out: str, *extra: str):
        args = ["segment", str(image), "-p", "road", "--weights", str(weights), "--out", str(tmp_path / out), *extra]
        return CliRunner().invoke(app, args)

    result = segment(folder, "fast", "--encoder", "fast")
    assert result.exit_code == 0, result.output
    resolved = json.loads((tmp_path / "fast" / "run.json").read_text())["resolved"]
    assert (resolved["encoder"], resolved["decoder"]) == ("fast", "vae")
    assert (tmp_path / "fast" / "a.mask.png").is_file()
    assert segment(folder, "auto").exit_code == 0  # no passed check recorded: auto keeps the VAE encoder
    assert json.loads((tmp_path / "auto" / "run.json").read_text())["resolved"]["encoder"] == "vae"
    # A run.json of a digseg before --encoder (no "encoder": it ran the VAE's) is continued, not refused...
    manifest = json.loads((tmp_path / "auto" / "run.json").read_text())
    del manifest["resolved"]["encoder"]
    (tmp_path / "auto" / "run.json").write_text(json.dumps(manifest))
    assert segment(folder, "auto", "--skip-existing").exit_code == 0
    # ...but outputs of the VAE encoder are not mixed with the fast encoder's.
    mixed = segment(folder, "auto", "--skip-existing", "--encoder", "fast")
    assert mixed.exit_code == 2 and "resolved.encoder" in mixed.output
    # --encoder fast on a checkpoint without one: one line naming the command that makes one, exit 2 (usage)
    plain = DigsegPipeline(load_model("tiny")).save_pretrained(tmp_path / "plain")
    refused = segment(plain, "refused", "--encoder", "fast")
    assert refused.exit_code == 2, refused.output
    assert "digseg encoder train" in refused.output and "Traceback" not in refused.output
    data = write_synth_dataset(tmp_path / "data", n=2, seed=0, size=32).out_dir
    args = ["eval", "--dataset", str(data), "--weights", str(folder), "--encoder", "fast", "--out", str(tmp_path / "e")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["settings"]["encoder"] == "fast"
