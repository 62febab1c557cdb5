"""`digseg segment` under `accelerate launch` or `torchrun`: the inputs shared out across processes and nodes.

One job: give each process (rank) its share of a run and bring the shares back together. Input i of the
run's sorted, collision-checked input list goes to rank i % world_size, whatever the output folder holds;
each rank decides itself, per input of its share, whether `--skip-existing` skips it. Every rank runs the
checks that come before the first image (the output folder, the collision checks, the `run.json` identity
check) and then waits for the others' verdicts (`agree`): none starts an image before all have passed, and
all stop when one refuses. At the end each rank sends its records, counts and RLE records to the first
(`gather`), which merges them in input order and writes `run.json` (and `sem_seg_predictions.json`) once;
the merged summary then goes back to every rank (`share`), so that each exits with the run's exit code.

The collectives run over a gloo group of their own, with a timeout (`DIGSEG_SHARD_TIMEOUT` seconds, default
3600): a rank that finished waits that long at most for the others, so one that died hard or hangs cannot
keep them forever (torchrun also ends the others when a process dies).

It knows nothing of Typer, Rich, the model or the output files (`run.py`, `outputs.py`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from digseg_cli.errors import EXIT_INTERRUPTED, EXIT_PARTIAL, DigsegError, UsageError

if TYPE_CHECKING:
    from digseg_cli.segment.inputs import InputFile
    from digseg_cli.segment.outputs import ImageResult, RunSummary

TIMEOUT_ENV = "DIGSEG_SHARD_TIMEOUT"
DEFAULT_TIMEOUT_S = 3600.0
# A run's status when its ranks ended differently: the first of these any rank has.
_WORST_FIRST = ("error", "out-of-memory", "output-error", "interrupted", "stopped", "completed")
T = TypeVar("T")


@dataclass
class Shard:
    """This process's place in a multi-process run, and the group its records travel over."""

    rank: int
    world_size: int
    host: str
    device: Any  # the torch.device Accelerate gave this process (cuda:LOCAL_RANK under CUDA)
    group: Any = field(repr=False, default=None)  # the gloo group of `gather`, `agree` and `share`

    @property
    def main(self) -> bool:
        return self.rank == 0

    def name(self, rank: int | None = None, host: str | None = None) -> str:
        """`rank 1 (host)`: how a summary names a process."""
        return f"rank {self.rank if rank is None else rank} ({host or self.host})"

    def device_for(self, asked: str) -> str:
        """The device to load the model on: this process's own GPU under CUDA, else what `--device` asked."""
        return str(self.device) if getattr(self.device, "type", "") == "cuda" and asked not in ("cpu", "mps") else asked

    def mine(self, files: Sequence[InputFile]) -> list[InputFile]:
        """This rank's share: input i goes to rank i % world_size."""
        return list(files[self.rank :: self.world_size])

    def agree(self, check: Callable[[], T]) -> T:
        """Run `check` (the checks before the first image) here, then meet the other ranks: when any refused,
        every rank raises (its own error, or a `UsageError` naming the rank that refused)."""
        error: BaseException | None = None
        value = None
        try:
            value = check()
        except Exception as exc:  # noqa: BLE001 - sent to the others first, raised below
            error = exc
        verdicts = self._all_gather(None if error is None else (self.host, error_line(error)))
        if error is not None:
            raise error
        for rank, verdict in enumerate(verdicts):
            if verdict is not None:
                raise UsageError(f"{self.name(rank, verdict[0])}: {verdict[1]}")
        return value  # type: ignore[return-value]

    def gather(self, payload: dict[str, Any]) -> list[dict[str, Any]] | None:
        """Every rank's `payload` on the first, by rank (None elsewhere)."""
        import torch.distributed as dist

        found: list[Any] | None = [None] * self.world_size if self.main else None
        dist.gather_object(payload, found, dst=0, group=self.group)  # the group holds every process, in order
        return found

    def combine(self, summary: RunSummary, records: list[ImageResult], error: BaseException | None, files, **kw):
        """Send this rank's share to the first, which folds every rank's into `summary` (`merge`), takes their
        RLE records into `kw["rle"]` and hands every record to `kw["on_result"]` in input order. The error this
        rank ends with: its own, or on the first a `RankError` for the first other rank that failed."""
        sent = self.gather(payload(self, summary, records, error, kw["rle"]))
        if sent is None:
            return error
        merged, peer = merge(self, sent, files, summary)
        if kw["rle"] is not None:
            merge_rle(kw["rle"], sent)
        for record in merged if kw["on_result"] is not None else ():
            kw["on_result"](record)
        return error if peer is None else (error or RankError(*peer))

    def share(self, summary: RunSummary, error: BaseException | None) -> tuple[RunSummary, BaseException | None]:
        """The first rank's merged summary on every rank (the others show nothing: `reports` False), each with
        its own error."""
        import torch.distributed as dist

        box = [summary if self.main else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        if not self.main:
            summary = box[0]
            summary.reports = False
        return summary, error

    def leave(self) -> None:
        """Meet the other ranks at the end of the run (its outputs, `run.json` and summary are out) and close the
        group. SIGTERM is ignored from here on: torchrun's agent sends it to the ranks still running as soon as
        one exits with a code other than 0, which would turn their exit code (the run's) into -15; and no rank
        exits before all have come here."""
        import signal

        from digseg_cli.inference.device import leave_process_group

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        leave_process_group()

    def _all_gather(self, value: Any) -> list[Any]:
        import torch.distributed as dist

        found: list[Any] = [None] * self.world_size
        dist.all_gather_object(found, value, group=self.group)
        return found


class RankError(DigsegError):
    """On the first rank: another rank failed (`rank 1 (host): <its line>`), with that failure's exit code."""

    def __init__(self, exit_code: int, line: str) -> None:
        super().__init__(line)
        self.exit_code = exit_code


def timeout_s() -> float:
    """`DIGSEG_SHARD_TIMEOUT` (seconds), or the default; a `UsageError` for a value that is not a positive number."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise UsageError(f"{TIMEOUT_ENV} must be a positive number of seconds; got {text!r}")
    return value


def join_shard(device: str) -> Shard | None:
    """Under `accelerate launch`/`torchrun` (WORLD_SIZE > 1): join the processes (Accelerate: NCCL and one GPU
    per process under CUDA, gloo otherwise) and open the gloo group of the records; None for one process."""
    from digseg_cli.inference.device import join_processes

    state = join_processes(device)
    if state is None:
        return None
    import torch.distributed as dist

    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s()))
    return Shard(state.process_index, state.num_processes, socket.gethostname(), state.device, group)


def error_line(error: BaseException) -> str:
    """One line for an error: a `DigsegError`'s own, else its type and message (a bug)."""
    text = str(error).splitlines()[0] if str(error) else ""
    return text if isinstance(error, DigsegError) else f"{type(error).__name__}: {text}".rstrip(": ")


def payload(shard: Shard, summary: RunSummary, records: list[ImageResult], error: BaseException | None, rle) -> dict:
    """What a rank sends the first: its summary, its records in its input order, its error and its RLE records."""
    return {
        "rank": shard.rank,
        "host": shard.host,
        "device": str(shard.device),
        "summary": summary,
        "records": records,
        "error": ended_early(summary, error),
        "rle": _rle_records(rle, records),
    }


def ended_early(summary: RunSummary, error: BaseException | None) -> tuple[int, str] | None:
    """How a rank ended before its share's end, as (exit code, line): its error, or SIGINT/SIGTERM sent to it
    alone; None when it went through its share."""
    if error is not None:
        return getattr(error, "exit_code", EXIT_PARTIAL), error_line(error)
    if summary.status == "interrupted":
        return EXIT_INTERRUPTED, f"interrupted after {summary.processed} of its {summary.total} images"
    return None


def merge(shard: Shard, sent: list[dict], files: Sequence[InputFile], summary: RunSummary) -> tuple[list, tuple | None]:
    """Fold the ranks' summaries into `summary` (the first rank's, now of the whole run): counts, failures in
    input order, timings, peak memory, per-rank rows and failures by rank name. Returns every record in input
    order and the first failing rank's (exit code, line) when the first rank itself did not fail."""
    order = {str(f.rel): i for i, f in enumerate(files)}
    summary.total = len(files)
    summary.processed = sum(p["summary"].processed for p in sent)
    summary.skipped = sum(p["summary"].skipped for p in sent)
    summary.failed = sorted((f for p in sent for f in p["summary"].failed), key=lambda f: order.get(f[0], -1))
    summary.backoffs = [b for p in sent for b in p["summary"].backoffs]
    summary.timings = {k: sum(p["summary"].timings.get(k, 0.0) for p in sent) for k in summary.timings}
    summary.wall_s = max(p["summary"].wall_s for p in sent)
    summary.peak_memory_bytes = max((p["summary"].peak_memory_bytes or 0 for p in sent), default=None) or None
    statuses = {p["summary"].status for p in sent}
    summary.status = next(s for s in _WORST_FIRST if s in statuses) if statuses <= set(_WORST_FIRST) else "error"
    summary.ranks = [_rank_row(p) for p in sent]
    summary.rank_errors = [f"{shard.name(p['rank'], p['host'])}: {p['error'][1]}" for p in sent if p["error"]]
    records = sorted((r for p in sent for r in p["records"]), key=lambda r: order.get(r.relative_path, -1))
    peer = next(((p["error"][0], summary.rank_errors[0]) for p in sent if p["error"]), None)
    return records, None if sent[0]["error"] else peer


def merge_rle(rle, sent: list[dict]) -> None:
    """The other ranks' RLE records into the first rank's `RleFile`."""
    for p in sent[1:]:
        if p["rle"]:
            rle.by_name.update({name: rec for name, rec in p["rle"].items() if rec is not None})
            rle.changed = True


def _rle_records(rle, records: list[ImageResult]) -> dict[str, list[dict] | None] | None:
    """This rank's RLE records by file name, when it changed any (a run that changed none leaves the file)."""
    if rle is None or not rle.changed:
        return None
    return {r.relative_path: rle.by_name.get(r.relative_path) for r in records}


def _rank_row(p: dict) -> dict[str, Any]:
    s = p["summary"]
    return {
        "rank": p["rank"],
        "host": p["host"],
        "device": p["device"],
        "status": s.status,
        "inputs": s.total,
        "processed": s.processed,
        "skipped": s.skipped,
        "failed": len(s.failed),
        "wall_s": round(s.wall_s, 3),
        "error": None if p["error"] is None else p["error"][1],
    }
