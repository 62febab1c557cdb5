"""Library tests for `digseg_cli.segment.run`: inputs, prompts, settings and `run_segment` on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from digseg_cli.errors import InterruptedRunError, NoInputsError, OutOfMemoryError, UsageError
from digseg_cli.inference import prompts
from digseg_cli.models.config import DigsegConfig
from digseg_cli.segment import inputs
from digseg_cli.segment import run as seg
from digseg_cli.segment import settings as seg_settings

SIZE = (40, 48)  # (H, W)


# The tiny model is far faster on one thread, and 2 spinning threads crawl on a busy 2-core runner.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _save(path: Path, seed: int, size=SIZE) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def pipe():
    from digseg_cli.inference.pipeline import load_pipeline

    return load_pipeline("tiny")


@pytest.fixture(scope="module")
def diffusion_pipe():
    from digseg_cli.inference.pipeline import DigsegPipeline
    from digseg_cli.models.checkpoint import build_compact

    return DigsegPipeline(build_compact("tiny", objective="diffusion", default_steps=2))


def _settings(**kw) -> seg_settings.SegmentSettings:
    classes, _ = prompts.parse_prompts(kw.pop("prompt", "road, tree"))
    return seg_settings.SegmentSettings(classes=tuple(classes), **kw)


# ------------------------------------------------------------------------------------------------ prompts
def test_parse_prompts_classes_synonyms_duplicates_and_empties():
    classes, warnings = prompts.parse_prompts(" road|street , tree,, Road ")
    assert [(c.name, c.texts) for c in classes] == [("road", ("road", "street")), ("tree", ("tree",))]
    assert len(warnings) == 2 and any("empty" in w for w in warnings) and any("twice" in w for w in warnings)
    with pytest.raises(UsageError, match="noun phrase"):
        prompts.parse_prompts("all wheels")
    with pytest.raises(UsageError, match="names no class"):
        prompts.parse_prompts(" , ")


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_load_prompt_file(tmp_path, suffix):
    data = {
        "classes": [
            {"name": "road", "synonyms": ["street", "highway"], "color": "#ff8800", "threshold": 0.4},
            {"name": "tree", "prompt": "green tree", "colour": "0,255,0"},
            "building|house",
        ]
    }
    path = tmp_path / f"classes{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(data))
    else:
        import yaml

        path.write_text(yaml.safe_dump(data))
    classes, _ = prompts.load_prompt_file(path)
    assert [c.name for c in classes] == ["road", "tree", "building"]
    assert classes[0].texts == ("road", "street", "highway") and classes[0].color == (255, 136, 0)
    assert classes[0].threshold == 0.4 and classes[1].texts == ("green tree",) and classes[1].color == (0, 255, 0)
    assert classes[2].texts == ("building", "house")
    typo = [{"name": "road", "treshold": 0.3}]
    path.write_text(json.dumps(typo) if suffix == ".json" else "- name: road\n  treshold: 0.3\n")
    with pytest.raises(UsageError, match="did you mean 'threshold'"):
        prompts.load_prompt_file(path)


def test_thresholds_tile_and_settings_validation():
    assert prompts.parse_thresholds(["0.5,road=0.4", "tree=0.3"]) == (0.5, {"road": 0.4, "tree": 0.3})
    with pytest.raises(UsageError):
        prompts.parse_thresholds(["road=1.5"])
    parse_tile = seg_settings.parse_tile
    assert parse_tile("auto") == "auto" and parse_tile("OFF") == "off" and parse_tile("64") == 64
    with pytest.raises(UsageError):
        parse_tile("big")
    assert seg_settings.parse_batch_size("auto") is None and seg_settings.parse_batch_size("4") == 4
    with pytest.raises(UsageError, match="--batch-size"):
        seg_settings.parse_batch_size("0")
    settings = _settings(thresholds={"raod": 0.3})
    with pytest.raises(UsageError, match="did you mean 'road'"):
        seg_settings.resolve_classes(settings, DigsegConfig(base_model="compact:tiny"))
    with pytest.raises(UsageError, match="contradict"):
        _settings(overwrite=True, skip_existing=True)
    with pytest.raises(UsageError, match="mode"):
        _settings(mode="panoptic")
    assert prompts.file_names(prompts.parse_prompts("mask, a.b, a b, a_b")[0]) == ["mask_", "a_b", "a_b_2", "a_b_3"]
    for template in ("aerial photo", "{name} of {place}", "{}", "photo of {{name}}"):
        with pytest.raises(UsageError, match="`--prompt-template` must contain {name}"):
            _settings(prompt_template=template)
    assert _settings(prompt_template="aerial photo of {name}").prompt_template == "aerial photo of {name}"


def test_threshold_rule_override_then_own_then_run_wide_then_checkpoint():
    """One rule, four levels: each level wins over every level below it, for the CLI and the pipeline alike."""
    road, water = prompts.PromptClass("road", ("road",)), prompts.PromptClass("water", ("water",))
    classes = [road, prompts.PromptClass("tree", ("tree",), threshold=0.3), water]  # tree's own: a prompts file's
    assert prompts.resolve_thresholds(classes, 0.5)[1] == [0.5, 0.3, 0.5]  # checkpoint default, own
    assert prompts.resolve_thresholds(classes, 0.5, threshold=0.7)[1] == [0.7, 0.3, 0.7]  # run-wide beats default
    ruled, values = prompts.resolve_thresholds(classes, 0.5, threshold=0.7, overrides={"tree": 0.9, "water": 0.2})
    assert values == [0.7, 0.9, 0.2]  # an override beats the class's own and the run-wide value
    assert [c.threshold for c in ruled] == [None, 0.9, 0.2]  # what run.json records per class
    assert prompts.resolve_thresholds([road, road], 0.5, threshold=[0.1, 0.2])[1] == [0.1, 0.2]  # Python API
    with pytest.raises(UsageError, match="one per prompt"):
        prompts.resolve_thresholds(classes, 0.5, threshold=[0.1, 0.2])
    with pytest.raises(UsageError, match="classes: road, tree, water"):
        prompts.resolve_thresholds(classes, 0.5, overrides={"sky": 0.4})
    # A segment run hands the pipeline exactly what the rule says.
    config = DigsegConfig(base_model="compact:tiny", default_threshold=0.45)
    settings = seg_settings.SegmentSettings(classes=tuple(classes), threshold=0.6, thresholds={"road": 0.35})
    assert seg_settings.resolve_classes(settings, config)[1] == [0.35, 0.3, 0.6]


def test_pipeline_thresholds_follow_the_same_rule(pipe):
    image = np.zeros((16, 16, 3), np.uint8)
    assert pipe(image, ["road", "tree"]).thresholds == [pipe.config.default_threshold] * 2
    assert pipe(image, ["road", "tree"], threshold=0.2).thresholds == [0.2, 0.2]
    assert pipe(image, ["road", "tree"], threshold=[0.1, 0.9]).thresholds == [0.1, 0.9]
    with pytest.raises(UsageError, match="one per prompt"):
        pipe(image, ["road", "tree"], threshold=[0.1])


# ------------------------------------------------------------------------------------------------- inputs
def test_expand_inputs_mirrors_tree_globs_lists_and_content_sniffing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for rel in ("data/a/x.png", "data/b/x.png", "data/b/deep/y.png", "data/z.jpg", "data/z.png"):
        _save(tmp_path / rel, 0, (8, 8))
    (tmp_path / "data/no_suffix").write_bytes((tmp_path / "data/a/x.png").read_bytes())  # found by content
    (tmp_path / "data/notes.txt").write_text("not an image")  # ignored
    (tmp_path / "data/broken.png").write_text("not an image")  # kept: fails when read
    _save(tmp_path / "data/out/old.mask.png", 0, (8, 8))  # the output folder is never walked
    found = inputs.expand_inputs(["data"], recursive=True, exclude="data/out")
    rels = {str(f.rel): str(f.key) for f in found}
    assert rels == {
        "a/x.png": "a/x",
        "b/x.png": "b/x",
        "b/deep/y.png": "b/deep/y",
        "z.jpg": "z.jpg",
        "z.png": "z.png",
        "no_suffix": "no_suffix",
        "broken.png": "broken",
    }
    assert {str(f.rel) for f in inputs.expand_inputs(["data"])} == {"z.jpg", "z.png", "no_suffix", "broken.png"}
    # Explicit files from two folders keep their folders; globs and @lists (relative to the list file).
    assert [str(f.rel) for f in inputs.expand_inputs(["data/a/x.png", "data/b/x.png"])] == ["a/x.png", "b/x.png"]
    assert [str(f.rel) for f in inputs.expand_inputs(["data/**/x.png"])] == ["a/x.png", "b/x.png"]
    (tmp_path / "data/list.txt").write_text("# comment\nb/deep/y.png\n\na/x.png\nb/deep/y.png\n")
    assert [str(f.rel) for f in inputs.expand_inputs(["@data/list.txt"])] == ["b/deep/y.png", "a/x.png"]
    with pytest.raises(NoInputsError):
        inputs.expand_inputs(["missing.png", "data/*.tif"])


def test_image_seed_depends_on_seed_and_name_only():
    assert inputs.image_seed(0, "a/b/img.png") == inputs.image_seed(0, "img.png")
    assert inputs.image_seed(0, "img.png") != inputs.image_seed(1, "img.png") != inputs.image_seed(0, "other.png")


# --------------------------------------------------------------------------------------------------- runs
def test_run_writes_outputs_records_and_manifest(tmp_path, pipe):
    src = tmp_path / "in"
    _save(src / "a.png", 1)
    _save(src / "sub/b.png", 2)
    (src / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    records = []
    settings = _settings(prompt="road|street, tree", save_binary=True, save_probs=True, recursive=True)
    summary = seg.run_segment([str(src)], tmp_path / "out", pipe, settings, on_result=records.append)
    assert (summary.processed, summary.skipped, [r for r, _ in summary.failed]) == (2, 0, ["bad.png"])
    assert summary.exit_code == 1 and summary.status == "completed"
    assert [r.relative_path for r in records] == ["a.png", "bad.png", "sub/b.png"]  # input order
    out = tmp_path / "out"
    for stem in ("a", "sub/b"):
        mask = Image.open(out / f"{stem}.mask.png")
        assert mask.mode == "P" and mask.size == (SIZE[1], SIZE[0])
        assert set(np.unique(np.asarray(mask))) <= {0, 1, 2}
        assert Image.open(out / f"{stem}.overlay.jpg").size == (SIZE[1], SIZE[0])
        for name in ("road", "tree"):
            assert set(np.unique(np.asarray(Image.open(out / f"{stem}.{name}.png")))) <= {0, 255}
            prob = Image.open(out / f"{stem}.{name}.prob.png")
            assert prob.mode.startswith("I")
    rec = records[0].to_json()
    assert rec["schema"] == "digseg.segment/1" and rec["status"] == "ok"
    assert (
        abs(sum(c["fraction"] for c in rec["classes"]) + (np.asarray(Image.open(out / "a.mask.png")) == 0).mean() - 1)
        < 1e-6
    )
    # 16-bit probabilities decode to the model's output on the documented 0–65535 scale.
    labels = np.asarray(Image.open(out / "a.mask.png"))
    road = np.asarray(Image.open(out / "a.road.prob.png")).astype(np.float64) / 65535
    assert abs(road[labels == 1].mean() - rec["classes"][0]["mean_confidence"]) < 1e-3
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "completed" and manifest["counts"]["failed"] == 1
    assert manifest["probability_scale"].startswith("linear 0-65535")
    assert manifest["versions"]["torch"] and manifest["device"] == "cpu" and manifest["precision"] == "fp32"
    assert manifest["resolved"]["labels"] == {"0": "background", "1": "road", "2": "tree"}
    assert manifest["peak_memory"]["bytes"] > 0


def test_existing_outputs_overwrite_and_skip(tmp_path, pipe):
    _save(tmp_path / "in/a.png", 1)
    seg.run_segment([str(tmp_path / "in")], tmp_path / "out", pipe, _settings())
    again = seg.run_segment([str(tmp_path / "in")], tmp_path / "out", pipe, _settings())
    assert again.processed == 0 and "--overwrite" in again.failed[0][1]
    assert seg.run_segment([str(tmp_path / "in")], tmp_path / "out", pipe, _settings(overwrite=True)).processed == 1
    skipped = seg.run_segment([str(tmp_path / "in")], tmp_path / "out", pipe, _settings(skip_existing=True))
    assert (skipped.skipped, skipped.exit_code) == (1, 0)
    (tmp_path / "out/a.overlay.jpg").unlink()  # an interrupted write: --skip-existing redoes the image
    assert seg.run_segment([str(tmp_path / "in")], tmp_path / "out", pipe, _settings(skip_existing=True)).processed == 1


def test_fail_fast_stops_at_the_first_failure(tmp_path, pipe):
    (tmp_path / "in").mkdir()
    (tmp_path / "in/a.png").write_text("broken")
    _save(tmp_path / "in/b.png", 1)
    summary = seg.run_segment([str(tmp_path / "in")], tmp_path / "out", pipe, _settings(fail_fast=True))
    assert (summary.status, summary.processed, summary.not_processed, summary.exit_code) == ("stopped", 0, 1, 1)
    assert json.loads((tmp_path / "out/run.json").read_text())["status"] == "stopped"


def test_max_pixels_refuses_before_running(tmp_path, pipe):
    _save(tmp_path / "a.png", 1)
    summary = seg.run_segment([str(tmp_path / "a.png")], tmp_path / "out", pipe, _settings(max_pixels=100))
    assert "max-pixels" in summary.failed[0][1] and not (tmp_path / "out/a.mask.png").exists()


def _probs(out: Path, stem: str) -> np.ndarray:
    return np.stack([np.load(out / f"{stem}.{n}.prob.npy") for n in ("road", "tree")])


def test_tiled_agrees_with_whole_image(tmp_path, pipe):
    probs_npy = dict(save_probs=True, probs_format="npy", overlay=False, resolution=0)
    _save(tmp_path / "a.png", 3)
    # 1. One tile at least as large as the image is the whole-image prediction (same native scale).
    seg.run_segment([str(tmp_path / "a.png")], tmp_path / "whole", pipe, _settings(tile="off", **probs_npy))
    seg.run_segment([str(tmp_path / "a.png")], tmp_path / "tile", pipe, _settings(tile=64, **probs_npy))
    np.testing.assert_allclose(_probs(tmp_path / "tile", "a"), _probs(tmp_path / "whole", "a"), atol=1e-5)
    # 2. An image made of 2x2 copies of one 32 px patch: aligned tiles without overlap reproduce the patch's
    #    prediction exactly; with 25 % overlap, pixels seen by one window only still do, and the feathered
    #    blend elsewhere stays a probability.
    patch = (np.random.default_rng(4).random((32, 32, 3)) * 255).astype(np.uint8)
    Image.fromarray(patch).save(tmp_path / "p.png")
    Image.fromarray(np.tile(patch, (2, 2, 1))).save(tmp_path / "quad.png")
    seg.run_segment([str(tmp_path / "p.png")], tmp_path / "patch", pipe, _settings(tile="off", **probs_npy))
    expected = np.tile(_probs(tmp_path / "patch", "p"), (1, 2, 2))  # [K,64,64]
    seg.run_segment([str(tmp_path / "quad.png")], tmp_path / "t0", pipe, _settings(tile=32, overlap=0, **probs_npy))
    np.testing.assert_allclose(_probs(tmp_path / "t0", "quad"), expected, atol=1e-5)
    seg.run_segment([str(tmp_path / "quad.png")], tmp_path / "t25", pipe, _settings(tile=32, overlap=0.25, **probs_npy))
    blended = _probs(tmp_path / "t25", "quad")  # windows start at 0, 24, 32 on each axis
    np.testing.assert_allclose(blended[:, :24, :24], expected[:, :24, :24], atol=1e-5)
    np.testing.assert_allclose(blended[:, 56:, 56:], expected[:, 56:, 56:], atol=1e-5)
    assert np.isfinite(blended).all() and blended.min() >= 0 and blended.max() <= 1


def test_seeds_do_not_depend_on_order_or_other_files(tmp_path, diffusion_pipe):
    for i, name in enumerate(("a.png", "b.png", "c.png")):
        _save(tmp_path / "in" / name, 10 + i)
    settings = _settings(save_probs=True, probs_format="npy", overlay=False, seed=7)
    seg.run_segment([str(tmp_path / "in")], tmp_path / "all", diffusion_pipe, settings)
    files = [str(tmp_path / "in" / n) for n in ("c.png", "b.png")]
    seg.run_segment(files, tmp_path / "reversed", diffusion_pipe, settings)
    seg.run_segment([str(tmp_path / "in/b.png")], tmp_path / "alone", diffusion_pipe, settings)
    reference = _probs(tmp_path / "all", "b")
    np.testing.assert_array_equal(_probs(tmp_path / "reversed", "b"), reference)
    np.testing.assert_array_equal(_probs(tmp_path / "alone", "b"), reference)
    np.testing.assert_array_equal(_probs(tmp_path / "reversed", "c"), _probs(tmp_path / "all", "c"))
    # The noise matters for this model, so the check above is not vacuous.
    other = dict(save_probs=True, probs_format="npy", overlay=False, seed=8)
    seg.run_segment([str(tmp_path / "in/b.png")], tmp_path / "seed8", diffusion_pipe, _settings(**other))
    assert np.abs(_probs(tmp_path / "seed8", "b") - reference).max() > 1e-4


class _FlakyPipe:
    """Wraps a pipeline; raises out-of-memory (or Ctrl-C) on the calls that `fail(call)` says."""

    def __init__(self, pipe, fail):
        self._pipe, self._fail, self.calls = pipe, fail, []

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __setattr__(self, name, value):
        if name == "batch_size":
            self._pipe.batch_size = value
        else:
            object.__setattr__(self, name, value)

    def __call__(self, image, prompts, **kw):
        self.calls.append((self._pipe.batch_size, kw["tile"]))
        error = self._fail(self)
        if error is not None:
            raise error
        return self._pipe(image, prompts, **kw)


def test_oom_backs_off_batch_then_tiles_and_records_it(tmp_path, pipe):
    _save(tmp_path / "a.png", 1)
    pipe.batch_size = 16
    flaky = _FlakyPipe(pipe, lambda p: torch.OutOfMemoryError("CUDA out of memory") if len(p.calls) <= 2 else None)
    try:
        summary = seg.run_segment([str(tmp_path / "a.png")], tmp_path / "out", flaky, _settings())
        assert summary.processed == 1
        assert flaky.calls == [(16, "auto"), (1, "auto"), (1, 16)]  # 2 prompts → batch 1, then 16 px tiles
        assert len(summary.backoffs) == 2
        manifest = json.loads((tmp_path / "out/run.json").read_text())
        assert manifest["backoffs"] == summary.backoffs
        always = _FlakyPipe(pipe, lambda p: RuntimeError("MPS backend out of memory"))
        with pytest.raises(OutOfMemoryError, match="--tile") as info:
            seg.run_segment([str(tmp_path / "a.png")], tmp_path / "out2", always, _settings())
        assert info.value.summary.status == "out-of-memory"
        assert json.loads((tmp_path / "out2/run.json").read_text())["status"] == "out-of-memory"
        # Tiled, one call holds tiles × prompts: 25 windows × 2 prompts fill the 16 pairs, so the first
        # back-off halves 16 rather than the prompt count.
        pipe.batch_size = 16
        flaky = _FlakyPipe(pipe, lambda p: torch.OutOfMemoryError("CUDA out of memory") if len(p.calls) <= 1 else None)
        seg.run_segment([str(tmp_path / "a.png")], tmp_path / "out3", flaky, _settings(tile=16))
        assert flaky.calls == [(16, 16), (8, 16)]
    finally:
        pipe.batch_size = 16


def test_fp16_overflow_fallback_is_recorded_once_in_the_manifest(tmp_path):
    """The pipeline's own fallback to fp32 (tested in test_core) reaches run.json, named with its image."""
    from digseg_cli.inference.pipeline import DigsegPipeline
    from digseg_cli.models.checkpoint import build_compact

    loaded = build_compact("tiny")
    with torch.no_grad():
        loaded.model.vae.decoder.conv_in.weight.mul_(3e4)  # overflows fp16, not fp32
    fp16 = DigsegPipeline(loaded, "cpu", torch.float16)
    for name in ("a.png", "b.png"):
        _save(tmp_path / "in" / name, 1)
    summary = seg.run_segment([str(tmp_path / "in")], tmp_path / "out", fp16, _settings())
    assert summary.processed == 2
    assert summary.backoffs == ["the VAE gave non-finite values in float16; it runs in float32 from now on (on a.png)"]
    assert json.loads((tmp_path / "out/run.json").read_text())["backoffs"] == summary.backoffs
    assert fp16.notes == []  # handed on, not kept


def test_interrupt_writes_manifest_and_finished_outputs(tmp_path, pipe):
    for name in ("a.png", "b.png", "c.png"):
        _save(tmp_path / "in" / name, 1)
    flaky = _FlakyPipe(pipe, lambda p: KeyboardInterrupt() if len(p.calls) == 2 else None)
    with pytest.raises(InterruptedRunError) as info:
        seg.run_segment([str(tmp_path / "in")], tmp_path / "out", flaky, _settings())
    assert info.value.exit_code == 130 and info.value.summary.processed == 1
    manifest = json.loads((tmp_path / "out/run.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["counts"]["not_processed"] == 2
    assert (tmp_path / "out/a.mask.png").exists() and not (tmp_path / "out/b.mask.png").exists()
