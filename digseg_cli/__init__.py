"""digseg: text-prompted segmentation with a fine-tuned diffusion U-Net (DiGSeg).

The public API is imported lazily so that ``import digseg_cli`` (and ``digseg --help``) never
imports torch:

    >>> from digseg_cli import load_pipeline
    >>> pipe = load_pipeline("tiny")                 # or a checkpoint folder, an SD base, a registry name
    >>> out = pipe(image, ["road", "tree"])          # PIL image or HxWx3 uint8 array
    >>> out.probs.shape, out.labels.shape            # [K,H,W] float in [0,1], [H,W] int (0 = background)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from digseg_cli._version import __version__

if TYPE_CHECKING:  # pragma: no cover
    from digseg_cli.inference.pipeline import DigsegPipeline, SegmentationOutput, load_pipeline

__all__ = ["__version__", "load_pipeline", "DigsegPipeline", "SegmentationOutput"]

_LAZY = {
    "load_pipeline": "digseg_cli.inference.pipeline",
    "DigsegPipeline": "digseg_cli.inference.pipeline",
    "SegmentationOutput": "digseg_cli.inference.pipeline",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'digseg_cli' has no attribute {name!r}")
