"""Fetch one file over HTTP(S) safely: ``download_file``, and the file digests it checks with.

``download_file`` writes to ``<dest>.part``, resumes it with a ``Range`` request after a dropped connection
(or in a later process), guarded by ``If-Range`` with the server's validator so a file that changed in
between is fetched whole rather than stitched from two versions, checks size and sha256 (or md5, where that
is all a publisher gives), then fsyncs it and renames it into place atomically, with the permissions the
user's umask gives (``digseg_cli.files``), so ``dest`` either does not exist or is complete. No library does
this resume-and-verify (``huggingface_hub`` only for Hub repos), hence the code. It uses urllib only, so
``HTTP(S)_PROXY``/``NO_PROXY`` apply as they do for any urllib client;
``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE``/``SSL_CERT_FILE`` pick the CA bundle.

Progress goes to an optional ``progress(done, total)`` callback; without one, a ``tqdm.auto`` bar (a
widget in a notebook, a bar on a terminal, nothing when stderr is not a terminal), as ``huggingface_hub``
shows for Hub downloads.

This module knows nothing of weights, datasets, registries or caches: callers choose URLs, destinations
and checksums; unpacking archives is ``archives.py``'s. It logs to ``logging.getLogger("digseg")``.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import re
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from digseg_cli._version import __version__
from digseg_cli.errors import ChecksumMismatchError, WeightsUnavailableError
from digseg_cli.files import atomic_write_text, fsync_file, fsync_folder, new_file_mode

log = logging.getLogger("digseg")

ProgressFn = Callable[[int, "int | None"], None]

CHUNK = 1 << 20  # bytes read per network read / hash update
BACKOFF_S = 1.0  # first wait between attempts; doubles each failed attempt (tests set it to 0)
MAX_BACKOFF_S = 16.0
_RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}


class DownloadError(WeightsUnavailableError):
    """A file could not be fetched (HTTP error, network down, retries used up)."""


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


def has_size(path: Path, size: int) -> bool:
    """Whether ``path`` is a file of ``size`` bytes: how a cached file is trusted on every run (sha256 on verify)."""
    return path.is_file() and path.stat().st_size == size


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


def _attempt(url: str, part: Path, *, size: int | None, progress: ProgressFn | None, timeout: float) -> bool:
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
                log.info(
                    "the server sent all of %s (it changed since the partial download, or the server does "
                    "not resume); downloading from the start",
                    url,
                )
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
        atomic_write_text(path, value + "\n")
    else:
        path.unlink(missing_ok=True)


def download_file(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    size: int | None = None,
    progress: ProgressFn | None = None,
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
    - Without ``progress``, a ``tqdm.auto`` bar shows the bytes (see the module docstring).
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    digests = {name: value.lower() for name, value in (("sha256", sha256), ("md5", md5)) if value}
    if dest.exists():
        return _check_existing(dest, url, digests=digests, size=size)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _progress_or_bar(progress, dest.name, size) as report:
        _fetch_part(url, part, size=size, digests=digests, progress=report, timeout=timeout, retries=retries)
    # files.py's rule for a finished file, kept here because the .part must survive a crash to be resumed
    fsync_file(part)
    os.chmod(part, new_file_mode())  # a .part resumed from a run under another umask
    os.replace(part, dest)
    fsync_folder(dest.parent)
    _validator_path(part).unlink(missing_ok=True)
    log.debug("downloaded %s → %s", url, dest)
    return dest


@contextlib.contextmanager
def _progress_or_bar(progress: ProgressFn | None, label: str, size: int | None) -> Iterator[ProgressFn]:
    """``progress`` itself, or (when None) the callback of a ``tqdm.auto`` byte bar that is closed afterwards.

    ``disable=None`` is tqdm's "only on a terminal": logs and CI output stay free of bar lines, while a
    notebook (tqdm.auto's widget) always shows it.
    """
    if progress is not None:
        yield progress
        return
    from tqdm.auto import tqdm

    with tqdm(total=size, desc=label, unit="B", unit_scale=True, disable=None) as bar:

        def report(done: int, total: int | None) -> None:
            bar.total = total
            bar.update(done - bar.n)  # done counts from 0 again when a server sends the whole file anew

        yield report


def _fetch_part(
    url: str,
    part: Path,
    *,
    size: int | None,
    digests: dict[str, str],
    progress: ProgressFn,
    timeout: float,
    retries: int,
) -> None:
    """Attempt, resume and retry until ``part`` holds the verified file (``download_file``'s rules)."""
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
