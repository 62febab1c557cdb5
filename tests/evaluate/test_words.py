"""The word test's scoring: each word its own prompt, IoU summed over images, what unrelated words mark."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from digseg_cli.data.benchmarks.base import Sample
from digseg_cli.data.vocabulary import Vocabulary
from digseg_cli.errors import UsageError
from digseg_cli.evaluate.words import word_test

VOCABULARY = Vocabulary(
    name="test",
    synonyms={},
    unrelated=(),
    held_out={"road": ("lane", "asphalt")},
    held_out_unrelated=("cat", "everything"),
)


def label(values: list[list[int]]) -> np.ndarray:
    return np.array(values, dtype=np.int64)


SAMPLES = [
    Sample("a", np.zeros((2, 4, 3), np.uint8), label([[1, 1, 0, 0], [2, 2, 0, 255]])),
    Sample("b", np.zeros((2, 4, 3), np.uint8), label([[0, 0, 0, 0], [1, 0, 0, 0]])),
]


def predictor(image, prompts, name):
    """Road (label 1) for `road` and `lane`; its first column for `asphalt`; every pixel for `everything`."""
    sample = next(s for s in SAMPLES if s.stem == name)
    road = torch.as_tensor(sample.label == 1).float()
    tree = torch.as_tensor(sample.label == 2).float()
    answers = {"road": road, "lane": road, "tree": tree, "cat": torch.zeros_like(road)}
    answers["asphalt"] = road * torch.tensor([1.0, 0, 0, 0])
    answers["everything"] = torch.ones_like(road)
    assert all(len(p) == 1 for p in prompts)  # one word per prompt, no synonyms averaged in
    return torch.stack([answers[p[0]] for p in prompts])


def test_each_word_is_scored_on_its_own_over_all_images():
    test = word_test(SAMPLES, ["road", "tree"], predictor, VOCABULARY, threshold=0.5, ignore_index=255)
    iou = {r["word"]: r.get("iou", r.get("marked")) for r in test["rows"]}
    assert iou["road"] == iou["lane"] == iou["tree"] == 1.0
    assert iou["asphalt"] == pytest.approx(2 / 3)  # 2 of the 3 road pixels, over both images
    assert iou["cat"] == 0.0 and iou["everything"] == 1.0  # shares of the 15 labelled pixels
    summary = test["summary"]
    assert summary["held_out_iou"] == pytest.approx(5 / 6) and summary["held_out_ratio"] == pytest.approx(5 / 6)
    assert summary["unrelated_marked"] == pytest.approx(0.5) and test["images"] == 2


def test_held_out_words_of_a_class_the_dataset_lacks_are_refused():
    wrong = Vocabulary("x", {}, (), {"lava": ("magma",)}, ())
    with pytest.raises(UsageError, match="classes the dataset lacks"):
        word_test(SAMPLES, ["road"], predictor, wrong, threshold=0.5)
