"""Training's validation: the held-out pairs scored by `digseg eval`'s own scorer.

One job: give the loop the validation mIoU of the weights it is training, computed exactly as
`digseg eval --dataset <folder> --weights <checkpoint> --seed <seed> --resolution <resolution>` would
compute it on the same images: the folder benchmark's labels and protocol
(`digseg_cli.data.benchmarks.local.spec_from_classes`: 0 background, k+1 class k, prompts with synonyms,
the background threshold), the pipeline predictor with its per-image seed, and the one scorer
(`digseg_cli.evaluate.scoring.evaluate`), sharded over the training processes and summed across them.
What it adds is only the training side: the EMA weights swapped in for the score, and the model put
back in training mode after it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

VALIDATION_SPLIT = "val"


class Validation:
    """The validation pairs as a folder benchmark (the spec and samples `digseg eval` builds for a folder)."""

    def __init__(self, classes, pairs: Sequence, root: Path, *, limit: int | None = None):
        from digseg_cli.data.benchmarks.base import BenchmarkDataset, Item
        from digseg_cli.data.benchmarks.local import spec_from_classes

        self.spec = spec_from_classes(
            classes, name=str(root), title=f"validation pairs of {Path(root).name}", folder=str(root)
        )
        items = [Item(p.stem, p.image, p.mask) for p in pairs]
        self.samples = BenchmarkDataset(self.spec, Path(root), VALIDATION_SPLIT, items)
        self.limit = limit

    def __bool__(self) -> bool:
        return len(self.samples) > 0

    @torch.no_grad()
    def score(self, loaded, *, resolution: int, seed: int, accelerator, ema=None, trainable=()):
        """(mIoU, {label name: IoU or None}) of the weights in `loaded` (the EMA weights when `ema` is on).

        A class absent from the validation images has no IoU: None (JSON null), not NaN."""
        from digseg_cli.evaluate.predictions import pipeline_predictor
        from digseg_cli.evaluate.scoring import evaluate, protocol_kwargs
        from digseg_cli.inference.pipeline import DigsegPipeline

        model = loaded.model
        if ema is not None:
            ema.store(trainable)
            ema.copy_to(trainable)
        model.eval()
        try:
            # fp32 on the training device; the frozen VAE stays in the training precision (prepare=False).
            pipe = DigsegPipeline(loaded, accelerator.device, torch.float32, prepare=False)
            predictor = pipeline_predictor(pipe, seed=seed, resolution=resolution)
            result = evaluate(
                self.samples,
                self.spec.class_names or (),
                predictor,
                limit=self.limit,
                worst_k=0,
                processes=accelerator,  # shard over the training processes, sum their confusion matrices
                **protocol_kwargs(self.spec),
            )
        finally:
            if ema is not None:
                ema.restore(trainable)
            model.train()
            model.vae.eval()
        per_class = {c["name"]: _number_or_none(c["iou"]) for c in result.metrics["per_class"]}
        return float(result.metrics["metrics"]["miou"]), per_class


def _number_or_none(value) -> float | None:
    return None if value is None or math.isnan(value) else float(value)
