"""``digseg doctor``: one table (or ``--json``) of what this machine has and whether digseg works on it.

It calls `digseg_cli.doctor.run.run_doctor` and renders its rows: the table and progress on stderr, ``--json``
on stdout. The checks and the exit code they add up to are the library's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from digseg_cli.cli.common import err_console, handle_errors
from digseg_cli.errors import EXIT_CODES_HELP
from digseg_cli.files import DEFAULT_OUT

STATUS_STYLE = {"ok": "[green]ok[/]", "note": "[yellow]note[/]", "fail": "[bold red]fail[/]"}


def doctor(
    weights: Annotated[
        str, typer.Option("--weights", "-w", envvar="DIGSEG_WEIGHTS", help="The model to load and try.")
    ] = "demo",
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    precision: Annotated[str, typer.Option("--precision", help="auto, fp32, fp16 or bf16.")] = "auto",
    out: Annotated[Path, typer.Option("--out", "-o", help="The output folder `segment` would write to.")] = DEFAULT_OUT,
    cache_dir: Annotated[
        Path | None,
        typer.Option("--cache-dir", envvar="DIGSEG_CACHE_DIR", help="Weights cache folder.", show_default=False),
    ] = None,
    offline: Annotated[
        bool, typer.Option("--offline", envvar="DIGSEG_OFFLINE", help="Do not probe the Hub; load from the cache.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout (schema digseg.doctor/1).")] = False,
) -> None:
    """Check this machine: versions, devices and what auto picks, caches, network, the model, --out, extras.

    Exits 0 when everything segmenting needs works, else with the code of the first needed check that failed
    (2 a library or the output folder, 4 the device, 5 the weights, 1 anything else); nothing is changed.
    """
    with handle_errors():
        from digseg_cli.doctor.checks import exit_code
        from digseg_cli.doctor.run import run_doctor

        settings = dict(weights=weights, device=device, precision=precision, out=out, cache_dir=cache_dir)
        with err_console.status("checking…") as status:
            rows = run_doctor(**settings, offline=offline, on_section=lambda s: status.update(f"checking {s}…"))
        code = exit_code(rows)
        if as_json:
            record = {"schema": "digseg.doctor/1", "exit_code": code, "checks": [r.to_dict() for r in rows]}
            typer.echo(json.dumps(record, default=str))
        else:
            _show(rows, code)
    raise typer.Exit(code)


def _show(rows, code: int) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="digseg doctor", title_justify="left")
    for column in ("section", "check", "status", "detail"):
        table.add_column(column, overflow="fold")
    for row in rows:
        detail = escape(row.detail) + (f"\n[dim]→ {escape(row.fix)}[/]" if row.fix and row.status != "ok" else "")
        table.add_row(row.section, escape(row.name), STATUS_STYLE[row.status], detail)
    err_console.print(table)
    failed = [r for r in rows if r.status == "fail" and r.exit_code]
    if not failed:
        err_console.print("[green]everything segmenting needs works here[/]", highlight=False)
        return
    first = failed[0]
    err_console.print(
        f"[bold red]error:[/] {escape(first.section)} {escape(first.name)}: {escape(first.detail)}"
        + (f": {escape(first.fix)}" if first.fix else "")
        + f" (exit code {code})",
        highlight=False,
        soft_wrap=True,
    )


def register(app: typer.Typer) -> None:
    app.command(epilog=EXIT_CODES_HELP)(doctor)
