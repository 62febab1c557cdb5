"""`train()`: fine-tune DiGSeg on a folder of image/mask pairs (DESIGN §1.5), on one process or many.

One function, read as its list of steps, runs on CPU, one GPU, or under `accelerate launch` across GPUs
and nodes (Accelerate handles the process group, mixed precision and gradient accumulation). Every random
choice is derived from (seed, step) or (seed, epoch, index), so a run resumed from `last/` continues
exactly where the uninterrupted run would be. The loop reports through a progress callback and logging;
it knows nothing of the terminal. Its parts live beside it: the samples (`train.samples`), the loss
(`train.loss`), a compact base's VAE stage (`train.vae_stage`, which a signal stops as it stops the loop),
validation through `digseg eval`'s scorer (`train.validate`), the checkpoints and resumable state
(`train.state`); the stop signals are `inference.stopping`'s.
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

import numpy as np
import torch

from digseg_cli.core import diffusion
from digseg_cli.errors import InterruptedRunError, UsageError
from digseg_cli.files import atomic_write_json, atomic_write_text, require_writable_folder
from digseg_cli.inference.device import emulated_bf16_note, leave_process_group
from digseg_cli.inference.stopping import StopSignals
from digseg_cli.models.checkpoint import LoadedModel
from digseg_cli.models.compact import COMPACT_PREFIX
from digseg_cli.train import state as train_state
from digseg_cli.train.loss import LossModule, step_generator
from digseg_cli.train.samples import SegmentationTrainDataset, collate, prepare_data, tokenizer_fn
from digseg_cli.train.settings import (
    TrainResult,
    TrainSettings,
    accelerate_precision,
    check_inputs,
    check_resolution,
)
from digseg_cli.train.validate import Validation

__all__ = ["TrainResult", "TrainSettings", "train"]
log = logging.getLogger("digseg")


@dataclass(kw_only=True)
class _Run:
    """What steps 2–6 of `train` build and the loop works with."""

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


def train(settings: TrainSettings, progress: Callable[[dict], None] | None = None) -> TrainResult:
    """Run (or resume) a training run; returns where its checkpoints are. See the module docstring.

    Under several processes it closes the process group when the run ends (one training per process)."""
    s = settings
    check_inputs(s)  # option values, before any work
    # 1. Check the data (the same check as `digseg data check`) and split it.
    classes, train_pairs, val_pairs = prepare_data(
        s.data, s.val, class_name=s.class_name, val_split=s.val_split, seed=s.seed
    )
    # 2. Processes, precision, accumulation (Accelerate) and seeds; the run folder with its settings.
    accelerator, accum, emit = _start(s, classes.to_json(), progress)
    # SIGINT/SIGTERM from here on end the run at the next step with a checkpoint and exit 130, in every stage.
    with StopSignals() as signals:
        # 3. Model: a checkpoint to resume or start from, else a fresh DiGSeg from the base; the samples.
        loaded, scheduler, state = _load_model(s, classes)
        dataset = SegmentationTrainDataset(
            train_pairs,
            classes,
            loaded.config.default_resolution,
            seed=s.seed,
            absent_prob=s.absent_prob,
            prompt_template=s.prompt_template,
        )
        # 4. Stage 1 for compact bases trained from scratch: the VAE as an autoencoder of images and masks.
        if loaded.config.base_model.startswith(COMPACT_PREFIX) and s.vae_steps and state is None and s.init is None:
            from digseg_cli.train.vae_stage import run_vae_stage

            run_vae_stage(s, loaded, dataset, accelerator=accelerator, emit=emit, signals=signals)
        # 5. Freeze the VAE (and an SD base's text encoder); optimizer, schedule and EMA of what trains.
        run = _set_up_optimisation(
            _Run(
                s=s,
                accelerator=accelerator,
                emit=emit,
                accum=accum,
                loaded=loaded,
                scheduler=scheduler,
                dataset=dataset,
                tokenize=tokenizer_fn(loaded.tokenizer),
            )
        )
        # 6. Resume: the weights came with the checkpoint; restore optimizer, schedule, EMA, position and RNG.
        if state is not None:
            _restore(run, state)
        # 7. The loop: `accum` micro-batches per optimizer step; validate and save on schedule.
        validation = Validation(classes, val_pairs, Path(s.val or s.data), limit=s.val_limit)
        stopped_by, history = _loop(run, validation, signals)
    # 8. The last checkpoint (with the trainer state), and a check that every process agrees on it.
    last = run.save("last")
    train_state.check_ranks_agree(loaded.model, accelerator)
    leave_process_group()
    if stopped_by == "signal":
        raise InterruptedRunError(
            f"interrupted by {signals.requested or 'a signal'} at step {run.pos.step}: checkpoint "
            f"written to {last}; continue with `digseg train --out {run.out} --resume`"
        )
    best_path = run.out / "best" if (run.out / "best").exists() else None
    return TrainResult(
        run.out, run.pos.step, run.pos.best_miou, last, best_path, stopped_by, history, accelerator.is_main_process
    )


def _start(s: TrainSettings, classes_json: dict, progress) -> tuple[Any, int, Callable[[dict], None]]:
    """(accelerator, micro-batches per step, the progress callback of this process): only the main
    process reports, writes `config.json` and `recipe.yaml`, and the seed is set on every process alike."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(
        cpu=s.cpu, mixed_precision=accelerate_precision(s.precision), gradient_accumulation_steps=1
    )
    per_step = s.effective_batch or s.batch_size
    accum = max(1, math.ceil(per_step / (s.batch_size * accelerator.num_processes)))
    emit = (progress or _quiet) if accelerator.is_main_process else _quiet
    if accelerator.mixed_precision == "bf16" and (note := emulated_bf16_note(accelerator.device)):
        emit({"event": "note", "text": note})
    set_seed(s.seed)
    if s.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if accelerator.is_main_process:
        require_writable_folder(s.out, "--out")  # before the model loads: a file there, read-only, full
        atomic_write_json(Path(s.out) / "config.json", {**s.to_dict(), "classes": classes_json})
        atomic_write_text(Path(s.out) / "recipe.yaml", s.to_yaml())  # `--recipe` of it starts this run again
    return accelerator, accum, emit


def _quiet(event: dict) -> None:
    """The progress callback of the processes that do not report."""


def _load_model(s: TrainSettings, classes) -> tuple[LoadedModel, Any, dict | None]:
    """(model, noise schedule, trainer state or None): `last/` of the run to resume, else `--init`'s
    weights, else a fresh DiGSeg from `--base`, with this run's classes, objective, prompt template and
    resolution.

    A run that does not resume starts its `evaluation` record empty: scores that came with `--init`'s
    weights (and its fast decoder's accuracy check, which `decoder="auto"` trusts) describe other weights."""
    from digseg_cli.inference.pipeline import load_model

    overrides = {
        "objective": s.objective,
        "prompt_template": s.prompt_template,
        "classes": [{"id": c.id, "name": c.name, "synonyms": list(c.synonyms)} for c in classes],
    }
    source = str(s.resume) if s.resume else (s.init or s.base)
    loaded = load_model(source, config_overrides=overrides)
    cfg = loaded.config
    if s.resume is None and s.init:
        cfg.objective, cfg.prompt_template, cfg.classes = s.objective, s.prompt_template, overrides["classes"]
    if s.resume is None:
        cfg.evaluation = {}
    cfg.default_resolution = check_resolution(s.resolution or cfg.default_resolution, loaded.model.size_multiple)
    scheduler = diffusion.make_scheduler(loaded.scheduler_config)
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise UsageError(f"unsupported prediction type {scheduler.config.prediction_type!r}")
    return loaded, scheduler, (train_state.load_state(s.resume) if s.resume else None)


def _set_up_optimisation(run: _Run) -> _Run:
    """Freeze what stays fixed, move the frozen parts to the low-precision dtype, and build AdamW, the
    learning-rate schedule (diffusers' `get_scheduler`), EMA and the loss module Accelerate wraps."""
    from diffusers.optimization import get_scheduler

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
    optimizer = torch.optim.AdamW(trainable, lr=s.lr, weight_decay=s.weight_decay)
    steps_per_epoch = max(1, len(run.dataset) // (s.batch_size * accelerator.num_processes * run.accum))
    max_steps = s.max_steps or (s.epochs * steps_per_epoch if s.epochs else None)
    if max_steps is None and s.time_limit is None:
        raise UsageError("give at least one of --max-steps, --epochs or --time")
    lr_sched = get_scheduler(
        s.lr_schedule, optimizer, num_warmup_steps=s.warmup_steps, num_training_steps=max_steps or 10**9
    )
    ema = None
    if s.ema > 0:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(trainable, decay=s.ema)
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
    )


def _restore(run: _Run, state: dict) -> None:
    run.optimizer.load_state_dict(state["optimizer"])
    run.lr_sched.load_state_dict(state["lr_scheduler"])
    if run.ema is not None and "ema" in state:
        run.ema.load_state_dict(state["ema"])
    run.pos = train_state.Position.from_state(state)
    train_state.set_rng_state(state["rng"])
    log.info("resumed from %s at step %d", run.s.resume, run.pos.step)


def _loop(run: _Run, validation: Validation, signals: StopSignals) -> tuple[str, list[dict]]:
    """Epochs of optimizer steps until a stop (`signals` asks for one after a step); returns (why it
    stopped, the records)."""
    s, pos, accelerator = run.s, run.pos, run.accelerator
    metrics = train_state.MetricsLog(run.out, truncate_after_step=pos.step) if accelerator.is_main_process else None
    history: list[dict] = []
    window: list[float] = []  # seconds per step, for it/s
    stopped_by = None
    run.t0 = time.monotonic()
    run.loaded.model.train()
    run.loaded.model.vae.eval()
    while not run.done():
        order = np.random.default_rng([s.seed, pos.epoch]).permutation(len(run.dataset))
        run.dataset.set_epoch(pos.epoch)
        n_batches = len(order) // (s.batch_size * accelerator.num_processes)
        if n_batches == 0:
            raise UsageError(
                f"batch size {s.batch_size * accelerator.num_processes} is larger than the {len(order)} training images"
            )
        while pos.batch_in_epoch + run.accum <= n_batches and not run.done():
            record = _optimizer_step(run, order, window)
            stopped_by = _stop_reason(run, signals, epoch_done=pos.batch_in_epoch + run.accum > n_batches)
            val_now = _validate(run, record, validation, stopped_by)
            if metrics and (pos.step % s.log_every == 0 or val_now or stopped_by):
                metrics.write(record)
                history.append(record)
            if s.save_every and pos.step % s.save_every == 0 and not stopped_by:
                run.save("last")
            if stopped_by:
                break
        if stopped_by or run.done():
            break
        pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0
    return stopped_by or "max_steps", history


def _optimizer_step(run: _Run, order: np.ndarray, window: list[float]) -> dict:
    """One optimizer step over `accum` micro-batches of this process's share of `order`; its record."""
    s, pos, accelerator = run.s, run.pos, run.accelerator
    rank, world = accelerator.process_index, accelerator.num_processes
    per_batch = s.batch_size * world
    t_step = time.monotonic()
    run.optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for micro in range(run.accum):
        lo = (pos.batch_in_epoch + micro) * per_batch
        idx = order[lo + rank * s.batch_size : lo + (rank + 1) * s.batch_size]
        batch = collate([run.dataset[int(i)] for i in idx], run.tokenize, accelerator.device)
        with accelerator.autocast():
            loss = run.loss_module(batch, step_generator(s.seed, pos.step, micro * world + rank)) / run.accum
        accelerator.backward(loss)
        loss_sum += float(loss.detach())
    accelerator.clip_grad_norm_(run.trainable, 1.0)
    run.optimizer.step()
    run.lr_sched.step()
    if run.ema is not None:
        run.ema.step(run.trainable)
    pos.step += 1
    pos.batch_in_epoch += run.accum
    window.append(time.monotonic() - t_step)
    loss_value = float(accelerator.reduce(torch.tensor(loss_sum, device=accelerator.device), "mean"))
    record = {
        "step": pos.step,
        "epoch": pos.epoch,
        "loss": loss_value,
        "lr": run.lr_sched.get_last_lr()[0],
        "it_per_s": len(window[-20:]) / max(sum(window[-20:]), 1e-9),
        "elapsed_s": run.elapsed(),
    }
    run.emit({"event": "step", "max_steps": run.max_steps, **record})
    return record


def _validate(run: _Run, record: dict, validation: Validation, stopped_by: str | None) -> bool:
    """Validate on schedule and once more at the end of the run (not after a signal: exit fast); a new
    best is saved to `best/` with its score as the checkpoint's `evaluation`. Returns whether it validated."""
    s, pos = run.s, run.pos
    val_now = (
        bool(validation)
        and stopped_by != "signal"
        and (bool(s.val_every and pos.step % s.val_every == 0) or stopped_by is not None)
    )
    if not val_now:
        return False
    record["val_miou"], record["val_iou"] = validation.score(
        run.loaded,
        resolution=run.loaded.config.default_resolution,
        seed=s.seed,
        accelerator=run.accelerator,
        ema=run.ema,
        trainable=run.trainable,
    )
    run.emit({"event": "val", **record})
    if pos.best_miou is None or record["val_miou"] > pos.best_miou:
        pos.best_miou = record["val_miou"]
        # Only what this run measured, on the weights `best/` holds (`last/` keeps the same record).
        run.loaded.config.evaluation = {"val_miou": pos.best_miou, "val_step": pos.step}
        run.save("best")
    return True


def _stop_reason(run: _Run, signals, *, epoch_done: bool) -> str | None:
    """Why the run stops after this step, decided alike on every process (one tiny all-reduce)."""
    s, accelerator = run.s, run.accelerator
    flags = torch.tensor(
        [signals.requested is not None, bool(s.time_limit and run.elapsed() >= s.time_limit)],
        dtype=torch.float32,
        device=accelerator.device,
    )
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, "sum")
    if flags[0] > 0:
        return "signal"
    if flags[1] > 0:
        return "time"
    if run.done():
        return "max_steps"
    if epoch_done and s.epochs and run.max_steps is None and run.pos.epoch + 1 >= s.epochs:
        return "epochs"
    return None
