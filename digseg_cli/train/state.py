"""What a training run keeps between processes: checkpoints, resumable state and metrics files.

The run folder holds `config.json` (resolved settings), `metrics.csv` / `metrics.jsonl`, and the
checkpoints `last/` and `best/` in the checkpoint format (`digseg_cli.models.checkpoint`);
`last/trainer_state.pt` adds what a resume needs (optimizer, schedule, EMA, the `Position`, RNG states).
Everything is written atomically. The state file holds tensors and plain values only and is read with
`weights_only=True`; `check_ranks_agree` proves at the end that every process holds the same weights.
This module does not know the training maths.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from digseg_cli.errors import CheckpointError
from digseg_cli.files import atomic_path, atomic_write_text
from digseg_cli.models.checkpoint import save_checkpoint

STATE_FILE = "trainer_state.pt"
log = logging.getLogger("digseg")


@dataclass
class Position:
    """Where a run stands: what a resume restores besides the optimizer, schedule, EMA and RNG states."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already used
    best_miou: float | None = None
    elapsed_before: float = 0.0  # wall-clock seconds of the run before this process took it over

    @classmethod
    def from_state(cls, state: dict) -> Position:
        return cls(
            state["step"], state["epoch"], state["batch_in_epoch"], state.get("best_miou"), state.get("elapsed_s", 0.0)
        )


def save_run_checkpoint(
    folder: Path,
    loaded,
    *,
    accelerator,
    training: dict,
    position: Position,
    elapsed: float,
    optimizer=None,
    lr_sched=None,
    ema=None,
    trainable=(),
) -> Path:
    """Write `last/` (with `optimizer` given: the trainer state too) or `best/` (the EMA weights when EMA
    is on) atomically, on the main process; the others wait for it. `training` is the config's record of
    how these weights were trained; their `evaluation` is whatever the run put in `loaded.config`."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return folder
    loaded.config.training = training
    swap = optimizer is None and ema is not None
    if swap:
        ema.store(trainable)
        ema.copy_to(trainable)

    def add_state(tmp: Path) -> None:
        save_state(
            tmp / STATE_FILE,
            {
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_sched.state_dict(),
                "step": position.step,
                "epoch": position.epoch,
                "batch_in_epoch": position.batch_in_epoch,
                "best_miou": position.best_miou,
                "elapsed_s": elapsed,
                "rng": rng_state(),
                **({"ema": ema.state_dict()} if ema is not None else {}),
            },
        )

    try:
        save_checkpoint(folder, loaded, overwrite=True, extra=None if optimizer is None else add_state)
    finally:
        if swap:
            ema.restore(trainable)
    return folder


def save_state(path: Path, state: dict) -> None:
    """Write `trainer_state.pt` (temp name, then rename)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(folder: Path) -> dict:
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {STATE_FILE}: it is not a resumable training checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None


def rng_state() -> dict:
    return {"torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])


class MetricsLog:
    """Appends one record per event to `metrics.jsonl` and the scalar columns to `metrics.csv`."""

    COLUMNS = ("step", "epoch", "loss", "lr", "it_per_s", "val_miou", "elapsed_s")

    def __init__(self, folder: Path, *, truncate_after_step: int | None = None):
        self.jsonl, self.csv = Path(folder) / "metrics.jsonl", Path(folder) / "metrics.csv"
        if truncate_after_step is not None:
            self._truncate(truncate_after_step)
        if not self.csv.exists():
            with self.csv.open("w", newline="") as f:
                csv.writer(f).writerow(self.COLUMNS)

    def _truncate(self, step: int) -> None:
        """On resume, drop records written after the checkpoint (they will be written again)."""
        if self.jsonl.exists():
            keep = [line for line in self.jsonl.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            write_lines(self.jsonl, keep)
        if self.csv.exists():
            rows = list(csv.reader(self.csv.open()))
            keep = [",".join(rows[0])] + [",".join(r) for r in rows[1:] if r and int(r[0]) <= step]
            write_lines(self.csv, keep)

    def write(self, record: dict) -> None:
        with self.jsonl.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        with self.csv.open("a", newline="") as f:
            csv.writer(f).writerow([_fmt(record.get(c)) for c in self.COLUMNS])


def write_lines(path: Path, lines: list[str]) -> None:
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def _fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def check_ranks_agree(model, accelerator) -> None:
    """Every process must end with the same weights; a cheap exact digest per tensor proves it."""
    if accelerator.num_processes == 1:
        return
    with torch.no_grad():
        digest = torch.stack(
            [p.detach().double().sum() + (p.detach().double() ** 2).sum() for p in model.parameters()]
        ).to(accelerator.device)  # [P]
    gathered = accelerator.gather(digest[None])  # [world,P]
    if not bool((gathered == gathered[0]).all()):
        raise RuntimeError("training processes ended with different weights: the run is not synchronised")
    if accelerator.is_main_process:
        log.info("all %d processes hold identical weights", accelerator.num_processes)
