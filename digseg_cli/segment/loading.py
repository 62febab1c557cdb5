"""The model a `digseg segment` run uses: device, precision and weights, opened before the first image.

One job: pick the device and precision (by `inference/device.py`'s rules), load the pipeline
(`load_pipeline`), find the local folder behind the weights (for the manifest's digest), and read a
checkpoint's config without loading its weights or touching the network (for `--dry-run`).

It prints nothing: the CLI shows what `LoadedPipeline` describes. Resolving weights names is
`weights/store.py`'s job, building models `models/`'s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from digseg_cli.errors import DigsegError

if TYPE_CHECKING:
    from digseg_cli.inference.pipeline import DigsegPipeline
    from digseg_cli.models.config import DigsegConfig


@dataclass
class LoadedPipeline:
    """A pipeline ready to run, and what the user is told about it."""

    pipe: DigsegPipeline
    weights_folder: Path | None  # the local folder behind the weights; None for built-in compact models
    device: str  # e.g. "cpu (4 threads), fp32 (auto → cpu)"
    load_s: float  # seconds to load the weights and find their folder
    notes: list[str] = field(default_factory=list)  # e.g. how reduced precision moves boundaries on this device


def open_pipeline(
    weights: str,
    *,
    device: str = "auto",
    precision: str = "auto",
    cache_dir: Path | None = None,
    offline: bool = False,
    deterministic: bool = False,
    compile: bool = False,
) -> LoadedPipeline:
    """Resolve the device (exit code 4 when an explicit one is missing) and precision, then load `weights`
    (exit code 5 when they are not available): before any image is read. `compile`: through torch.compile
    (`inference.compiling`; exit code 2 when it cannot run here), compiled by the run's first calls."""
    from digseg_cli.inference.device import describe, precision_note, resolve_device, resolve_dtype
    from digseg_cli.inference.pipeline import load_pipeline

    dev = resolve_device(device)
    dtype = resolve_dtype(precision, dev)
    if deterministic:
        import torch

        torch.use_deterministic_algorithms(True, warn_only=True)
    t0 = time.perf_counter()
    pipe = load_pipeline(
        weights, device=dev, dtype=dtype, cache_dir=cache_dir, offline=offline or None, compile=compile
    )
    folder = weights_folder(weights, cache_dir, offline)
    load_s = time.perf_counter() - t0
    picked = f" (auto → {dev})" if device.strip().lower() == "auto" else ""
    note = precision_note(dtype, dev)
    return LoadedPipeline(pipe, folder, describe(dev, dtype) + picked, load_s, [] if note is None else [note])


def weights_folder(weights: str, cache_dir: Path | None, offline: bool) -> Path | None:
    """The local folder behind `weights` (for the manifest's sha256), or None for built-in compact models."""
    from digseg_cli.models.compact import compact_name

    if compact_name(weights) is not None:
        return None
    from digseg_cli.weights.store import resolve_weights

    return resolve_weights(weights, cache_dir=cache_dir, offline=offline or None)


def peek_config(weights: str, cache_dir: Path | None) -> DigsegConfig | None:
    """The checkpoint config behind `weights` without loading weights or touching the network, or None."""
    from digseg_cli.models.compact import COMPACT_CONFIGS, COMPACT_PREFIX, compact_name, get_compact_config
    from digseg_cli.models.config import DigsegConfig

    name = compact_name(weights)
    if name in COMPACT_CONFIGS:
        spec = get_compact_config(name)
        return DigsegConfig(base_model=COMPACT_PREFIX + name, default_resolution=spec.resolution)
    try:
        folder = weights_folder(weights, cache_dir, offline=True)
        return DigsegConfig.load(folder) if folder is not None else None
    except DigsegError:
        return None
