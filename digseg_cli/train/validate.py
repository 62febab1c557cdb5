"""Training's validation: each dataset's validation split scored by `digseg eval`'s own scorer.

One job: give the loop the validation mIoU of the weights it is training, computed exactly as
`digseg eval --dataset <dataset> --weights <checkpoint> --seed <seed> --resolution <resolution>` would
compute it on the same images, per dataset of the run: a folder's held-out pairs as the folder benchmark
(`digseg_cli.data.benchmarks.local.spec_from_classes`: 0 background, k+1 class k, prompts with synonyms, the
background threshold), a benchmark's own validation split with its own protocol; the pipeline predictor
with its per-image seed, and the one scorer (`digseg_cli.evaluate.scoring.evaluate`), sharded over the
training processes and summed across them. What it adds is only the training side: the EMA weights swapped
in for the score, the model put back in training mode after it, and the mean over datasets that picks
`best/`. Which splits validate is `train.sources`' choice.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch


class Validations:
    """The validation splits of a run's sources (those that have one), capped at `limit` images each."""

    def __init__(self, sources, *, limit: int | None = None):
        self.parts = [(src.name, *src.validation) for src in sources if src.validation and len(src.validation[1])]
        self.limit = limit

    def __bool__(self) -> bool:
        return bool(self.parts)

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.parts]

    @torch.no_grad()
    def score(self, loaded, *, resolution: int, seed: int, accelerator, ema=None, trainable=()) -> dict:
        """The record of one validation: `val_miou` and `val_iou` ({label name: IoU or None}); with several
        datasets `val_miou` is the mean of their mIoUs, `val_miou_by_dataset` gives each, and `val_iou` is
        {dataset: {label name: IoU or None}}. A class absent from the images has no IoU: None, not NaN."""
        with _evaluation_weights(loaded.model, ema, trainable):
            scores = {
                name: _score_one(
                    loaded, spec, samples, limit=self.limit, resolution=resolution, seed=seed, accelerator=accelerator
                )
                for name, spec, samples in self.parts
            }
        if len(scores) == 1:
            ((miou, per_class),) = scores.values()
            return {"val_miou": miou, "val_iou": per_class}
        by_dataset = {name: miou for name, (miou, _) in scores.items()}
        return {
            "val_miou": sum(by_dataset.values()) / len(by_dataset),
            "val_miou_by_dataset": by_dataset,
            "val_iou": {name: per_class for name, (_, per_class) in scores.items()},
        }


@contextmanager
def _evaluation_weights(model, ema, trainable):
    """The EMA weights (when EMA is on) in eval mode for the score; the training weights and mode after."""
    if ema is not None:
        ema.store(trainable)
        ema.copy_to(trainable)
    model.eval()
    try:
        yield
    finally:
        if ema is not None:
            ema.restore(trainable)
        model.train()
        model.vae.eval()


def _score_one(loaded, spec, samples, *, limit, resolution: int, seed: int, accelerator) -> tuple[float, dict]:
    """(mIoU, {label name: IoU or None}) of one validation split, as `digseg eval` scores it."""
    from digseg_cli.evaluate.predictions import pipeline_predictor
    from digseg_cli.evaluate.scoring import evaluate, protocol_kwargs
    from digseg_cli.inference.pipeline import DigsegPipeline

    # fp32 on the training device; the frozen VAE stays in the training precision (prepare=False).
    pipe = DigsegPipeline(loaded, accelerator.device, torch.float32, prepare=False)
    predictor = pipeline_predictor(pipe, seed=seed, resolution=resolution)
    result = evaluate(
        samples,
        spec.class_names or (),
        predictor,
        limit=limit,
        worst_k=0,
        processes=accelerator,  # shard over the training processes, sum their confusion matrices
        **protocol_kwargs(spec),
    )
    per_class = {c["name"]: _number_or_none(c["iou"]) for c in result.metrics["per_class"]}
    return float(result.metrics["metrics"]["miou"]), per_class


def _number_or_none(value) -> float | None:
    return None if value is None or math.isnan(value) else float(value)
