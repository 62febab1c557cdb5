"""Where predictions come from: a pipeline wrapped as a predictor (with the benchmark's test-time resize), or
saved predictions scored with no model: a folder of label maps, or detectron2's ``sem_seg_predictions.json``
(COCO RLE records, decoded by ``digseg_cli.inference.coco_rle``), both read into the same label maps.

Both hand their samples to ``digseg_cli.evaluate.scoring``, which owns the protocol: the label rule, the
confusion matrix, sharding and the worst images. Noise: ``pipeline_predictor`` seeds each image with
``digseg_cli.inference.seeds.image_seed`` from the run's seed and the sample's name, the policy ``segment``
uses, so a score does not depend on the order of the samples or on how many processes share them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
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
    encoder: str = "auto",
) -> Predictor:
    """Wrap a ``DigsegPipeline`` as a predictor: optional test-time resize (short side, capped long side),
    one noise seed per image from ``seed`` and the sample's name (``image_seed``, as ``segment`` does: the
    same whatever the order or sharding), probabilities returned at the resized size (``evaluate`` resizes
    them to the label). Its ``chunks`` gives the same maps a chunk of classes at a time, which ``evaluate``
    folds into labels in bounded memory."""

    settings = dict(steps=steps, ensemble=ensemble, resolution=resolution, prompt_template=prompt_template)
    settings.update(decoder=decoder, encoder=encoder)

    def predict(image: np.ndarray, prompts: list, name: str) -> torch.Tensor:
        img = resize_short_side(image, short_side, max_side)
        return pipe(img, prompts, seed=image_seed(seed or 0, name), tile=tile, **settings).probs  # [K,h,w]

    def chunks(image: np.ndarray, prompts: list, name: str):
        """`predict`'s maps a chunk of classes at a time (`inference.many_prompts`): memory bounded whatever K."""
        from digseg_cli.inference.many_prompts import class_probs

        img = resize_short_side(image, short_side, max_side)
        call = pipe.prepare(prompts, seed=image_seed(seed or 0, name), **settings)
        return class_probs(pipe, img, call, tile, {})  # (first class, [k,h,w]) chunk by chunk

    if hasattr(pipe, "image_predictor"):  # a pipeline (a test's stand-in may have `__call__` alone)
        predict.chunks = chunks  # `evaluate` labels from these, one chunk at a time
    predict.settings = settings  # the pipeline's call settings (`--compile`'s warm-up runs with them)
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


def is_records_file(predictions: Path | str) -> bool:
    """Whether ``--predictions`` names a file of COCO RLE records (``.json``) rather than a folder of label maps."""
    return Path(predictions).suffix.lower() == ".json" and not Path(predictions).is_dir()


class _LabelMaps:
    """A folder of label-map files, ``<stem>.png`` (or .tif, .bmp; a benchmark's own format via ``decode``)."""

    def __init__(self, folder: Path, decode: Callable | None) -> None:
        if not folder.is_dir():
            raise DatasetError(f"predictions folder {folder} does not exist")
        self.folder, self.decode, self.where = folder, decode, f"in {folder} (expected <stem>.png)"

    def missing(self, stems: Sequence[str]) -> list[str]:
        return [s for s in stems if find_prediction(self.folder, s) is None]

    def read(self, stem: str) -> tuple[np.ndarray, str]:
        from digseg_cli.inference.images import ImageReadError, read_mask

        path = find_prediction(self.folder, stem)
        if path is None:
            raise DatasetError(f"no prediction for {stem} in {self.folder} (expected {stem}.png)")
        try:
            return np.asarray((self.decode or read_mask)(path), dtype=np.int64), str(path)
        except ImageReadError as exc:
            raise DatasetError(str(exc)) from None


class _RleRecords:
    """A detectron2 ``sem_seg_predictions.json``: each sample's records are those whose ``file_name``, less its
    suffix, ends with the sample's stem (``a/b.jpg`` is sample ``b`` or ``a/b``) or is its image file's stem
    (Cityscapes' ``<stem>_leftImg8bit.png``); category ids map back to label ids through ``category_ids``."""

    def __init__(
        self, path: Path, label_count: int, category_ids: Sequence[int] | None, image_stems: dict[str, str]
    ) -> None:
        from digseg_cli.inference.coco_rle import read_records, require_pycocotools

        require_pycocotools(f"`--predictions {path.name}`")
        if not path.is_file():
            raise DatasetError(f"predictions file {path} does not exist")
        self.path, self.image_stems = path, image_stems
        self.where = f"in {path} (no record's file_name has that stem)"
        self.by_name: dict[str, list[dict]] = {}
        for record in read_records(path):
            self.by_name.setdefault(record["file_name"], []).append(record)
        self.by_stem: dict[str, list[tuple[tuple[str, ...], str]]] = {}  # last part → (parts, file name)
        for name in self.by_name:
            parts = PurePosixPath(name.replace("\\", "/")).with_suffix("").parts
            self.by_stem.setdefault(parts[-1], []).append((parts, name))
        ids = range(label_count) if category_ids is None else category_ids
        self.label_of = {int(c): label for label, c in enumerate(ids)}

    def _names(self, stem: str) -> list[str]:
        wanted = PurePosixPath(stem).parts
        found = [name for parts, name in self.by_stem.get(wanted[-1], []) if parts[-len(wanted) :] == wanted]
        if found or stem not in self.image_stems:
            return found
        return [name for _, name in self.by_stem.get(self.image_stems[stem], [])]

    def missing(self, stems: Sequence[str]) -> list[str]:
        return [s for s in stems if not self._names(s)]

    def read(self, stem: str) -> tuple[np.ndarray, str]:
        from digseg_cli.inference.coco_rle import decode_records

        names = self._names(stem)
        if not names:
            raise DatasetError(f"no prediction for {stem} {self.where}")
        if len(names) > 1:
            raise UsageError(f"{self.path}: the records of {' and '.join(names[:2])} both match image {stem}")
        where = f"{self.path}: {names[0]}"
        return decode_records(self.by_name[names[0]], where, self.label_of), where


def _fit(pred: np.ndarray, size: tuple[int, ...], where: str, resize: bool) -> np.ndarray:
    """A prediction at its label's ``size``: as it is, resized (nearest, logged) when asked, else a `UsageError`."""
    if pred.shape == size:
        return pred
    sizes = f"{where} is {pred.shape[1]}x{pred.shape[0]}, its label {size[1]}x{size[0]}"
    if not resize:
        # Scoring a resized map would report a number for predictions nobody made: refuse unless asked.
        raise UsageError(f"{sizes}: save predictions at the label's size, or pass --resize-predictions")
    import cv2

    log.warning("%s: resized (nearest)", sizes)
    return cv2.resize(pred.astype(np.int32), size[::-1], interpolation=cv2.INTER_NEAREST).astype(np.int64)


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
    category_ids: Sequence[int] | None = None,
    **_unused: Any,
) -> EvalResult:
    """Score saved predictions — no model: a folder of label-map files (``<stem>.png``, values = label ids of
    ``label_names``), or a ``.json`` file of COCO RLE records as detectron2's ``SemSegEvaluator`` writes them
    (``sem_seg_predictions.json``; ``category_ids[label]`` is each label's ``category_id`` there, else the
    label id itself). Both are scored alike.

    Every sample must have a prediction; a missing one raises ``DatasetError`` naming the first few.
    A prediction of another size than its label is a `UsageError` naming the file and both sizes; with
    ``resize_predictions`` it is resized to the label with nearest neighbour instead (and logged).
    ``decode_prediction(path)`` reads a benchmark's own submission format (REFUGE BMPs) instead.
    ``processes``, ``rank`` and ``world_size`` shard as in ``evaluate``.
    """
    source = Path(predictions_dir)
    if is_records_file(source):
        images = {it.stem: Path(it.image).stem for it in getattr(samples, "items", [])}
        found: _LabelMaps | _RleRecords = _RleRecords(source, len(label_names), category_ids, images)
    else:
        found = _LabelMaps(source, decode_prediction)
    n = len(samples) if limit is None else min(limit, len(samples))
    stems = [s.stem for s in samples.items[:n]] if hasattr(samples, "items") else None
    if stems is not None and (missing := found.missing(stems)):
        raise DatasetError(
            f"{len(missing)} of {n} images have no prediction {found.where}, e.g. {', '.join(missing[:5])}"
        )

    def predict_one(sample) -> tuple[torch.Tensor, str]:
        pred, where = found.read(sample.stem)
        return torch.from_numpy(_fit(pred, np.asarray(sample.label).shape, where, resize_predictions)), where

    meta = {
        "dataset": dataset,
        "split": split,
        "protocol": protocol,
        "source": f"predictions: {source}",
        "label_mode": "COCO RLE records" if isinstance(found, _RleRecords) else "saved label maps",
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
