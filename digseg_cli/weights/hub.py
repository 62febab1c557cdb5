"""The Hugging Face Hub side of the weights chain: Hub ids, the shared HF cache, snapshot downloads, checks.

One job: parse ``owner/name[@revision]``; find a complete snapshot of a repo in the shared Hugging Face
cache (``HF_HOME``/``HF_HUB_CACHE``) with ``snapshot_download(local_files_only=True)`` (no network; it
resolves branch names through the cache's refs and, where huggingface_hub caches the repo's file listing
(2.4 does), checks the snapshot against it for the same patterns); fetch one with ``snapshot_download``
(safetensors, JSON and text files only), turning its errors into one-line ``WeightsUnavailableError``s;
and check the cached files ``scan_cache_dir`` lists against their blob names (sha256 for LFS files, git
blob sha1 for small ones). The cache's folder layout is huggingface_hub's business: nothing here builds a
path into it.

It knows nothing of digseg's registry, its own URL cache or the offline policy (``store.py`` decides
whether the network may be used), nor of how a checkpoint is loaded; it never prints, logs to
``logging.getLogger("digseg")``, and never deletes anything but corrupt blobs it was asked to repair.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path, PurePosixPath

from digseg_cli._version import __version__
from digseg_cli.errors import WeightsUnavailableError
from digseg_cli.weights.download import sha256_file

log = logging.getLogger("digseg")

_HUB_RE = re.compile(r"^([A-Za-z0-9][\w.\-]{0,95})/([A-Za-z0-9][\w.\-]{0,95})(?:@([^\s@]+))?$")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

# What we take from a diffusers Stable Diffusion repo: the five components, safetensors only.
SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SD_WEIGHTS = ("unet", "vae", "text_encoder")  # the components that hold weights (safetensors only)
HUB_ALLOW = (
    "model_index.json",
    "digseg_config.json",
    *(f"{c}/*.{ext}" for c in SD_COMPONENTS for ext in ("json", "txt", "safetensors")),
)
# For any other Hub id (e.g. a digseg checkpoint): every component folder, safetensors/json/txt only.
HUB_ALLOW_ANY = ("model_index.json", "digseg_config.json", "*/*.json", "*/*.txt", "*/*.safetensors")
HUB_IGNORE = (
    "*fp16*",
    "*non_ema*",
    "*.ckpt",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.msgpack",
    "*.onnx",
    "*.pb",
    "*.h5",
    "safety_checker/*",
    "feature_extractor/*",
)


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """``owner/name[@revision]`` → (repo_id, revision or None); anything else → None."""
    match = _HUB_RE.match(text)
    if not match or ".." in text or "--" in match.group(1) + match.group(2):
        return None
    return f"{match.group(1)}/{match.group(2)}", match.group(3)


def hub_cache() -> str:
    """The shared Hugging Face cache folder (``HF_HUB_CACHE``, by default under ``HF_HOME``)."""
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def cached_snapshot(repo_id: str, revision: str | None, *, allow, complete=None) -> Path | None:
    """A complete cached snapshot of a Hub repo at ``revision`` holding the ``allow``-ed files; no network.
    ``complete(folder)`` says whether a snapshot is whole (default: a diffusers or digseg folder's check)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError

    try:  # local_files_only: never a request, whatever HF_HUB_OFFLINE says
        folder = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=list(allow),
                ignore_patterns=list(HUB_IGNORE),
                local_files_only=True,
            )
        )
    except LocalEntryNotFoundError:  # not cached, or cached with files missing (IncompleteSnapshotError)
        return None
    return folder if (complete or _snapshot_complete)(folder) else None


def _snapshot_complete(folder: Path) -> bool:
    """A diffusers/digseg folder whose weight components each hold their safetensors (not a cut-off download).

    A huggingface_hub that keeps no file listing returns any snapshot folder that exists: this check stays.
    """
    index = folder / "model_index.json"
    if not index.is_file():
        return (folder / "digseg_config.json").is_file()
    try:
        components = set(json.loads(index.read_text())) & set(SD_WEIGHTS)
    except (ValueError, OSError):
        return False
    return all(any((folder / c).glob("*.safetensors")) for c in components)


def fetch_snapshot(label: str, repo_id: str, revision: str | None, allow) -> Path:
    """Download the ``allow``-ed files of ``repo_id@revision`` into the HF cache; return the snapshot folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    where = f"{repo_id}@{revision or 'main'}"
    log.info("fetching %s from the Hugging Face Hub (HF_ENDPOINT, HF_TOKEN and proxies apply)", where)
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=list(allow),
            ignore_patterns=list(HUB_IGNORE),
            library_name="digseg",
            library_version=__version__,
        )
    except GatedRepoError:
        raise WeightsUnavailableError(
            f"{repo_id} is gated: accept its licence on https://huggingface.co/{repo_id}"
            f", then log in (hf auth login) or set HF_TOKEN"
        ) from None
    except RevisionNotFoundError:
        raise WeightsUnavailableError(f"revision '{revision}' not found in {repo_id}") from None
    except RepositoryNotFoundError:
        raise WeightsUnavailableError(
            f"'{label}' is neither a local folder nor a repo on the Hugging Face Hub (a private repo needs HF_TOKEN)"
        ) from None
    except Exception as exc:  # network down, proxy, endpoint, disk: one line, with what to try
        raise WeightsUnavailableError(
            f"could not fetch {where} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            f"Check the network, HTTPS_PROXY or HF_ENDPOINT; or use a local folder"
        ) from None
    return Path(path)


def _git_blob_sha1(path: Path) -> str:
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _snapshot_blobs(folder: Path) -> dict[str, Path]:
    """``{relative path: blob}`` of every file of the cached snapshot ``folder``, as ``scan_cache_dir`` sees it."""
    from huggingface_hub import scan_cache_dir

    folder = folder.resolve()
    scan = scan_cache_dir(hub_cache())
    for repo in scan.repos:
        for rev in repo.revisions:
            if rev.snapshot_path.resolve() == folder:
                return {f.file_path.relative_to(rev.snapshot_path).as_posix(): f.blob_path for f in rev.files}
    # A repo the scan cannot read (e.g. a blob deleted by hand) is left out of ``repos`` and named in ``warnings``.
    raise WeightsUnavailableError(
        f"huggingface_hub cannot read the cache entry of {folder} "
        f"({'; '.join(map(str, scan.warnings)) or 'not listed'}); fetch it again with: digseg weights download NAME"
    )


def verify_snapshot(folder: Path, *, repair: bool) -> tuple[list[dict], list[int]]:
    """Check every file of a cached snapshot against its blob name; return (``[{path, status, expected,
    actual}]``, the indices of the files removed as corrupt, which the caller fetches again).

    HF blobs are named by their sha256 (LFS files) or git blob sha1 (small files): those names are checked.
    Status: ``ok``, ``unchecked`` (a blob name that is neither), ``corrupt`` (``repair=False``) or ``removed``.
    """
    results, removed = [], []
    blobs = _snapshot_blobs(folder)
    for rel in sorted(blobs, key=PurePosixPath):
        blob = blobs[rel]
        want = blob.name
        actual = sha256_file(blob) if _HEX64.match(want) else _git_blob_sha1(blob) if _HEX40.match(want) else None
        status = "unchecked" if actual is None else "ok" if actual == want else "corrupt"
        if status == "corrupt" and repair:
            log.warning("%s is corrupt; removing it from the Hugging Face cache", folder / rel)
            blob.unlink()  # huggingface_hub deletes whole revisions only; the next fetch restores this one file
            (folder / rel).unlink(missing_ok=True)
            status = "removed"
            removed.append(len(results))
        results.append({"path": rel, "status": status, "expected": want if actual else None, "actual": actual})
    return results, removed
