"""The label rule: per-prompt probabilities `[K,H,W]` → one label map `[H,W]`.

One rule, three modes, used by the pipeline (`segment`'s label maps, "background" mode with one threshold
per prompt) and by benchmark scoring (`eval`, the mode a benchmark's protocol names), over all K maps at once
or folded chunk by chunk (`LabelFold`: memory that does not grow with K). Tensor-only: it knows nothing of
prompts' text, files or datasets; callers validate user input before it reaches here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# argmax: closed set, label k = prompt k (0..K-1), no threshold;
# background: 0 = background, k+1 where prompt k has the top probability and reaches its threshold;
# nested: structures nested outer → inner (REFUGE disc ⊃ cup): k+1 for the innermost prompt k that reaches it.
LABEL_MODES = ("argmax", "background", "nested")
# A prompted call (`segment`, the pipeline's label maps, whole or folded chunk by chunk) labels in this mode.
PROMPTED_MODE = "background"


def prompt_thresholds(threshold: float | Sequence[float], probs: torch.Tensor) -> torch.Tensor:
    """One threshold or one per prompt → `[K,1,1]` in `probs`' dtype and device (so the comparison is made in
    the probabilities' own precision, whichever form the threshold came in)."""
    values = [float(threshold)] * probs.shape[0] if isinstance(threshold, (int, float)) else list(threshold)
    return torch.tensor(values, device=probs.device, dtype=probs.dtype)[:, None, None]  # [K,1,1]


def class_means(probs: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """`[T,H,W]` per text → `[K,H,W]` per class: each class's `sizes[k]` synonyms' scores averaged (a view of
    `probs` when every class has one text: no K-map copy)."""
    if all(size == 1 for size in sizes):
        return probs
    return torch.stack([chunk.mean(0) for chunk in probs.split(list(sizes))])  # [K,H,W]


class LabelFold:
    """The label rule over prompts that arrive in chunks, in prompt order: `add` each chunk's `[k,H,W]`, then
    `labels()`. Only a running best score and its prompt (`[H,W]` each) are kept, so memory does not grow with
    K; one chunk of all K prompts is `labels_from_probs`, which is this fold. Ties go to the earlier prompt in
    every mode, as `max` gives them within a chunk."""

    def __init__(self, mode: str, threshold: float | Sequence[float], count: int) -> None:
        if mode not in LABEL_MODES:
            raise ValueError(f"label mode must be one of {', '.join(LABEL_MODES)}; got {mode!r}")
        self.mode, self.count, self.seen = mode, count, 0
        self.values = [float(threshold)] * count if isinstance(threshold, (int, float)) else list(threshold)
        self.best: torch.Tensor | None = None  # [H,W] the top probability so far (nested: unused)
        self.index: torch.Tensor | None = None  # [H,W] int64, its prompt (nested: the label so far)

    def add(self, probs: torch.Tensor) -> None:
        """The next `probs.shape[0]` prompts' probabilities `[k,H,W]`."""
        lo, k = self.seen, probs.shape[0]
        if lo + k > self.count:
            raise ValueError(f"{lo + k} prompts' probabilities for a fold of {self.count}")
        self.seen += k
        if self.mode == "nested":  # outer → inner: a later (inner) structure that is on overwrites
            thr = prompt_thresholds(self.values[lo : lo + k], probs)  # [k,1,1]
            if self.index is None:
                self.index = torch.zeros(probs.shape[1:], dtype=torch.int64, device=probs.device)  # [H,W]
            for j in range(k):
                self.index[probs[j] >= thr[j, 0, 0]] = lo + j + 1
            return
        best, index = probs.max(0)  # [H,W]: the first maximal prompt of the chunk
        if self.best is None:
            self.best, self.index = best, index + lo
            return
        better = best > self.best  # strictly: on a tie the earlier chunk's prompt stays
        self.best = torch.where(better, best, self.best)
        self.index = torch.where(better, index + lo, self.index)

    def labels(self) -> torch.Tensor:
        """`[H,W]` int64 labels by the mode, once all `count` prompts are in."""
        if self.seen != self.count or self.index is None:
            raise ValueError(f"the fold has {self.seen} of its {self.count} prompts")
        if self.mode != "background":  # argmax: 0..K-1; nested: the label map itself
            return self.index
        thr = prompt_thresholds(self.values, self.best[None])[:, 0, 0]  # [K] in the probabilities' dtype
        return torch.where(self.best >= thr[self.index], self.index + 1, torch.zeros_like(self.index))


def labels_from_probs(
    probs: torch.Tensor, mode: str = "argmax", threshold: float | Sequence[float] = 0.5
) -> torch.Tensor:
    """`[K,H,W]` probabilities → `[H,W]` int64 labels by `mode` (see `LABEL_MODES`); `threshold` is one value
    or one per prompt (unused by argmax). ValueError for an unknown mode. `LabelFold` with one chunk."""
    fold = LabelFold(mode, threshold, probs.shape[0])
    fold.add(probs)
    return fold.labels()
