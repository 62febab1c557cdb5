"""What one call of the DiGSeg pipeline resolves and returns: its settings (`CallSettings`), its prompts as the
model reads them (`PreparedCall`) and its result (`SegmentationOutput`).

One job: the values that pass between the pipeline's steps (`pipeline.py`), its tiling (`tiling.py`) and large
images' blocks (`blocks.py`), so that each of them can name them without importing the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# What a call returns: every probability map ("probs") or the label map alone ("labels", in bounded memory).
OUTPUTS = ("probs", "labels")


@dataclass(frozen=True)
class CallSettings:
    """What one call of the pipeline resolved, passed down its prediction steps as one value."""

    resolution: int
    steps: int
    ensemble: int
    seed: int
    decoder: str
    overlap: float
    groups: tuple[int, ...] | None = None  # texts per class, when the members' spread is asked for
    encoder: str = "vae"  # the image encoder: "vae" or "fast" (resolved, like `decoder`)


@dataclass(frozen=True)
class PreparedCall:
    """What `DigsegPipeline.prepare` resolved for a call: its settings, each class's texts (main prompt first,
    then synonyms), every text as the model reads it (synonyms flattened, template applied) and the thresholds."""

    run: CallSettings
    classes: list[list[str]]
    texts: list[str]
    thresholds: list[float]


@dataclass
class SegmentationOutput:
    """Result for one image of size H×W and K prompts.

    probs:  float32 `[K,H,W]` in [0,1], probability that each pixel belongs to prompt k (None when the call
            asked for the labels alone, `output="labels"`: then memory does not grow with K).
    labels: int64 `[H,W]`; 0 = background, k = prompt k (1-based) where its probability is the largest
            and reaches its threshold (semantic mode).
    masks:  bool `[K,H,W]`, each prompt thresholded alone (multilabel mode; None with `output="labels"`).
    spread: float32 `[K,H,W]` (only when asked for with an ensemble of two or more members, else None): the
            standard deviation of each class's probability across the members (seeds, or flips for one-step
            models); where tiles overlap, the tiles' variances are blended like their probabilities.
    """

    probs: torch.Tensor | None
    labels: torch.Tensor
    masks: torch.Tensor | None
    thresholds: list[float]
    prompts: list[str]
    timings: dict[str, float] = field(default_factory=dict)
    spread: torch.Tensor | None = None
