"""The ``digseg`` Typer application: global options and the list of command modules.

Each command module defines ``register(app)``; its heavy imports (torch, diffusers) happen inside the
command bodies so that ``digseg --help`` and ``digseg --version`` answer without importing torch.
"""

from __future__ import annotations

import importlib
import signal
from typing import Annotated

import typer

from digseg_cli._version import __version__
from digseg_cli.errors import EXIT_CODES_HELP

app = typer.Typer(
    name="digseg",
    help="Text-prompted segmentation with a diffusion model (DiGSeg): segment, eval, train, weights, data, doctor.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Command modules, in the order they appear in --help.
COMMAND_MODULES = [
    "digseg_cli.cli.segment",
    "digseg_cli.cli.eval",
    "digseg_cli.cli.train",
    "digseg_cli.cli.data",
    "digseg_cli.cli.weights",
    "digseg_cli.cli.distill",
    "digseg_cli.cli.doctor",
]


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"digseg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ] = None,
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="More logging (-vv: also libraries).")
    ] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
) -> None:
    from digseg_cli.cli.common import setup_logging

    setup_logging(-1 if quiet else verbose)


for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(app)


def main() -> None:
    # SIGTERM ends a command as Ctrl-C does (exit 130 through `handle_errors`, `finally` blocks run) instead
    # of killing it with 143; `segment` and `train` install their own handler for the run itself, which
    # finishes the image or step in hand and writes the manifest or a checkpoint first.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # an ignored SIGTERM stays ignored
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    app()
