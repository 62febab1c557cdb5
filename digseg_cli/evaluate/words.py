"""The word test: does a model answer words it never trained on (open vocabulary), and ignore unrelated ones?

One job: on a benchmark's images, ask for each class by its name and by each of its held-out words (a
vocabulary's `held_out`, `data.vocabulary`), one prompt at a time, and score each word's binary mask
(probability above the threshold) by its IoU with the class, summed over the images like a class IoU; and
ask for each held-out unrelated word and count the share of pixels it marks. The summary says how the
held-out words do against the names on the same images (`held_out_ratio`) and what the unrelated words mark.

Predictions come from any `evaluate.scoring.Predictor`; what an image and its label are is the benchmark's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from digseg_cli.errors import UsageError

NAME, HELD_OUT, UNRELATED = "name", "held-out", "unrelated"


def word_rows(class_names: Sequence[str], vocabulary) -> list[dict]:
    """What the test asks: `{kind, class, word}` per class name, held-out word and held-out unrelated word."""
    known = {n.lower(): n for n in class_names}
    missing = [c for c in vocabulary.held_out if c.lower() not in known]
    if missing:
        raise UsageError(f"vocabulary {vocabulary.name}: held-out words for classes the dataset lacks: {missing}")
    rows = [{"kind": NAME, "class": n, "word": n} for n in class_names]
    for cls, words in vocabulary.held_out.items():
        rows += [{"kind": HELD_OUT, "class": known[cls.lower()], "word": w} for w in words]
    rows += [{"kind": UNRELATED, "class": None, "word": w} for w in vocabulary.held_out_unrelated]
    if not vocabulary.held_out and not vocabulary.held_out_unrelated:
        raise UsageError(f"vocabulary {vocabulary.name} holds out no words to test")
    return rows


def word_test(
    samples,
    class_names: Sequence[str],
    predictor,
    vocabulary,
    *,
    threshold: float,
    ignore_index: int | None = None,
    limit: int | None = None,
) -> dict:
    """`{"rows": [... with "iou" or "marked"], "summary": {...}}`; labels as a `background` benchmark's
    (0 nothing, k+1 class k). Every word is its own prompt of one call per image."""
    rows = word_rows(class_names, vocabulary)
    texts = [[r["word"]] for r in rows]  # one prompt each, no synonyms averaged in
    ids = torch.tensor([class_names.index(r["class"]) + 1 if r["class"] else -1 for r in rows])  # [W]
    inter, union, marked = torch.zeros(len(rows)), torch.zeros(len(rows)), torch.zeros(len(rows))
    pixels, images = 0, 0
    for sample in samples[:limit] if limit else samples:
        label = torch.as_tensor(np.asarray(sample.label))  # [H,W]
        probs = torch.as_tensor(predictor(sample.image, texts, sample.stem)).float().cpu()  # [W,h,w]
        if tuple(probs.shape[1:]) != tuple(label.shape):
            probs = F.interpolate(probs[None], size=tuple(label.shape), mode="bilinear", align_corners=False)[0]
        valid = label != ignore_index if ignore_index is not None else torch.ones_like(label, dtype=torch.bool)
        masks = (probs > threshold) & valid  # [W,H,W']
        truth = (label[None] == ids[:, None, None]) & valid  # [W,H,W']: empty for unrelated words
        inter += (masks & truth).flatten(1).sum(1)
        union += (masks | truth).flatten(1).sum(1)
        marked += masks.flatten(1).sum(1)
        pixels, images = pixels + int(valid.sum()), images + 1
    for i, row in enumerate(rows):
        if row["kind"] == UNRELATED:
            row["marked"] = float(marked[i] / max(pixels, 1))
        else:
            row["iou"] = float(inter[i] / union[i]) if union[i] > 0 else None
    return {
        "vocabulary": vocabulary.name,
        "images": images,
        "threshold": threshold,
        "rows": rows,
        "summary": summarize(rows),
    }


def summarize(rows: list[dict]) -> dict:
    """Means over the words of each kind, and the held-out words' mean IoU over the names' (same images)."""

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    names = mean(r["iou"] for r in rows if r["kind"] == NAME)
    held = mean(r["iou"] for r in rows if r["kind"] == HELD_OUT)
    per_class = {}
    for r in rows:
        if r["kind"] == HELD_OUT:
            per_class.setdefault(r["class"], []).append(r["iou"])
    return {
        "name_iou": names,
        "held_out_iou": held,
        "held_out_ratio": held / names if names and held is not None else None,
        "held_out_iou_by_class": {c: mean(v) for c, v in per_class.items()},
        "unrelated_marked": mean(r["marked"] for r in rows if r["kind"] == UNRELATED),
    }
