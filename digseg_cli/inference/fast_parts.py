"""Which image encoder and mask decoder a call runs: `vae`, `fast` or `auto` → `vae` or `fast`, one rule for both.

"auto" is the distilled part (`fast_encoder/`, `fast_decoder/` of the checkpoint) only when the checkpoint's
config records that it passed its accuracy check (`evaluation["fast_encoder"]["passed"]`, written by
`digseg encoder train`; likewise for the decoder), else the VAE's own. It knows the model and its config, not
how the parts are trained or run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from digseg_cli.errors import UsageError
from digseg_cli.models.config import DECODERS

if TYPE_CHECKING:
    from digseg_cli.core.model import DigsegModel
    from digseg_cli.models.config import DigsegConfig

PARTS = ("encoder", "decoder")


def resolve_part(model: DigsegModel, config: DigsegConfig, part: str, choice: str) -> str:
    """`choice` (vae|fast|auto) for `part` ("encoder" or "decoder") → "vae" or "fast"; a `UsageError` for
    another choice, or for "fast" when the checkpoint has no such part (naming the command that makes one)."""
    fast = getattr(model, f"fast_{part}") is not None
    if choice == "auto":
        passed = bool((config.evaluation.get(f"fast_{part}") or {}).get("passed"))
        return "fast" if fast and passed else "vae"
    if choice not in DECODERS:
        raise UsageError(f"`{part}` must be vae, fast or auto, got {choice!r}")
    if choice == "fast" and not fast:
        raise UsageError(f"`{part}` fast needs a checkpoint with a fast {part} (make one with `digseg {part} train`)")
    return choice
