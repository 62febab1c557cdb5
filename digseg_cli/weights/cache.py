"""What is in the weights caches: list the registry with what is cached, verify cached files, remove entries.

``list_weights`` (``digseg weights list|info``), ``verify_weights`` (``verify``: recompute checksums, remove
corrupt files and fetch them again unless offline) and ``remove_weights`` (``rm``: digseg's own cache only;
the shared Hugging Face cache and a user's folders are never deleted from). Before deleting anything in
digseg's cache both ask ``entries.py`` whether digseg wrote the entry and the cache folder holds nothing else.

Where entries live and how a name becomes a folder (and is fetched) is ``store.py``'s; the Hub's checks
are ``hub.py``'s. Nothing here prints; it logs to ``logging.getLogger("digseg")``.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

from digseg_cli.errors import UsageError, WeightsUnavailableError
from digseg_cli.weights import hub, package
from digseg_cli.weights.download import sha256_file
from digseg_cli.weights.entries import own_entry, require_own_cache
from digseg_cli.weights.hub import parse_hub_id
from digseg_cli.weights.registry import NAME_RE, REGISTRY, WeightsSpec, unknown_weights_error
from digseg_cli.weights.store import (
    SUMS_FILE,
    WeightsProgress,
    cached_path,
    download_command,
    download_weights,
    entry_dir,
    is_offline_env,
)
from digseg_cli.weights.store import (
    cache_dir as cache_root,
)

log = logging.getLogger("digseg")


# -------------------------------------------------------------------------------------------- listing
def list_weights(
    cache_dir: Path | str | None = None, *, registry: Mapping[str, WeightsSpec] | None = None
) -> list[dict]:
    """One dict per registry entry: its fields plus ``cached`` and ``path`` (no network)."""
    rows = []
    for spec in (REGISTRY if registry is None else registry).values():
        path = cached_path(spec.name, cache_dir, registry=registry)
        row = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(spec).items() if k != "allow_patterns"}
        rows.append({**row, "size": spec.size, "cached": path is not None, "path": str(path) if path else None})
    return rows


# --------------------------------------------------------------------------------------- verification
def _read_sums(folder: Path) -> dict[str, str]:
    sums = {}
    for line in (folder / SUMS_FILE).read_text().splitlines():
        match = re.match(r"^([0-9a-fA-F]{64})\s+\*?(.+)$", line.strip())
        if match:
            sums[match.group(2)] = match.group(1).lower()
    return sums


def verify_weights(
    name: str,
    cache_dir: Path | str | None = None,
    *,
    repair: bool = True,
    offline: bool | None = None,
    progress: WeightsProgress | None = None,
    registry: Mapping[str, WeightsSpec] | None = None,
) -> list[dict]:
    """Recompute the checksum of every file of a cached entry; return ``[{path, status, expected, actual}]``.

    Status: ``ok``; ``unchecked`` (no recorded checksum); ``missing``; ``corrupt`` (left in place:
    ``repair=False`` or a bundled file); ``removed`` (corrupt, deleted, not fetched because offline);
    ``repaired`` (corrupt or missing, fetched again and verified).
    """
    registry = REGISTRY if registry is None else registry
    offline = is_offline_env() if offline is None else offline
    spec = registry.get(name)
    if spec is not None and spec.source == "url":
        if repair:  # it may delete and fetch files: only in an entry, and a cache, of digseg's own
            _require_own(spec.name, cache_dir, registry)
        return _verify_url(spec, cache_dir, repair=repair, offline=offline, progress=progress)
    folder = cached_path(name, cache_dir, registry=registry)
    if folder is None:
        raise WeightsUnavailableError(f"'{name}' is not cached, nothing to verify: {download_command(name, cache_dir)}")
    if spec is not None and spec.source == "package" and package.installed_folder(spec) == folder:
        return _verify_listed(spec, folder)  # a pip-installed package is pip's to repair, not digseg's
    if spec is not None and spec.source == "bundled":
        expected = {f.path: f.sha256 for f in spec.files}
        if not expected and (folder / SUMS_FILE).is_file():
            expected = _read_sums(folder)
        results = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SUMS_FILE):
            rel = path.relative_to(folder).as_posix()
            want = expected.get(rel)
            actual = sha256_file(path) if want else None
            status = "unchecked" if not want else "ok" if actual == want else "corrupt"
            results.append({"path": rel, "status": status, "expected": want, "actual": actual})
        return results
    results, removed = hub.verify_snapshot(folder, repair=repair)
    if removed and not offline:
        download_weights(name, cache_dir=cache_dir, offline=False, registry=registry)
        _mark_repaired(results, removed)
    return results


def _verify_url(spec: WeightsSpec, cache_dir, *, repair: bool, offline: bool, progress) -> list[dict]:
    folder = entry_dir(spec, cache_dir)
    if not any((folder / f.path).is_file() for f in spec.files):
        raise WeightsUnavailableError(
            f"'{spec.name}' is not cached, nothing to verify: {download_command(spec.name, cache_dir)}"
        )
    results, bad = _verify_listed(spec, folder), []
    for i, (f, result) in enumerate(zip(spec.files, results, strict=True)):
        if result["status"] == "corrupt" and repair:
            log.warning(
                "%s is corrupt (sha256 %s, expected %s); removing it", folder / f.path, result["actual"], f.sha256
            )
            (folder / f.path).unlink()
            result["status"] = "removed"
        if result["status"] in ("missing", "removed") and repair and not offline:
            bad.append(i)
    if bad:
        download_weights(spec.name, cache_dir=cache_dir, offline=False, progress=progress, registry={spec.name: spec})
        _mark_repaired(results, bad)
    return results


def _verify_listed(spec: WeightsSpec, folder: Path) -> list[dict]:
    """Check the files ``spec`` lists in ``folder``, left in place whatever they hold."""
    results = []
    for f in spec.files:
        path = folder / f.path
        actual = sha256_file(path) if path.is_file() else None
        status = "missing" if actual is None else "ok" if actual == f.sha256 else "corrupt"
        results.append({"path": f.path, "status": status, "expected": f.sha256, "actual": actual})
    return results


def _mark_repaired(results: list[dict], indices: list[int]) -> None:
    """After fetching the files at ``indices`` again (the download checked them), record them as repaired."""
    for i in indices:
        results[i]["status"], results[i]["actual"] = "repaired", results[i]["expected"]


# --------------------------------------------------------------------------------------------- removal
def remove_weights(
    name: str,
    cache_dir: Path | str | None = None,
    *,
    dry_run: bool = False,
    registry: Mapping[str, WeightsSpec] | None = None,
) -> list[Path]:
    """Delete digseg's cached copy of ``name`` (all its versions); return what was (``dry_run``: would be) removed.

    Only entries digseg wrote (``entries.py``), in a cache folder holding nothing else, are ever removed:
    bundled weights, Hub entries (the HF cache is shared with other tools), user folders and a cache folder
    with anything else in it are refused with a ``UsageError``.
    """
    registry = REGISTRY if registry is None else registry
    spec = registry.get(name)
    if spec is not None and spec.source == "bundled":
        raise UsageError(f"'{name}' is bundled with digseg; there is nothing to remove")
    if spec is not None and spec.source == "package" and package.installed_folder(spec) is not None:
        raise UsageError(
            f"'{name}' comes with the Python package {spec.package}; remove it with: pip uninstall {spec.package}"
        )
    if spec is not None and spec.source in ("hub", "package") or spec is None and parse_hub_id(name):
        snap = cached_path(name, cache_dir, registry=registry)
        hint = f"hf cache rm {snap.name}" if snap else "hf cache rm model/<owner>/<name>"
        raise UsageError(
            f"'{name}' lives in the shared Hugging Face cache, which digseg does not delete from; use: {hint}"
        )
    if not NAME_RE.match(name):
        raise UsageError(f"'{name}' is not a weights name; digseg only removes its own cache entries")
    target = _require_own(name, cache_dir, registry)  # an entry an older registry had is still removable
    if target is None:
        if spec is None:
            raise unknown_weights_error(name, registry)
        return []
    if dry_run:
        return [target]
    shutil.rmtree(target)
    log.debug("removed %s", target)
    return [target]


def _require_own(name: str, cache_dir, registry: Mapping[str, WeightsSpec]) -> Path | None:
    """``name``'s entry folder (None when absent) if digseg wrote it and the cache holds nothing else; else
    ``UsageError`` (``entries.py``'s rule)."""
    root = cache_root(cache_dir)
    require_own_cache(root, registry)
    return own_entry(root, name, registry.get(name))
