"""`train()`: fine-tune DiGSeg on folders of image/mask pairs and benchmarks by name (DESIGN §1.5), on one
process or many.

One function, read as its list of steps, runs on CPU, one GPU, or under `accelerate launch` across GPUs
and nodes (Accelerate handles the process group, mixed precision and gradient accumulation). Every random
choice is derived from (seed, step) or (seed, epoch, index), so a run resumed from `last/` continues
exactly where the uninterrupted run would be, with any number of loader workers. The loop reports through
a progress callback and logging; it knows nothing of the terminal. Its parts live beside it: the datasets
(`train.sources`), the samples (`train.samples`) and their loader (`train.loader`), what a run builds
before its first step (`train.setup`, with `train.optim`), the loss (`train.loss`), a compact base's VAE
stage (`train.vae_stage`, which a signal stops as it stops the loop), validation through `digseg eval`'s
scorer (`train.validate`), the checkpoints and resumable state (`train.state`); the stop signals are
`inference.stopping`'s."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from digseg_cli.data.vocabulary import load_vocabulary
from digseg_cli.errors import InterruptedRunError
from digseg_cli.inference.device import leave_process_group
from digseg_cli.inference.stopping import StopSignals
from digseg_cli.models.compact import COMPACT_PREFIX
from digseg_cli.train import setup
from digseg_cli.train import state as train_state
from digseg_cli.train.loss import step_generator
from digseg_cli.train.optim import time_progress
from digseg_cli.train.samples import SegmentationTrainDataset, to_batch, tokenizer_fn
from digseg_cli.train.settings import TrainResult, TrainSettings, check_inputs
from digseg_cli.train.sources import open_sources, union_classes, with_synonyms
from digseg_cli.train.validate import Validations

__all__ = ["TrainResult", "TrainSettings", "train"]
log = logging.getLogger("digseg")


def train(settings: TrainSettings, progress: Callable[[dict], None] | None = None) -> TrainResult:
    """Run (or resume) a training run; returns where its checkpoints are. See the module docstring.

    Under several processes it closes the process group when the run ends (one training per process)."""
    s = settings
    check_inputs(s)  # option values, before any work
    # 1. The data: each --data folder (checked, split) and --dataset benchmark (its train split, read as
    #    `digseg eval` reads it), with its classes and validation split.
    sources = open_sources(s)
    vocabulary = load_vocabulary(s.vocabulary) if s.vocabulary else None
    if vocabulary is not None:  # more words per class, and words that mean "nothing here"
        sources = with_synonyms(sources, vocabulary)
    unrelated = vocabulary.unrelated if vocabulary is not None else ()
    # 2. Processes, precision, accumulation (Accelerate) and seeds; the run folder with its settings.
    classes = union_classes(sources)  # the checkpoint's class list, each class with its datasets
    accelerator, accum, emit = setup.start(s, sources, classes, progress)
    # SIGINT/SIGTERM from here on end the run at the next step with a checkpoint and exit 130, in every stage.
    with StopSignals() as signals:
        # 3. Model: a checkpoint to resume or start from, else a fresh DiGSeg from the base; the samples.
        loaded, scheduler, state = setup.load_run_model(s, classes, unrelated)
        dataset = SegmentationTrainDataset(
            sources,
            loaded.config.default_resolution,
            seed=s.seed,
            absent_prob=s.absent_prob,
            prompt_template=s.prompt_template,
            unrelated=unrelated,
        )
        # 4. Stage 1 for compact bases trained from scratch: the VAE as an autoencoder of images and masks.
        if loaded.config.base_model.startswith(COMPACT_PREFIX) and s.vae_steps and state is None and s.init is None:
            from digseg_cli.train.vae_stage import run_vae_stage

            run_vae_stage(s, loaded, dataset, accelerator=accelerator, emit=emit, signals=signals)
        # 5. Freeze the VAE (and an SD base's text encoder); optimizer, schedule and EMA of what trains.
        run = setup.set_up_optimisation(
            setup.Run(
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
            setup.restore(run, state)
        # 7. The loop: batches from loader workers, `accum` micro-batches per optimizer step; validate and
        #    save on schedule.
        run.batches = setup.open_batches(run)
        validation = Validations(sources, limit=s.val_limit)
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


def _loop(run: setup.Run, validation: Validations, signals: StopSignals) -> tuple[str, list[dict]]:
    """Optimizer steps until a stop (`signals` asks for one after a step); returns (why it stopped, the
    records)."""
    s, pos, accelerator = run.s, run.pos, run.accelerator
    metrics = None
    if accelerator.is_main_process:
        metrics = train_state.MetricsLog(run.out, truncate_after_step=pos.step, datasets=validation.names)
    history: list[dict] = []
    window: list[float] = []  # seconds per step, for it/s
    stopped_by = None
    run.t0 = time.monotonic()
    run.loaded.model.train()
    run.loaded.model.vae.eval()
    while not run.done():
        record = _optimizer_step(run, window)
        epoch_done = pos.batch_in_epoch >= run.plan.batches_per_epoch
        stopped_by = _stop_reason(run, signals, epoch_done=epoch_done)
        val_now = _validate(run, record, validation, stopped_by)
        if metrics and (pos.step % s.log_every == 0 or val_now or stopped_by):
            metrics.write(record)
            history.append(record)
        if epoch_done:
            pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0
        if s.save_every and pos.step % s.save_every == 0 and not stopped_by:
            run.save("last")
        if stopped_by:
            break
    return stopped_by or "max_steps", history


def _optimizer_step(run: setup.Run, window: list[float]) -> dict:
    """One optimizer step over `accum` micro-batches of this process; its record (with the seconds the
    step waited for its batches: the loader workers should keep that near 0)."""
    s, pos, accelerator = run.s, run.pos, run.accelerator
    rank, world = accelerator.process_index, accelerator.num_processes
    t_step = time.monotonic()
    waited = 0.0
    run.optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for micro in range(run.accum):
        t_wait = time.monotonic()
        batch = to_batch(next(run.batches), run.tokenize, accelerator.device)
        waited += time.monotonic() - t_wait
        with accelerator.accumulate(run.loss_module), accelerator.autocast():
            loss = run.loss_module(batch, step_generator(s.seed, pos.step, micro * world + rank))
            accelerator.backward(loss)  # divides by the accumulation steps
        loss_sum += float(loss.detach()) / run.accum
    accelerator.clip_grad_norm_(run.trainable, 1.0)
    _set_time_progress(run)
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
        "data_wait_s": waited,
    }
    run.emit({"event": "step", "max_steps": run.max_steps, **record})
    return record


def _set_time_progress(run: setup.Run) -> None:
    """A run bounded only by time: its schedule's curve follows the share of the time budget spent."""
    progress = time_progress(run.lr_sched)
    if progress is not None and run.s.time_limit:
        progress.progress = run.elapsed() / run.s.time_limit


def _validate(run: setup.Run, record: dict, validation: Validations, stopped_by: str | None) -> bool:
    """Validate on schedule and once more at the end of the run (not after a signal: exit fast); a new
    best (by the mean of the datasets' mIoU) is saved to `best/` with its score as the checkpoint's
    `evaluation`. Returns whether it validated."""
    s, pos = run.s, run.pos
    val_now = (
        bool(validation)
        and stopped_by != "signal"
        and (bool(s.val_every and pos.step % s.val_every == 0) or stopped_by is not None)
    )
    if not val_now:
        return False
    scores = validation.score(
        run.loaded,
        resolution=run.loaded.config.default_resolution,
        seed=s.seed,
        accelerator=run.accelerator,
        ema=run.ema,
        trainable=run.trainable,
    )
    record.update(scores)
    run.emit({"event": "val", **record})
    if pos.best_miou is None or record["val_miou"] > pos.best_miou:
        pos.best_miou = record["val_miou"]
        # Only what this run measured, on the weights `best/` holds (`last/` keeps the same record).
        run.loaded.config.evaluation = {"val_miou": pos.best_miou, "val_step": pos.step}
        if "val_miou_by_dataset" in scores:
            run.loaded.config.evaluation["val_miou_by_dataset"] = scores["val_miou_by_dataset"]
        run.save("best")
    return True


def _stop_reason(run: setup.Run, signals, *, epoch_done: bool) -> str | None:
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
