"""The label rule: per-prompt probabilities `[K,H,W]` → one label map `[H,W]`.

One rule, three modes, used by the pipeline (`segment`'s label maps, "background" mode with one threshold
per prompt) and by benchmark scoring (`eval`, the mode a benchmark's protocol names). Tensor-only: it
knows nothing of prompts' text, files or datasets; callers validate user input before it reaches here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# argmax: closed set, label k = prompt k (0..K-1), no threshold;
# background: 0 = background, k+1 where prompt k has the top probability and reaches its threshold;
# nested: structures nested outer → inner (REFUGE disc ⊃ cup): k+1 for the innermost prompt k that reaches it.
LABEL_MODES = ("argmax", "background", "nested")


def prompt_thresholds(threshold: float | Sequence[float], probs: torch.Tensor) -> torch.Tensor:
    """One threshold or one per prompt → `[K,1,1]` in `probs`' dtype and device (so the comparison is made in
    the probabilities' own precision, whichever form the threshold came in)."""
    values = [float(threshold)] * probs.shape[0] if isinstance(threshold, (int, float)) else list(threshold)
    return torch.tensor(values, device=probs.device, dtype=probs.dtype)[:, None, None]  # [K,1,1]


def labels_from_probs(
    probs: torch.Tensor, mode: str = "argmax", threshold: float | Sequence[float] = 0.5
) -> torch.Tensor:
    """`[K,H,W]` probabilities → `[H,W]` int64 labels by `mode` (see `LABEL_MODES`); `threshold` is one value
    or one per prompt (unused by argmax). ValueError for an unknown mode."""
    if mode == "argmax":
        return probs.argmax(0)  # [H,W] in 0..K-1
    if mode not in LABEL_MODES:
        raise ValueError(f"label mode must be one of {', '.join(LABEL_MODES)}; got {mode!r}")
    thr = prompt_thresholds(threshold, probs)  # [K,1,1]
    if mode == "background":
        best, idx = probs.max(0)  # [H,W]
        return torch.where(best >= thr[idx, 0, 0], idx + 1, torch.zeros_like(idx))  # 0 = background
    labels = torch.zeros(probs.shape[1:], dtype=torch.int64, device=probs.device)  # [H,W]
    for k in range(probs.shape[0]):  # outer → inner: a later (inner) structure that is on overwrites
        labels[probs[k] >= thr[k, 0, 0]] = k + 1
    return labels
