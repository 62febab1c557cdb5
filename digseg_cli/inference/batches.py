"""Several images in one model call: equal-size images segmented together, each as if it had been alone.

One job: `segment_batch` runs the pipeline's steps 2–10 for n images of one size that are not tiled, their image
latents encoded in one VAE call and their (image, prompt) pairs sharing U-Net and decoder calls `batch_size` at
a time, each image with its own seed; `images_per_call` says how many such images share a call (the tiles'
rule, `DigsegPipeline._tiles_per_call`, at the processing size). `auto_batch_size` sizes the U-Net batch from a
GPU's free memory after one probing call.

It reads no files and knows nothing of folders or back-off: `segment/run.py` groups a folder's images and
`segment/backoff.py` retries on out-of-memory.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from digseg_cli.core import transforms
from digseg_cli.errors import UsageError

if TYPE_CHECKING:
    import numpy as np

    from digseg_cli.inference.pipeline import DigsegPipeline, Prompt, SegmentationOutput

# `--batch-size auto` on a GPU: the share of free memory the U-Net batch may take (the rest is headroom for the
# allocator's fragments and the decoder), and the largest batch it picks.
FREE_MEMORY_SHARE = 0.6
MAX_AUTO_BATCH = 256


def images_per_call(pipe: DigsegPipeline, height: int, width: int, texts: int, resolution: int | None) -> int:
    """How many untiled `height`×`width` images with `texts` prompts share one call on a GPU (1 when tiled).

    Off CUDA always 1: a CPU gains little (its tuned batch is one or two pairs), and alone each image's result
    is bit for bit the same whatever else is in its folder; sharing a call moves it by float rounding."""
    res = pipe.config.default_resolution if resolution is None else resolution
    if pipe.device.type != "cuda" or pipe._tile_size("auto", res, height, width):
        return 1
    h, w = transforms.processing_size(height, width, res)
    return pipe._tiles_per_call(h, w, texts)


@torch.no_grad()
def segment_batch(
    pipe: DigsegPipeline, images: Sequence[np.ndarray], prompts: Sequence[Prompt], *, seeds: Sequence[int], **settings
) -> list[SegmentationOutput]:
    """`[pipe(image, prompts, seed=s, **settings) for image, s in zip(images, seeds)]`, in shared calls.

    The images must be `[H,W,3]` uint8 arrays of one size that is not tiled; `settings` are the pipeline's call
    settings (`tile` other than "auto" is refused). Each result's timings are the batch's shared evenly."""
    t_start = time.perf_counter()
    if len(images) != len(seeds) or not images:
        raise UsageError("`segment_batch` needs one seed per image and at least one image")
    if settings.pop("tile", "auto") != "auto":
        raise UsageError("`segment_batch` runs untiled images only (tile='auto')")
    settings.pop("seed", None)  # each image's own, in `seeds`
    call = pipe.prepare(prompts, **settings)
    height, width = images[0].shape[:2]
    if any(image.shape[:2] != (height, width) for image in images) or pipe._tile_size(
        "auto", call.run.resolution, height, width
    ):
        raise UsageError("`segment_batch` takes images of one size that is not tiled")
    pixels = torch.cat([pipe._check_image(image) for image in images])  # [n,3,H,W] in [-1,1]
    timings: dict[str, float] = {}
    probs = pipe.predict_finite(lambda text: pipe._predict(pixels, text, call.run, timings, seeds=seeds), call)
    shared = {key: value / len(images) for key, value in timings.items()}  # [n,T,H,W] above; per image below
    return [pipe.finish(p, call, dict(shared), t_start) for p in probs]


def batch_from_memory(free_bytes: int, pair_bytes: int) -> int:
    """The U-Net batch (pairs per call) that `FREE_MEMORY_SHARE` of `free_bytes` holds at `pair_bytes` each."""
    if pair_bytes <= 0:
        return MAX_AUTO_BATCH
    return max(1, min(MAX_AUTO_BATCH, int(FREE_MEMORY_SHARE * free_bytes // pair_bytes)))


def auto_batch_size(pipe: DigsegPipeline, image: np.ndarray, prompts: Sequence[Prompt], call: dict[str, Any]) -> int:
    """On CUDA: segment `image` with one prompt and a batch of one, measure the memory that took, and size the
    batch from the memory free after it. Elsewhere the pipeline's own batch (the CPU's tuned one, MPS's 1)."""
    if pipe.device.type != "cuda":
        return pipe.batch_size
    device, saved = pipe.device, pipe.batch_size
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    pipe.batch_size = 1
    try:
        pipe(image, list(prompts[:1]), **call)
    finally:
        pipe.batch_size = saved
    torch.cuda.synchronize(device)
    pair_bytes = torch.cuda.max_memory_allocated(device) - before  # one encode + one pair: an upper bound
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # free for torch too
    return batch_from_memory(free + cached, pair_bytes)
