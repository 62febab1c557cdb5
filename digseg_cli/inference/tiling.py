"""Tiled inference at native scale: an image's tile windows run several per call and blended with a feathered
window, over the whole image or over one block of it (`blocks.py` segments large images block by block).

One job: `blend_windows` turns the pipeline's predictions of equal-size tiles into probabilities over a box of the
image. Each pixel of the box gets the same sum, in the same order, of the windows that cover it as it would for
the whole image, so a block's probabilities are the whole image's there, whatever the block.

It knows nothing of files, prompts' text or label rules: the pipeline (`pipeline.py`) runs the model and
calls this for its step 3–7 when it tiles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from digseg_cli.core import transforms
from digseg_cli.inference.calls import CallSettings

Box = tuple[int, int, int, int]  # (top, left, height, width) in the image's pixels


def blend_windows(
    pipe: Any,
    crop: Callable[[int, int, int, int], torch.Tensor],
    windows: Sequence[Box],
    box: Box,
    *,
    text: tuple[torch.Tensor, torch.Tensor],
    tile: int,
    run: CallSettings,
    timings: dict[str, float],
    latents: dict | None = None,
) -> torch.Tensor:
    """Probabilities `[T,h,w]` over `box` of an image, `pipe` a `DigsegPipeline` (not imported: it imports this)
    and `run` its call's settings.

    Tiled (`tile` > 0): `windows` are the image's tile windows (`transforms.tile_windows`, all one size) that
    overlap `box`, run at native scale several per call and blended with a feathered window; windows left out
    (no data under them) leave 0 where no other window reaches. Untiled: the whole image at the processing
    resolution (`box` is all of it). `crop(top, left, h, w)` gives the image's pixels there, `[1,3,h,w]` in [-1, 1]
    on the pipeline's device; `text` = (emb `[T,L,D]`, pooled `[T,D]`). With `run.groups` (the members' spread
    asked for) each class's variance across the ensemble follows the T maps, blended alike: `[T+K,h,w]`.
    `latents` (a dict, empty at first, or None) keeps the windows' latents for the next texts of the same image."""
    if not tile:
        return pipe._predict(crop(*box), text, run, timings, latents=latents)[0]
    top0, left0, height, width = box
    texts = text[0].shape[0]
    acc = torch.zeros((texts + len(run.groups or ()), height, width), device=pipe.device)  # maps, variances
    weight = torch.zeros((height, width), device=pipe.device)
    if not windows:
        return acc
    _, _, h, w = windows[0]
    win = transforms.feather_weights(h, w, int(tile * run.overlap / 2), pipe.device)  # [h,w]
    group = pipe._tiles_per_call(h, w, texts)
    native = dataclasses.replace(run, resolution=0)  # tiles run at native scale
    for lo in range(0, len(windows), group):
        chunk = windows[lo : lo + group]
        pixels = torch.cat([crop(*window) for window in chunk])  # [g,3,h,w]
        # This group's latents; groups depend on the texts per call, so they are known by their windows.
        cached = None if latents is None else latents.setdefault(tuple(chunk), {})
        probs = pipe._predict(pixels, text, native, timings, latents=cached)  # [g,T,h,w]
        for (top, left, _, _), tile_probs in zip(chunk, probs, strict=True):
            y0, y1 = max(top, top0), min(top + h, top0 + height)  # the window's part inside the box
            x0, x1 = max(left, left0), min(left + w, left0 + width)
            inside = (slice(y0 - top, y1 - top), slice(x0 - left, x1 - left))
            out = (slice(y0 - top0, y1 - top0), slice(x0 - left0, x1 - left0))
            acc[:, out[0], out[1]] += (tile_probs * win)[:, inside[0], inside[1]]
            weight[out] += win[inside]
    return acc / weight.clamp_min(1e-12)
