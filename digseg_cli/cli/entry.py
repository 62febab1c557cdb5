"""The ``digseg`` console entry point: top-level help from text stored with the package, else the Typer app.

``digseg --help`` (and ``-h``, and a bare ``digseg``) print Typer's own help, rendered once at 80 columns
and stored beside this module (``help.txt`` plain, ``help.ansi`` coloured), so they answer without
importing Typer and Rich: importing and rendering them costs several times Python's own start-up
(issue #7 asks for at most 4×). A test re-renders the help through Typer and fails when the stored text
is stale; ``python -m digseg_cli.cli.entry --write-help`` rewrites it. When the stored text would differ
from what Typer prints (a narrow terminal, forced colours, a width or colour environment variable), the
Typer app answers instead. Every other command line goes to the Typer app unchanged.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HELP_WIDTH = 80
HELP_DIR = Path(__file__).resolve().parent
# Variables that change how Typer/Rich render help; with any of them set, Typer renders it itself.
RENDER_VARIABLES = (
    "FORCE_COLOR",
    "PY_COLORS",
    "GITHUB_ACTIONS",
    "TERMINAL_WIDTH",
    "_TYPER_FORCE_DISABLE_TERMINAL",
    "TTY_COMPATIBLE",
    "TTY_INTERACTIVE",
    "JUPYTER_COLUMNS",
)


def _stored_help_file() -> Path | None:
    """The stored rendering Typer would print now, or None when it would print something else."""
    if any(os.environ.get(name) for name in RENDER_VARIABLES) or os.environ.get("COLUMNS", "80") != "80":
        return None
    if not sys.stdout.isatty():
        return HELP_DIR / "help.txt"
    try:
        width = os.get_terminal_size(sys.stdout.fileno()).columns
    except OSError:
        return None
    # Typer fills the whole width of a terminal; the stored text is 80 columns, the width Typer
    # itself uses where it cannot tell. Narrower terminals would wrap it, so Typer renders for them.
    if width < HELP_WIDTH or os.environ.get("TERM") == "dumb":
        return None
    return HELP_DIR / ("help.txt" if os.environ.get("NO_COLOR") else "help.ansi")


def main() -> None:
    args = sys.argv[1:]
    if args in ([], ["--help"], ["-h"]):
        path = _stored_help_file()
        if path is not None and path.is_file():
            sys.stdout.write(path.read_text(encoding="utf-8"))
            sys.stdout.flush()
            # A bare `digseg` shows the help as a usage error (exit 2), as Typer's `no_args_is_help` does.
            raise SystemExit(0 if args else 2)
    from digseg_cli.cli.app import main as typer_main

    typer_main()


def plain_render_env() -> dict[str, str]:
    """This process's environment without any variable that changes how help renders (`RENDER_VARIABLES`,
    `COLUMNS`, `NO_COLOR`): what a user who set none of them has."""
    return {k: v for k, v in os.environ.items() if k not in RENDER_VARIABLES and k not in ("NO_COLOR", "COLUMNS")}


def render_help(color: bool) -> str:
    """Typer's top-level help at `HELP_WIDTH` columns, rendered in a fresh interpreter."""
    import subprocess

    env = plain_render_env()
    env["COLUMNS"] = str(HELP_WIDTH)
    if color:
        env["FORCE_COLOR"] = "1"
    code = "import sys; sys.argv = ['digseg', '--help']; from digseg_cli.cli.app import main; main()"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return result.stdout


def write_help() -> None:
    for name, color in (("help.txt", False), ("help.ansi", True)):
        (HELP_DIR / name).write_text(render_help(color), encoding="utf-8")
        print(f"wrote {HELP_DIR / name}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-help"]:
        write_help()
    else:
        main()
