"""How digseg writes and opens files: atomically, durably, with the user's umask, and only regular files.

Every file digseg writes goes through `atomic_path` (or the `atomic_write_*` helpers over it): the bytes go
to a temporary file in the destination folder, are fsynced, get the permissions the user's umask gives a
new file (`tempfile.mkstemp` alone would leave 0600), and are renamed over the final name; the folder is
fsynced after the rename. A crash or a kill never leaves a half-written file under a final name, and the
temporary files a killed run leaves behind carry `TEMP_PREFIX` and their writer's pid, so
`remove_stale_temporaries` can tell them from the user's files and from a live run's.

`require_regular_file` (and `not_regular_reason`, `is_regular_file`) is the one check before digseg opens an
input: a FIFO, a socket or a device would block a reader forever or stream without end.
`require_writable_folder` proves a folder takes files before a long run starts writing into it.

`read_settings_file` is the one way to read a JSON/YAML file a user wrote (prompts, class lists, configs):
an unreadable, non-UTF-8 or malformed file is one line naming it. The values that come out of one are
checked by `digseg_cli.typecheck`.

`DEFAULT_OUT` is the output folder of commands given no --out.

It knows nothing of images, models or run folders: callers decide which file to write; this decides how.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from digseg_cli.errors import UsageError

PathLike = str | os.PathLike[str]
TEMP_PREFIX = ".digseg-tmp-"
# Where outputs go when no --out is given: `segment`'s, `eval`'s runs below it, and the folder `doctor` probes.
DEFAULT_OUT = Path("digseg-out")
_TEMP_NAME = re.compile(re.escape(TEMP_PREFIX) + r"(\d+)-")
_umask_lock = threading.Lock()
_umask: int | None = None


def user_umask() -> int:
    """The process's umask (read once: `os.umask` can only be read by setting it, so under a lock)."""
    global _umask
    with _umask_lock:
        if _umask is None:
            _umask = os.umask(0o022)
            os.umask(_umask)
        return _umask


def new_file_mode() -> int:
    """The permissions `open(path, "w")` would give a new file: 0o666 less the umask."""
    return 0o666 & ~user_umask()


def new_folder_mode() -> int:
    """The permissions `mkdir` would give a new folder: 0o777 less the umask (`tempfile.mkdtemp` gives 0o700)."""
    return 0o777 & ~user_umask()


def follow_umask(folder: PathLike) -> None:
    """Give every file and folder under `folder` (itself included) the umask's permissions: writers that
    make their own temporary file, as safetensors' `save_file` does, leave 0600 behind."""
    for path in [Path(folder), *Path(folder).rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, new_folder_mode() if path.is_dir() else new_file_mode())


def fsync_file(path: PathLike) -> None:
    """Make a file's bytes durable before it is renamed into place."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_folder(folder: PathLike) -> None:
    """Make a rename inside `folder` durable (POSIX; a no-op where folders cannot be opened)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix) for the caller to write; on success it is fsynced,
    given the umask's permissions and renamed over `path`.

    On an exception the temporary file is removed and `path` is untouched. With `overwrite=False` an
    existing `path` raises `UsageError` before anything is written.
    """
    final = Path(path)
    if not overwrite and final.exists():
        raise UsageError(f"{final} already exists; pass --overwrite to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=final.suffix, dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        fsync_file(tmp)
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, final)
        fsync_folder(final.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: PathLike, data: bytes, *, overwrite: bool = True) -> Path:
    """Write `data` to `path` atomically and return the path."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str, *, overwrite: bool = True) -> Path:
    """Write UTF-8 `text` to `path` atomically and return the path."""
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def atomic_write_json(path: PathLike, data: Any, *, overwrite: bool = True) -> Path:
    """Write `data` as indented JSON (non-JSON values as their `str`) to `path` atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n", overwrite=overwrite)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's live process, or we cannot tell: keep its file
    return True


def remove_stale_temporaries(folder: PathLike) -> list[Path]:
    """Remove the temporary files that killed digseg processes left directly in `folder`; return them.

    Only names `atomic_path` makes are touched, and only when the pid in the name is no longer running.
    """
    removed = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(folder):
            match = _TEMP_NAME.match(entry.name)
            if match and entry.is_file(follow_symlinks=False) and not _pid_alive(int(match.group(1))):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def is_regular_file(path: PathLike) -> bool:
    """True for a regular file (after following symlinks); False for FIFOs, sockets, devices, folders, nothing."""
    return not_regular_reason(path) is None


def not_regular_reason(path: PathLike) -> str | None:
    """None for a regular file (after following symlinks), else what it is instead, as a phrase after its name:
    "does not exist", "is a folder", "is a named pipe", "is not a regular file" or "cannot be read: <why>"."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return f"cannot be read: {exc.strerror}"
    if stat.S_ISREG(mode):
        return None
    return (
        "is a folder" if stat.S_ISDIR(mode) else "is a named pipe" if stat.S_ISFIFO(mode) else "is not a regular file"
    )


def require_regular_file(path: PathLike, what: str = "file") -> Path:
    """`path` when it is a regular file, else a `UsageError` naming what it is instead."""
    p = Path(path)
    reason = not_regular_reason(p)
    if reason is None:
        return p
    only = "; digseg reads only regular files" if reason.startswith("is ") and reason != "is a folder" else ""
    raise UsageError(f"{what} {p} {reason}{only}")


def require_writable_folder(folder: PathLike, what: str = "output folder") -> Path:
    """Create `folder` (and its parents) and write and remove a probe file in it, before any work is done; a
    `UsageError` saying why not (a file in the way, no permission, a read-only or full file system)."""
    p = Path(folder)
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-probe-", dir=p)
        try:
            os.write(fd, b"digseg")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except FileExistsError:
        raise UsageError(f"{what} {p} is a file, not a folder: choose another folder") from None
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise UsageError(f"cannot write to {what} {p}: {why}: choose another folder") from None
    return p


# ------------------------------------------------------------------------------------ reading settings files
def read_text_file(path: PathLike, what: str = "file", *, error: type[UsageError] = UsageError) -> str:
    """The UTF-8 text (a BOM dropped) of a regular file a user gave; missing, not a regular file, unreadable
    or not UTF-8 raises `error` (a `UsageError` or a subclass: the caller's exit code) naming the file."""
    p = Path(path)
    try:
        require_regular_file(p, what)
        return p.read_bytes().decode("utf-8-sig")
    except UsageError as exc:
        raise error(str(exc)) from None
    except OSError as exc:
        raise error(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{what} {p} is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8") from None


def read_settings_file(path: PathLike, what: str = "file", *, error: type[UsageError] = UsageError) -> Any:
    """The parsed content of a JSON (by its `.json` suffix) or YAML file a user gave or edited.

    YAML is read with `safe_load`: a tag such as `!!python/object` is refused, never run. A file that
    `read_text_file` refuses, or that is not valid JSON/YAML, raises `error` with one line naming it."""
    p = Path(path)
    text = read_text_file(p, what, error=error)
    if p.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise error(f"{what} {p} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{what} {p} is not valid YAML: {yaml_problem(exc)}") from None


def yaml_problem(exc: Exception) -> str:
    """One line for a PyYAML error: its problem and where (PyYAML's own text spans several lines)."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(problem)
