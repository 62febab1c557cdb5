"""Unpack a zip or tar(.gz/.bz2/.xz) archive into a folder, safely: ``safe_extract``.

Every member is checked before anything is written: an absolute path, a ``..`` escape, a symlink or hardlink
pointing outside, a member under a link, a device or fifo, or an archive that unpacks to more than the free
disk space raises ``UnsafeArchiveError``; a member or archive over the size and compression limits below (a
decompression bomb, or a damaged header) raises ``ArchiveBombError`` (exit 5). Tar members are then written
through the standard library's ``data`` extraction filter (PEP 706) as a second line of defence (it also drops
setuid bits and odd permissions); ``zipfile`` sanitises zip names itself. The filter exists from Python
3.10.12, 3.11.4 and 3.12 on; on an older patch release a tar archive is refused with a one-line error that
says to upgrade Python, rather than unpacked without it (zip archives work on every supported Python).

It knows nothing of downloads, datasets or weights (``download.py``, ``data/benchmarks``); it never prints
and raises ``UnsafeArchiveError`` (``ArchiveBombError``) or ``UsageError``, one line each.
"""

from __future__ import annotations

import filecmp
import os
import platform
import re
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from digseg_cli.errors import EXIT_WEIGHTS, DigsegError, UsageError
from digseg_cli.files import new_folder_mode


class UnsafeArchiveError(DigsegError):
    """An archive member would be written outside the extraction folder (or is a device/fifo), or the archive
    unpacks to more than the disk can hold."""


class ArchiveBombError(UnsafeArchiveError):
    """An archive declares absurd sizes or compresses absurdly well: a decompression bomb or a damaged file."""

    exit_code = EXIT_WEIGHTS


# Limits real archives stay far under: the largest file of an fp32 Stable Diffusion checkpoint is about
# 3.5 GiB (a whole one-file checkpoint about 5 GiB) and the largest benchmark archive digseg fetches is 7.6 GB.
MAX_MEMBER_BYTES = 64 << 30  # one member's unpacked size
MAX_TOTAL_BYTES = 512 << 30  # all members together
# Unpacked / packed bytes: weights and PNG/JPEG masks ~1, JSON and text ~3-10; deflate cannot pass ~1032,
# so a member (zip) or archive (tar) above this is zeros made to fill a disk, or a header that lies.
MAX_RATIO = 200
RATIO_FLOOR = 64 << 20  # the ratio is judged only above this many unpacked bytes: a small file of zeros is fine


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


def _check_tar(tar: tarfile.TarFile, archive: Path) -> int:
    """Refuse escaping names, outside links, members under a link, special files and absurd sizes; return the
    bytes of data."""
    links: set[PurePosixPath] = set()
    total = 0
    for member in _members(tar, archive):
        _check_member(archive, member.name, member.size if member.isfile() else 0, None)
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
        total += member.size if member.isfile() else 0
    return _check_total(archive, total)


def _members(tar: tarfile.TarFile, archive: Path):
    """The members one by one, so a header that lies is judged before tarfile seeks past it."""
    try:
        yield from tar
    except tarfile.TarError as exc:
        raise UnsafeArchiveError(f"refusing to extract {archive}: it is damaged or cut off ({exc})") from None


def _check_member(archive: Path, name: str, size: int, packed: int | None) -> None:
    """Refuse a member over the limits above; ``packed`` is None where the format has no per-member size (tar)."""
    if size > MAX_MEMBER_BYTES:
        raise ArchiveBombError(
            f"refusing to extract {archive}: member {name!r} declares {size} bytes, over the limit of "
            f"{MAX_MEMBER_BYTES} for one file (a damaged or hostile archive)"
        )
    if packed is not None and size > RATIO_FLOOR and size > MAX_RATIO * max(packed, 1):
        raise ArchiveBombError(
            f"refusing to extract {archive}: member {name!r} unpacks {packed} bytes to {size}, a ratio over "
            f"{MAX_RATIO}:1 that only a decompression bomb or a damaged header has"
        )


def _check_total(archive: Path, total: int) -> int:
    """Refuse an archive whose members add up to more than the limits above; return ``total``."""
    packed = archive.stat().st_size
    if total > MAX_TOTAL_BYTES or total > RATIO_FLOOR and total > MAX_RATIO * max(packed, 1):
        raise ArchiveBombError(
            f"refusing to extract {archive}: its {packed} bytes unpack to {total}, over the limit of "
            f"{MAX_TOTAL_BYTES} bytes or a ratio of {MAX_RATIO}:1 (a decompression bomb or a damaged archive)"
        )
    return total


def _check_space(archive: Path, unpacked: int, folder: Path) -> None:
    """Refuse an archive that unpacks to more than ``folder``'s disk has free (a bomb, or simply too big)."""
    free = shutil.disk_usage(folder).free
    if unpacked > free:
        raise UnsafeArchiveError(
            f"refusing to extract {archive}: it unpacks to {unpacked} bytes and only {free} bytes are free in {folder}"
        )


def _extract_zip(archive: Path, folder: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:
            _member_path(info.filename, archive)
            _check_member(archive, info.filename, info.file_size, info.compress_size)
        _check_space(archive, _check_total(archive, sum(info.file_size for info in infos)), folder)
        zf.extractall(folder)


def _extract_tar(archive: Path, folder: Path) -> None:
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise UsageError(f"{archive} is not a zip or tar(.gz/.bz2/.xz) archive ({exc})") from None
    with tar:
        _check_space(archive, _check_tar(tar, archive), folder)
        if not hasattr(tarfile, "data_filter"):  # Python < 3.10.12 / 3.11.4: no PEP 706 filter
            raise UsageError(
                f"extracting {archive.name} needs Python 3.10.12+, 3.11.4+ or 3.12+ (tarfile's 'data' "
                f"filter); this is Python {platform.python_version()}: upgrade Python"
            )
        try:
            tar.extractall(folder, filter="data")
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

    Every member is checked first (see the module docstring): ``UnsafeArchiveError`` before anything is
    written. Extraction goes to a temporary folder beside ``target`` that is then renamed (or, when
    ``target`` already exists, merged into it file by file). Files already in ``target`` are never
    overwritten: an identical file is skipped, a different one raises ``UsageError``.
    """
    archive, target = Path(archive), Path(target)
    if not archive.is_file():
        raise UsageError(f"archive not found: {archive}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.extract-", dir=target.parent))
    os.chmod(tmp, new_folder_mode())  # it becomes ``target``: the user's umask, not mkdtemp's 0o700
    try:
        (_extract_zip if zipfile.is_zipfile(archive) else _extract_tar)(archive, tmp)
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
