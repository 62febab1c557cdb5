"""Which folders of digseg's weights cache are digseg's own: the only ones it ever deletes or fetches into.

An entry (``<cache>/<name>/``) gets ``ENTRY_MARKER`` when digseg creates it, before its first file is
fetched (``claim_entry``). ``own_entry`` is the one check before ``rm`` deletes an entry or ``verify``
removes and re-fetches files in one; ``require_own_cache`` refuses a cache folder that holds anything that
is not such an entry (a ``DIGSEG_CACHE_DIR`` pointed at a home folder), so nothing in it is ever deleted.

Entries written by digseg before the marker existed are adopted (given the marker) when every file in them
is one of their registry entry's files with its recorded sha256, or a ``.part`` download of one; anything
else is refused with how to remove it by hand.

It knows nothing of downloads, the Hub or where the cache is (callers pass the cache folder); it never prints
and logs to ``logging.getLogger("digseg")``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path, PurePosixPath

from digseg_cli._version import __version__
from digseg_cli.errors import UsageError
from digseg_cli.files import atomic_write_json
from digseg_cli.weights.download import sha256_file
from digseg_cli.weights.registry import WeightsSpec

log = logging.getLogger("digseg")

ENTRY_MARKER = ".digseg-entry.json"
ENTRY_SCHEMA = "digseg.weights-entry/1"
_PART_SUFFIXES = (".part", ".part.validator")  # download.py's resumable partial file and its validator


def version_name(spec: WeightsSpec) -> str:
    """The folder of one version of a URL entry: its revision, or the first 12 hex of its files' digest."""
    return spec.revision or hashlib.sha256("".join(f.sha256 for f in spec.files).encode()).hexdigest()[:12]


def is_marked(folder: Path, name: str) -> bool:
    marker = folder / ENTRY_MARKER
    if marker.is_symlink() or not marker.is_file():
        return False
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("schema") == ENTRY_SCHEMA and data.get("name") == name


def _mark(folder: Path, name: str) -> None:
    atomic_write_json(
        folder / ENTRY_MARKER, {"schema": ENTRY_SCHEMA, "name": name, "written_by": f"digseg {__version__}"}
    )


def _adoptable(folder: Path, spec: WeightsSpec | None) -> bool:
    """An unmarked folder an older digseg wrote: only ``spec``'s files (recorded sha256) or their ``.part``."""
    if spec is None or spec.source != "url":
        return False
    version = PurePosixPath(version_name(spec))
    wanted = {version / f.path: f.sha256 for f in spec.files}
    allowed_dirs = {parent for path in wanted for parent in path.parents}
    paths = list(folder.rglob("*"))
    if any(path.is_symlink() for path in paths):  # a link may point at anything of the user's
        return False
    for path in paths:
        rel = PurePosixPath(path.relative_to(folder).as_posix())
        if path.is_dir():
            if rel not in allowed_dirs:
                return False
            continue
        part_of = next((rel.with_name(rel.name[: -len(s)]) for s in _PART_SUFFIXES if rel.name.endswith(s)), None)
        if part_of in wanted:
            continue
        if rel not in wanted or not path.is_file() or sha256_file(path) != wanted[rel]:
            return False
    return True


def _not_ours(folder: Path) -> UsageError:
    return UsageError(
        f"{folder} was not written by digseg (no {ENTRY_MARKER}, and its files are not a registry entry's); "
        f"digseg neither deletes nor fetches into it: check it and remove it by hand (rm -r '{folder}')"
    )


def own_entry(root: Path, name: str, spec: WeightsSpec | None) -> Path | None:
    """``<root>/<name>`` when digseg wrote it (marked, or adopted now), None when absent; else ``UsageError``."""
    folder = Path(root) / name
    if not folder.exists() and not folder.is_symlink():
        return None
    if folder.is_symlink() or not folder.is_dir():
        raise _not_ours(folder)
    if is_marked(folder, name):
        return folder
    if _adoptable(folder, spec):
        log.info("adopting %s, written by an earlier digseg (its files match the registry's sha256)", folder)
        _mark(folder, name)
        return folder
    raise _not_ours(folder)


def claim_entry(root: Path, spec: WeightsSpec) -> Path:
    """The entry folder of ``spec``, created with its marker when absent; ``UsageError`` when not digseg's."""
    folder = own_entry(root, spec.name, spec)
    if folder is None:
        folder = Path(root) / spec.name
        folder.mkdir(parents=True, exist_ok=True)
        _mark(folder, spec.name)
    return folder


def release_if_empty(root: Path, name: str) -> None:
    """Remove an entry that holds nothing but its marker (a first download that failed leaves no trace)."""
    folder = Path(root) / name
    if not is_marked(folder, name):
        return
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True):
        with contextlib.suppress(OSError):  # not empty: something was fetched, keep it
            sub.rmdir()
    with contextlib.suppress(OSError):
        if [p.name for p in folder.iterdir()] == [ENTRY_MARKER]:
            (folder / ENTRY_MARKER).unlink()
            folder.rmdir()


def require_own_cache(root: Path, registry) -> None:
    """Refuse (``UsageError``) a cache folder holding anything that is not a digseg entry, before any deletion."""
    root = Path(root)
    if not root.is_dir():
        return
    foreign = []
    for child in sorted(root.iterdir()):
        try:
            own_entry(root, child.name, registry.get(child.name))
        except UsageError:
            foreign.append(child.name)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UsageError(
            f"the weights cache {root} also holds what digseg did not write ({shown}), so digseg deletes nothing "
            f"in it: point --cache-dir / DIGSEG_CACHE_DIR at a folder of digseg's own"
        )
