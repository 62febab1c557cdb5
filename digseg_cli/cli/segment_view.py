"""How ``digseg segment`` looks on the terminal: the progress bar, the per-image JSON lines (``--json``), the
banner, the summary table, the ``--dry-run`` plan and one-line warnings. Rendering only: the command
(`digseg_cli.cli.segment`) decides what runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from digseg_cli.cli.common import err_console, stderr_is_terminal

if TYPE_CHECKING:
    from digseg_cli.segment.loading import LoadedPipeline
    from digseg_cli.segment.outputs import RunSummary
    from digseg_cli.segment.plan import DryRun

DEMO_NOTE = (
    "note: `demo` is a small demo model trained on synthetic aerial-like scenes (road, tree, building, "
    "water, field); expect poor masks on other images (choose other weights with --weights)"
)


class Reporter:
    """Per-image progress: a Rich bar on a terminal, else a plain line about every 10 seconds."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.start = self.last = time.monotonic()
        self.bar = self.task = None

    def __enter__(self) -> Reporter:
        if self.enabled and stderr_is_terminal():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                SpinnerColumn(),
                TextColumn("segment"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TextColumn("[dim]{task.fields[current]}"),
                console=err_console.real,
                transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task("segment", total=self.total, rate="", current="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __call__(self, done: int, total: int, current: str | None) -> None:
        now = time.monotonic()
        rate = done / (now - self.start) if now > self.start else 0.0
        if self.bar is not None:
            fields = {"rate": f"{rate:.2f} img/s"} | ({"current": current} if current else {})
            self.bar.update(self.task, completed=done, **fields)
        elif self.enabled and current is None and (now - self.last >= 10 or done == total):
            self.last = now
            eta = f", ETA {(total - done) / rate:.0f} s" if rate > 0 and done < total else ""
            err_console.print(f"segment: {done}/{total} images, {rate:.2f} img/s{eta}", highlight=False, markup=False)


def echo_json(obj: dict) -> None:
    typer.echo(json.dumps(obj, default=str))


def print_summary(summary: RunSummary) -> None:
    from rich.table import Table

    from digseg_cli.weights.store import human_size

    table = Table(title="digseg segment", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in (
        ("status", summary.status),
        ("processed", str(summary.processed)),
        ("skipped", str(summary.skipped)),
        ("failed", str(len(summary.failed))),
        ("not processed", str(summary.not_processed)),
        ("wall time", f"{summary.wall_s:.1f} s"),
        ("images/s", f"{summary.images_per_s:.2f}"),
        ("peak memory", f"{human_size(summary.peak_memory_bytes)} ({summary.peak_memory_kind})"),
        ("outputs", str(summary.out_dir)),
        ("manifest", str(summary.manifest) + ("" if summary.manifest_written else " (unchanged: no image written)")),
    ):
        table.add_row(key, value)
    if summary.ranks is not None:
        table.add_row("processes", str(len(summary.ranks)))
    for line in summary.rank_errors:  # many processes: a rank that failed, by name
        table.add_row("failed rank", line)
    err_console.print(table)


def warn(warnings: list[str]) -> None:
    for warning in warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)


def show_banner(loaded: LoadedPipeline, n_files: int, out: Path, weights: str) -> None:
    err_console.print(
        f"digseg segment: {n_files} input(s) → {out}; device {loaded.device}; weights {weights} "
        f"(loaded in {loaded.load_s:.1f} s)",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    if weights == "demo":
        err_console.print(DEMO_NOTE, style="yellow", highlight=False, markup=False, soft_wrap=True)
    for note in loaded.notes:
        err_console.print(note, style="dim", highlight=False, markup=False, soft_wrap=True)


def show_plan(plan: DryRun, out: Path, weights: str, as_json: bool) -> None:
    """Print what a run would do (`--dry-run`): JSON lines, or a table on stderr."""
    from digseg_cli.segment.outputs import SCHEMA

    if as_json:
        for row in plan.rows:
            echo_json({"schema": SCHEMA, "type": "plan", **row})
        echo_json(
            {
                "schema": SCHEMA,
                "type": "plan-summary",
                "inputs": len(plan.rows),
                "weights": weights,
                "resolution": plan.resolution,
                "note": plan.note,
            }
        )
        return
    from rich.table import Table

    table = Table(title=f"digseg segment --dry-run: {len(plan.rows)} input(s) → {out}", title_justify="left")
    for column in ("input", "size", "tiles", "action", "mask"):
        table.add_column(column, overflow="fold")
    for row in plan.rows:
        size = f"{row['width']}x{row['height']}" if "width" in row else "?"
        table.add_row(row["relative_path"], size, str(row.get("tiles", "?")), row["action"], row["mask"])
    err_console.print(table)
    if plan.note:
        err_console.print(plan.note, style="yellow", highlight=False, markup=False)
