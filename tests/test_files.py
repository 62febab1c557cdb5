"""digseg_cli.files: atomic, durable writes with the umask's permissions; stale temporaries; regular files only."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from digseg_cli.errors import UsageError
from digseg_cli.files import (
    TEMP_PREFIX,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    remove_stale_temporaries,
    require_regular_file,
)


def test_atomic_path_leaves_old_file_on_error(tmp_path):
    target = tmp_path / "keep.txt"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    with pytest.raises(UsageError, match="overwrite"):
        atomic_write_bytes(target, b"new", overwrite=False)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(tmp_path, umask):
    """`mkstemp` alone gives 0600; a written file gets what `open(..., "w")` would give under the umask."""
    code = (
        "import os, sys; from digseg_cli.files import atomic_write_json; "
        f"os.umask({umask}); atomic_write_json(sys.argv[1], {{'a': 1}}); open(sys.argv[2], 'w').close()"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code, tmp_path / "a.json", tmp_path / "plain"], check=True, env=env)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "a.json").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_stale_temporaries_of_dead_processes_are_removed_and_nothing_else(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{TEMP_PREFIX}{int(dead.stdout)}-abc.png"
    live = tmp_path / f"{TEMP_PREFIX}{os.getpid()}-def.png"
    mine = tmp_path / ".digseg-tmp-notapid.png"
    for p in (stale, live, mine, tmp_path / "user.png"):
        p.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, mine.name, "user.png"])
    atomic_write_json(tmp_path / "r.json", [1])  # a write of our own leaves no temporary behind
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, mine.name, "r.json", "user.png"])


def test_only_regular_files_are_accepted(tmp_path):
    (tmp_path / "f.png").write_bytes(b"x")
    assert require_regular_file(tmp_path / "f.png") == tmp_path / "f.png"
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(UsageError, match="named pipe"):
        require_regular_file(tmp_path / "pipe.png", "image")
    with pytest.raises(UsageError, match="folder"):
        require_regular_file(tmp_path)
    with pytest.raises(UsageError, match="does not exist"):
        require_regular_file(tmp_path / "none")
