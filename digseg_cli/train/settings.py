"""What a training run is asked to do (`TrainSettings`, every option of `digseg train`) and what it leaves
(`TrainResult`). Plain data: the settings are written to `<out>/config.json`, to `<out>/recipe.yaml`
(`to_yaml`, which `--recipe` reads back through `train.recipes`) and into the checkpoint's `training` record;
`train.loop` runs them. `check_inputs` is the one check of their values, `parse_duration` the one reader of
`--time`'s durations.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from digseg_cli.errors import UsageError

# `--precision` (besides auto) as Accelerate's `mixed_precision`.
MIXED_PRECISION = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}
# `--lr-schedule`: the names diffusers' `get_scheduler` takes (its `SchedulerType`), but `piecewise_constant`,
# which needs step rules no option gives. Spelled out because importing diffusers costs seconds that
# `--print-config` and a refused option should not wait; tests/train/test_recipes.py keeps it in step.
LR_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
# Settings of one run, not of a recipe: which checkpoint it continues (`--resume`, `--resume-from`).
RUN_ONLY = ("resume",)


@dataclass
class TrainSettings:
    """Every knob of a run; written to `<out>/config.json`, `<out>/recipe.yaml` and the checkpoint's record."""

    data: Path | None = None  # a training folder; `datasets` names benchmarks or folders instead (or too)
    out: Path = Path("digseg-train")
    datasets: list[str] = field(default_factory=list)  # "NAME_OR_PATH[:WEIGHT]": "ade20k:1", "./my_masks"
    data_root: Path | None = None  # where named datasets live (None: $DIGSEG_DATA_ROOT, else the user data folder)
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
    vocabulary: str | None = None  # a vocabulary file or shipped name (`data.vocabulary`): synonyms, unrelated words
    noise_strength: float = 0.0  # multi-resolution noise for the `diffusion` objective
    decoded_loss: float = 0.0  # `one-step`: weight of the loss on the VAE-decoded mask (E2E-FT)
    foreground_weight: float = 1.0  # weight of latent pixels that cover the target (1 = plain latent MSE)
    vae_steps: int = 0  # compact bases: stage-1 autoencoder steps before the U-Net trains
    vae_lr: float = 1e-3
    seed: int = 0
    workers: int | None = None  # data-loading worker processes (None: the library picks from the usable cores)
    deterministic: bool = False
    resume: Path | None = None
    cpu: bool = False
    recipe: str | None = None  # the shipped recipe's name or the file these settings started from

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}

    def __post_init__(self) -> None:
        # Paths stay paths when the settings come back from JSON (a resume) or a recipe.
        self.data, self.val, self.data_root = (
            Path(p) if p is not None else None for p in (self.data, self.val, self.data_root)
        )
        self.out = Path(self.out)
        self.datasets = list(self.datasets)

    def to_yaml(self) -> str:
        """The settings as a recipe: what `digseg train --print-config` prints and `<out>/recipe.yaml` holds,
        every key but `RUN_ONLY`'s in field order, so `--recipe` of that file starts the same run again."""
        import yaml

        from digseg_cli._version import __version__

        values = {k: v for k, v in self.to_dict().items() if k not in RUN_ONLY}
        header = f"# digseg {__version__} train settings; `digseg train --recipe THIS_FILE` starts this run again\n"
        return header + yaml.safe_dump(values, sort_keys=False, allow_unicode=True)


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


def check_inputs(s: TrainSettings) -> None:
    """Refuse, before any work, settings no run could use: a `UsageError` (exit 2) naming the option as
    `digseg train` spells it. Pure (diffusers' pipelines' `check_inputs` is the model): `train()` calls it, so
    the Python API is checked alike. The resolution's multiple needs the model: `check_resolution`."""
    from digseg_cli.core import OBJECTIVES
    from digseg_cli.models.config import check_prompt_template

    rules = [
        (s.batch_size >= 1, "--batch-size", "at least 1", s.batch_size),
        (s.effective_batch is None or s.effective_batch >= 1, "--effective-batch", "at least 1", s.effective_batch),
        (s.lr > 0, "--lr", "a positive number", s.lr),
        (s.vae_lr > 0, "--vae-lr", "a positive number", s.vae_lr),
        (s.weight_decay >= 0, "--weight-decay", "0 or more", s.weight_decay),
        (s.warmup_steps >= 0, "--warmup-steps", "0 or more", s.warmup_steps),
        (s.max_steps is None or s.max_steps >= 1, "--max-steps", "at least 1", s.max_steps),
        (s.epochs is None or s.epochs >= 1, "--epochs", "at least 1", s.epochs),
        (s.time_limit is None or s.time_limit > 0, "--time", "a positive duration", s.time_limit),
        (s.val_every >= 0, "--val-every", "0 (off) or more", s.val_every),
        (s.save_every >= 0, "--save-every", "0 (off) or more", s.save_every),
        (s.log_every >= 1, "--log-every", "at least 1", s.log_every),
        (s.val_limit is None or s.val_limit >= 1, "--val-limit", "at least 1", s.val_limit),
        (0 <= s.val_split < 1, "--val-split", "in [0, 1)", s.val_split),
        (0 <= s.ema < 1, "--ema", "in [0, 1) (0 = off; 0.999 is usual)", s.ema),
        (s.vae_steps >= 0, "--vae-steps", "0 or more", s.vae_steps),
        (s.resolution is None or s.resolution >= 1, "--resolution", "a positive number of pixels", s.resolution),
        (s.decoded_loss >= 0, "--decoded-loss", "0 or more", s.decoded_loss),
        (s.foreground_weight >= 1, "--foreground-weight", "at least 1", s.foreground_weight),
        (0 <= s.absent_prob <= 1, "--absent-prob", "in [0, 1]", s.absent_prob),
        (s.noise_strength >= 0, "--noise-strength", "0 or more", s.noise_strength),
        (s.workers is None or s.workers >= 0, "--workers", "0 or more", s.workers),
        (s.objective in OBJECTIVES, "--objective", " or ".join(OBJECTIVES), s.objective),
        (s.lr_schedule in LR_SCHEDULES, "--lr-schedule", "one of " + ", ".join(LR_SCHEDULES), s.lr_schedule),
    ]
    refuse_broken(rules)
    if s.precision != "auto" and s.precision not in MIXED_PRECISION:
        raise UsageError(f"`--precision` must be auto, fp32, fp16 or bf16, got {s.precision!r}")
    check_prompt_template(s.prompt_template, "`--prompt-template`")


def refuse_broken(rules: list[tuple[bool, str, str, object]]) -> None:
    """A `UsageError` for the first rule `(holds, option, what it must be, value)` that does not hold: the one
    wording of an option check (`` `--lr` must be a positive number, got -1.0 ``)."""
    for holds, option, wanted, value in rules:
        if not holds:
            raise UsageError(f"`{option}` must be {wanted}, got {value!r}")


def parse_duration(text: str | float | None, option: str = "--time") -> float | None:
    """Seconds in a duration as `--time` and a recipe's `time_limit` take it: a number of seconds, or one with
    a unit (`90`, `90s`, `45m`, `2h`); anything else is a `UsageError` naming `option`."""
    if text is None or (isinstance(text, (int, float)) and not isinstance(text, bool)):
        return None if text is None else float(text)
    units = {"s": 1, "m": 60, "h": 3600}
    clean = str(text).strip().lower()
    try:
        return float(clean[:-1]) * units[clean[-1]] if clean[-1:] in units else float(clean)
    except ValueError:
        raise UsageError(f"`{option}` must be a duration (examples: 900, 45m, 2h), got {text!r}") from None


def check_resolution(resolution: int, multiple: int) -> int:
    """`resolution` when the model can train at it (a multiple of its `size_multiple`), else a `UsageError`."""
    if resolution % multiple:
        lower = max(multiple, resolution // multiple * multiple)
        raise UsageError(
            f"`--resolution` must be a multiple of {multiple} for this model, got {resolution} (try {lower})"
        )
    return resolution


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
    if precision not in MIXED_PRECISION:
        raise UsageError(f"`--precision` must be auto, fp32, fp16 or bf16, got {precision!r}")
    return MIXED_PRECISION[precision]
