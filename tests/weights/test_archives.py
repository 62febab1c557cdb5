"""safe_extract refuses decompression bombs and lying headers (exit 5) before it writes a byte."""

from __future__ import annotations

import os
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from digseg_cli.errors import EXIT_WEIGHTS
from digseg_cli.files import new_folder_mode
from digseg_cli.weights import archives
from digseg_cli.weights.archives import ArchiveBombError, safe_extract

try:
    from test_download import _tar, _zip
except ImportError:  # pragma: no cover - tests run as a package
    from tests.weights.test_download import _tar, _zip

KIB = 1 << 10


def _zip_claiming(path: Path, size: int) -> Path:
    """A zip whose central directory says its 5-byte member unpacks to `size` bytes."""
    _zip(path, {"weights.safetensors": b"small"})
    data = bytearray(path.read_bytes())
    at = data.index(b"PK\x01\x02")
    data[at + 24 : at + 28] = struct.pack("<I", size)  # the central directory's uncompressed size
    path.write_bytes(bytes(data))
    return path


def _tar_claiming(path: Path, size: int) -> Path:
    """A tar whose one header declares `size` bytes that are not there (GNU base-256 size field)."""
    info = tarfile.TarInfo("unet.safetensors")
    info.size = size
    path.write_bytes(info.tobuf(format=tarfile.GNU_FORMAT) + b"\0" * 1024)
    return path


def _deflated(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@pytest.fixture()
def small_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same rules at sizes a test can build: 1 MiB per member, 2 MiB in all, ratio 20:1 over 64 KiB."""
    monkeypatch.setattr(archives, "MAX_MEMBER_BYTES", 1024 * KIB)
    monkeypatch.setattr(archives, "MAX_TOTAL_BYTES", 2048 * KIB)
    monkeypatch.setattr(archives, "MAX_RATIO", 20)
    monkeypatch.setattr(archives, "RATIO_FLOOR", 64 * KIB)


BOMBS = [
    # (archive, limits, message fragment)
    (lambda p: _zip_claiming(p / "a.zip", 0xFFFF_FFF0), "default", "a ratio over 200:1"),
    (lambda p: _tar_claiming(p / "a.tar", 100 << 30), "default", "declares 107374182400 bytes, over the limit"),
    (lambda p: _deflated(p / "a.zip", {"zeros.bin": bytes(512 * KIB)}), "small", "a ratio over 20:1"),
    (lambda p: _tar(p / "a.tar.gz", [("zeros.bin", bytes(512 * KIB), None)]), "small", "or a ratio of 20:1"),
    (lambda p: _zip(p / "a.zip", {"big.bin": os.urandom(1100 * KIB)}), "small", "'big.bin' declares 1126400"),
    (
        lambda p: _zip(p / "a.zip", {f"{i}.bin": os.urandom(900 * KIB) for i in range(3)}),
        "small",
        "over the limit of 2097152 bytes",
    ),
]


@pytest.mark.parametrize(("make", "limits", "fragment"), BOMBS)
def test_bombs_are_refused_before_anything_is_written(tmp_path: Path, request, make, limits, fragment) -> None:
    if limits == "small":
        request.getfixturevalue("small_limits")
    archive = make(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ArchiveBombError) as info:
        safe_extract(archive, out / "data")
    assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert info.value.exit_code == EXIT_WEIGHTS
    assert list(out.iterdir()) == []  # not the target, not a temporary folder


def test_ordinary_archives_pass_the_limits(tmp_path: Path, small_limits) -> None:
    random = os.urandom(600 * KIB)  # does not compress: ratio ~1
    zeros = bytes(32 * KIB)  # compresses 1000:1, but is below the floor where the ratio is judged
    out = safe_extract(_deflated(tmp_path / "a.zip", {"w.bin": random, "z.bin": zeros}), tmp_path / "out")
    assert (out / "w.bin").read_bytes() == random and (out / "z.bin").read_bytes() == zeros
    assert (out.stat().st_mode & 0o777) == new_folder_mode()  # the umask's, not mkdtemp's 0o700
    tar = _tar(tmp_path / "b.tar.gz", [("w.bin", random, None)])
    assert (safe_extract(tar, tmp_path / "t") / "w.bin").read_bytes() == random


def test_a_stable_diffusion_sized_archive_is_within_the_limits(tmp_path: Path) -> None:
    """Declared sizes of an fp32 SD checkpoint's files (about 5 GiB), as a zip stores them (deflate ~1.1:1)."""
    archive = _zip(tmp_path / "sd.zip", {"x": b"x"})
    files = [("unet.safetensors", 3_460_000_000, 3_200_000_000), ("sd.ckpt", 5_200_000_000, 4_800_000_000)]
    for name, size, packed in files:
        archives._check_member(archive, name, size, packed)
    with pytest.MonkeyPatch.context() as mp:  # the archive's own size: what those members would weigh packed
        mp.setattr(Path, "stat", lambda self, **kw: os.stat_result((0o100644, 0, 0, 1, 0, 0, 8 << 30, 0, 0, 0)))
        assert archives._check_total(archive, sum(size for _, size, _ in files)) == 8_660_000_000


def test_a_cut_off_tar_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    whole = _tar(tmp_path / "a.tar", [("a.bin", os.urandom(4 * KIB), None), ("b.bin", b"b", None)], mode="w")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[: 512 + 2 * KIB])  # the first member's header and half its data
    with pytest.raises(archives.UnsafeArchiveError, match="is damaged or cut off") as info:
        safe_extract(cut, tmp_path / "out")
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()
