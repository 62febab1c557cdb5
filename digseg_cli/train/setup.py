"""What a training run builds before its first step: processes, the model, the optimizer, the batches.

One job: the steps of `train.loop.train` that set a run up — Accelerate's processes, precision and
accumulation, and the run folder's `config.json` (`start`); the model to train, from a checkpoint to resume,
`--init`'s weights or a fresh base (`load_run_model`); freezing, AdamW, schedule, EMA and the loss module
(`set_up_optimisation`); a resume's restored state (`restore`); the loader of this process's batches
(`open_batches`). `Run` is what they build and the loop works with. The loop itself, validation and
checkpoints on schedule are `train.loop`'s.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from digseg_cli.core import diffusion
from digseg_cli.errors import UsageError
from digseg_cli.files import atomic_write_json, atomic_write_text, require_writable_folder
from digseg_cli.inference.device import emulated_bf16_note
from digseg_cli.models.checkpoint import LoadedModel
from digseg_cli.models.compact import COMPACT_PREFIX
from digseg_cli.train import loader as train_loader
from digseg_cli.train import state as train_state
from digseg_cli.train.loss import LossModule
from digseg_cli.train.optim import adamw, lr_schedule
from digseg_cli.train.samples import SegmentationTrainDataset
from digseg_cli.train.settings import TrainSettings, accelerate_precision, check_resolution

log = logging.getLogger("digseg")


@dataclass(kw_only=True)
class Run:
    """What steps 2–6 of `train.loop.train` build and the loop works with."""

    s: TrainSettings
    accelerator: Any
    emit: Callable[[dict], None]
    accum: int  # micro-batches per optimizer step
    loaded: LoadedModel
    scheduler: Any  # the noise schedule (diffusers DDIMScheduler)
    dataset: SegmentationTrainDataset
    tokenize: Callable[[list[str]], torch.Tensor]
    optimizer: Any = None
    lr_sched: Any = None
    ema: Any = None  # diffusers EMAModel, or None when EMA is off
    trainable: list = field(default_factory=list)
    loss_module: Any = None
    max_steps: int | None = None
    plan: train_loader.BatchPlan | None = None
    batches: Any = None  # this process's collated micro-batches, from the run's position on
    pos: train_state.Position = field(default_factory=train_state.Position)
    t0: float = field(default_factory=time.monotonic)

    @property
    def out(self) -> Path:
        return Path(self.s.out)

    def elapsed(self) -> float:
        return self.pos.elapsed_before + time.monotonic() - self.t0

    def done(self) -> bool:
        return self.max_steps is not None and self.pos.step >= self.max_steps

    def save(self, kind: str) -> Path:
        """`last/` (with the trainer state) or `best/` (the EMA weights when EMA is on)."""
        last = kind == "last"
        training = {"settings": self.s.to_dict(), "step": self.pos.step, "epoch": self.pos.epoch}
        return train_state.save_run_checkpoint(
            self.out / kind,
            self.loaded,
            accelerator=self.accelerator,
            training=training,
            position=self.pos,
            elapsed=self.elapsed(),
            optimizer=self.optimizer if last else None,
            lr_sched=self.lr_sched,
            ema=self.ema,
            trainable=self.trainable,
        )


def start(s: TrainSettings, sources: list, classes: list[dict], progress) -> tuple[Any, int, Callable[[dict], None]]:
    """(accelerator, micro-batches per step, the progress callback of this process): only the main
    process reports and writes `config.json` (settings, the class list and each dataset) and `recipe.yaml`;
    the seed is set on every process alike. Accumulation runs through `accelerator.accumulate`: no
    gradient all-reduce on the micro-batches before an optimizer step's last."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(
        cpu=s.cpu, mixed_precision=accelerate_precision(s.precision), gradient_accumulation_steps=1
    )
    per_step = s.effective_batch or s.batch_size
    accum = max(1, math.ceil(per_step / (s.batch_size * accelerator.num_processes)))
    accelerator.gradient_accumulation_steps = accum
    emit = (progress or _quiet) if accelerator.is_main_process else _quiet
    if accelerator.mixed_precision == "bf16" and (note := emulated_bf16_note(accelerator.device)):
        emit({"event": "note", "text": note})
    set_seed(s.seed)
    if s.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if accelerator.is_main_process:
        require_writable_folder(s.out, "--out")  # before the model loads: a file there, read-only, full
        datasets = [
            {"name": src.name, "kind": src.kind, "weight": src.weight, "ignore_index": src.ignore_index}
            for src in sources
        ]
        record = {**s.to_dict(), "classes": classes, "datasets": datasets}
        atomic_write_json(Path(s.out) / "config.json", record)
        atomic_write_text(Path(s.out) / "recipe.yaml", s.to_yaml())  # `--recipe` of it starts this run again
    return accelerator, accum, emit


def _quiet(event: dict) -> None:
    """The progress callback of the processes that do not report."""


def load_run_model(s: TrainSettings, classes, unrelated=()) -> tuple[LoadedModel, Any, dict | None]:
    """(model, noise schedule, trainer state or None): `last/` of the run to resume, else `--init`'s
    weights, else a fresh DiGSeg from `--base`, with this run's classes, objective, prompt template and
    resolution.

    A run that does not resume starts its `evaluation` record empty: scores that came with `--init`'s
    weights (and its fast decoder's accuracy check, which `decoder="auto"` trusts) describe other weights."""
    from digseg_cli.inference.pipeline import load_model

    overrides = {
        "objective": s.objective,
        "prompt_template": s.prompt_template,
        "classes": classes,
        "unrelated_words": list(unrelated) or None,
    }
    source = str(s.resume) if s.resume else (s.init or s.base)
    loaded = load_model(source, config_overrides=overrides)
    cfg = loaded.config
    if s.resume is None and s.init:
        cfg.objective, cfg.prompt_template, cfg.classes = s.objective, s.prompt_template, overrides["classes"]
        cfg.unrelated_words = overrides["unrelated_words"]
    if s.resume is None:
        cfg.evaluation = {}
    cfg.default_resolution = check_resolution(s.resolution or cfg.default_resolution, loaded.model.size_multiple)
    scheduler = diffusion.make_scheduler(loaded.scheduler_config)
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise UsageError(f"unsupported prediction type {scheduler.config.prediction_type!r}")
    return loaded, scheduler, (train_state.load_state(s.resume) if s.resume else None)


def set_up_optimisation(run: Run) -> Run:
    """Freeze what stays fixed, move the frozen parts to the low-precision dtype, and build AdamW and the
    learning-rate schedule (`train.optim`), how epochs cut into batches, EMA and the loss module Accelerate
    wraps."""
    s, loaded, accelerator = run.s, run.loaded, run.accelerator
    model, compact = loaded.model, loaded.config.base_model.startswith(COMPACT_PREFIX)
    model.vae.requires_grad_(False).eval()
    model.text_encoder.requires_grad_(compact)  # a compact base's text encoder is trained from scratch
    if s.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    # Frozen parts run in the low-precision dtype (only cast when it differs: diffusers warns on casts).
    model.vae.to(accelerator.device, **({"dtype": weight_dtype} if weight_dtype != torch.float32 else {}))
    if not compact:
        model.text_encoder.to(accelerator.device, weight_dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(trainable, lr=s.lr, weight_decay=s.weight_decay)
    world = accelerator.num_processes
    plan = train_loader.BatchPlan(len(run.dataset), s.batch_size, world, accelerator.process_index, run.accum)
    steps_per_epoch = plan.batches_per_epoch // run.accum
    max_steps = s.max_steps or (s.epochs * steps_per_epoch if s.epochs else None)
    if max_steps is None and s.time_limit is None:
        raise UsageError("give at least one of --max-steps, --epochs or --time")
    lr_sched = lr_schedule(optimizer, kind=s.lr_schedule, warmup_steps=s.warmup_steps, max_steps=max_steps)
    ema = None
    if s.ema > 0:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(trainable, decay=s.ema, foreach=True)  # one kernel per step: 9 ms against 15 (small, CPU)
    loss_module = LossModule(
        model,
        run.scheduler,
        objective=s.objective,
        noise_strength=s.noise_strength,
        decoded_weight=s.decoded_loss,
        foreground_weight=s.foreground_weight,
    )
    loss_module, optimizer = accelerator.prepare(loss_module, optimizer)
    if ema is not None:
        ema.to(accelerator.device)
    return dataclasses.replace(
        run,
        optimizer=optimizer,
        lr_sched=lr_sched,
        ema=ema,
        trainable=trainable,
        loss_module=loss_module,
        max_steps=max_steps,
        plan=plan,
    )


def restore(run: Run, state: dict) -> None:
    run.optimizer.load_state_dict(state["optimizer"])
    run.lr_sched.load_state_dict(state["lr_scheduler"])
    if run.ema is not None and "ema" in state:
        run.ema.load_state_dict(state["ema"])
    run.pos = train_state.Position.from_state(state)
    if run.pos.batch_in_epoch >= run.plan.batches_per_epoch:  # saved at an epoch's end by an older digseg
        run.pos.epoch, run.pos.batch_in_epoch = run.pos.epoch + 1, 0
    train_state.set_rng_state(state["rng"])
    log.info("resumed from %s at step %d", run.s.resume, run.pos.step)


def open_batches(run: Run):
    """This process's micro-batches from the run's position on (`train.loader`), in `--workers` processes."""
    s, accelerator = run.s, run.accelerator
    device_type = accelerator.device.type
    workers = (
        s.workers if s.workers is not None else train_loader.default_workers(device_type, accelerator.num_processes)
    )
    start = (run.pos.epoch, run.pos.batch_in_epoch)
    return train_loader.batches(
        run.dataset, run.plan, seed=s.seed, start=start, workers=workers, pin=device_type == "cuda"
    )
