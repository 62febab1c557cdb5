"""Where predictions come from: a pipeline wrapped as a predictor (with the benchmark's test-time resize), or a
folder of saved label maps scored with no model.

Both hand their samples to ``digseg_cli.evaluate.scoring``, which owns the protocol: the label rule, the
confusion matrix, sharding and the worst images. Noise: ``pipeline_predictor`` seeds each image with
``digseg_cli.inference.seeds.image_seed`` from the run's seed and the sample's name, the policy ``segment``
uses, so a score does not depend on the order of the samples or on how many processes share them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from digseg_cli.errors import DatasetError, UsageError
from digseg_cli.evaluate.scoring import EvalResult, Predictor, Progress, score_samples
from digseg_cli.inference.seeds import image_seed

if TYPE_CHECKING:
    from accelerate import PartialState

    from digseg_cli.inference.pipeline import DigsegPipeline

log = logging.getLogger("digseg")


def pipeline_predictor(
    pipe: DigsegPipeline,
    *,
    steps: int | None = None,
    ensemble: int | None = None,
    seed: int | None = None,
    resolution: int | None = None,
    tile: str | int | None = "auto",
    prompt_template: str | None = None,
    short_side: int | None = None,
    max_side: int | None = None,
    decoder: str = "auto",
) -> Predictor:
    """Wrap a ``DigsegPipeline`` as a predictor: optional test-time resize (short side, capped long side),
    one noise seed per image from ``seed`` and the sample's name (``image_seed``, as ``segment`` does: the
    same whatever the order or sharding), probabilities returned at the resized size (``evaluate`` resizes
    them to the label)."""

    def predict(image: np.ndarray, prompts: list, name: str) -> torch.Tensor:
        img = resize_short_side(image, short_side, max_side)
        out = pipe(
            img,
            prompts,
            steps=steps,
            ensemble=ensemble,
            seed=image_seed(seed or 0, name),
            resolution=resolution,
            tile=tile,
            prompt_template=prompt_template,
            decoder=decoder,
        )
        return out.probs  # [K,h,w]

    return predict


def resize_short_side(image: np.ndarray, short_side: int | None, max_side: int | None = None) -> np.ndarray:
    """Resize so the short side is ``short_side`` and the long side at most ``max_side`` (detectron2
    ``ResizeShortestEdge``); unchanged when ``short_side`` is None or 0."""
    if not short_side:
        return image
    import cv2

    h, w = image.shape[:2]
    scale = short_side / min(h, w)
    if max_side and max(h, w) * scale > max_side:
        scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == (w, h):
        return image
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


PREDICTION_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")


def find_prediction(predictions_dir: Path, stem: str) -> Path | None:
    for suffix in PREDICTION_SUFFIXES:
        path = predictions_dir / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def score_predictions(
    samples: Sequence,
    predictions_dir: Path | str,
    *,
    label_names: Sequence[str],
    ignore_index: int | None,
    absent_rule: str = "detectron2",
    out_dir: Path | str | None = None,
    headline: str = "miou",
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
    decode_prediction: Callable | None = None,
    resize_predictions: bool = False,
    **_unused: Any,
) -> EvalResult:
    """Score a folder of label-map files (``<stem>.png``, values = label ids of ``label_names``) — no model.

    Every sample must have a prediction; a missing one raises ``DatasetError`` naming the first few.
    A prediction of another size than its label is a `UsageError` naming the file and both sizes; with
    ``resize_predictions`` it is resized to the label with nearest neighbour instead (and logged).
    ``decode_prediction(path)`` reads a benchmark's own submission format (REFUGE BMPs) instead.
    ``processes``, ``rank`` and ``world_size`` shard as in ``evaluate``.
    """
    from digseg_cli.inference.images import ImageReadError, read_mask

    folder = Path(predictions_dir)
    if not folder.is_dir():
        raise DatasetError(f"predictions folder {folder} does not exist")
    n = len(samples) if limit is None else min(limit, len(samples))
    stems = [s.stem for s in samples.items[:n]] if hasattr(samples, "items") else None
    if stems is not None:
        missing = [s for s in stems if find_prediction(folder, s) is None]
        if missing:
            raise DatasetError(
                f"{len(missing)} of {n} images have no prediction in {folder} "
                f"(expected <stem>.png), e.g. {', '.join(missing[:5])}"
            )

    def predict_one(sample) -> tuple[torch.Tensor, str]:
        path = find_prediction(folder, sample.stem)
        if path is None:
            raise DatasetError(f"no prediction for {sample.stem} in {folder} (expected {sample.stem}.png)")
        try:
            pred = np.asarray((decode_prediction or read_mask)(path), dtype=np.int64)
        except ImageReadError as exc:
            raise DatasetError(str(exc)) from None
        size = np.asarray(sample.label).shape
        if pred.shape != size:
            sizes = f"{path} is {pred.shape[1]}x{pred.shape[0]}, its label {size[1]}x{size[0]}"
            if not resize_predictions:
                # Scoring a resized map would report a number for predictions nobody made: refuse unless asked.
                raise UsageError(f"{sizes}: save predictions at the label's size, or pass --resize-predictions")
            import cv2

            log.warning("%s: resized (nearest)", sizes)
            pred = cv2.resize(pred.astype(np.int32), size[::-1], interpolation=cv2.INTER_NEAREST).astype(np.int64)
        return torch.from_numpy(pred), str(path)

    meta = {
        "dataset": dataset,
        "split": split,
        "protocol": protocol,
        "source": f"predictions: {folder}",
        "label_mode": "saved label maps",
        "threshold": None,
        "settings": dict(settings or {}),
    }
    return score_samples(
        samples,
        predict_one,
        label_names=list(label_names),
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
