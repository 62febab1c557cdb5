"""Fetch one file over HTTP(S) safely, and unpack an archive safely.

``download_file`` writes to ``<dest>.part``, resumes it with a ``Range`` request after a dropped
connection (or in a later process), guarded by ``If-Range`` with the server's validator so a file that
changed in between is fetched whole rather than stitched from two versions, checks size and sha256 (or
md5, where that is all a publisher gives),
then renames it into place atomically, so ``dest`` either does not exist or is complete. It uses urllib only, so ``HTTP(S)_PROXY``/``NO_PROXY``
apply as they do for any urllib client; ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE``/``SSL_CERT_FILE`` pick
the CA bundle. ``safe_extract`` unpacks zip and tar archives into a folder, refusing any member that would
land outside it.

This module knows nothing of weights, datasets, registries or caches: callers choose URLs, destinations
and checksums. It never prints; it logs to ``logging.getLogger("digseg")`` and reports bytes through an
optional ``progress(done, total)`` callback.
"""

from __future__ import annotations

import filecmp
import hashlib
import http.client
import logging
import os
import re
import shutil
import ssl
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from digseg_cli._version import __version__
from digseg_cli.errors import ChecksumMismatchError, DigsegError, UsageError, WeightsUnavailableError

log = logging.getLogger("digseg")

ProgressFn = Callable[[int, "int | None"], None]

CHUNK = 1 << 20  # bytes read per network read / hash update
BACKOFF_S = 1.0  # first wait between attempts; doubles each failed attempt (tests set it to 0)
MAX_BACKOFF_S = 16.0
_RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}


class DownloadError(WeightsUnavailableError):
    """A file could not be fetched (HTTP error, network down, retries used up)."""


class UnsafeArchiveError(DigsegError):
    """An archive member would be written outside the extraction folder (or is a device/fifo)."""


class _Retry(Exception):
    """Internal: this attempt failed in a way that another attempt may fix."""


# ---------------------------------------------------------------------------------------------- hashing
def file_digests(path: Path, algorithms: tuple[str, ...]) -> dict[str, str]:
    """Hex digests of a file for each ``hashlib`` algorithm name, in one chunked read (constant memory)."""
    digests = {name: hashlib.new(name, usedforsecurity=False) for name in algorithms}
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            for digest in digests.values():
                digest.update(block)
    return {name: digest.hexdigest() for name, digest in digests.items()}


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (constant memory)."""
    return file_digests(path, ("sha256",))["sha256"]


# --------------------------------------------------------------------------------------------- download
def _opener() -> urllib.request.OpenerDirector:
    """Default urllib handlers (ProxyHandler reads the *_proxy env vars) plus the user's CA bundle."""
    cafile = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or None
    context = ssl.create_default_context(cafile=cafile)
    return urllib.request.build_opener(urllib.request.HTTPSHandler(context=context))


def _content_range_start(header: str | None) -> int | None:
    match = re.match(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)", header or "")
    return int(match.group(1)) if match else None


def _content_range_total(header: str | None) -> int | None:
    match = re.match(r"\s*bytes\s+(?:\*|\d+-\d+)/(\d+)", header or "")
    return int(match.group(1)) if match else None


def _attempt(
    url: str, part: Path, *, size: int | None, progress: ProgressFn | None, timeout: float
) -> bool:
    """One HTTP request that appends to ``part``. Returns True when ``part`` is complete.

    Raises ``_Retry`` for failures another attempt may fix and ``DownloadError`` for those it cannot.
    """
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset > size:
        log.debug("%s is larger than expected; starting again", part)
        part.unlink()
        offset = 0
    if size is not None and offset == size:
        return True
    headers = {"User-Agent": f"digseg/{__version__}", "Accept-Encoding": "identity"}
    validator = _validator_path(part)
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if validator.is_file():  # the server sends the whole (new) file, not a range, if this no longer matches
            headers["If-Range"] = validator.read_text().strip()
    request = urllib.request.Request(url, headers=headers)
    try:
        response = _opener().open(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        with exc:
            if exc.code == 416 and offset:
                # Range not satisfiable: the .part already holds the whole file, or more than it.
                total = _content_range_total(exc.headers.get("Content-Range"))
                if total == offset:
                    return True
                part.unlink(missing_ok=True)
                raise _Retry(f"HTTP 416 for a resume at byte {offset}; starting again") from None
            if exc.code in _RETRYABLE_STATUS:
                raise _Retry(f"HTTP {exc.code} {exc.reason}") from None
            raise DownloadError(f"could not download {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise _Retry(f"{type(exc).__name__}: {reason}") from None

    with response:
        status = response.status
        if status == 206:
            start = _content_range_start(response.headers.get("Content-Range"))
            if start != offset:  # a server that answers a different range than asked: start over
                part.unlink(missing_ok=True)
                raise _Retry(f"server answered range start {start}, asked for {offset}")
            mode = "ab"
        else:
            if offset:
                log.info("the server sent all of %s (it changed since the partial download, or the server does "
                         "not resume); downloading from the start", url)
            offset, mode = 0, "wb"
            _remember_validator(validator, response.headers)
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        total = size if size is not None else (offset + expected if expected is not None else None)
        received = 0
        with open(part, mode) as fh:
            while True:
                try:
                    block = response.read(CHUNK)
                except (OSError, http.client.HTTPException) as exc:  # socket.timeout is an OSError
                    raise _Retry(f"connection lost after {offset + received} bytes ({type(exc).__name__})") from None
                if not block:
                    break
                fh.write(block)  # a local write error (disk full) propagates: retrying will not help
                received += len(block)
                if progress is not None:
                    progress(offset + received, total)
            fh.flush()
            os.fsync(fh.fileno())
    if expected is not None and received < expected:
        raise _Retry(f"connection closed after {offset + received} of {offset + expected} bytes")
    return True


def _validator_path(part: Path) -> Path:
    return part.with_name(part.name + ".validator")


def _remember_validator(path: Path, headers) -> None:
    """Keep the response's strong ETag (else its Last-Modified) beside the ``.part`` for ``If-Range``."""
    etag = headers.get("ETag")
    value = etag if etag and not etag.startswith("W/") else headers.get("Last-Modified")
    if value:
        path.write_text(value + "\n")
    else:
        path.unlink(missing_ok=True)


def download_file(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    size: int | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    md5: str | None = None,
    timeout: float = 30.0,
    retries: int = 3,
) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming and verifying; return ``dest``.

    - An existing ``dest`` is never overwritten: it is returned if it matches ``sha256``/``md5``/``size`` (or
      if none is given), otherwise ``ChecksumMismatchError`` says to remove it. ``md5`` is for files whose
      publisher gives no sha256; both are checked when both are given.
    - An existing ``.part`` is resumed with ``Range: bytes=N-`` and ``If-Range`` (the ETag or Last-Modified
      the server gave when the ``.part`` was started, kept in ``.part.validator``). A server that answers
      200 (file changed, or no ``Range`` support) makes the download start from 0; a 416 means the ``.part``
      is already complete or is discarded.
    - ``retries`` more attempts follow a dropped connection, a timeout or an HTTP 5xx/429, each resuming
      where the last stopped; an attempt that received bytes does not use up a retry.
    - A size or checksum mismatch deletes the ``.part`` and raises ``ChecksumMismatchError`` (a resumed
      download is first tried once more from scratch). Other failures raise ``DownloadError``.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    digests = {name: value.lower() for name, value in (("sha256", sha256), ("md5", md5)) if value}
    if dest.exists():
        return _check_existing(dest, url, digests=digests, size=size)
    dest.parent.mkdir(parents=True, exist_ok=True)
    resumed = part.exists() and part.stat().st_size > 0
    failures, last_error = 0, ""
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            if _attempt(url, part, size=size, progress=progress, timeout=timeout):
                problem = _check_part(part, size=size, digests=digests)
                if problem is None:
                    break
                part.unlink(missing_ok=True)
                _validator_path(part).unlink(missing_ok=True)
                if resumed:  # the earlier bytes may be stale: one clean attempt before giving up
                    log.warning("%s did not verify after resuming; downloading it again from the start", url)
                    resumed = False
                    continue
                expected, actual = problem
                raise ChecksumMismatchError(
                    f"downloaded file does not match its checksum: expected {expected}, got {actual} "
                    f"(url {url}); the partial file was deleted"
                )
        except _Retry as exc:
            last_error = str(exc)
            now = part.stat().st_size if part.exists() else 0
            resumed = resumed or now > 0
            if now > before:
                failures = 0  # progress was made: keep going
            failures += 1
            if failures > retries:
                raise DownloadError(
                    f"could not download {url} after {retries + 1} attempts: {last_error}. "
                    f"Check the network or proxy settings (HTTPS_PROXY, NO_PROXY); run again to resume "
                    f"from {part}"
                ) from None
            wait = min(BACKOFF_S * 2 ** (failures - 1), MAX_BACKOFF_S)
            log.warning("download of %s interrupted (%s); retrying in %.1f s", url, last_error, wait)
            time.sleep(wait)
    os.replace(part, dest)
    _validator_path(part).unlink(missing_ok=True)
    log.debug("downloaded %s → %s", url, dest)
    return dest


def _check_part(part: Path, *, size: int | None, digests: dict[str, str]) -> tuple[str, str] | None:
    """None when ``part`` matches its size and every expected ``{algorithm: hex}``; else (expected, actual)."""
    actual_size = part.stat().st_size
    if size is not None and actual_size != size:
        return f"{size} bytes", f"{actual_size} bytes"
    actual = file_digests(part, tuple(digests)) if digests else {}
    for name, want in digests.items():
        if actual[name] != want:
            return f"{name} {want}", f"{name} {actual[name]}"
    return None


def _check_existing(dest: Path, url: str, *, digests: dict[str, str], size: int | None) -> Path:
    problem = _check_part(dest, size=size, digests=digests)
    if problem is None:
        log.debug("%s already present; not downloading %s", dest, url)
        return dest
    expected, actual = problem
    raise ChecksumMismatchError(
        f"{dest} already exists and does not match {url}: expected {expected}, got {actual}; "
        f"it is left untouched: remove it to download again"
    )


# ------------------------------------------------------------------------------------------ extraction
def _unsafe(member: str, archive: Path, why: str) -> UnsafeArchiveError:
    return UnsafeArchiveError(f"refusing to extract {archive}: member {member!r} {why}")


def _member_path(name: str, archive: Path) -> PurePosixPath:
    """The normalised relative path of a member; raises if absolute or escaping."""
    clean = name.replace("\\", "/")
    if clean.startswith("/") or re.match(r"^[A-Za-z]:", clean):
        raise _unsafe(name, archive, "has an absolute path")
    normal = os.path.normpath(clean).replace("\\", "/")
    if normal == ".." or normal.startswith("../"):
        raise _unsafe(name, archive, "would be written outside the target folder")
    return PurePosixPath(normal)


def _check_tar(tar: tarfile.TarFile, archive: Path) -> None:
    links: set[PurePosixPath] = set()
    for member in tar.getmembers():
        path = _member_path(member.name, archive)
        if any(parent in links for parent in path.parents):
            raise _unsafe(member.name, archive, "lies under a link inside the archive")
        if member.issym() or member.islnk():
            target = member.linkname.replace("\\", "/")
            if target.startswith("/") or re.match(r"^[A-Za-z]:", target):
                raise _unsafe(member.name, archive, f"links to an absolute path {member.linkname!r}")
            base = path.parent if member.issym() else PurePosixPath(".")
            resolved = os.path.normpath(str(base / target)).replace("\\", "/")
            if resolved == ".." or resolved.startswith("../"):
                raise _unsafe(member.name, archive, f"links outside the target folder ({member.linkname!r})")
            links.add(path)
        elif not (member.isfile() or member.isdir()):
            raise _unsafe(member.name, archive, "is a device, fifo or other special file")


def _extract_into(archive: Path, folder: Path) -> None:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                _member_path(info.filename, archive)
            zf.extractall(folder)
        return
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise UsageError(f"{archive} is not a zip or tar(.gz/.bz2/.xz) archive ({exc})") from None
    with tar:
        _check_tar(tar, archive)
        try:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(folder, filter="data")  # second line of defence
            else:  # pragma: no cover - Python < 3.11.4
                tar.extractall(folder)
        except tarfile.FilterError as exc:
            raise UnsafeArchiveError(f"refusing to extract {archive}: {exc}") from None


def _plan_merge(source: Path, target: Path) -> list[tuple[Path, Path]]:
    """(from, to) moves that put ``source``'s files into ``target``; raises on a conflicting file."""
    moves: list[tuple[Path, Path]] = []
    for entry in sorted(source.iterdir()):
        dest = target / entry.name
        if not dest.exists() and not dest.is_symlink():
            moves.append((entry, dest))
        elif entry.is_dir() and not entry.is_symlink() and dest.is_dir():
            moves.extend(_plan_merge(entry, dest))
        elif entry.is_file() and dest.is_file() and filecmp.cmp(entry, dest, shallow=False):
            continue  # identical file already there (archives that share a README/licence)
        else:
            raise UsageError(f"extracting would overwrite {dest}, which differs; remove it first")
    return moves


def safe_extract(archive: Path, target: Path) -> Path:
    """Extract a zip or tar(.gz/.bz2/.xz) archive into ``target`` and return ``target``.

    Every member is checked first: an absolute path, a ``..`` escape, a symlink or hardlink pointing
    outside, a member under a link, or a device/fifo raises ``UnsafeArchiveError`` before anything is
    written. Extraction goes to a temporary folder beside ``target`` that is then renamed (or, when
    ``target`` already exists, merged into it file by file). Files already in ``target`` are never
    overwritten: an identical file is skipped, a different one raises ``UsageError``.
    """
    archive, target = Path(archive), Path(target)
    if not archive.is_file():
        raise UsageError(f"archive not found: {archive}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.extract-", dir=target.parent))
    try:
        _extract_into(archive, tmp)
        if not target.exists():
            os.replace(tmp, target)
            return target
        if not target.is_dir():
            raise UsageError(f"cannot extract into {target}: it exists and is not a folder")
        for src, dest in _plan_merge(tmp, target):
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dest)
        return target
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
