"""``digseg weights list|info|download|path|verify|rm``: show, fetch, check and remove named weights.

Each command calls one function of ``digseg_cli.weights.store`` or ``digseg_cli.weights.cache`` and renders its
result: tables and progress on stderr, ``--json`` and ``path`` output on stdout. It knows nothing of URLs, caches
or checksums itself.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from digseg_cli.cli.common import err_console, fail, handle_errors, stderr_is_terminal
from digseg_cli.errors import EXIT_PARTIAL, EXIT_WEIGHTS

CacheDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        envvar="DIGSEG_CACHE_DIR",
        help="digseg's weights cache folder.",
        show_default="platform cache folder",
    ),
]
OfflineOpt = Annotated[
    bool,
    typer.Option(
        "--offline",
        envvar="DIGSEG_OFFLINE",
        help="Never touch the network (also HF_HUB_OFFLINE=1); a cache miss exits with code 5.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Write JSON to stdout instead of a table.")]

weights_app = typer.Typer(
    name="weights",
    help="List, download, locate, verify and remove model weights (cache: --cache-dir / DIGSEG_CACHE_DIR).",
    no_args_is_help=True,
)


def _echo_json(obj: object) -> None:
    typer.echo(json.dumps(obj, indent=None, default=str))


class _Reporter:
    """Byte progress for downloads: a Rich bar on a terminal, else a plain line every few seconds."""

    def __init__(self) -> None:
        self._progress = None
        self._tasks: dict[str, int] = {}
        self._last = 0.0

    def __enter__(self) -> _Reporter:
        if stderr_is_terminal():
            from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

            self._progress = Progress(
                "[bold]{task.description}",
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=err_console.real,
            )
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __call__(self, label: str, done: int, total: int | None) -> None:
        if self._progress is not None:
            if label not in self._tasks:
                self._tasks[label] = self._progress.add_task(label, total=total)
            self._progress.update(self._tasks[label], completed=done, total=total)
            return
        now = time.monotonic()
        if now - self._last >= 5.0 or (total is not None and done >= total):
            from digseg_cli.weights.store import human_size

            self._last = now
            pct = f" ({100 * done / total:.0f}%)" if total else ""
            err_console.print(f"{label}: {human_size(done)} of {human_size(total)}{pct}", highlight=False, markup=False)


@weights_app.command("list")
def list_cmd(
    *,
    cache_dir: CacheDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the registry: name, source, size, whether it is cached, description, licence."""
    with handle_errors():
        from digseg_cli.weights.cache import list_weights
        from digseg_cli.weights.store import human_size

        rows = list_weights(cache_dir)
        if as_json:
            _echo_json({"schema": "digseg.weights-list/1", "weights": rows})
            return
        from rich.table import Table

        table = Table(title="digseg weights", title_justify="left")
        for column in ("name", "source", "size", "cached", "licence", "description"):
            table.add_column(column, overflow="fold")
        for row in rows:
            size = human_size(row["size"]) if row["size"] else "-"
            size = f"≈{size}" if row["source"] == "hub" and row["size"] else size
            table.add_row(
                row["name"], row["source"], size, "yes" if row["cached"] else "no", row["licence"], row["description"]
            )
        err_console.print(table)


@weights_app.command("info")
def info_cmd(
    name: Annotated[str, typer.Argument(help="Registry name (see `digseg weights list`).")],
    *,
    cache_dir: CacheDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show every field of one registry entry, with its licence, classes and cached path."""
    with handle_errors():
        from rich.markup import escape

        from digseg_cli.weights.cache import list_weights
        from digseg_cli.weights.registry import REGISTRY, unknown_weights_error
        from digseg_cli.weights.store import human_size

        row = next((r for r in list_weights(cache_dir) if r["name"] == name), None)
        if row is None:
            raise unknown_weights_error(name, REGISTRY)
        if as_json:
            _echo_json(row)
            return
        for key, value in row.items():
            if key == "files":
                value = ", ".join(f"{f['path']} ({f['size']} B, sha256 {f['sha256'][:12]}…)" for f in value) or "-"
            elif key == "size" and value:
                value = f"{human_size(value)} ({value} bytes)"
            elif isinstance(value, list):
                value = ", ".join(value) or "-"
            shown = escape(str(value)) if value not in (None, "") else "-"
            err_console.print(f"[bold]{key:>12}[/]  {shown}", highlight=False)


@weights_app.command("download")
def download_cmd(
    names: Annotated[list[str], typer.Argument(help="Registry names or Hub ids owner/name[@revision].")],
    *,
    cache_dir: CacheDirOpt = None,
    offline: OfflineOpt = False,
) -> None:
    """Fetch weights into the cache (resumable, sha256-checked). Prints each local folder on stdout."""
    with handle_errors():
        from rich.markup import escape

        from digseg_cli.weights.registry import REGISTRY
        from digseg_cli.weights.store import download_weights

        with _Reporter() as report:
            for name in names:
                path = download_weights(name, cache_dir=cache_dir, offline=offline or None, progress=report)
                err_console.print(f"[green]ready[/] {escape(name)}: {escape(str(path))}", highlight=False)
                if name in REGISTRY and REGISTRY[name].licence:
                    err_console.print(f"  licence: {escape(REGISTRY[name].licence)}", highlight=False)
                typer.echo(str(path))


# `pull` is the name in the feature list; `download` the one in the docs.
weights_app.command("pull", hidden=True)(download_cmd)


@weights_app.command("path")
def path_cmd(
    name: Annotated[str | None, typer.Argument(help="Registry name or Hub id; none: the cache folder.")] = None,
    *,
    cache_dir: CacheDirOpt = None,
) -> None:
    """Print the local folder of cached weights (exit 5 if not cached), or of the cache itself. No network."""
    with handle_errors():
        from digseg_cli.weights.store import cache_dir as resolve_cache_dir
        from digseg_cli.weights.store import cached_path, download_command

        if name is None:
            typer.echo(str(resolve_cache_dir(cache_dir)))
            return
        path = cached_path(name, cache_dir)
        if path is None:
            raise fail(f"'{name}' is not cached; fetch it with: {download_command(name, cache_dir)}", EXIT_WEIGHTS)
        typer.echo(str(path))


@weights_app.command("verify")
def verify_cmd(
    name: Annotated[str | None, typer.Argument(help="Registry name or Hub id; none: every cached entry.")] = None,
    *,
    cache_dir: CacheDirOpt = None,
    offline: OfflineOpt = False,
    repair: Annotated[bool, typer.Option(help="Remove corrupt files and fetch them again (unless offline).")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Recompute the sha256 of cached files; corrupt ones are removed and fetched again unless --offline."""
    with handle_errors():
        from digseg_cli.weights.cache import list_weights, verify_weights

        names = [name] if name else [r["name"] for r in list_weights(cache_dir) if r["cached"]]
        report: dict[str, list[dict]] = {}
        for each in names:
            report[each] = verify_weights(each, cache_dir, repair=repair, offline=offline or None)
        bad = sorted({r["status"] for rows in report.values() for r in rows} & {"corrupt", "removed", "missing"})
        if as_json:
            _echo_json({"schema": "digseg.weights-verify/1", "ok": not bad, "weights": report})
        else:
            from rich.markup import escape
            from rich.table import Table

            table = Table(title="verify", title_justify="left")
            for column in ("weights", "file", "status"):
                table.add_column(column, overflow="fold")
            style = {"ok": "green", "repaired": "yellow", "unchecked": "dim"}
            for each, rows in report.items():
                for r in rows:
                    table.add_row(escape(each), escape(r["path"]), f"[{style.get(r['status'], 'red')}]{r['status']}[/]")
            err_console.print(table if names else "nothing cached to verify")
        if bad:
            fix = (
                "run again without --offline"
                if offline
                else "run: digseg weights download NAME (bundled weights: reinstall digseg)"
            )
            raise fail(f"some files are not intact ({', '.join(bad)}); {fix}", EXIT_WEIGHTS)


@weights_app.command("rm")
def rm_cmd(
    name: Annotated[str, typer.Argument(help="Registry name whose cached files to delete.")],
    *,
    cache_dir: CacheDirOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete digseg's cached copy of a registry entry (never bundled weights, the HF cache or your folders)."""
    with handle_errors():
        from digseg_cli.weights.cache import remove_weights

        targets = remove_weights(name, cache_dir, dry_run=True)
        if not targets:
            err_console.print(f"'{name}' is not cached; nothing to remove", highlight=False, markup=False)
            return
        if not yes and not typer.confirm(f"Delete {', '.join(map(str, targets))}?", default=False, err=True):
            raise fail("nothing removed", EXIT_PARTIAL)
        removed = remove_weights(name, cache_dir)
        for path in removed:
            err_console.print(f"removed {path}", highlight=False, markup=False)
        if not removed:
            err_console.print(f"'{name}' is not cached; nothing to remove", highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    app.add_typer(weights_app, name="weights")
