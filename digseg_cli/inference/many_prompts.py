"""Many prompts per image in bounded memory: an image's classes run chunk by chunk, each chunk's maps folded
into the label map and dropped.

One job: `class_probs` yields an image's per-class probabilities `[k,H,W]` a chunk of classes at a time (whole
classes: a class's synonyms never straddle two chunks), the image (and each tile) encoded once for all chunks
and the chunk's text embeddings taken from the pipeline's cache; `segment_labels` folds them with the core label
rule (`core.labels.LabelFold`, the rule the stacked path runs too) into a `SegmentationOutput` that holds the
label map only. Memory then holds one chunk's maps and two `[H,W]` running maps, whatever K is; asking for the
probabilities (`output="probs"`) keeps all K maps instead. `digseg eval` labels this way (`evaluate.predictions`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import torch

from digseg_cli.core.labels import PROMPTED_MODE, LabelFold, class_means
from digseg_cli.inference.calls import PreparedCall, SegmentationOutput

DigsegPipeline = Any  # `inference.pipeline`'s (not imported: it imports this)

# Full-size float32 maps one chunk may hold (its texts × H × W × 4 bytes): 64 MiB is 64 maps of a 512 px image,
# 4 of a 2048 px one; a call's peak above the model is a few times this (the maps before and after the resize to
# the image's size), whatever K. A chunk is also a whole number of U-Net batches where it can be (no part-filled
# batch but the last), so chunking costs no U-Net time.
CHUNK_MAP_BYTES = 2**26


def class_chunks(sizes: list[int], map_bytes: int, batch: int, budget: int = CHUNK_MAP_BYTES) -> list[range]:
    """The classes (texts per class: `sizes`) in chunks, each a `range` of class indices: as many texts as
    `budget` holds at `map_bytes` a map, rounded down to a multiple of `batch`, whole classes, at least one."""
    per_chunk = max(1, budget // max(1, map_bytes))
    if per_chunk >= batch:
        per_chunk -= per_chunk % batch
    chunks, lo, texts = [], 0, 0
    for k, size in enumerate(sizes):
        if k > lo and texts + size > per_chunk:
            chunks.append(range(lo, k))
            lo, texts = k, 0
        texts += size
    chunks.append(range(lo, len(sizes)))
    return chunks


def class_probs(
    pipe: DigsegPipeline, image, call: PreparedCall, tile, timings: dict, budget: int = CHUNK_MAP_BYTES
) -> Iterator[tuple[int, torch.Tensor]]:
    """(first class of the chunk, its classes' probabilities `[k,H,W]`) chunk by chunk, in class order: what
    `pipe(image, ...).probs[first : first + k]` holds, without the other chunks' maps. `call` is `pipe.prepare`'s;
    a spread is not computed here (no per-class maps are kept for it)."""
    call = dataclasses.replace(call, run=dataclasses.replace(call.run, groups=None))
    latents: dict = {}
    predict, (height, width) = pipe.image_predictor(image, call, tile, timings, latents)
    notes = len(pipe.notes)

    def predict_chunk(text) -> torch.Tensor:  # [T_c,H,W]
        nonlocal notes
        if len(pipe.notes) != notes:  # the pipeline went to float32 after an overflow: latents made before it go
            latents.clear()
            notes = len(pipe.notes)
        return predict(text)

    sizes = [len(c) for c in call.classes]
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + size)  # each class's first text
    for chunk in class_chunks(sizes, 4 * height * width, pipe.batch_size, budget):
        texts = call.texts[starts[chunk.start] : starts[chunk.stop]]
        classes, thresholds = call.classes[chunk.start : chunk.stop], call.thresholds[chunk.start : chunk.stop]
        part = PreparedCall(call.run, classes, texts, thresholds)
        probs = pipe.predict_finite(predict_chunk, part)  # [T_c,H,W]
        yield chunk.start, class_means(probs, sizes[chunk.start : chunk.stop])  # [k,H,W]


def segment_labels(pipe: DigsegPipeline, image, call: PreparedCall, tile, t_start: float, *, budget=None):
    """`pipe(image, ..., output="labels")` → `SegmentationOutput`: the label map by the pipeline's rule (the
    prompted mode, each class's threshold), folded over `class_probs`' chunks; `probs` and `masks` are None."""
    timings: dict[str, float] = {}
    fold = LabelFold(PROMPTED_MODE, call.thresholds, len(call.classes))
    for _, probs in class_probs(pipe, image, call, tile, timings, budget or CHUNK_MAP_BYTES):
        fold.add(probs)
    labels = fold.labels()  # [H,W]
    timings["total"] = time.perf_counter() - t_start
    names = [c[0] for c in call.classes]
    return SegmentationOutput(None, labels.cpu(), None, call.thresholds, names, timings)
