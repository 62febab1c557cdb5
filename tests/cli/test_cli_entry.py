"""The console entry point: stored top-level help equals Typer's, and answers without importing Typer."""

from __future__ import annotations

import subprocess
import sys

import pytest

from digseg_cli.cli import entry


@pytest.mark.parametrize(("name", "color"), [("help.txt", False), ("help.ansi", True)])
def test_stored_help_is_what_typer_renders_now(name, color):
    stored = (entry.HELP_DIR / name).read_text(encoding="utf-8")
    assert stored == entry.render_help(color), (
        f"digseg_cli/cli/{name} is stale: run `python -m digseg_cli.cli.entry --write-help`"
    )


def _run(args, **env_changes):
    env = entry.plain_render_env()
    env.update(env_changes)
    code = (
        "import sys, atexit; atexit.register(lambda: sys.stderr.write("
        "'[typer loaded]' if 'typer' in sys.modules else '[typer not loaded]'));"
        f" sys.argv = ['digseg', *{args!r}]; from digseg_cli.cli.entry import main; main()"
    )
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


@pytest.mark.parametrize(("args", "code"), [(["--help"], 0), (["-h"], 0), ([], 2)])
def test_help_answers_from_stored_text_without_typer(args, code):
    result = _run(args)
    assert result.returncode == code
    assert result.stdout == entry.render_help(False)
    assert result.stderr.endswith("[typer not loaded]")


def test_other_command_lines_and_other_render_settings_go_to_typer():
    version = _run(["--version"])
    assert version.returncode == 0 and version.stdout.startswith("digseg ")
    assert version.stderr.endswith("[typer loaded]")
    wide = _run(["--help"], COLUMNS="120")
    assert wide.returncode == 0 and wide.stderr.endswith("[typer loaded]") and wide.stdout != entry.render_help(False)
    sub = _run(["weights", "--help"])
    assert sub.returncode == 0 and "list" in sub.stdout and sub.stderr.endswith("[typer loaded]")
