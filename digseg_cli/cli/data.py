"""``digseg data check`` and ``digseg data synth``: render a folder check, write a synthetic dataset.

Each command calls one library function (``digseg_cli.data.check.check_folder``,
``digseg_cli.data.synth.write_synth_dataset``) and renders its result on stderr; ``--json`` output goes to
stdout. It knows nothing of how folders are paired or scenes are painted.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer

from digseg_cli.cli.common import err_console, fail, handle_errors, stderr_is_terminal
from digseg_cli.errors import EXIT_DATASET

data_app = typer.Typer(
    name="data",
    help="Check and make training data.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@contextlib.contextmanager
def progress_reporter(description: str) -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done, total)`` callback: a Rich bar on a terminal, else a plain line every ~10 %/5 s."""
    if stderr_is_terminal():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=err_console.real,
            transient=True,
        ) as bar:
            task = bar.add_task(description, total=None)

            def update(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            yield update
        return
    last = {"t": time.monotonic(), "pct": -1}

    def plain(done: int, total: int) -> None:
        pct = int(100 * done / max(total, 1)) // 10 * 10
        now = time.monotonic()
        if done == total or pct > last["pct"] and now - last["t"] >= 1.0 or now - last["t"] >= 5.0:
            err_console.print(f"{description}: {done}/{total}", highlight=False)
            last["t"], last["pct"] = now, pct

    yield plain


@data_app.command("check")
def check(
    folder: Annotated[Path, typer.Argument(help="Training folder: images/, masks/, classes.json or classes.txt.")],
    class_name: Annotated[
        str | None,
        typer.Option("--class-name", help="Masks are 0/255 binary masks of this one class (no class file needed)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Check a training folder: pairing, sizes, unreadable files, unknown label values, class balance.

    Exits 0 when the folder is fine and 7 when it has problems; every bad file is named.
    """
    from digseg_cli.data.check import check_folder

    with handle_errors():
        with progress_reporter(f"checking {folder}") as progress:
            report = check_folder(folder, class_name=class_name, progress=progress)

    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _render_report(report)
    if not report.ok:
        n = len(report.problems)
        raise fail(f"{n} problem{'s' if n != 1 else ''} in {folder}", EXIT_DATASET)


def _render_report(report) -> None:  # noqa: ANN001 - CheckReport, imported lazily
    from rich.table import Table

    sizes = ""
    if report.min_size:
        lo, hi = report.min_size, report.max_size
        sizes = f", image sizes {lo[0]}x{lo[1]}" + ("" if lo == hi else f" to {hi[0]}x{hi[1]}")
    err_console.print(f"{report.folder}: {report.n_pairs} pairs{sizes}", highlight=False, soft_wrap=True)
    table = Table(title="class balance", title_justify="left")
    table.add_column("id", justify="right")
    table.add_column("class")
    table.add_column("pixels", justify="right")
    table.add_column("images", justify="right")
    for row in report.balance:
        table.add_row(str(row.id), row.name, f"{100 * row.pixel_fraction:.2f} %", str(row.images))
    err_console.print(table)
    for warning in report.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    for problem in report.problems:
        err_console.print(f"[red]problem:[/] {problem}", highlight=False, soft_wrap=True)
    if report.ok:
        err_console.print(f"[green]ok:[/] {report.folder} is ready for training", highlight=False)


@data_app.command("synth")
def synth(
    out: Annotated[Path, typer.Argument(help="Output folder (created; must be empty unless --overwrite).")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of scenes.")] = 200,
    seed: Annotated[int, typer.Option("--seed", help="Random seed; the same seed gives identical files.")] = 0,
    size: Annotated[int, typer.Option("--size", min=16, help="Scene width and height in pixels.")] = 128,
    zoom: Annotated[
        float, typer.Option("--zoom", min=0.25, max=4.0, help="Draw objects this many times larger (a closer view).")
    ] = 1.0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into a non-empty OUT.")] = False,
) -> None:
    """Write synthetic aerial-like scenes (road, tree, building, water, field) with exact masks."""
    from digseg_cli.data.synth import write_synth_dataset

    with handle_errors():
        with progress_reporter(f"writing {out}") as progress:
            summary = write_synth_dataset(out, n, seed, size, progress, zoom=zoom, overwrite=overwrite)
    counts = ", ".join(f"{name} {k}" for name, k in summary.images_with_class.items())
    err_console.print(
        f"wrote {summary.n} scenes ({size}x{size}) to {summary.out_dir} in {summary.seconds:.1f} s; "
        f"images per class: {counts}",
        highlight=False,
        soft_wrap=True,
    )


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
