"""The training batches: a torch `DataLoader` over the run's epochs, with worker processes and prefetch.

One job: hand the loop this process's micro-batches in order, from where the run stands (a resumed run
starts mid-epoch), decoded and augmented in `--workers` processes while the model trains. The order of
epoch e is a permutation drawn from (seed, e); the batch sampler yields each micro-batch's sample keys
`(epoch, index)`, and every random choice of a sample comes from its key (`train.samples`), so the
batches are the same with any number of workers. It knows nothing of the model or the optimizer.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from torch.utils.data import DataLoader, Sampler

from digseg_cli.errors import UsageError
from digseg_cli.train.samples import collate

MAX_DEFAULT_WORKERS = 8
PREFETCH_BATCHES = 4  # per worker: enough to hide a slow JPEG behind a GPU step


def usable_cores() -> int:
    """The cores this process may run on (its affinity, which containers and `taskset` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_workers(device_type: str, processes: int) -> int:
    """`--workers` when not given: on a GPU, the usable cores shared among the local training processes, one
    kept for each process itself (at most 8); on a CPU, 0, since the model's own threads use every core and a
    worker would only take them away (the data of the demo size costs 0.4 ms a sample)."""
    if device_type == "cpu":
        return 0
    return max(1, min(MAX_DEFAULT_WORKERS, usable_cores() // max(1, processes) - 1))


@dataclass(frozen=True)
class BatchPlan:
    """How epochs cut into micro-batches: `per_batch` samples per micro-batch over all processes, of which
    this process (`rank` of `world`) takes `batch_size`; an optimizer step takes `accum` micro-batches, and an
    epoch's remainder that does not fill a step is left out (as the loop counts it)."""

    length: int  # samples per epoch
    batch_size: int
    world: int
    rank: int
    accum: int

    @property
    def per_batch(self) -> int:
        return self.batch_size * self.world

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches of one epoch that the loop uses (whole optimizer steps only)."""
        n = self.length // self.per_batch
        if n < self.accum:
            raise UsageError(
                f"batch size {self.per_batch * self.accum} is larger than the {self.length} training samples"
            )
        return n // self.accum * self.accum


class EpochBatchSampler(Sampler):
    """Micro-batches of sample keys `(epoch, index)` for one process, epoch after epoch, from `start`."""

    def __init__(self, plan: BatchPlan, seed: int, start: tuple[int, int]):
        self.plan, self.seed, self.start = plan, seed, start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        p = self.plan
        epoch, first = self.start
        while True:
            order = epoch_order(self.seed, epoch, p.length)
            for b in range(first, p.batches_per_epoch):
                lo = b * p.per_batch + p.rank * p.batch_size
                yield [(epoch, int(i)) for i in order[lo : lo + p.batch_size]]
            epoch, first = epoch + 1, 0


def epoch_order(seed: int, epoch: int, length: int) -> np.ndarray:
    """The order of epoch `epoch`'s samples: a permutation drawn from (seed, epoch) alone."""
    return np.random.default_rng([seed, epoch]).permutation(length)


def _worker_init(_worker_id: int) -> None:
    # Ctrl-C reaches the whole process group; the training process decides when to stop (after a step,
    # with a checkpoint) and shuts its workers down, so a worker must not die on it first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def batches(dataset, plan: BatchPlan, *, seed: int, start: tuple[int, int], workers: int, pin: bool) -> Iterator:
    """This process's collated micro-batches from position `start` = (epoch, micro-batch in it), without end."""
    loader = DataLoader(
        dataset,
        batch_sampler=EpochBatchSampler(plan, seed, start),
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin,
        prefetch_factor=PREFETCH_BATCHES if workers else None,
        worker_init_fn=_worker_init if workers else None,
        persistent_workers=False,
    )
    return iter(loader)
