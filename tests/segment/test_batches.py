"""Several images per model call (issue 20, item 6): `segment_batch` gives each image what a call of its own
gives, with its own seed; a folder run groups equal-size pictures and hands every image on as before; the
GPU's `--batch-size auto` arithmetic. On a CPU a run keeps one image per call, so here grouping is switched on
by replacing the sizing rule alone (`groups.images_per_call`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from digseg_cli.inference import batches
from digseg_cli.inference.prompts import parse_prompts
from digseg_cli.segment import groups
from digseg_cli.segment import run as seg
from digseg_cli.segment.settings import SegmentSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def diffusion_pipe():
    """A two-step diffusion model: its noise, so its seed, changes what it predicts."""
    from digseg_cli.inference.pipeline import DigsegPipeline
    from digseg_cli.models.checkpoint import build_compact

    return DigsegPipeline(build_compact("tiny", objective="diffusion", default_steps=2))


def _image(seed: int, size=(40, 48)) -> np.ndarray:
    return (np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8)


def test_a_batch_gives_each_image_its_own_call_with_its_own_seed(diffusion_pipe):
    images, seeds = [_image(1), _image(2), _image(3)], [11, 12, 13]
    settings = dict(ensemble=2, threshold=0.4)
    outs = batches.segment_batch(diffusion_pipe, images, ["road", "tree|forest"], seeds=seeds, **settings)
    for image, seed, out in zip(images, seeds, outs, strict=True):
        alone = diffusion_pipe(image, ["road", "tree|forest"], seed=seed, **settings)
        np.testing.assert_allclose(out.probs.numpy(), alone.probs.numpy(), atol=1e-5)
        assert (out.labels == alone.labels).all() and out.thresholds == alone.thresholds
        assert set(out.timings) >= {"encode", "denoise", "decode", "total"}
    other_seed = diffusion_pipe(images[0], ["road", "tree|forest"], seed=12, **settings)
    assert float((other_seed.probs - outs[0].probs).abs().max()) > 1e-3  # the seeds matter: not vacuous


def test_a_batch_refuses_images_of_different_sizes_or_tiling(diffusion_pipe):
    from digseg_cli.errors import UsageError

    with pytest.raises(UsageError, match="one size"):
        batches.segment_batch(diffusion_pipe, [_image(1), _image(2, (48, 40))], ["road"], seeds=[1, 2])
    with pytest.raises(UsageError, match="untiled"):
        batches.segment_batch(diffusion_pipe, [_image(1)], ["road"], seeds=[1], tile=32)


def _folder(root: Path) -> list[str]:
    """Seven inputs: four pictures of one size, one of another, a broken file, then one more of the first size."""
    names = ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png", "g.png"]
    root.mkdir(parents=True)
    for i, name in enumerate(names):
        if name == "f.png":
            (root / name).write_bytes(b"not a png")
        else:
            Image.fromarray(_image(20 + i, (48, 40) if name == "e.png" else (40, 48))).save(root / name)
    return names


def _run(files: list[Path], out: Path, pipe) -> tuple[dict, list]:
    classes, _ = parse_prompts("road, tree")
    settings = SegmentSettings(classes=tuple(classes), save_probs=True, probs_format="npy", overlay=False, seed=5)
    records = []
    seg.run_segment([str(f) for f in files], out, pipe, settings, on_result=records.append)
    return json.loads((out / "run.json").read_text()), records


def test_a_folder_run_groups_equal_size_pictures_and_changes_nothing_else(tmp_path, diffusion_pipe, monkeypatch):
    names = _folder(tmp_path / "in")
    files = [tmp_path / "in" / n for n in names]
    alone_manifest, alone = _run(files, tmp_path / "alone", diffusion_pipe)  # the CPU's rule: one per call
    sizes: list[int] = []
    real = groups.infer_batch

    def counted(pipe, images, *args, **kwargs):
        sizes.append(len(images))
        return real(pipe, images, *args, **kwargs)

    monkeypatch.setattr(groups, "images_per_call", lambda *args: 3)
    monkeypatch.setattr(groups, "infer_batch", counted)
    grouped_manifest, grouped = _run(files, tmp_path / "grouped", diffusion_pipe)
    assert sizes == [3]  # a, b, c together; d stops at e (another size); e, f (broken) and g alone
    assert [r.relative_path for r in grouped] == names  # handed on in input order
    assert [r.status for r in grouped] == [r.status for r in alone] == ["ok"] * 5 + ["failed", "ok"]
    assert grouped_manifest["counts"] == alone_manifest["counts"] and grouped_manifest["counts"]["processed"] == 6
    for name, a, g in zip(names, alone, grouped, strict=True):
        assert g.seed == a.seed and json.dumps(g.outputs) == json.dumps(a.outputs).replace("/alone/", "/grouped/")
        if a.status != "ok":
            continue
        stem = name.removesuffix(".png")
        for cls in ("road", "tree"):
            probs = [np.load(tmp_path / run / f"{stem}.{cls}.prob.npy") for run in ("alone", "grouped")]
            np.testing.assert_allclose(probs[1], probs[0], atol=1e-5)
        assert g.timings["model"] > 0 and g.timings["read"] >= 0


def test_auto_batch_size_arithmetic_and_the_cpu_keeps_its_batch(diffusion_pipe):
    gib = 2**30
    assert batches.batch_from_memory(10 * gib, gib) == 6  # 60 % of the free memory
    assert batches.batch_from_memory(gib, 4 * gib) == 1  # never below one pair
    assert batches.batch_from_memory(1000 * gib, 1) == batches.MAX_AUTO_BATCH
    before = diffusion_pipe.batch_size
    assert batches.auto_batch_size(diffusion_pipe, _image(1), ["road"], {}) == before
    assert batches.images_per_call(diffusion_pipe, 40, 48, 2, None) == 1  # a CPU: one image per call
