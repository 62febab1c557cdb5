"""What a pipeline does when reduced precision overflows: the VAE, then the whole model, to float32.

One job: `upcast_after_overflow`, called by `DigsegPipeline.predict_finite` (and by the chunked calls of
`many_prompts`) after a prediction came out non-finite. It changes the pipeline in place and says so in its
`notes`; it runs nothing.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

DigsegPipeline = Any  # `inference.pipeline`'s (not imported: it imports this)

log = logging.getLogger("digseg")


def upcast_after_overflow(pipe: DigsegPipeline) -> None:
    """After non-finite probabilities: the VAE to fp32 first (the usual culprit), then the whole model.
    Sticky for the pipeline's life; each step adds a line to `notes`. The weights keep their reduced-precision
    rounding (no second copy is held). In fp32 it is the weights' fault."""
    from digseg_cli.errors import CheckpointError

    # The VAE's dtype is not always the pipeline's: a trainer validating keeps its frozen VAE in its own.
    if pipe.model.vae.dtype != torch.float32:
        part, dtype = "VAE", pipe.model.vae.dtype
        pipe.model.vae.to(torch.float32)
    elif pipe.dtype != torch.float32:
        part, dtype = "model", pipe.dtype
        pipe.model.to(torch.float32)
        pipe.dtype = torch.float32
        pipe._prompt_cache.clear()  # embeddings made in the reduced precision may be what overflowed
    else:
        raise CheckpointError(
            "the model gives non-finite probabilities in float32: its weights look damaged "
            "(download them again, or check a checkpoint you trained)"
        )
    note = f"the {part} gave non-finite values in {str(dtype).removeprefix('torch.')}; it runs in float32 from now on"
    log.warning("%s", note)
    pipe.notes.append(note)
