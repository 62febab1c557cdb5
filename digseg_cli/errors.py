"""Errors a user can cause, each carrying the documented exit code the CLI maps it to.

This module knows nothing of Typer, Rich or torch: library code raises these, the CLI renders
``str(error)`` as one line and exits with ``error.exit_code``.
"""

from __future__ import annotations

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
