"""`--compile` (issue 21): compiled parts give the eager probabilities, a part the compiler fails on runs eagerly,
the warm-up compiles what a run meets and is recorded apart, and a machine without a compiler is exit 2."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from digseg_cli.cli.app import app
from digseg_cli.core.fast_decoder import FastMaskDecoder
from digseg_cli.core.fast_encoder import FastImageEncoder
from digseg_cli.errors import UsageError
from digseg_cli.inference import compiling
from digseg_cli.inference.compiling import compile_pipeline, compile_record, require_compiler
from digseg_cli.inference.pipeline import DigsegPipeline, load_pipeline
from digseg_cli.inference.warmup import warm_up
from digseg_cli.models.loader import load_model

# Not square and larger than 1.5× the tiny model's 32 px: tiled, so tiles share calls (a latent per pair).
IMAGE = (np.random.default_rng(0).random((64, 48, 3)) * 255).astype(np.uint8)  # [64,48,3] uint8
PROMPTS = ["road", "tree"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from nothing (dynamo's caches and recompile counts are per process)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _with_fast_parts() -> DigsegPipeline:
    loaded = load_model("tiny")
    torch.manual_seed(1)
    m = loaded.model
    m.fast_decoder = FastMaskDecoder(m.latent_channels, m.vae_scale_factor, width=8)
    m.fast_encoder = FastImageEncoder(m.latent_channels, m.vae_scale_factor, width=8)
    return DigsegPipeline(loaded)


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_compiled_parts_give_the_eager_probabilities_and_the_warm_up_compiles_what_a_run_meets():
    pipe = _with_fast_parts()
    vae = pipe(IMAGE, PROMPTS).probs  # [2,64,48]
    fast = pipe(IMAGE, PROMPTS, decoder="fast", encoder="fast").probs
    keys = list(pipe.model.state_dict())
    compile_pipeline(pipe, backend="eager")  # dynamo traces every part; "eager" runs the graphs as they are
    assert warm_up(pipe, PROMPTS, {"threshold": [0.4, 0.6]}) > 0  # the run's thresholds are not the warm-up's
    before = _graphs()
    assert torch.equal(pipe(IMAGE, PROMPTS).probs, vae)
    assert torch.equal(pipe(IMAGE, PROMPTS[:1]).probs, vae[:1])  # fewer prompts: a smaller batch
    assert _graphs() == before  # another size, tiles and batch sizes: nothing compiled after the warm-up
    assert torch.equal(pipe(IMAGE, PROMPTS, decoder="fast", encoder="fast").probs, fast)
    record = compile_record(pipe)
    assert record["enabled"] and record["backend"] == "eager" and record["warmup_s"] > 0
    assert record["parts"] == ["unet", "vae_encoder", "vae_decoder", "fast_decoder", "fast_encoder"]
    assert record["eager_fallbacks"] == {}
    assert list(pipe.model.state_dict()) == keys  # the modules are as they were: the same checkpoint
    assert compile_record(load_pipeline("tiny")) == {"enabled": False}


def _failing_backend(graph, example_inputs):
    raise RuntimeError("this backend compiles nothing")


def test_a_part_the_compiler_fails_on_runs_eagerly_after_one_warning(caplog):
    pipe = load_pipeline("tiny")
    expected = pipe(IMAGE, PROMPTS, tile="off").probs
    compile_pipeline(pipe, backend=_failing_backend)
    with caplog.at_level(logging.WARNING, logger="digseg"):
        first = pipe(IMAGE, PROMPTS, tile="off").probs
        again = pipe(IMAGE, PROMPTS, tile="off").probs
    assert torch.equal(first, expected) and torch.equal(again, expected)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3 and all("runs eagerly" in w and "compiles nothing" in w for w in warnings)
    fallbacks = compile_record(pipe)["eager_fallbacks"]
    assert set(fallbacks) == {"unet", "vae_encoder", "vae_decoder"}  # each once, then eager for good


def _image(path):
    Image.fromarray(IMAGE).save(path)
    return path


def test_segment_compile_records_the_warm_up_apart_from_the_images(tmp_path, monkeypatch):
    monkeypatch.setattr(compiling, "BACKEND", "eager")  # the command's backend; inductor takes minutes here
    images = tmp_path / "in"
    images.mkdir()
    _image(images / "a.png")
    _image(images / "b.png")
    out = tmp_path / "out"
    args = ["segment", str(images), "-p", "road, tree", "-w", "tiny", "--compile", "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "run.json").read_text())
    record = manifest["compile"]
    assert record["enabled"] and record["backend"] == "eager" and record["eager_fallbacks"] == {}
    # The warm-up compiled; the images did not: the run's wall time and model time leave it out.
    assert manifest["timings"]["wall_s"] < record["warmup_s"] and manifest["counts"]["processed"] == 2
    assert manifest["arguments"]["compile"] is True
    plain = CliRunner().invoke(app, [*args[:-3], "-o", str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    assert json.loads((tmp_path / "plain/run.json").read_text())["compile"] == {"enabled": False}
    compiled, eager = (np.asarray(Image.open(folder / "a.mask.png")) for folder in (out, tmp_path / "plain"))
    assert np.array_equal(compiled, eager)


def test_segment_compile_skips_the_warm_up_when_every_input_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(compiling, "BACKEND", "eager")
    args = ["segment", str(_image(tmp_path / "a.png")), "-p", "road", "-w", "tiny", "-o", str(tmp_path / "out")]
    assert CliRunner().invoke(app, args).exit_code == 0  # an earlier run: every output there
    calls = []
    monkeypatch.setattr(DigsegPipeline, "__call__", lambda self, *a, **k: calls.append(a) or 1 / 0)
    result = CliRunner().invoke(app, [*args, "--compile", "--skip-existing"])
    assert result.exit_code == 0, result.output
    assert re.search(r"skipped\W+1\b", result.output) and calls == []  # no model call, not even the warm-up's


def test_eval_compile_records_the_warm_up_apart_from_seconds_per_image(tmp_path, monkeypatch):
    monkeypatch.setattr(compiling, "BACKEND", "eager")
    rng = np.random.default_rng(1)
    for folder in ("images", "masks"):
        (tmp_path / "data" / folder).mkdir(parents=True)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(tmp_path / f"data/images/{i}.png")
        Image.fromarray(rng.integers(0, 3, (16, 16)).astype(np.uint8)).save(tmp_path / f"data/masks/{i}.png")
    (tmp_path / "data/classes.txt").write_text("road\ntree\n")
    args = ["eval", "-d", str(tmp_path / "data"), "-w", "tiny", "--compile", "--out", str(tmp_path / "report")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "report/metrics.json").read_text())
    record = metrics["settings"]["compile"]
    assert record["enabled"] and record["backend"] == "eager" and record["eager_fallbacks"] == {}
    assert metrics["seconds_per_image"] < record["warmup_s"]  # the images ran what the warm-up compiled


def test_without_a_cpp_compiler_compile_is_one_line_and_exit_2(tmp_path, monkeypatch):
    from torch._inductor import config

    monkeypatch.setattr(config.cpp, "cxx", (None, "digseg-no-such-c++"))
    with pytest.raises(UsageError, match="C\\+\\+ compiler"):
        require_compiler("inductor", torch.device("cpu"))
    require_compiler("eager", torch.device("cpu"))  # dynamo's own backends need no compiler
    _image(tmp_path / "a.png")
    args = ["segment", str(tmp_path / "a.png"), "-p", "road", "-w", "tiny", "--compile", "-o", str(tmp_path / "o")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "C++ compiler" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "o" / "run.json").exists()
    planned = CliRunner().invoke(app, [*args, "--dry-run"])  # the plan refuses what the run refuses
    assert planned.exit_code == 2 and "C++ compiler" in planned.stderr, planned.output
    plain = [a for a in args if a != "--compile"]
    assert CliRunner().invoke(app, [*plain, "--dry-run"]).exit_code == 0  # no --compile: nothing to check


@pytest.mark.slow
def test_inductor_gives_the_eager_probabilities_within_1e_4():
    """One real inductor compile of the tiny model's parts (about two minutes on a 2-core CPU)."""
    pipe = load_pipeline("tiny")
    try:
        require_compiler("inductor", pipe.device)
    except UsageError as exc:  # a machine without a C++ compiler: what it gets there is the test above
        pytest.skip(str(exc))
    image = IMAGE[:32, :32]  # the tiny model's native size: one call, one prompt
    expected = pipe(image, ["road"], tile="off").probs
    compile_pipeline(pipe)  # the default: inductor, as `--compile` runs
    probs = pipe(image, ["road"], tile="off").probs
    assert compile_record(pipe)["eager_fallbacks"] == {}
    assert (probs - expected).abs().max().item() < 1e-4
