"""``digseg eval --download`` against a local 127.0.0.1 server: fetch, verify, extract, then check the layout;
an archive with a member escaping the target is refused before anything is written."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import zipfile

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from digseg_cli import datasets as D
from digseg_cli.cli.app import app
from digseg_cli.datasets.base import DownloadItem
from digseg_cli.download import UnsafeArchiveError
from digseg_cli.errors import ChecksumMismatchError

try:
    from test_download import LocalServer, guard_network
except ImportError:  # run from the repository root as a package
    from tests.test_download import LocalServer, guard_network


def _png_bytes(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def ade_zip() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in (1, 2):
            stem = f"ADE_val_{i:08d}"
            zf.writestr(f"ADEChallengeData2016/images/validation/{stem}.jpg",
                        _png_bytes(rng.integers(0, 255, (8, 8, 3), np.uint8), "JPEG"))
            zf.writestr(f"ADEChallengeData2016/annotations/validation/{stem}.png",
                        _png_bytes(rng.integers(0, 151, (8, 8)).astype(np.uint8)))
    return buf.getvalue()


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    guard_network(monkeypatch)


def _serve_as_ade(monkeypatch, srv, name: str, body: bytes, sha: str | None) -> None:
    item = DownloadItem(f"{srv.url}/{name}", name, sha256=sha, size=len(body))
    monkeypatch.setitem(D.DATASETS, "ade20k", dataclasses.replace(D.DATASETS["ade20k"], download=(item,)))


def test_download_then_check_through_the_cli(tmp_path, monkeypatch):
    body = ade_zip()
    with LocalServer({"/ADEChallengeData2016.zip": body}) as srv:
        _serve_as_ade(monkeypatch, srv, "ADEChallengeData2016.zip", body, hashlib.sha256(body).hexdigest())
        res = CliRunner().invoke(app, ["eval", "-d", "ade20k", "--data-root", str(tmp_path), "--download", "--check",
                                       "--json"])
        assert res.exit_code == 0, res.output
        assert '"images": 2' in res.stdout and '"ok": true' in res.stdout
        # a second --download is a no-op: the archive is verified, not fetched or extracted again
        n = len(srv.requests)
        assert D.download_dataset(D.DATASETS["ade20k"], data_root=tmp_path) == tmp_path / "ade20k"
        assert len(srv.requests) == n
    assert len(D.open_dataset(D.DATASETS["ade20k"], data_root=tmp_path)) == 2


def test_wrong_checksum_is_refused(tmp_path, monkeypatch):
    body = ade_zip()
    with LocalServer({"/a.zip": body}) as srv:
        _serve_as_ade(monkeypatch, srv, "a.zip", body, "0" * 64)
        with pytest.raises(ChecksumMismatchError):
            D.download_dataset(D.DATASETS["ade20k"], data_root=tmp_path)
    assert not (tmp_path / "ade20k/ADEChallengeData2016").exists()


def test_escaping_member_is_refused(tmp_path, monkeypatch):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ADEChallengeData2016/images/validation/ok.jpg", b"x")
        zf.writestr("../../escaped.txt", b"gotcha")
    body = buf.getvalue()
    root = tmp_path / "data"
    with LocalServer({"/evil.zip": body}) as srv:
        _serve_as_ade(monkeypatch, srv, "evil.zip", body, None)
        with pytest.raises(UnsafeArchiveError):
            D.download_dataset(D.DATASETS["ade20k"], data_root=root)
        res = CliRunner().invoke(app, ["eval", "-d", "ade20k", "--data-root", str(root), "--download"])
        assert res.exit_code != 0 and "escaped.txt" in res.stderr
    assert not (tmp_path / "escaped.txt").exists() and not (root / "escaped.txt").exists()
    assert not (root / "ade20k/ADEChallengeData2016").exists()
