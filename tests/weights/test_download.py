"""download_file against a real HTTP server on 127.0.0.1 (Range, drops, wrong bytes), and safe_extract.

``LocalServer`` and ``guard_network`` are imported by test_weights.py and test_cli_weights.py too.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import shutil
import socket
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from digseg_cli.errors import ChecksumMismatchError, UsageError
from digseg_cli.weights import download
from digseg_cli.weights.archives import UnsafeArchiveError, safe_extract
from digseg_cli.weights.download import DownloadError, download_file, sha256_file


class LocalServer:
    """A threaded HTTP server on a free 127.0.0.1 port serving ``files`` (path → bytes), with Range support.

    Misbehaviours, per path: ``drop`` (the first N GETs send half the body, then close the connection),
    ``wrong`` (serve these bytes instead), ``status`` (answer this HTTP status). ``etags`` gives a path an
    ETag, honoured in ``If-Range``; ``replace_after_drop`` (path → (bytes, etag)) publishes a new version
    of the file once a dropped response has been sent. ``ignore_range`` makes it answer 200 with the whole
    file to a Range request. ``headers`` (path → {name: value}) adds response headers; HEAD answers as GET
    without the body, and a query string is ignored when looking a path up (enough to play the Hugging Face
    Hub, see ``test_weights.hub_files``). At most ``max_requests`` are served; the rest get
    500, so a looping client cannot hang a test. ``requests`` records (path, Range header) of each request.
    """

    def __init__(self, files: dict[str, bytes], *, max_requests: int = 50) -> None:
        self.files = dict(files)
        self.drop: dict[str, int] = {}
        self.wrong: dict[str, bytes] = {}
        self.status: dict[str, int] = {}
        self.etags: dict[str, str] = {}
        self.replace_after_drop: dict[str, tuple[bytes, str]] = {}
        self.headers: dict[str, dict[str, str]] = {}
        self.ignore_range = False
        self.max_requests = max_requests
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            head = False  # answering a HEAD request: headers only

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:  # noqa: N802
                self.do_GET(head=True)

            def do_GET(self, head: bool = False) -> None:  # noqa: N802
                server.requests.append((self.path, self.headers.get("Range")))
                self.head, path = head, self.path.split("?")[0]
                if len(server.requests) > server.max_requests:
                    return self._send(500, b"too many requests")
                if path in server.status:
                    return self._send(server.status[path], b"nope")
                if path not in server.files:
                    return self._send(404, b"not found")
                body = server.wrong.get(path, server.files[path])
                etag = server.etags.get(path)
                start = 0
                rng = self.headers.get("Range")
                if_range = self.headers.get("If-Range")
                if if_range is not None and if_range != etag:
                    rng = None  # RFC 9110: a validator that no longer matches gets the whole new file
                if rng and not server.ignore_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        return self._send(416, b"", {"Content-Range": f"bytes */{len(body)}"})
                if server.drop.get(path, 0) > 0:
                    server.drop[path] -= 1
                    self.send_response(206 if start else 200)
                    if etag:
                        self.send_header("ETag", etag)
                    self.send_header("Content-Length", str(len(body) - start))
                    if start:
                        self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                    self.end_headers()
                    self.wfile.write(body[start : start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    if path in server.replace_after_drop:
                        server.files[path], server.etags[path] = server.replace_after_drop.pop(path)
                    return None
                extra = {**server.headers.get(path, {}), **({"ETag": etag} if etag else {})}
                if start:
                    extra["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
                    return self._send(206, body[start:], extra)
                return self._send(200, body, extra)

            def _send(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not self.head:
                    self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> LocalServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def ranges(self, path: str) -> list[str | None]:
        return [r for p, r in self.requests if p == path]


def guard_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any connection to a host other than 127.0.0.1, and keep proxies away from the local server."""
    real_connect = socket.socket.connect

    def connect(sock: socket.socket, address: object) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"test tried to reach the network: {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(download, "BACKOFF_S", 0.0)


PAYLOAD = bytes(range(256)) * 4096  # 1 MiB, not a multiple of the read size once halved
SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    guard_network(monkeypatch)


@pytest.fixture()
def server():
    with LocalServer({"/model.bin": PAYLOAD}) as srv:
        yield srv


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*"))


def test_download_with_sha256_and_progress(server: LocalServer, tmp_path: Path) -> None:
    seen: list[tuple[int, int | None]] = []
    dest = download_file(
        f"{server.url}/model.bin",
        tmp_path / "sub" / "model.bin",
        sha256=SHA,
        size=len(PAYLOAD),
        progress=lambda d, t: seen.append((d, t)),
    )
    assert dest.read_bytes() == PAYLOAD and sha256_file(dest) == SHA
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert _leftovers(tmp_path) == ["model.bin", "sub"]


class _RecordingBar:
    """Stands in for ``tqdm.auto.tqdm``: a real tqdm bar, forced on and written to a buffer, that is kept."""

    bars: list = []

    def __new__(cls, *args, **kwargs):
        from tqdm.std import tqdm

        bar = tqdm(*args, **{**kwargs, "disable": False, "file": io.StringIO()})
        cls.bars.append((bar, kwargs))
        return bar


def test_no_callback_means_a_tqdm_bar_that_ends_full(server: LocalServer, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("tqdm.auto.tqdm", _RecordingBar)
    monkeypatch.setattr(_RecordingBar, "bars", [])
    server.drop["/model.bin"] = 1  # a resumed download still ends at the file's size, not beyond
    download_file(f"{server.url}/model.bin", tmp_path / "model.bin", sha256=SHA, size=len(PAYLOAD))
    ((bar, kwargs),) = _RecordingBar.bars
    assert kwargs["desc"] == "model.bin" and kwargs["unit"] == "B" and kwargs["disable"] is None  # off off a tty
    assert bar.n == bar.total == len(PAYLOAD) and bar.disable is True  # closed after the download
    download_file(f"{server.url}/model.bin", tmp_path / "other.bin", progress=lambda d, t: None)
    assert len(_RecordingBar.bars) == 1  # a caller's callback replaces the bar


def test_no_callback_off_a_terminal_writes_nothing(server: LocalServer, tmp_path: Path, capfd) -> None:
    download_file(f"{server.url}/model.bin", tmp_path / "model.bin", sha256=SHA)
    assert capfd.readouterr().err == ""  # tqdm's disable=None: no bar lines in logs or CI output


def test_dropped_connection_resumes_with_range(server: LocalServer, tmp_path: Path) -> None:
    server.drop["/model.bin"] = 2  # the first two responses stop halfway
    dest = download_file(f"{server.url}/model.bin", tmp_path / "model.bin", sha256=SHA, retries=1)
    assert dest.read_bytes() == PAYLOAD
    ranges = server.ranges("/model.bin")
    assert ranges[0] is None and len(ranges) == 3
    assert ranges[1] == f"bytes={len(PAYLOAD) // 2}-"  # resumed where the first response stopped
    assert not (tmp_path / "model.bin.part").exists()


def test_a_file_that_changes_on_the_server_mid_download_is_fetched_whole(server: LocalServer, tmp_path: Path) -> None:
    """With no checksum to catch it, a resume must not glue the first half of one version to the second
    half of another: If-Range carries the ETag the first response gave, and the changed file comes whole."""
    new = PAYLOAD[::-1]  # same length: only the content tells the versions apart
    server.etags["/model.bin"] = '"v1"'
    server.drop["/model.bin"] = 1
    server.replace_after_drop["/model.bin"] = (new, '"v2"')
    dest = download_file(f"{server.url}/model.bin", tmp_path / "model.bin", retries=1)
    assert dest.read_bytes() == new
    assert server.ranges("/model.bin") == [None, f"bytes={len(PAYLOAD) // 2}-"]  # asked to resume, got it all
    assert _leftovers(tmp_path) == ["model.bin"]


def test_existing_part_is_resumed(server: LocalServer, tmp_path: Path) -> None:
    (tmp_path / "model.bin.part").write_bytes(PAYLOAD[:1000])
    download_file(f"{server.url}/model.bin", tmp_path / "model.bin", sha256=SHA)
    assert server.ranges("/model.bin") == ["bytes=1000-"]
    assert (tmp_path / "model.bin").read_bytes() == PAYLOAD


def test_server_ignoring_range_restarts_from_zero(server: LocalServer, tmp_path: Path) -> None:
    server.ignore_range = True
    (tmp_path / "model.bin.part").write_bytes(b"x" * 1000)  # stale bytes that must not survive
    download_file(f"{server.url}/model.bin", tmp_path / "model.bin", sha256=SHA)
    assert (tmp_path / "model.bin").read_bytes() == PAYLOAD


def test_416_on_complete_part(server: LocalServer, tmp_path: Path) -> None:
    (tmp_path / "model.bin.part").write_bytes(PAYLOAD)
    download_file(f"{server.url}/model.bin", tmp_path / "model.bin", sha256=SHA)  # size unknown: asks, gets 416
    assert server.ranges("/model.bin") == [f"bytes={len(PAYLOAD)}-"]
    assert (tmp_path / "model.bin").read_bytes() == PAYLOAD


def test_sha256_mismatch_leaves_nothing(server: LocalServer, tmp_path: Path) -> None:
    server.wrong["/model.bin"] = PAYLOAD[::-1]
    with pytest.raises(ChecksumMismatchError) as info:
        download_file(f"{server.url}/model.bin", tmp_path / "model.bin", sha256=SHA)
    message = str(info.value)
    assert SHA in message and hashlib.sha256(PAYLOAD[::-1]).hexdigest() in message and server.url in message
    assert _leftovers(tmp_path) == []


def test_md5_only_and_with_sha256(server: LocalServer, tmp_path: Path) -> None:
    md5 = hashlib.md5(PAYLOAD).hexdigest()
    dest = download_file(f"{server.url}/model.bin", tmp_path / "model.bin", md5=md5.upper())
    assert dest.read_bytes() == PAYLOAD
    assert download_file(f"{server.url}/model.bin", dest, md5=md5, sha256=SHA) == dest  # present and verified
    with pytest.raises(ChecksumMismatchError, match=f"md5 {'0' * 32}"):
        download_file(f"{server.url}/model.bin", dest, sha256=SHA, md5="0" * 32)  # both are checked
    server.wrong["/model.bin"] = PAYLOAD[::-1]
    with pytest.raises(ChecksumMismatchError, match=hashlib.md5(PAYLOAD[::-1]).hexdigest()):
        download_file(f"{server.url}/model.bin", tmp_path / "other.bin", md5=md5)
    assert _leftovers(tmp_path) == ["model.bin"]


def test_http_errors(server: LocalServer, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="404"):
        download_file(f"{server.url}/missing.bin", tmp_path / "m.bin")
    assert len(server.requests) == 1  # a 404 is not retried
    server.status["/model.bin"] = 503
    with pytest.raises(DownloadError, match="after 3 attempts"):
        download_file(f"{server.url}/model.bin", tmp_path / "model.bin", retries=2)
    assert len(server.ranges("/model.bin")) == 3 and _leftovers(tmp_path) == []


def test_existing_dest_is_never_overwritten(server: LocalServer, tmp_path: Path) -> None:
    dest = tmp_path / "model.bin"
    dest.write_bytes(b"my own fine-tuned file")
    with pytest.raises(ChecksumMismatchError, match="left untouched"):
        download_file(f"{server.url}/model.bin", dest, sha256=SHA)
    assert dest.read_bytes() == b"my own fine-tuned file" and server.requests == []


# ------------------------------------------------------------------------------------------ safe_extract
def _tar(path: Path, members: list[tuple[str, bytes | None, str | None]], mode: str = "w:gz") -> Path:
    """members: (name, data, symlink target)."""
    with tarfile.open(path, mode) as tar:
        for name, data, link in members:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            else:
                info.size = len(data or b"")
                tar.addfile(info, io.BytesIO(data or b""))
    return path


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return path


@pytest.mark.parametrize(
    "members",
    [
        [("ok.txt", b"ok", None), ("../escape", b"bad", None)],
        [("/tmp/digseg-abs-escape", b"bad", None)],
        [("a/../../escape", b"bad", None)],
        [("link", None, "../../etc"), ("link/passwd", b"bad", None)],
        [("abs-link", None, "/etc/passwd")],
    ],
    ids=["dotdot", "absolute", "normalised-dotdot", "symlink-out", "symlink-absolute"],
)
def test_safe_extract_refuses_bad_tar(tmp_path: Path, members: list) -> None:
    archive = _tar(tmp_path / "bad.tar.gz", members)
    with pytest.raises(UnsafeArchiveError):
        safe_extract(archive, tmp_path / "out" / "data")
    assert _leftovers(tmp_path / "out") == []  # nothing written, temp folder gone
    assert not (tmp_path / "escape").exists() and not Path("/tmp/digseg-abs-escape").exists()


@pytest.mark.parametrize("name", ["../escape", "/abs/escape", "..\\escape"])
def test_safe_extract_refuses_bad_zip(tmp_path: Path, name: str) -> None:
    archive = _zip(tmp_path / "bad.zip", {"fine.txt": b"ok", name: b"bad"})
    with pytest.raises(UnsafeArchiveError):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "escape").exists()


def test_safe_extract_uses_the_data_filter(tmp_path: Path) -> None:
    archive = tmp_path / "modes.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("run.sh")
        info.size, info.mode = 2, 0o6777  # setuid, setgid, world-writable
        tar.addfile(info, io.BytesIO(b"hi"))
    out = safe_extract(archive, tmp_path / "out")
    assert (out / "run.sh").stat().st_mode & 0o7777 == 0o755  # PEP 706's data filter cleared them


def test_safe_extract_without_the_data_filter_refuses_tar(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delattr(tarfile, "data_filter")  # as on Python < 3.10.12 / 3.11.4
    archive = _tar(tmp_path / "a.tar.gz", [("ok.txt", b"ok", None)])
    with pytest.raises(UsageError, match="upgrade Python"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == ["a.tar.gz"]
    assert (safe_extract(_zip(tmp_path / "a.zip", {"ok.txt": b"ok"}), tmp_path / "z") / "ok.txt").is_file()


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_safe_extract_refuses_more_than_the_free_space(tmp_path: Path, monkeypatch, kind: str) -> None:
    from digseg_cli.weights import archives

    free = {"bytes": 99}
    monkeypatch.setattr(archives.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 0, free["bytes"]))
    archive = (
        _zip(tmp_path / "a.zip", {"big.bin": b"x" * 100})
        if kind == "zip"
        else _tar(tmp_path / "a.tar", [("big.bin", b"x" * 100, None)], mode="w")
    )
    with pytest.raises(UnsafeArchiveError, match="unpacks to 100 bytes and only 99 bytes are free"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    free["bytes"] = 100  # exactly enough
    assert (safe_extract(archive, tmp_path / "out") / "big.bin").stat().st_size == 100


def test_safe_extract_good_archives_and_merge(tmp_path: Path) -> None:
    tar = _tar(
        tmp_path / "a.tar.xz",
        [("README", b"same", None), ("images/1.png", b"png", None), ("images/link.png", None, "1.png")],
        mode="w:xz",
    )
    zf = _zip(tmp_path / "b.zip", {"README": b"same", "masks/1.png": b"mask"})
    target = tmp_path / "data" / "ds"
    assert safe_extract(tar, target) == target
    safe_extract(zf, target)  # merges: identical README skipped
    assert (target / "images" / "1.png").read_bytes() == b"png" and (target / "masks" / "1.png").read_bytes() == b"mask"
    assert (target / "images" / "link.png").is_symlink()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["ds"]  # no temp folders left
    conflict = _zip(tmp_path / "c.zip", {"README": b"different"})
    with pytest.raises(UsageError, match="overwrite"):
        safe_extract(conflict, target)
    assert (target / "README").read_bytes() == b"same"
    with pytest.raises(UsageError, match="not a zip or tar"):
        safe_extract(tmp_path / "data" / "ds" / "README", tmp_path / "x")


def test_a_download_is_fsynced_before_its_rename_and_follows_the_umask(
    server: LocalServer, tmp_path: Path, monkeypatch
) -> None:
    from digseg_cli import files

    events: list[tuple[str, int]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_ino)), real_fsync(fd))[1])
    monkeypatch.setattr(
        os, "replace", lambda a, b: (events.append(("replace", os.stat(a).st_ino)), real_replace(a, b))[1]
    )
    monkeypatch.setattr(files, "_umask", None)  # read again under the umask set here
    part = tmp_path / "model.bin.part"  # complete, left by a killed run (before its fsync) under umask 077
    part.write_bytes(PAYLOAD)
    part.chmod(0o600)
    old = os.umask(0o027)
    try:
        dest = download_file(f"{server.url}/model.bin", tmp_path / "model.bin", sha256=SHA, size=len(PAYLOAD))
    finally:
        os.umask(old)
    inode = dest.stat().st_ino
    renamed = events.index(("replace", inode))
    assert events[:renamed][-1] == ("fsync", inode)  # made durable right before its rename
    assert dest.stat().st_mode & 0o777 == 0o640 and dest.read_bytes() == PAYLOAD
