"""Many prompts per image: labels folded chunk by chunk (bounded memory) are the stacked path's labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from digseg_cli.core.labels import LABEL_MODES, LabelFold, labels_from_probs
from digseg_cli.evaluate.scoring import evaluate
from digseg_cli.inference import many_prompts
from digseg_cli.inference.pipeline import load_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny")


@pytest.mark.parametrize("mode", LABEL_MODES)
def test_the_fold_over_chunks_is_the_rule_over_all_maps(mode):
    # Coarse values make ties, within and across chunks; per-prompt thresholds make some background.
    probs = torch.randint(0, 5, (11, 9, 7), generator=torch.Generator().manual_seed(0)).float() / 4  # [K,H,W]
    thresholds = [0.3 + 0.05 * k for k in range(11)]
    stacked = labels_from_probs(probs, mode, thresholds)
    for sizes in ([1] * 11, [4, 4, 3], [2, 9], [10, 1]):
        fold = LabelFold(mode, thresholds, 11)
        for chunk in probs.split(sizes):
            fold.add(chunk)
        assert torch.equal(fold.labels(), stacked), (mode, sizes)
    assert len(stacked.unique()) > 3  # labels from several chunks: an offset or tie gone wrong shows
    with pytest.raises(ValueError):  # a fold that has not seen every prompt has no labels
        LabelFold(mode, thresholds, 11).labels()


def test_chunks_are_whole_classes_and_whole_batches():
    chunks = many_prompts.class_chunks([1, 2, 1, 3, 1, 1], map_bytes=1, batch=2, budget=4)
    assert chunks == [range(0, 3), range(3, 5), range(5, 6)]  # 4, 4 and 1 texts: a class is never split
    assert many_prompts.class_chunks([1] * 40, map_bytes=1, batch=16, budget=40) == [range(0, 32), range(32, 40)]


@pytest.mark.parametrize("settings", [dict(tile="off"), dict(tile=16, resolution=0, ensemble=2)])
def test_streamed_labels_are_the_stacked_labels(pipe, settings, monkeypatch):
    image = np.random.default_rng(1).integers(0, 255, (40, 48, 3), np.uint8)
    # Classes with synonyms on both sides of chunk boundaries, a threshold per class.
    prompts = [f"thing {i}" if i % 3 else [f"thing {i}", f"other {i}", f"more {i}"] for i in range(20)]
    thresholds = [0.2 + 0.03 * i for i in range(20)]
    stacked = pipe(image, prompts, threshold=thresholds, **settings)
    encodes = []
    original = pipe._encode
    monkeypatch.setattr(pipe, "_encode", lambda *a: encodes.append(1) or original(*a))
    budget = 4 * 40 * 48 * 5  # five full-size maps a chunk: several chunks
    call = pipe.prepare(prompts, threshold=thresholds, **{k: v for k, v in settings.items() if k != "tile"})
    streamed = many_prompts.segment_labels(pipe, image, call, settings["tile"], 0.0, budget=budget)
    # Chunks run the U-Net at other batch sizes, so a probability may move by float rounding (oneDNN's results
    # even depend on buffer alignment, so which pixels move varies from process to process). The random tiny
    # model gives some classes all but equal scores: where the winner is within 1e-4 of the runner-up or of its
    # threshold the label may flip; everywhere else it must be the same.
    top = stacked.probs.topk(2, dim=0).values  # [2,H,W]
    winner_threshold = torch.tensor(thresholds)[stacked.probs.argmax(0)]  # [H,W]
    near = (top[0] - top[1] < 1e-4) | ((top[0] - winner_threshold).abs() < 1e-4)
    assert near.float().mean() < 0.2  # about 5 % here: most pixels are compared
    assert torch.equal(streamed.labels[~near], stacked.labels[~near])
    assert streamed.probs is None and streamed.masks is None
    labels = set(stacked.labels[~near].unique().tolist())
    assert len(labels) > 3 and max(labels) > 5  # classes of later chunks win somewhere
    if settings["tile"] == "off":  # the image encoded once for all chunks (tiles are grouped per chunk's texts)
        assert len(encodes) == 1


def test_eval_labels_chunk_by_chunk_as_from_all_maps(pipe):
    class Sample:
        def __init__(self, stem, image, label):
            self.stem, self.image, self.label = stem, image, label

    rng = np.random.default_rng(2)
    samples = [
        Sample(f"s{i}", rng.integers(0, 255, (24, 32, 3), np.uint8), np.zeros((30, 40), np.int64)) for i in range(2)
    ]
    names = [f"class {i}" for i in range(9)]
    probs = torch.rand(9, 24, 32, generator=torch.Generator().manual_seed(3))  # [K,h,w], not the label size

    def whole(image, prompts, name):
        return probs

    def chunked(image, prompts, name):
        raise AssertionError("evaluate reads the chunks")

    chunked.chunks = lambda image, prompts, name: [(0, probs[:4]), (4, probs[4:5]), (5, probs[5:])]
    common = dict(ignore_index=None, label_mode="background", threshold=0.6, worst_k=0)
    a, b = evaluate(samples, names, whole, **common), evaluate(samples, names, chunked, **common)
    assert a.metrics["metrics"] == b.metrics["metrics"] and np.array_equal(a.confusion, b.confusion)
    assert "seconds_per_image" in b.metrics
