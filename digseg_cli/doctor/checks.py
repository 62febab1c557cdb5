"""The checks of `digseg doctor`, each a function returning `Check` rows, and the exit code they add up to.

One job: look at this machine and say what digseg finds and would pick on it (libraries, devices and
precisions, caches, network, the built-in model, the output folder, optional extras) without changing
anything: no download, no folder created, no file left behind. The rules themselves stay where they live
(`inference/device.py` picks devices, `weights/store.py` finds caches and weights, `files.py` probes a
folder): this module calls them and reports. Rendering the rows is the CLI's job.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from digseg_cli import errors
from digseg_cli._version import __version__

OK, NOTE, FAIL = "ok", "note", "fail"
# Distributions that stand in for a requirement of the same library under another name.
ALTERNATES = {"opencv-python-headless": ("opencv-python", "opencv-contrib-python", "opencv-contrib-python-headless")}
HUB_PROBE_TIMEOUT_S = 5.0
# Extras that only serve development; `doctor` lists the ones a user installs for a feature.
DEVELOPMENT_EXTRAS = {"test", "dev"}


@dataclass
class Check:
    """One row: a `fail` of a check with a non-zero `exit_code` means digseg cannot do its main job here."""

    section: str  # versions, devices, caches, network, model, output, extras
    name: str
    status: str  # ok, note (worth knowing; nothing needed is missing) or fail
    detail: str
    fix: str = ""  # what to do about a note or a failure
    exit_code: int = 0  # the documented code a failure gives; 0: not needed for segmenting

    def to_dict(self) -> dict:
        return asdict(self)


def exit_code(checks: list[Check]) -> int:
    """0 when every needed check passed, else the documented exit code of the first needed one that failed."""
    return next((c.exit_code for c in checks if c.status == FAIL and c.exit_code), errors.EXIT_OK)


# ------------------------------------------------------------------------------------------------ versions
def _requirements() -> tuple[list, dict[str, list]] | None:
    """digseg's installed requirements: (needed, {extra: requirements}), or None when it is not installed."""
    from packaging.requirements import Requirement

    try:
        declared = importlib.metadata.requires("digseg") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    needed, extras = [], {}
    for req in map(Requirement, declared):
        extra = next((e for e in _extras_named(req) if e not in DEVELOPMENT_EXTRAS), None)
        if req.marker is None:
            needed.append(req)
        elif extra is not None:
            extras.setdefault(extra, []).append(req)
    return needed, extras


def _extras_named(req) -> list[str]:
    """The extras a requirement's marker names (`extra == "geo"` → ["geo"])."""
    text = str(req.marker or "")
    return [part.split('"')[1] for part in text.split("extra ==")[1:] if '"' in part]


def _installed_version(name: str) -> tuple[str, str] | None:
    """(distribution, version) of `name` or of a stand-in for it, or None when none is installed."""
    for dist in (name, *ALTERNATES.get(name, ())):
        try:
            return dist, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _requirement_row(req, section: str, code: int, fix: str) -> Check:
    found = _installed_version(req.name)
    if found is None:
        return Check(section, req.name, FAIL if code else NOTE, f"not installed (needs {req})", fix, code)
    dist, version = found
    shown = version if dist == req.name else f"{version} ({dist})"
    if req.specifier and not req.specifier.contains(version, prereleases=True):
        return Check(section, req.name, FAIL if code else NOTE, f"{shown}, needs {req}", fix, code)
    return Check(section, req.name, OK, shown)


def check_versions() -> list[Check]:
    """digseg, Python and every library digseg needs, with their versions against the declared ranges."""
    import torch

    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    rows = [
        Check("versions", "digseg", OK, __version__),
        Check("versions", "python", OK, f"{platform.python_version()} ({sys.executable})"),
        Check("versions", "platform", OK, f"{platform.system()} {platform.release()} {platform.machine()}"),
        Check("versions", "torch build", OK, build),
    ]
    found = _requirements()
    if found is None:
        fix = "install it: pip install . (in the source folder) or pip install digseg"
        return [*rows, Check("versions", "requirements", NOTE, "digseg runs from source, not installed", fix)]
    fix = "reinstall digseg's requirements: pip install --upgrade digseg (or pip install . in its source folder)"
    return rows + [_requirement_row(req, "versions", errors.EXIT_USAGE, fix) for req in found[0]]


def check_extras() -> list[Check]:
    """The optional extras (`pip install "digseg[geo]"`): which are installed, with their versions."""
    found = _requirements()
    rows = []
    for extra, reqs in sorted((found or ({}, {}))[1].items()):
        fix = f'pip install "digseg[{extra}]"'
        parts = [_requirement_row(req, "extras", 0, fix) for req in reqs]
        listed = ", ".join(f"{part.name} {part.detail}" for part in parts)
        complete = all(part.status == OK for part in parts)
        rows.append(Check("extras", extra, OK if complete else NOTE, listed, "" if complete else fix))
    return rows


# -------------------------------------------------------------------------------------------------- caches
def _existing_ancestor(folder: Path) -> Path:
    """`folder` itself when it exists, else its nearest parent that does."""
    folder = folder.absolute()
    return next((p for p in (folder, *folder.parents) if p.exists()), Path(folder.anchor))


def folder_size(folder: Path) -> tuple[int, int]:
    """(files, bytes) below `folder`, links not followed (the Hugging Face cache links snapshots to blobs)."""
    files = size = 0
    for root, _dirs, names in os.walk(folder):
        for name in names:
            try:
                stat = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if not os.path.islink(os.path.join(root, name)):
                files, size = files + 1, size + stat.st_size
    return files, size


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**28 else f"{size / 2**20:.1f} MiB"


def _cache_row(name: str, folder: Path, fix: str) -> Check:
    import shutil

    base = _existing_ancestor(folder)
    free = f"{_gib(shutil.disk_usage(base).free)} free"
    if not folder.exists():
        detail = f"{folder} (not created yet; {free})"
    else:
        files, size = folder_size(folder)
        detail = f"{folder}: {files} files, {_gib(size)} ({free})"
    if not (base.is_dir() and os.access(base, os.W_OK | os.X_OK)):
        return Check("caches", name, NOTE, f"{detail}; not writable", fix)
    return Check("caches", name, OK, detail)


def check_caches(cache_dir: Path | None) -> list[Check]:
    """digseg's weights cache, the shared Hugging Face cache and the datasets folder: where, how big, writable."""
    from digseg_cli.data.benchmarks.base import default_data_root
    from digseg_cli.weights.hub import hub_cache
    from digseg_cli.weights.store import cache_dir as weights_cache

    return [
        _cache_row("digseg weights", weights_cache(cache_dir), "choose another with --cache-dir or DIGSEG_CACHE_DIR"),
        _cache_row("Hugging Face hub", Path(hub_cache()), "choose another with HF_HOME or HF_HUB_CACHE"),
        _cache_row("datasets", default_data_root(), "choose another with --data-root or DIGSEG_DATA_ROOT"),
    ]


# ------------------------------------------------------------------------------------------------- network
def _offline_reason(offline: bool) -> str | None:
    """What turned offline mode on (the variables first: they also set --offline), or None when it is off."""
    from digseg_cli.weights.store import offline_variables

    named = " and ".join(f"{k}={os.environ[k]}" for k in offline_variables())
    return named or ("--offline" if offline else None)


def check_network(offline: bool) -> list[Check]:
    """Whether digseg may download (offline mode) and, when it may, whether the Hub answers."""
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    reason = _offline_reason(offline)
    if reason is not None:
        detail = f"offline ({reason}): weights come from the cache and the built-in demo only"
        return [
            Check("network", "digseg", OK, detail),
            Check("network", "hub", OK, f"{endpoint}: not probed (offline)"),
        ]
    rows = [Check("network", "digseg", OK, "online: weights missing from the cache are downloaded")]
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=HUB_PROBE_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:  # any HTTP answer means the server is there
        pass
    except (urllib.error.URLError, OSError, ValueError) as exc:
        why = getattr(exc, "reason", None) or exc
        fix = "downloads need it: download on a connected machine (digseg weights download NAME) or use --offline"
        return [*rows, Check("network", "hub", NOTE, f"{endpoint}: not reachable ({why})", fix)]
    return [*rows, Check("network", "hub", OK, f"{endpoint}: reachable ({time.perf_counter() - t0:.2f} s)")]


# -------------------------------------------------------------------------------------------------- output
def check_output(out: Path) -> Check:
    """Whether `segment --out` could write into `out` (probed in it, or in the parent it would be made in)."""
    import shutil

    from digseg_cli.files import require_writable_folder

    folder = Path(out).absolute()
    base = _existing_ancestor(folder)
    if not base.is_dir():
        return Check(
            "output", "--out", FAIL, f"{base} is a file, not a folder", "choose another --out", errors.EXIT_USAGE
        )
    try:
        require_writable_folder(base, "output folder")  # an existing folder: nothing is created
    except errors.UsageError as exc:
        return Check("output", "--out", FAIL, str(exc), "choose another --out", errors.EXIT_USAGE)
    where = "" if base == folder else f" (made in {base} on first use)"
    return Check("output", "--out", OK, f"{folder} is writable{where}, {_gib(shutil.disk_usage(base).free)} free")
