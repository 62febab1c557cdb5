"""What a training run is asked to do (`TrainSettings`, every option of `digseg train`) and what it leaves
(`TrainResult`). Plain data: the settings are written to `<out>/config.json` and into the checkpoint's
`training` record; `train.loop` runs them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from digseg_cli.errors import UsageError


@dataclass
class TrainSettings:
    """Every knob of a run; written to `<out>/config.json` and into the checkpoint's `training` record."""

    data: Path
    out: Path
    base: str = "stabilityai/stable-diffusion-2"  # SD base (folder / Hub id) or compact config name
    init: str | None = None  # start from these weights (checkpoint, registry name) instead of a fresh base
    val: Path | None = None
    val_split: float = 0.1
    class_name: str | None = None
    objective: str = "one-step"
    resolution: int | None = None  # default: the model's processing resolution
    batch_size: int = 4
    effective_batch: int | None = None  # gradient accumulation up to this many samples per step
    lr: float = 3e-5
    weight_decay: float = 1e-2
    warmup_steps: int = 100
    lr_schedule: str = "cosine"
    max_steps: int | None = None
    epochs: int | None = None
    time_limit: float | None = None  # seconds of wall clock
    val_every: int = 500
    save_every: int = 500
    log_every: int = 10
    val_limit: int | None = 64
    ema: float = 0.0  # EMA decay, 0 = off
    precision: str = "auto"
    gradient_checkpointing: bool = False
    absent_prob: float = 0.3
    prompt_template: str = "{name}"
    noise_strength: float = 0.0  # multi-resolution noise for the `diffusion` objective
    decoded_loss: float = 0.0  # `one-step`: weight of the loss on the VAE-decoded mask (E2E-FT)
    foreground_weight: float = 1.0  # weight of latent pixels that cover the target (1 = plain latent MSE)
    vae_steps: int = 0  # compact bases: stage-1 autoencoder steps before the U-Net trains
    vae_lr: float = 1e-3
    seed: int = 0
    workers: int = 0
    deterministic: bool = False
    resume: Path | None = None
    cpu: bool = False

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


@dataclass
class TrainResult:
    out: Path
    step: int
    best_miou: float | None
    last: Path
    best: Path | None
    stopped_by: str  # "max_steps" | "time" | "epochs" | "signal"
    history: list[dict] = field(default_factory=list)
    is_main_process: bool = True


def accelerate_precision(precision: str) -> str:
    """`--precision` as Accelerate's `mixed_precision`: auto is bf16 on a CUDA GPU that has it, else fp16 there,
    else no mixed precision."""
    import torch

    if precision == "auto":
        return (
            "bf16"
            if torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            else ("fp16" if torch.cuda.is_available() else "no")
        )
    mapping = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}
    if precision not in mapping:
        raise UsageError(f"unknown precision {precision!r}: use auto, fp32, fp16 or bf16")
    return mapping[precision]
