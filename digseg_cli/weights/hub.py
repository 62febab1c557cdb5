"""The Hugging Face Hub side of the weights chain: Hub ids, the shared HF cache, snapshot downloads, checks.

One job: parse ``owner/name[@revision]``; find a complete snapshot of a repo in the shared Hugging Face
cache (``HF_HOME``/``HF_HUB_CACHE``; file system only); fetch one with ``huggingface_hub.snapshot_download``
(safetensors, JSON and text files only), turning its errors into one-line ``WeightsUnavailableError``s;
and check cached files against their blob names (sha256 for LFS files, git blob sha1 for small ones).

It knows nothing of digseg's registry, its own URL cache or the offline policy (``weights.py`` decides
whether the network may be used), nor of how a checkpoint is loaded; it never prints, logs to
``logging.getLogger("digseg")``, and never deletes anything but corrupt blobs it was asked to repair.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

from digseg_cli._version import __version__
from digseg_cli.weights.download import sha256_file
from digseg_cli.errors import WeightsUnavailableError

log = logging.getLogger("digseg")

_HUB_RE = re.compile(r"^([A-Za-z0-9][\w.\-]{0,95})/([A-Za-z0-9][\w.\-]{0,95})(?:@([^\s@]+))?$")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

# What we take from a diffusers Stable Diffusion repo: the five components, safetensors only.
SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
HUB_ALLOW = ("model_index.json", "digseg_config.json",
             *(f"{c}/*.{ext}" for c in SD_COMPONENTS for ext in ("json", "txt", "safetensors")))
# For any other Hub id (e.g. a digseg checkpoint): every component folder, safetensors/json/txt only.
HUB_ALLOW_ANY = ("model_index.json", "digseg_config.json", "*/*.json", "*/*.txt", "*/*.safetensors")
HUB_IGNORE = ("*fp16*", "*non_ema*", "*.ckpt", "*.bin", "*.pt", "*.pth", "*.msgpack", "*.onnx", "*.pb", "*.h5",
              "safety_checker/*", "feature_extractor/*")


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


def cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """A complete cached snapshot of a Hub repo at ``revision`` (file system only, no network)."""
    repo = Path(hub_cache()) / ("models--" + repo_id.replace("/", "--"))
    commit = revision or "main"
    if not _HEX40.match(commit):
        ref = repo / "refs" / commit
        if not ref.is_file():
            return None
        commit = ref.read_text().strip()
    folder = repo / "snapshots" / commit
    return folder if _snapshot_complete(folder) else None


def _snapshot_complete(folder: Path) -> bool:
    """A diffusers/digseg folder whose weight components each hold their safetensors (not a cut-off download)."""
    index = folder / "model_index.json"
    if not index.is_file():
        return (folder / "digseg_config.json").is_file()
    try:
        components = set(json.loads(index.read_text())) & {"unet", "vae", "text_encoder"}
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
        path = snapshot_download(repo_id, revision=revision, allow_patterns=list(allow),
                                 ignore_patterns=list(HUB_IGNORE), library_name="digseg",
                                 library_version=__version__)
    except GatedRepoError:
        raise WeightsUnavailableError(f"{repo_id} is gated: accept its licence on https://huggingface.co/{repo_id}"
                                      f", then log in (hf auth login) or set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise WeightsUnavailableError(f"revision '{revision}' not found in {repo_id}") from None
    except RepositoryNotFoundError:
        raise WeightsUnavailableError(f"'{label}' is neither a local folder nor a repo on the Hugging Face Hub "
                                      f"(a private repo needs HF_TOKEN)") from None
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


def verify_snapshot(folder: Path, *, repair: bool) -> tuple[list[dict], list[int]]:
    """Check every file of a cached snapshot against its blob name; return (``[{path, status, expected,
    actual}]``, the indices of the files removed as corrupt, which the caller fetches again).

    HF blobs are named by their sha256 (LFS files) or git blob sha1 (small files): those names are checked.
    Status: ``ok``, ``unchecked`` (a blob name that is neither), ``corrupt`` (``repair=False``) or ``removed``.
    """
    results, removed = [], []
    for link in sorted(p for p in folder.rglob("*") if p.is_file()):
        blob = link.resolve()
        want = blob.name
        actual = sha256_file(blob) if _HEX64.match(want) else _git_blob_sha1(blob) if _HEX40.match(want) else None
        status = "unchecked" if actual is None else "ok" if actual == want else "corrupt"
        if status == "corrupt" and repair:
            log.warning("%s is corrupt; removing it from the Hugging Face cache", link)
            blob.unlink()
            link.unlink(missing_ok=True)
            status = "removed"
            removed.append(len(results))
        results.append({"path": link.relative_to(folder).as_posix(), "status": status,
                        "expected": want if actual else None, "actual": actual})
    return results, removed
