"""``digseg eval --download`` against a local 127.0.0.1 server: fetch, verify (sha256 or md5), extract, convert
(PASCAL-Context), then check the layout; an archive with a member escaping the target is refused before anything
is written."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from digseg_cli.cli.app import app
from digseg_cli.data.benchmarks import catalog as D
from digseg_cli.data.benchmarks.base import DownloadItem
from digseg_cli.errors import ChecksumMismatchError, DatasetError
from digseg_cli.weights.archives import UnsafeArchiveError

try:
    from test_download import LocalServer, guard_network
except ImportError:  # run from the repository root as a package
    from tests.weights.test_download import LocalServer, guard_network


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
            zf.writestr(
                f"ADEChallengeData2016/images/validation/{stem}.jpg",
                _png_bytes(rng.integers(0, 255, (8, 8, 3), np.uint8), "JPEG"),
            )
            zf.writestr(
                f"ADEChallengeData2016/annotations/validation/{stem}.png",
                _png_bytes(rng.integers(0, 151, (8, 8)).astype(np.uint8)),
            )
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
        res = CliRunner().invoke(
            app, ["eval", "-d", "ade20k", "--data-root", str(tmp_path), "--download", "--check", "--json"]
        )
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


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_pinned_checksums_are_well_formed():
    hexdigits = set("0123456789abcdef")
    for name in ("ade20k", "pascal-context-59", "coco-stuff", "phenobench"):
        items = D.DATASETS[name].download
        assert items, name
        for item in items:
            assert item.sha256 is None or (len(item.sha256) == 64 and set(item.sha256) <= hexdigits), item
            assert item.md5 is None or (len(item.md5) == 32 and set(item.md5) <= hexdigits), item
    assert D.DATASETS["ade20k"].download[0].sha256 and D.DATASETS["phenobench"].download[0].md5


def test_phenobench_download_verifies_md5_then_checks_the_layout(tmp_path, monkeypatch):
    mask = np.array([[0, 1], [3, 4]], np.uint16)
    body = _zip(
        {
            "PhenoBench/val/images/05-15_00028_P0030852.png": _png_bytes(np.zeros((2, 2, 3), np.uint8)),
            "PhenoBench/val/semantics/05-15_00028_P0030852.png": _png_bytes(mask),
        }
    )
    real = D.DATASETS["phenobench"].download[0]
    with LocalServer({"/PhenoBench-v110.zip": body, "/flat.zip": _zip({"README.md": b"x"})}) as srv:
        item = dataclasses.replace(
            real, url=f"{srv.url}/PhenoBench-v110.zip", size=len(body), sha256=None, md5=hashlib.md5(body).hexdigest()
        )
        monkeypatch.setitem(D.DATASETS, "phenobench", dataclasses.replace(D.DATASETS["phenobench"], download=(item,)))
        res = CliRunner().invoke(
            app, ["eval", "-d", "phenobench", "--data-root", str(tmp_path), "--download", "--check", "--json"]
        )
        assert res.exit_code == 0, res.output
        assert '"ok": true' in res.stdout
        assert D.open_dataset(D.DATASETS["phenobench"], data_root=tmp_path)[0].label.tolist() == [[0, 1], [1, 2]]
        flat = dataclasses.replace(item, url=f"{srv.url}/flat.zip", filename="flat.zip", size=None, md5=None)
        monkeypatch.setitem(D.DATASETS, "phenobench", dataclasses.replace(D.DATASETS["phenobench"], download=(flat,)))
        with pytest.raises(DatasetError, match="do not have the expected layout"):
            D.download_dataset(D.DATASETS["phenobench"], data_root=tmp_path / "other")
        bad = dataclasses.replace(item, md5="0" * 32)
        monkeypatch.setitem(D.DATASETS, "phenobench", dataclasses.replace(D.DATASETS["phenobench"], download=(bad,)))
        with pytest.raises(ChecksumMismatchError, match="md5"):
            D.download_dataset(D.DATASETS["phenobench"], data_root=tmp_path / "third")


def test_pascal_context_download_then_converts_the_official_labels(tmp_path, monkeypatch):
    sio = pytest.importorskip("scipy.io")
    mat = io.BytesIO()
    sio.savemat(mat, {"LabelMap": np.array([[2, 459], [1, 0]], np.uint16)}, do_compression=True)
    voc_tar, labels_tar = io.BytesIO(), io.BytesIO()
    with tarfile.open(fileobj=voc_tar, mode="w") as tar:
        _add(tar, "VOCdevkit/VOC2010/JPEGImages/2008_000002.jpg", _png_bytes(np.zeros((2, 2, 3), np.uint8), "JPEG"))
        _add(tar, "VOCdevkit/VOC2010/ImageSets/Main/val.txt", b"2008_000002\n")
    with tarfile.open(fileobj=labels_tar, mode="w:gz") as tar:
        _add(tar, "trainval/2008_000002.mat", mat.getvalue())
        _add(tar, "labels.txt", b"1: accordion\n2: aeroplane\n")
    files = {"/voc.tar": voc_tar.getvalue(), "/trainval.tar.gz": labels_tar.getvalue()}
    with LocalServer(files) as srv:
        voc_item, labels_item = D.DATASETS["pascal-context-59"].download  # the real items, served locally
        items = tuple(
            dataclasses.replace(item, url=srv.url + path, md5=None, sha256=hashlib.sha256(files[path]).hexdigest())
            for item, path in ((voc_item, "/voc.tar"), (labels_item, "/trainval.tar.gz"))
        )
        for name in ("pascal-context-59", "pascal-context-459"):
            monkeypatch.setitem(D.DATASETS, name, dataclasses.replace(D.DATASETS[name], download=items))
        D.download_dataset(D.DATASETS["pascal-context-59"], data_root=tmp_path)
    conv = tmp_path / "pascal-context/VOCdevkit/VOC2010/annotations_detectron2"
    assert (conv / "pc59_val/2008_000002.png").is_file() and (conv / "pc459_val/2008_000002.tif").is_file()
    pc59 = D.open_dataset(D.DATASETS["pascal-context-59"], data_root=tmp_path)[0].label
    pc459 = D.open_dataset(D.DATASETS["pascal-context-459"], data_root=tmp_path)[0].label
    assert pc59.tolist() == [[0, 255], [255, 255]] and pc459.tolist() == [[1, 458], [0, 65535]]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
