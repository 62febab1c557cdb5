"""What a training run keeps between processes: checkpoints, resumable state and metrics files.

The run folder holds `config.json` (resolved settings), `metrics.csv` / `metrics.jsonl`, and the
checkpoints `last/` and `best/` in the checkpoint format (`digseg_cli.models.checkpoint`);
`last/trainer_state.safetensors` + `last/trainer_state.json` add what a resume needs (optimizer, schedule,
EMA, the `Position`, RNG states): the tensors in safetensors under their path in the state
(`optimizer.state.<param>.<name>`, `ema.shadow_params.<i>`, `rng.torch`), everything else in JSON, so nothing
is ever unpickled. Everything is written atomically; `check_ranks_agree` proves at the end that every process
holds the same weights. This module does not know the training maths.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from digseg_cli.errors import CheckpointError, UsageError
from digseg_cli.files import atomic_path, atomic_write_text
from digseg_cli.models.checkpoint import save_checkpoint

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
STATE_SCHEMA = "digseg.trainer-state/1"
OLD_STATE_FILE = "trainer_state.pt"  # a pickle, written before 0.x: refused, never read
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
            tmp,
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


def save_state(folder: Path, state: dict) -> None:
    """Write `state` as `trainer_state.safetensors` (its tensors) + `trainer_state.json` (the rest), atomically."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "", tensors, set())
    with atomic_path(Path(folder) / STATE_TENSORS) as tmp:
        save_file(tensors, str(tmp))
    atomic_write_text(Path(folder) / STATE_JSON, json.dumps({"schema": STATE_SCHEMA, "state": skeleton}) + "\n")


def require_resumable(folder: Path) -> None:
    """Refuse a folder without a trainer state (`UsageError`) or with an older digseg's pickle (exit 5)."""
    folder = Path(folder)
    if (folder / STATE_JSON).is_file() and (folder / STATE_TENSORS).is_file():
        return
    if (folder / OLD_STATE_FILE).is_file():
        raise CheckpointError(
            f"{folder / OLD_STATE_FILE} was written by an older digseg (a pickle, which digseg no longer reads): "
            f"start a new run from its weights with --init {folder}"
        )
    raise UsageError(f"nothing to resume: {folder} has no {STATE_JSON} and {STATE_TENSORS}")


def load_state(folder: Path) -> dict:
    """The state `save_state` wrote into `folder`, tensors on the CPU."""
    from safetensors.torch import load_file

    require_resumable(folder)
    path = Path(folder) / STATE_JSON
    try:
        record = json.loads(path.read_text())
        tensors = load_file(str(Path(folder) / STATE_TENSORS))
        if record.get("schema") != STATE_SCHEMA:
            raise ValueError(f"unknown schema {record.get('schema')!r}")
        return _join(record["state"], tensors)
    except Exception as exc:  # truncated, edited or mismatched files: the run cannot resume from them
        raise CheckpointError(f"cannot read the trainer state in {folder}: {exc}") from None


def _split(value, key: str, tensors: dict[str, torch.Tensor], storages: set[int]):
    """`value` with each tensor moved into `tensors` under its dotted path and replaced by a reference.

    Tuples and dicts with non-string keys (the optimizer's per-parameter state) are tagged, so `_join` gives
    back exactly the types `load_state_dict` was given."""

    def child(k) -> str:
        return f"{key}.{k}" if key else str(k)

    if isinstance(value, torch.Tensor):
        if key in tensors:
            raise ValueError(f"two tensors of the trainer state share the name {key!r}")
        tensor = value.detach().cpu().contiguous()
        # safetensors refuses tensors that share memory; a clone only for those (`storages`: the memory of the
        # tensors kept so far, a set so that a state of thousands of tensors is not compared pair by pair)
        pointer = tensor.untyped_storage().data_ptr()
        tensors[key] = tensor.clone() if pointer in storages else tensor
        storages.add(tensors[key].untyped_storage().data_ptr())
        return {"__tensor__": key}
    if isinstance(value, tuple):
        return {"__tuple__": [_split(v, child(i), tensors, storages) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_split(v, child(i), tensors, storages) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _split(v, child(k), tensors, storages) for k, v in value.items()}
        return {"__items__": [[k, _split(v, child(k), tensors, storages)] for k, v in value.items()]}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"the trainer state holds a {type(value).__name__} at {key!r}, which is neither JSON nor a tensor")


def _join(value, tensors: dict[str, torch.Tensor]):
    """The inverse of `_split`."""
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__tuple__" in value:
        return tuple(_join(v, tensors) for v in value["__tuple__"])
    if "__items__" in value:
        return {k: _join(v, tensors) for k, v in value["__items__"]}
    return {k: _join(v, tensors) for k, v in value.items()}


def rng_state() -> dict:
    return {"torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])


class MetricsLog:
    """Appends one record per event to `metrics.jsonl` and the scalar columns to `metrics.csv`."""

    COLUMNS = ("step", "epoch", "loss", "lr", "it_per_s", "val_miou", "elapsed_s", "data_wait_s")

    def __init__(self, folder: Path, *, truncate_after_step: int | None = None, datasets: Sequence[str] = ()):
        """`datasets`: with two or more, one more column per dataset, `val_miou[NAME]` (its validation mIoU)."""
        self.jsonl, self.csv = Path(folder) / "metrics.jsonl", Path(folder) / "metrics.csv"
        self.datasets = list(datasets) if len(datasets) > 1 else []
        self.columns = (*self.COLUMNS, *(f"val_miou[{name}]" for name in self.datasets))
        if truncate_after_step is not None:
            self._truncate(truncate_after_step)
        if not self.csv.exists():
            with self.csv.open("w", newline="") as f:
                csv.writer(f).writerow(self.columns)

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
            by_dataset = record.get("val_miou_by_dataset") or {}
            row = [_fmt(record.get(c)) for c in self.COLUMNS] + [_fmt(by_dataset.get(n)) for n in self.datasets]
            csv.writer(f).writerow(row)


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
