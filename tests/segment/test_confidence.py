"""`segment --save-confidence`: the winning class's probability, its margin and, with an ensemble, its spread
across the members (`SegmentationOutput.spread`), as 16-bit PNGs named, checked and resumed like every output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from digseg_cli.inference import prompts
from digseg_cli.inference.images import read_png16
from digseg_cli.inference.pipeline import DigsegPipeline, load_pipeline
from digseg_cli.segment import inputs
from digseg_cli.segment import outputs as seg_outputs
from digseg_cli.segment import run as seg
from digseg_cli.segment import settings as seg_settings

SIZE = (24, 32)  # (H, W)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny")  # one-step: its ensemble members are flipped and rotated copies


def _settings(**kw) -> seg_settings.SegmentSettings:
    classes, _ = prompts.parse_prompts(kw.pop("prompt", "road|street, tree"))
    return seg_settings.SegmentSettings(classes=tuple(classes), overlay=False, **kw)


def _image(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*SIZE, 3), np.uint8)).save(path)
    return path


class _Members(DigsegPipeline):
    """The pipeline with a stand-in model call: member m's map of text t is `VALUES[m][t]` everywhere."""

    VALUES = [[0.2, 0.4, 0.9], [0.6, 0.0, 0.3], [0.1, 0.2, 0.6]]  # 3 members × 3 texts (class 0 has 2 texts)

    def _predict_padded(self, x, text, run, generator, timings, cached=None):
        self.calls = getattr(self, "calls", 0) + 1
        values = torch.tensor(self.VALUES[(self.calls - 1) % run.ensemble])[: text[0].shape[0]]  # member by member
        return values[None, :, None, None].expand(x.shape[0], -1, *x.shape[-2:]).clone()


def test_spread_is_the_members_standard_deviation_per_class(pipe):
    members = _Members(pipe.loaded)
    image = np.zeros((16, 16, 3), np.uint8)
    out = members(image, [["a", "b"], "c"], ensemble=3, spread=True, tile="off")
    per_class = np.array([[np.mean(v[:2]), v[2]] for v in _Members.VALUES])  # [members, K]
    np.testing.assert_allclose(out.probs[:, 0, 0].numpy(), per_class.mean(0), atol=1e-6)
    np.testing.assert_allclose(out.spread[:, 5, 7].numpy(), per_class.std(0), atol=1e-6)  # population std
    # Tiled, every window sees the same members: the blend keeps each class's spread.
    members.calls = 0
    tiled = members(image, [["a", "b"], "c"], ensemble=3, spread=True, tile=8, resolution=0)
    np.testing.assert_allclose(tiled.spread.numpy(), out.spread.numpy(), atol=1e-6)
    assert members(image, ["a"], ensemble=1, spread=True).spread is None
    assert members(image, ["a"], ensemble=3).spread is None


def test_asking_for_the_spread_changes_no_probability(pipe):
    image = np.random.default_rng(0).integers(0, 255, (*SIZE, 3), np.uint8)
    for tile in ("off", 16):
        kw = dict(ensemble=4, tile=tile, resolution=0 if tile != "off" else None)
        plain, spread = (
            pipe(image, ["road", ["tree", "bush"]], **kw),
            pipe(image, ["road", ["tree", "bush"]], spread=True, **kw),
        )
        assert torch.equal(plain.probs, spread.probs) and torch.equal(plain.labels, spread.labels)
        assert spread.spread.shape == (2, *SIZE) and float(spread.spread.min()) >= 0
        assert float(spread.spread.max()) > 1e-3  # the flips disagree somewhere


def test_confidence_maps_decode_to_the_winner_its_margin_and_spread(tmp_path, pipe):
    _image(tmp_path / "in/a.png", 1)
    out, results = tmp_path / "out", []
    settings = _settings(save_confidence=True, save_probs=True, probs_format="npy", ensemble=3)
    seg.run_segment([str(tmp_path / "in")], out, pipe, settings, on_result=results.append)
    assert {"confidence", "margin", "spread"} <= set(results[0].outputs)
    probs = np.stack([np.load(out / f"a.{name}.prob.npy") for name in ("road", "tree")])  # [K,H,W]
    top, runner_up = probs.max(0), probs.min(0)
    scale = 0.5 / 65535 + 1e-7  # 16-bit PNG: value / 65535, rounded
    np.testing.assert_allclose(read_png16(out / "a.confidence.png"), top, atol=scale)
    np.testing.assert_allclose(read_png16(out / "a.margin.png"), top - runner_up, atol=scale)
    direct = pipe(np.array(Image.open(tmp_path / "in/a.png")), ["road|street".split("|"), "tree"], ensemble=3,
                  seed=results[0].seed, spread=True, threshold=settings.threshold)  # fmt: skip
    winner = probs.argmax(0)[None]
    expected = np.take_along_axis(direct.spread.numpy(), winner, 0)[0]
    np.testing.assert_allclose(read_png16(out / "a.spread.png"), expected, atol=scale + 1e-6)
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["settings"]["save_confidence"] is True and "value / 65535" in manifest["probability_scale"]
    assert "standard deviation" in manifest["outputs"]["spread"]


def test_one_class_and_one_member(tmp_path, pipe):
    _image(tmp_path / "in/a.png", 2)
    out = tmp_path / "out"
    seg.run_segment([str(tmp_path / "in")], out, pipe, _settings(prompt="road", save_confidence=True, save_probs=True))
    assert not (out / "a.spread.png").exists()  # one member: no spread
    road = read_png16(out / "a.road.prob.png")
    np.testing.assert_array_equal(read_png16(out / "a.confidence.png"), road)
    np.testing.assert_array_equal(read_png16(out / "a.margin.png"), road)  # the runner-up of one class is 0


def test_names_collisions_and_skip_existing(tmp_path, pipe):
    # A class cannot take a confidence map's name: its binary mask would be <stem>.confidence.png.
    assert prompts.file_names(prompts.parse_prompts("confidence, margin, spread")[0]) == [
        "confidence_",
        "margin_",
        "spread_",
    ]
    _image(tmp_path / "in/a.png", 3)
    out = tmp_path / "out"
    settings = _settings(save_confidence=True, ensemble=2, skip_existing=True)
    assert seg.run_segment([str(tmp_path / "in")], out, pipe, settings).processed == 1
    assert seg.run_segment([str(tmp_path / "in")], out, pipe, settings).skipped == 1
    (out / "a.spread.png").unlink()  # an interrupted write: --skip-existing redoes the image
    assert seg.run_segment([str(tmp_path / "in")], out, pipe, settings).processed == 1
    # Confidence maps go through the run's name checks: an input that is one of them is left out, and inputs
    # that share a stem keep their suffixes.
    folder = tmp_path / "same"
    files = [inputs.InputFile(_image(folder / n, 0), inputs.PurePosixPath(n)) for n in ("a.png", "a.confidence.png")]
    assert seg_outputs.check_outputs(files, folder, _settings().classes, settings) == files[:1]
    files = inputs.expand_inputs([str(_image(tmp_path / "x/a.png", 0)), str(_image(tmp_path / "x/a.jpg", 0))])
    paths = [seg_outputs.output_paths(out, f, _settings().classes, settings, members=2) for f in files]
    assert [Path(p["spread"]).name for p in paths] == ["a.png.spread.png", "a.jpg.spread.png"]
    assert "spread" not in seg_outputs.output_paths(out, files[0], _settings().classes, settings)  # one member
