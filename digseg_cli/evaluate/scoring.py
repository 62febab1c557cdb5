"""Benchmark evaluation: run a predictor (or read saved label maps) over samples and score them.

One job: turn (image, ground truth) samples plus predictions into dataset-level numbers with the
benchmark's exact protocol: probabilities are resized to the label size (bilinear) *before* the label
rule (``digseg_cli.core.labels``: argmax / background threshold / nested), one int64 confusion matrix is
summed over every image (and, across processes, summed through Accelerate like training's reductions, never
averaged), per-image rows are kept for the CSV and the worst images for the report.

Predictions come from ``digseg_cli.evaluate.predictions`` (a pipeline, or saved label maps).

It knows nothing of dataset layouts (``digseg_cli.data.benchmarks.catalog``), models (any
``predictor(image, prompts, name) -> [K,H,W]`` callable), process groups (``digseg_cli.evaluate.run`` joins
them) or the command line; reports are written by ``digseg_cli.evaluate.report``.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from digseg_cli.core import metrics as M
from digseg_cli.core.labels import LABEL_MODES, LabelFold
from digseg_cli.errors import DatasetError, UsageError

if TYPE_CHECKING:
    from accelerate import PartialState


log = logging.getLogger("digseg")

# (image HxWx3 uint8, prompts, name: the sample's stem) -> probs [K,h,w] in [0,1]
Predictor = Callable[[np.ndarray, list, str], Any]
Progress = Callable[[int, int, str], None]  # (done, total, stem)
THUMB = 384  # longest side of the images kept for the worst-image overlays


@dataclass
class EvalResult:
    """metrics: the ``metrics.json`` object; confusion: int64 ``[C,C]`` (rows GT, cols prediction)."""

    metrics: dict[str, Any]
    confusion: torch.Tensor
    per_image: list[dict[str, Any]]
    label_names: list[str]
    worst: list[tuple[float, str, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    out_dir: Path | None = None
    files: list[Path] = field(default_factory=list)
    word_test: dict | None = None  # `--word-test`'s table (`evaluate.words`), when asked


def protocol_kwargs(spec) -> dict[str, Any]:
    """The keyword arguments of ``evaluate``/``score_predictions`` that a ``DatasetSpec`` fixes."""
    return dict(
        label_names=list(spec.label_names),
        prompts=spec.prompts,
        ignore_index=spec.ignore_index,
        absent_rule=spec.absent_rule,
        label_mode=spec.label_mode,
        threshold=spec.threshold,
        headline=spec.headline,
        dataset=spec.name,
        protocol=spec.protocol,
    )


def _vertical_diameter(mask: torch.Tensor) -> float:
    return float(mask.sum(0).max()) if mask.any() else 0.0  # largest column count (REFUGE vCDR)


class _Scorer:
    """Accumulates the confusion matrix, per-image rows and the worst images."""

    def __init__(self, label_names, ignore_index, absent_rule, headline, worst_k):
        if absent_rule not in M.ABSENT_RULES:
            raise UsageError(f"`--absent-rule` must be one of {', '.join(M.ABSENT_RULES)}; got {absent_rule!r}")
        self.names, self.C = list(label_names), len(label_names)
        self.ignore, self.rule, self.headline, self.worst_k = ignore_index, absent_rule, headline, worst_k
        self.cm = torch.zeros(self.C, self.C, dtype=torch.int64)
        self.rows: list[dict[str, Any]] = []
        self.worst: list = []  # heap of (-score, stem, thumbs)

    def add(self, stem: str, image: np.ndarray, gt: np.ndarray, pred: torch.Tensor, where: str = "") -> None:
        gt_t = torch.as_tensor(np.asarray(gt, dtype=np.int64))
        try:
            cm = M.confusion_matrix(pred, gt_t, self.C, self.ignore)  # [C,C]
        except ValueError as exc:
            raise DatasetError(f"{where or stem}: {exc}") from None
        self.cm += cm
        row: dict[str, Any] = {
            "stem": stem,
            "pixels": int(cm.sum()),
            "pixel_accuracy": M.pixel_accuracy(cm),
            "miou": M.miou(cm, self.rule),
        }
        if self.headline == "road_iou":
            row["road_iou"] = float(M.iou_per_class(cm)[1])
            score = row["road_iou"]
        elif self.headline == "refuge_dice":
            disc_p, disc_g, cup_p, cup_g = pred >= 1, gt_t >= 1, pred == 2, gt_t == 2
            row["dice_disc"], row["dice_cup"] = M.binary_dice(disc_p, disc_g), M.binary_dice(cup_p, cup_g)
            vcdr = [
                _vertical_diameter(c) / d if (d := _vertical_diameter(o)) else math.nan
                for c, o in ((cup_p, disc_p), (cup_g, disc_g))
            ]
            row["vcdr_pred"], row["vcdr_gt"], row["vcdr_abs_error"] = vcdr[0], vcdr[1], abs(vcdr[0] - vcdr[1])
            score = (
                float(np.nanmean([row["dice_disc"], row["dice_cup"]]))
                if not (math.isnan(row["dice_disc"]) and math.isnan(row["dice_cup"]))
                else math.nan
            )
        else:
            score = row["miou"]
        self.rows.append(row)
        if self.worst_k > 0 and not math.isnan(score):
            entry = (-score, stem, _thumbs(image, gt, pred.numpy()))
            if len(self.worst) < self.worst_k:
                heapq.heappush(self.worst, entry)
            elif -score > self.worst[0][0]:
                heapq.heapreplace(self.worst, entry)

    def sync(self, processes: PartialState) -> None:
        """Sum the matrix and gather the rows and worst images of every process, through Accelerate (the
        matrix on the processes' device, as NCCL needs; int64 throughout, so the sum is exact)."""
        from accelerate.utils import gather_object, reduce

        self.cm = reduce(self.cm.to(processes.device), reduction="sum").cpu()  # [C,C]
        self.rows = sorted(gather_object(self.rows), key=lambda r: r["stem"])
        # entries are (-score, stem, thumbs): the K largest -score are the K worst images
        self.worst = heapq.nlargest(self.worst_k, gather_object(self.worst), key=lambda e: e[0])

    def summary(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        s = M.summarize(self.cm, self.rule)
        gt, pred = self.cm.sum(1), self.cm.sum(0)
        per_class = [
            {
                "id": k,
                "name": self.names[k],
                "iou": s["iou"][k],
                "dice": s["dice"][k],
                "precision": s["precision"][k],
                "recall": s["recall"][k],
                "gt_pixels": int(gt[k]),
                "pred_pixels": int(pred[k]),
                "tp": int(self.cm[k, k]),
                "counted": bool(s["counted"][k]),
            }
            for k in range(self.C)
        ]
        out = {
            k: s[k]
            for k in ("miou", "miou_detectron2", "miou_mmseg", "mean_dice", "pixel_accuracy", "mean_accuracy", "fwiou")
        }
        if self.headline == "road_iou":
            out["road_iou"] = s["iou"][1]
            out["miou_2class"] = out["miou"]  # background + road: much higher than road IoU, not comparable
            head = ("road IoU", out["road_iou"])
        elif self.headline == "refuge_dice":
            for key in ("dice_disc", "dice_cup", "vcdr_abs_error"):
                vals = [r[key] for r in self.rows if not math.isnan(r[key])]
                out[key if key != "vcdr_abs_error" else "vcdr_mae"] = float(np.mean(vals)) if vals else math.nan
            head = ("mean per-image Dice (disc, cup)", [out["dice_disc"], out["dice_cup"]])
        elif self.headline == "phenobench_miou":
            out["phenobench_miou"] = float(np.mean([0.0 if math.isnan(v) else v for v in s["iou"]]))
            head = ("mIoU (soil, crop, weed)", out["phenobench_miou"])
        else:
            head = (f"mIoU ({self.rule} rule)", out["miou"])
        out["headline"] = {"name": head[0], "value": head[1]}
        return out, per_class


def _thumbs(image: np.ndarray, gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import cv2

    h, w = gt.shape
    scale = min(1.0, THUMB / max(h, w))
    if scale >= 1.0 and image.shape[:2] == gt.shape:
        return image.copy(), gt.copy(), pred.copy()
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = cv2.resize(np.ascontiguousarray(image), size, interpolation=cv2.INTER_AREA)
    g = cv2.resize(gt.astype(np.int32), size, interpolation=cv2.INTER_NEAREST).astype(np.int64)
    p = cv2.resize(pred.astype(np.int32), size, interpolation=cv2.INTER_NEAREST).astype(np.int64)
    return img, g, p


def _shard(samples: Iterable, limit: int | None, rank: int, world_size: int):
    """Yield (index, sample) of this process's shard: ``index % world_size == rank``, within ``limit``."""
    if isinstance(samples, Sequence):
        n = len(samples) if limit is None else min(limit, len(samples))
        for i in range(rank, n, world_size):
            yield i, samples[i]
        return
    for i, sample in enumerate(samples):
        if limit is not None and i >= limit:
            return
        if i % world_size == rank:
            yield i, sample


def _shard_of(processes: PartialState | None, rank: int | None, world_size: int | None) -> tuple[int, int, bool]:
    """(rank, world size, whether results are summed across processes): from Accelerate's ``processes`` (an
    ``accelerate.PartialState`` or ``Accelerator``) when given, else the explicit shard (default: all)."""
    if processes is not None:
        return processes.process_index, processes.num_processes, processes.num_processes > 1
    rank, world_size = (0, 1) if rank is None or world_size is None else (rank, world_size)
    if not 0 <= rank < world_size:
        raise UsageError(f"`rank` must be in [0, world_size); got {rank} of {world_size}")
    return rank, world_size, False


def _total(samples, limit) -> int:
    n = len(samples) if hasattr(samples, "__len__") else -1
    return min(n, limit) if limit is not None and n >= 0 else n


def score_samples(
    samples,
    predict_one,
    *,
    label_names,
    ignore_index,
    absent_rule,
    headline,
    out_dir,
    limit,
    progress,
    processes,
    rank,
    world_size,
    worst_k,
    meta,
) -> EvalResult:
    if limit is not None and limit < 1:
        raise UsageError(f"`--limit` must be at least 1; got {limit}")
    rank, world_size, distributed = _shard_of(processes, rank, world_size)
    scorer = _Scorer(label_names, ignore_index, absent_rule, headline, worst_k)
    total, done, predict_s = _total(samples, limit), 0, 0.0
    for _, sample in _shard(samples, limit, rank, world_size):
        t0 = time.perf_counter()
        pred, where = predict_one(sample)
        predict_s += time.perf_counter() - t0
        scorer.add(sample.stem, sample.image, sample.label, pred, where)
        done += 1
        if progress is not None:
            progress(done, total, sample.stem)
    if distributed:
        scorer.sync(processes)
    if not scorer.rows:
        raise DatasetError("no samples were evaluated (empty dataset, or --limit/sharding left none)")
    summary, per_class = scorer.summary()
    metrics = {
        **meta,
        "absent_rule": absent_rule,
        "ignore_index": ignore_index,
        "num_classes": len(label_names),
        "num_images": len(scorer.rows),
        "shard": {"rank": rank, "world_size": world_size, "all_reduced": distributed},
        "headline": summary.pop("headline"),
        "metrics": summary,
        "per_class": per_class,
    }
    if meta.get("source") == "model":
        # Predicting and labelling an image (not reading or scoring it), this process's mean: the model's cost with
        # this many prompts, which open-vocabulary benchmarks make large (A-847: 847 per image).
        metrics["seconds_per_image"] = round(predict_s / done, 4)
    worst = sorted(((-s, stem, *t) for s, stem, t in scorer.worst), key=lambda e: e[0])
    result = EvalResult(metrics, scorer.cm, scorer.rows, list(label_names), worst, Path(out_dir) if out_dir else None)
    if out_dir is not None and (not distributed or rank == 0):  # the summed numbers are the same on every process
        from digseg_cli.evaluate.report import write_reports

        result.files = write_reports(result, Path(out_dir))
    return result


def evaluate(
    samples: Iterable,
    class_names: Sequence[str],
    predictor: Predictor,
    *,
    ignore_index: int | None,
    num_classes: int | None = None,
    absent_rule: str = "detectron2",
    out_dir: Path | str | None = None,
    label_mode: str = "argmax",
    threshold: float = 0.5,
    headline: str = "miou",
    label_names: Sequence[str] | None = None,
    prompts: Sequence | None = None,
    dataset: str = "",
    split: str = "",
    protocol: str = "",
    settings: dict | None = None,
    limit: int | None = None,
    progress: Progress | None = None,
    processes: PartialState | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    worst_k: int = 6,
) -> EvalResult:
    """Score ``predictor`` on ``samples`` (``Sample``s: ``stem``, ``image``, ``label``); write reports to ``out_dir``.

    ``predictor(image, prompts, name)`` returns ``[K,h,w]`` probabilities for the K ``class_names``
    (``prompts``: per class a name or a list of synonyms; default the names; ``name``: the sample's stem,
    for its noise seed). They are resized to the label size (bilinear) before ``label_mode`` turns them into
    labels. ``label_names`` name the C label ids (default: the class names, plus "background" first unless
    ``label_mode == "argmax"``). Sharding: this process takes samples with ``index % world_size == rank``;
    with ``processes`` (Accelerate's ``PartialState`` or an ``Accelerator``) rank and world size are its own,
    the confusion matrix is summed across processes and only the main process writes the reports; without
    it, ``rank``/``world_size`` pick one shard (default: all samples), nothing is summed.
    """
    if label_mode not in LABEL_MODES:
        raise UsageError(f"`label_mode` must be one of {', '.join(LABEL_MODES)}; got {label_mode!r}")
    class_names = list(class_names)
    names = (
        list(label_names)
        if label_names is not None
        else (class_names if label_mode == "argmax" else ["background", *class_names])
    )
    if num_classes is not None and num_classes != len(names):
        raise UsageError(f"`num_classes` is {num_classes} but there are {len(names)} label names")
    prompts = list(prompts) if prompts is not None else class_names
    if len(prompts) != len(class_names):
        raise UsageError("`prompts` must give one entry per class")

    def predict_one(sample) -> tuple[torch.Tensor, str]:
        # A predictor with `chunks` (a pipeline's) gives its maps a chunk of classes at a time: each is resized and
        # folded into the labels, so memory holds one chunk whatever K is; else all K maps in one chunk.
        chunks = getattr(predictor, "chunks", None)
        parts = (
            chunks(sample.image, prompts, sample.stem)
            if chunks
            else [(0, predictor(sample.image, prompts, sample.stem))]
        )
        fold, size = LabelFold(label_mode, threshold, len(class_names)), tuple(np.asarray(sample.label).shape)
        for _, part in parts:
            probs = torch.as_tensor(part).detach().float().cpu()  # [k,h,w]
            if probs.ndim != 3 or (not chunks and probs.shape[0] != len(class_names)):
                raise ValueError(f"predictor returned shape {tuple(probs.shape)}; expected [{len(class_names)},H,W]")
            if tuple(probs.shape[1:]) != size:  # resize probabilities, never labels
                probs = F.interpolate(probs[None], size=size, mode="bilinear", align_corners=False)[0]  # [k,H,W]
            fold.add(probs)
        return fold.labels(), sample.stem

    meta = {
        "dataset": dataset,
        "split": split,
        "protocol": protocol,
        "source": "model",
        "prompts_per_image": len(prompts),
        "label_mode": label_mode,
        "threshold": threshold if label_mode != "argmax" else None,
        "settings": dict(settings or {}),
    }
    return score_samples(
        samples,
        predict_one,
        label_names=names,
        ignore_index=ignore_index,
        absent_rule=absent_rule,
        headline=headline,
        out_dir=out_dir,
        limit=limit,
        progress=progress,
        processes=processes,
        rank=rank,
        world_size=world_size,
        worst_k=worst_k,
        meta=meta,
    )
