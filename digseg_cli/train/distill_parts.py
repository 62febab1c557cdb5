"""The two distillations in words and defaults, torch-free: the one table that `distill.Part` and the command
line (`digseg decoder train`, `digseg encoder train`: their help, their progress lines) both read.

One job: say what each part is called and does, what its pool holds, its student's default width and its
loss's name. How a part is distilled (its pool, student and loss functions) is `distill_decoder.py`'s and
`distill_encoder.py`'s.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PartAbout:
    """What is said of one part: by the command line, and in the distilled checkpoint's record."""

    name: str  # "decoder" | "encoder": the pipeline's option, the command and the model's `fast_<name>`
    what: str  # the part in words: "mask decoder"
    inputs: str  # what the pool holds: "latents" | "images" (recorded as `pool_<inputs>`)
    each: str  # what one pool scene gives, for `--pool`'s help
    width: int  # the student's default width (`--width`)
    loss: str  # "bce" | "mse": recorded as the distillation's `final_<loss>`, shown upper-case
    verb: str  # "decode" | "encode": what the part does, naming its timings (`<verb>_speedup`, ...)


PARTS = {
    "decoder": PartAbout("decoder", "mask decoder", "latents", "3 latents each", 32, "bce", "decode"),
    "encoder": PartAbout("encoder", "image encoder", "images", "one image each", 64, "mse", "encode"),
}
