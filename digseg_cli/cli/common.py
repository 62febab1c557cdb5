"""Shared CLI plumbing: the stderr console, logging set-up and error → exit-code mapping.

Commands stay thin: they call one library function inside ``handle_errors()``, which turns a
``DigsegError`` (or an exception the user's files or machine caused, such as a full disk) into one red line
on stderr and the error's documented exit code (never a traceback).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from digseg_cli import errors
from digseg_cli.models.config import DECODERS

# `--decoder` and `--encoder` of segment and eval (`inference.fast_parts` says what auto picks).
Decoder = Enum("Decoder", [(name, name) for name in DECODERS], type=str)
Encoder = Decoder  # the same three choices


# `--data-root` of eval and train; when it is not given, the library reads $DIGSEG_DATA_ROOT (so a recipe or
# a run's record that leaves it out means "this machine's data root").
DataRoot = Annotated[
    Path | None,
    typer.Option(
        "--data-root", help="Folder holding the datasets (default: $DIGSEG_DATA_ROOT, else the user data folder)."
    ),
]

# `--compile` of segment and eval (`inference.compiling`).
Compile = Annotated[
    bool,
    typer.Option(
        "--compile/--no-compile",
        help="torch.compile the U-Net, VAE and fast parts (inductor). The first calls compile (minutes on a CPU), "
        "timed apart as the warm-up (the report's compile record); pays on long runs on a GPU.",
    ),
]

DECODER_HELP, ENCODER_HELP = (
    f"{what}: vae, fast (the checkpoint's distilled {part}) or auto (fast when it passed its accuracy check, else vae)."
    for what, part in (("Mask decoder", "decoder"), ("Image encoder", "encoder"))
)


class LazyConsole:
    """A rich ``Console`` built on first use: importing rich costs tens of milliseconds that
    ``digseg --help`` and ``--version`` do not need. ``.real`` is the Console itself (for rich's own
    classes, such as ``Progress(console=...)``); any other attribute is the Console's."""

    def __init__(self, **kwargs) -> None:
        self._kwargs, self._console = kwargs, None

    @property
    def real(self):
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._kwargs)
        return self._console

    def __getattr__(self, name: str):
        return getattr(self.real, name)


# Logs, progress and tables go to stderr so that `--json` output on stdout stays machine-readable.
err_console = LazyConsole(stderr=True)
out_console = LazyConsole()

log = logging.getLogger("digseg")


def setup_logging(verbosity: int) -> None:
    """-q → warnings only, default → info, -v → debug for digseg, -vv → debug for everything."""
    from rich.logging import RichHandler

    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    handler = RichHandler(console=err_console.real, show_path=False, show_time=False, rich_tracebacks=False)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbosity >= 2 else logging.WARNING)
    logging.getLogger("digseg").setLevel(level)
    if verbosity < 2:
        # Third-party libraries are chatty at INFO (and print progress bars): keep them quiet.
        # rasterio logs GDAL's warnings on a damaged GeoTIFF; the input's one failure line says what matters.
        for name in ("diffusers", "transformers", "huggingface_hub", "accelerate", "rasterio"):
            logging.getLogger(name).setLevel(logging.ERROR)


def fail(message: str, code: int) -> typer.Exit:
    """Print one red line on stderr and return the Exit to raise (``raise fail(...) from None``)."""
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code=code)


@contextlib.contextmanager
def handle_errors() -> Iterator[None]:
    """Map library errors, and the exceptions a user's files and machine cause (`errors.as_user_error`:
    file-system errors, undecodable files, out of memory), to one line and their exit codes; Ctrl-C to 130.
    Any other exception is a bug and keeps its traceback."""
    try:
        yield
    except KeyboardInterrupt:
        raise fail("interrupted", errors.EXIT_INTERRUPTED) from None
    except Exception as exc:
        user_error = errors.as_user_error(exc)
        if user_error is None:
            raise
        raise fail(str(user_error), user_error.exit_code) from None


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()
