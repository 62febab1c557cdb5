"""Weights that ship inside an installed Python package (a `package` registry entry), found without importing it.

One job: find the entry's folder in the installed distribution (``importlib.metadata``: the package's own
code is never imported, so a third party's repackaging runs nothing of its own) and check every file digseg
reads against the sha256 the registry records; and do the same check on any other folder said to hold
the entry (its pinned Hub snapshot). A file is hashed once per process (by path, size and modification time).

Where the Hub fallback comes from and what offline means are ``store.py``'s; this module never downloads.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
from pathlib import Path

from digseg_cli.weights.download import has_size, sha256_file
from digseg_cli.weights.registry import WeightsSpec

log = logging.getLogger("digseg")


def installed_folder(spec: WeightsSpec) -> Path | None:
    """The folder of ``spec``'s files inside its installed distribution, or None when it is not installed."""
    try:
        dist = importlib.metadata.distribution(spec.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    folder = Path(str(dist.locate_file(spec.package_folder)))
    return folder if folder.is_dir() else None


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def has_files(spec: WeightsSpec, folder: Path) -> bool:
    """Whether ``folder`` holds every file of ``spec`` with its recorded size (a whole Hub snapshot)."""
    return all(has_size(Path(folder) / f.path, f.size) for f in spec.files)


def cached_snapshot(spec: WeightsSpec) -> Path | None:
    """The entry's pinned Hub snapshot in the Hugging Face cache when it holds every file; no network."""
    from digseg_cli.weights import hub

    return hub.cached_snapshot(
        spec.repo_id, spec.revision, allow=spec.allow_patterns, complete=lambda f: has_files(spec, f)
    )


def mismatches(spec: WeightsSpec, folder: Path) -> list[str]:
    """The files of ``spec`` that ``folder`` lacks or holds with another sha256 (empty: all verified)."""
    bad = []
    for f in spec.files:
        path = Path(folder) / f.path
        stat = path.stat() if path.is_file() else None
        if stat is None or stat.st_size != f.size or _sha256(str(path), stat.st_size, stat.st_mtime_ns) != f.sha256:
            bad.append(f.path)
    return bad


def verified_installed_folder(spec: WeightsSpec) -> Path | None:
    """The installed package's folder when every file matches its recorded sha256; else None (and a warning
    naming the files when the package is installed but differs)."""
    folder = installed_folder(spec)
    if folder is None:
        return None
    bad = mismatches(spec, folder)
    if bad:
        log.warning(
            "the installed %s differs from what digseg recorded (%s); not using it "
            "(reinstall it: pip install --force-reinstall %s)",
            spec.package,
            ", ".join(bad),
            spec.package,
        )
        return None
    return folder
