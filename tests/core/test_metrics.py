"""core.metrics: the confusion matrix, both absent-class rules, torchmetrics parity and datasets.md's worked
examples."""

from __future__ import annotations

import math

import pytest
import torch

from digseg_cli.core import metrics as M


def test_confusion_matrix_rows_are_ground_truth_and_ignore_drops():
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 2, 0]])
    cm = M.confusion_matrix(pred, target, 3, ignore_index=255)
    assert cm.dtype == torch.int64
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]


def test_confusion_matrix_is_summable():
    g = torch.Generator().manual_seed(1)
    a_t, a_p, b_t, b_p = (torch.randint(0, 4, (5, 7), generator=g) for _ in range(4))
    whole = M.confusion_matrix(torch.cat([a_p, b_p]), torch.cat([a_t, b_t]), 4)
    assert torch.equal(M.confusion_matrix(a_p, a_t, 4) + M.confusion_matrix(b_p, b_t, 4), whole)


@pytest.mark.parametrize("bad", ["target", "pred"])
def test_out_of_range_values_raise(bad):
    t, p = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1])
    if bad == "target":
        t = torch.tensor([0, 1, 7])
    else:
        p = torch.tensor([0, 1, 9])
    with pytest.raises(ValueError, match="must be in"):
        M.confusion_matrix(p, t, 3, ignore_index=255)


def test_worked_example_absent_class_rule():
    # GT: 4 px class 0 + 4 px class 1; prediction: 3 of class 0 right, the 4th called class 2; class 1 perfect.
    target = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    pred = torch.tensor([0, 0, 0, 2, 1, 1, 1, 1])
    cm = M.confusion_matrix(pred, target, 3)
    assert M.miou(cm, "detectron2") == pytest.approx(0.875)
    assert M.miou(cm, "mmseg") == pytest.approx(0.5833333333, abs=1e-9)
    assert math.isnan(M.iou_per_class(torch.zeros(3, 3, dtype=torch.int64))[0])


def test_worked_example_dataset_level_vs_per_image():
    # Image 1: 98 px background + 2 px object, object missed. Image 2: 50/50, perfect.
    t1, p1 = torch.tensor([0] * 98 + [1] * 2), torch.zeros(100, dtype=torch.int64)
    t2 = torch.tensor([0] * 50 + [1] * 50)
    cm1, cm2 = M.confusion_matrix(p1, t1, 2), M.confusion_matrix(t2.clone(), t2, 2)
    assert M.miou(cm1 + cm2) == pytest.approx((148 / 150 + 50 / 52) / 2)
    assert round(M.miou(cm1 + cm2), 3) == 0.974
    per_image = (M.miou(cm1) + M.miou(cm2)) / 2
    assert round(per_image, 3) == 0.745


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_miou_matches_torchmetrics_multiclass_jaccard(seed):
    from torchmetrics.classification import MulticlassJaccardIndex

    g = torch.Generator().manual_seed(seed)
    c = 6
    metric = MulticlassJaccardIndex(num_classes=c, average="macro", ignore_index=255)
    per_class = MulticlassJaccardIndex(num_classes=c, average=None, ignore_index=255)
    cm = torch.zeros(c, c, dtype=torch.int64)
    for _ in range(3):  # accumulated over several "images"
        target = torch.randint(0, c - 1, (16, 16), generator=g)  # class 5 never in GT ...
        pred = torch.randint(0, c, (16, 16), generator=g)  # ... but predicted
        target[torch.rand(16, 16, generator=g) < 0.1] = 255
        metric.update(pred, target)
        per_class.update(pred, target)
        cm += M.confusion_matrix(pred, target, c, 255)
    # torchmetrics reduces in float32 (``confmat.float()``): its integer matrix must equal ours exactly, its
    # float32 answer agree to float32 precision, and its macro rule (union > 0) re-applied in float64 to 1e-9.
    assert torch.equal(metric.confmat.long(), cm)
    assert M.miou(cm, "mmseg") == pytest.approx(float(metric.compute()), abs=1e-6)
    tm = metric.confmat.double()
    inter, union = tm.diag(), tm.sum(0) + tm.sum(1) - tm.diag()
    assert M.miou(cm, "mmseg") == pytest.approx(float((inter[union > 0] / union[union > 0]).mean()), abs=1e-9)
    ours = M.iou_per_class(cm)
    assert torch.allclose(torch.nan_to_num(ours, nan=0.0), per_class.compute().double(), atol=1e-6)
    assert M.miou(cm, "detectron2") == pytest.approx(float(ours[:5].mean()), abs=1e-12)


def test_other_metrics_from_counts():
    cm = torch.tensor([[8, 2], [1, 9]])
    tp, gt, pred = torch.tensor([8.0, 9.0]), torch.tensor([10.0, 10.0]), torch.tensor([9.0, 11.0])
    assert M.pixel_accuracy(cm) == pytest.approx(17 / 20)
    assert M.mean_accuracy(cm) == pytest.approx((0.8 + 0.9) / 2)
    assert torch.allclose(M.precision_per_class(cm), (tp / pred).double())
    assert torch.allclose(M.recall_per_class(cm), (tp / gt).double())
    iou = M.iou_per_class(cm)
    assert torch.allclose(M.dice_per_class(cm), 2 * iou / (1 + iou))  # per class, Dice = 2 IoU / (1 + IoU)
    assert M.frequency_weighted_iou(cm) == pytest.approx(float(0.5 * iou[0] + 0.5 * iou[1]))
    summary = M.summarize(cm, "mmseg")
    assert summary["miou"] == summary["miou_mmseg"] and len(summary["iou"]) == 2
    with pytest.raises(ValueError, match="rule"):
        M.miou(cm, "voc")


def test_binary_dice_and_iou_per_image():
    pred = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)
    target = torch.tensor([[1, 0, 0, 0]], dtype=torch.bool)
    assert M.binary_dice(pred, target) == pytest.approx(2 / 3)
    assert M.binary_iou(pred, target) == pytest.approx(0.5)
    empty = torch.zeros(1, 4, dtype=torch.bool)
    assert math.isnan(M.binary_dice(empty, empty)) and math.isnan(M.binary_iou(empty, empty))
    assert M.binary_dice(pred, empty) == 0.0
