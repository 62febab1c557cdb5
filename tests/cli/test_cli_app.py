"""The command line as a whole: fast start without torch, version, `python -m`, exit-code epilog."""

from __future__ import annotations

import os
import subprocess
import sys

from typer.testing import CliRunner

from digseg_cli._version import __version__
from digseg_cli.cli.app import app


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "COLUMNS": "120"}
    )


def test_help_and_version_do_not_import_torch():
    for argv in (
        ["--help"],
        ["--version"],
        ["segment", "--help"],
        ["train", "--help"],
        ["eval", "--help"],
        ["weights", "--help"],
        ["data", "--help"],
    ):
        code = (
            "import sys\n"
            f"sys.argv = ['digseg', *{argv!r}]\n"
            "from digseg_cli.cli.app import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'cv2') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
        )
        done = _python(code)
        assert done.returncode == 0, (argv, done.stderr)


def test_version_and_python_m():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"digseg {__version__}"
    done = subprocess.run([sys.executable, "-m", "digseg_cli", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"digseg {__version__}"


def test_help_lists_commands_and_exit_codes():
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for word in ("segment", "eval", "train", "weights", "data", "Exit codes", "130"):
        assert word in result.output


def test_unknown_option_is_a_usage_error_with_a_suggestion():
    result = CliRunner().invoke(app, ["segment", "x.png", "--promt", "road"])
    assert result.exit_code == 2
    assert "--prompt" in result.output
