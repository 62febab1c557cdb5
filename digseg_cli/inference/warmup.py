"""`--compile`'s warm-up: the calls that compile a compiled pipeline, made before a run's first image and timed.

One job: run a pipeline compiled by `compiling.compile_pipeline` on a synthetic picture with the run's settings,
in the shapes the run will meet, so that the compile happens (and is timed) here and the images' timings leave it
out. A pipeline that is not compiled costs nothing. Compiling is `compiling.py`'s job, the calls `pipeline.py`'s
and `batches.py`'s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from digseg_cli.inference.batches import segment_batch

if TYPE_CHECKING:
    from digseg_cli.inference.pipeline import DigsegPipeline, Prompt

log = logging.getLogger("digseg")

# Settings of a pipeline call that depend on the run's classes, or that the warm-up chooses itself.
_NOT_WARM_UP = ("threshold", "seed", "tile", "output")


def warm_up(pipe: DigsegPipeline, prompts: Sequence[Prompt], settings: Mapping[str, Any]) -> float:
    """The calls that compile, on a synthetic picture at the processing resolution, timed (seconds, also in
    `pipe.compiled.warmup_s`); 0 for a pipeline that is not compiled. `settings`: the run's pipeline keyword
    arguments (its thresholds, seed and tile are left out).

    The shapes a run meets, each compiled once for every image size and batch but one (torch compiles a size of
    one apart): one image whose latent serves all its prompts (a view), a tiled image where tiles share calls (a
    latent per pair, one noise for all) and, on CUDA, a batch of one (`--batch-size auto` probes with it)
    and images sharing a call (`batches.segment_batch`: a noise per image)."""
    compiled = getattr(pipe, "compiled", None)
    if compiled is None:
        return 0.0
    call = {k: v for k, v in settings.items() if k not in _NOT_WARM_UP}
    side = call.get("resolution") or pipe.config.default_resolution or 512  # 0 (native): the model's own
    image = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)  # [side,side,3]
    two = list(prompts[:2])  # two prompts: a batch above one
    log.info("--compile: compiling the model by its first calls (%s; minutes on a CPU)", compiled.backend)
    t0 = time.perf_counter()
    pipe(image, two, tile="off", **call)
    if pipe._tiles_per_call(side, side, len(two)) > 1:  # tiles share calls (one by one they meet the shapes above)
        pipe(np.concatenate([image, image], axis=1), two, tile=side, **call)  # [side,2·side,3]: three tiles
    if pipe.device.type == "cuda":
        if len(prompts) > 1:
            pipe(image, list(prompts[:1]), tile="off", **call)
        segment_batch(pipe, [image, image], two, seeds=[0, 1], **call)
        torch.cuda.synchronize(pipe.device)
    compiled.warmup_s = time.perf_counter() - t0
    log.info("--compile: warm-up took %.1f s (timed apart from the images)", compiled.warmup_s)
    return compiled.warmup_s
