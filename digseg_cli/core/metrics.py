"""Segmentation metrics from an int64 confusion matrix, plus per-image binary Dice/IoU.

One job: turn label tensors into counts and counts into scores, exactly as the benchmark protocols define
them (see ``reference/datasets.md`` "Metric conventions"). Rows of a confusion matrix are ground truth,
columns are predictions; matrices add across images and processes, never average. Undefined values are
NaN, never 0. This module deliberately knows nothing of files, datasets, class names or models.

Absent-class rules for the mean IoU:

- ``"detectron2"``: mean over classes present in the ground truth (GT_k > 0). A class that is only
  predicted is skipped (its false positives still lower the IoU of the classes they fall on).
- ``"mmseg"``: mean over classes with union > 0 (also torchmetrics ``MulticlassJaccardIndex``
  ``average="macro"``): a class predicted but absent from GT counts with IoU 0.
"""

from __future__ import annotations

import torch

ABSENT_RULES = ("detectron2", "mmseg")


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = None
) -> torch.Tensor:
    """Count (gt, pred) pairs: ``cm[g, p]`` → int64 ``[C,C]``; pixels with ``target == ignore_index`` drop.

    Out-of-range values raise ``ValueError`` (detectron2 crashes and mmseg silently drops them; neither
    is acceptable for a benchmark number).
    """
    if pred.shape != target.shape:
        raise ValueError(f"`pred` {tuple(pred.shape)} and `target` {tuple(target.shape)} must have the same shape")
    pred = pred.reshape(-1).to(torch.int64)  # [N]
    target = target.reshape(-1).to(torch.int64)  # [N]
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    if target.numel():
        lo, hi = int(target.min()), int(target.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"ground-truth values must be in [0, {num_classes}) or {ignore_index}; found {lo}..{hi}")
        lo, hi = int(pred.min()), int(pred.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"predicted values must be in [0, {num_classes}); found {lo}..{hi}")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)  # [C*C]
    return counts.reshape(num_classes, num_classes)  # [C,C] rows = GT, cols = prediction


def _parts(cm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cm = cm.to(torch.float64)
    tp = cm.diagonal()  # [C]
    return tp, cm.sum(1), cm.sum(0)  # TP_k, GT_k, PRED_k


def _div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den with NaN where den == 0."""
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.full_like(num, float("nan")))


def iou_per_class(cm: torch.Tensor) -> torch.Tensor:
    """IoU_k = TP / (GT + PRED − TP), float64 ``[C]``; NaN where the union is empty."""
    tp, gt, pred = _parts(cm)
    return _div(tp, gt + pred - tp)


def dice_per_class(cm: torch.Tensor) -> torch.Tensor:
    """Dice_k = 2·TP / (GT + PRED), float64 ``[C]``; NaN where both are empty."""
    tp, gt, pred = _parts(cm)
    return _div(2 * tp, gt + pred)


def precision_per_class(cm: torch.Tensor) -> torch.Tensor:
    """TP / PRED, float64 ``[C]``; NaN for classes never predicted."""
    tp, _, pred = _parts(cm)
    return _div(tp, pred)


def recall_per_class(cm: torch.Tensor) -> torch.Tensor:
    """TP / GT (per-class accuracy), float64 ``[C]``; NaN for classes absent from GT."""
    tp, gt, _ = _parts(cm)
    return _div(tp, gt)


def counted_classes(cm: torch.Tensor, rule: str = "detectron2") -> torch.Tensor:
    """Bool ``[C]``: the classes that enter the mean under ``rule``."""
    if rule not in ABSENT_RULES:
        raise ValueError(f"`rule` must be one of {', '.join(ABSENT_RULES)}; got {rule!r}")
    tp, gt, pred = _parts(cm)
    return gt > 0 if rule == "detectron2" else (gt + pred - tp) > 0


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    return float(values[mask].mean()) if bool(mask.any()) else float("nan")


def miou(cm: torch.Tensor, rule: str = "detectron2") -> float:
    """Mean IoU over the classes counted by ``rule`` (see the module docstring); NaN if none are."""
    return _masked_mean(iou_per_class(cm), counted_classes(cm, rule))


def mean_dice(cm: torch.Tensor, rule: str = "detectron2") -> float:
    """Mean of the per-class Dice over the classes counted by ``rule``."""
    return _masked_mean(dice_per_class(cm), counted_classes(cm, rule))


def pixel_accuracy(cm: torch.Tensor) -> float:
    """Σ TP / Σ GT over the valid pixels; NaN for an empty matrix."""
    tp, gt, _ = _parts(cm)
    total = float(gt.sum())
    return float(tp.sum()) / total if total > 0 else float("nan")


def mean_accuracy(cm: torch.Tensor) -> float:
    """Mean over GT-present classes of TP_k / GT_k."""
    rec = recall_per_class(cm)
    return _masked_mean(rec, ~rec.isnan())


def frequency_weighted_iou(cm: torch.Tensor) -> float:
    """Σ_k (GT_k / Σ GT) · IoU_k (classes absent from GT weigh 0)."""
    _, gt, _ = _parts(cm)
    total = float(gt.sum())
    if total <= 0:
        return float("nan")
    iou = torch.nan_to_num(iou_per_class(cm), nan=0.0)
    return float((gt / total * iou).sum())


def binary_stats(pred: torch.Tensor, target: torch.Tensor) -> tuple[int, int, int]:
    """(TP, FP, FN) of two boolean masks of the same shape."""
    if pred.shape != target.shape:
        raise ValueError(f"`pred` {tuple(pred.shape)} and `target` {tuple(target.shape)} must have the same shape")
    pred, target = pred.bool(), target.bool()
    tp = int((pred & target).sum())
    return tp, int(pred.sum()) - tp, int(target.sum()) - tp


def binary_dice(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Dice of one binary mask pair (REFUGE, per image); NaN when both masks are empty (as the official
    ``ignaciorlando/refuge-evaluation`` 0/0)."""
    tp, fp, fn = binary_stats(pred, target)
    den = 2 * tp + fp + fn
    return 2 * tp / den if den else float("nan")


def binary_iou(pred: torch.Tensor, target: torch.Tensor) -> float:
    """TP / (TP + FP + FN) of one binary mask pair; NaN when both are empty."""
    tp, fp, fn = binary_stats(pred, target)
    den = tp + fp + fn
    return tp / den if den else float("nan")


def summarize(cm: torch.Tensor, rule: str = "detectron2") -> dict[str, object]:
    """All dataset-level numbers of one matrix (fractions in [0, 1], NaN where undefined)."""
    return {
        "miou": miou(cm, rule),
        "miou_detectron2": miou(cm, "detectron2"),
        "miou_mmseg": miou(cm, "mmseg"),
        "mean_dice": mean_dice(cm, rule),
        "pixel_accuracy": pixel_accuracy(cm),
        "mean_accuracy": mean_accuracy(cm),
        "fwiou": frequency_weighted_iou(cm),
        "iou": iou_per_class(cm).tolist(),
        "dice": dice_per_class(cm).tolist(),
        "precision": precision_per_class(cm).tolist(),
        "recall": recall_per_class(cm).tolist(),
        "counted": counted_classes(cm, rule).tolist(),
    }
