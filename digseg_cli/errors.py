"""Errors a user can cause, each carrying the documented exit code the CLI maps it to.

This module knows nothing of Typer, Rich or torch: library code raises these, the CLI renders
``str(error)`` as one line and exits with ``error.exit_code``. `as_user_error` says which other exceptions
a user can cause (files, encodings, memory) and which error each stands for; anything else is a bug.
"""

from __future__ import annotations

import json
import sys

# Documented exit codes (README "Exit codes", `digseg --help` epilog).
EXIT_OK = 0
EXIT_PARTIAL = 1  # finished, but some inputs failed
EXIT_USAGE = 2  # usage or configuration error
EXIT_NO_INPUTS = 3  # no inputs found
EXIT_DEVICE = 4  # requested device not available
EXIT_WEIGHTS = 5  # weights not available (offline, missing, checksum mismatch)
EXIT_OOM = 6  # out of memory even after back-off
EXIT_DATASET = 7  # dataset validation failed / dataset missing
EXIT_INTERRUPTED = 130  # interrupted; partial results / checkpoint written first

EXIT_CODES_HELP = (
    "Exit codes: 0 success; 1 some inputs failed; 2 usage error; 3 no inputs found; "
    "4 device unavailable; 5 weights unavailable; 6 out of memory; 7 dataset invalid or missing; "
    "130 interrupted."
)


class DigsegError(Exception):
    """Base class: a problem the user can fix; its message says how."""

    exit_code = EXIT_USAGE


class UsageError(DigsegError, ValueError):
    """A bad argument or configuration value."""

    exit_code = EXIT_USAGE


class NoInputsError(DigsegError):
    """No input files were found."""

    exit_code = EXIT_NO_INPUTS


class DeviceUnavailableError(DigsegError):
    """An explicitly requested device does not exist on this machine."""

    exit_code = EXIT_DEVICE


class WeightsUnavailableError(DigsegError):
    """Weights could not be found, fetched or verified."""

    exit_code = EXIT_WEIGHTS


class ChecksumMismatchError(WeightsUnavailableError):
    """A downloaded or cached file does not match its recorded sha256."""


class CheckpointError(WeightsUnavailableError):
    """A checkpoint folder is incomplete, corrupt or of an unknown format."""


class OutOfMemoryError(DigsegError):
    """The device ran out of memory even after backing off."""

    exit_code = EXIT_OOM


class DatasetError(DigsegError):
    """A dataset or training folder is missing or failed validation."""

    exit_code = EXIT_DATASET


class OutputUnwritableError(DigsegError):
    """The output folder stopped taking files mid-run (full disk, quota, read-only): the run stopped there."""

    exit_code = EXIT_USAGE


class InterruptedRunError(DigsegError):
    """The run was interrupted (SIGINT/SIGTERM) after writing what it could."""

    exit_code = EXIT_INTERRUPTED


# Messages of allocation failures torch raises as a plain RuntimeError (CPU allocator, MPS), lower-cased.
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory", "failed to allocate")


def is_out_of_memory(exc: BaseException) -> bool:
    """The one rule for "the device ran out of memory": Python's `MemoryError`, torch's `OutOfMemoryError`
    (CUDA), and the RuntimeErrors torch raises for the CPU ("DefaultCPUAllocator: can't allocate memory")
    and MPS. Torch is not imported here: an exception can only be torch's once torch is loaded."""
    torch = sys.modules.get("torch")
    if isinstance(exc, MemoryError) or (torch is not None and isinstance(exc, torch.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MESSAGES)


def as_user_error(exc: BaseException) -> DigsegError | None:
    """The `DigsegError` an exception of the user's environment or files stands for, or None for a bug.

    Files and folders (any `OSError`: permission denied, is a directory, disk full, ...) → `strerror: filename`,
    exit 2; text that is not UTF-8, JSON or YAML that does not parse → exit 2; out of memory → exit 6. Callers
    that know the file name raise their own error first (`files.read_settings_file`); this is the net under
    them (`cli.common.handle_errors`). Anything else, a bug, keeps its traceback."""
    if isinstance(exc, DigsegError):
        return exc
    if is_out_of_memory(exc):
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return OutOfMemoryError(
            f"out of memory ({detail[:160]}): try a smaller --batch-size or --resolution, or another device"
        )
    if isinstance(exc, OSError):
        if exc.strerror and exc.filename is not None:
            target = f"{exc.filename} → {exc.filename2}" if exc.filename2 is not None else f"{exc.filename}"
            return UsageError(f"{exc.strerror}: {target}")
        return UsageError(_first_line(exc))
    if isinstance(exc, UnicodeDecodeError):
        return UsageError(f"a file is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8")
    if isinstance(exc, json.JSONDecodeError):
        return UsageError(f"a file is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}")
    yaml = sys.modules.get("yaml")
    if yaml is not None and isinstance(exc, yaml.YAMLError):
        return UsageError(f"a file is not valid YAML: {_first_line(exc)}")
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
