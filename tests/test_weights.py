"""The weights chain: registry entries served by a local HTTP server, the cache, verify, rm, offline misses."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from digseg_cli.weights import store as weights
from digseg_cli.errors import ChecksumMismatchError, UsageError, WeightsUnavailableError
from digseg_cli.weights.registry import REGISTRY, FileSpec, WeightsSpec
from digseg_cli.weights.store import (
    cache_dir,
    list_weights,
    remove_weights,
    resolve_weights,
    verify_weights,
    weights_sha256,
)

try:
    from test_download import LocalServer, guard_network
except ImportError:  # pragma: no cover - tests run as a package
    from tests.test_download import LocalServer, guard_network

UNET = os.urandom(300_000)
CONFIG = b'{"format_version": 1}'
FILES = {"/w/unet/model.safetensors": UNET, "/w/digseg_config.json": CONFIG}


def make_spec(url: str, name: str = "tiny-test", unet: bytes = UNET) -> WeightsSpec:
    return WeightsSpec(
        name=name, description="test weights", source="url", base_url=f"{url}/w", revision="v1",
        files=(FileSpec("unet/model.safetensors", hashlib.sha256(unet).hexdigest(), len(unet)),
               FileSpec("digseg_config.json", hashlib.sha256(CONFIG).hexdigest(), len(CONFIG))),
        licence="test-licence", classes=("road", "tree"),
    )


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    guard_network(monkeypatch)
    for var in ("DIGSEG_OFFLINE", "HF_HUB_OFFLINE", "DIGSEG_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf-hub"))


@pytest.fixture()
def server():
    with LocalServer(FILES) as srv:
        yield srv


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    default = cache_dir()
    assert default.is_absolute() and default.name == "weights" and default.parent != tmp_path
    monkeypatch.setenv("DIGSEG_CACHE_DIR", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    assert cache_dir(tmp_path / "flag") == tmp_path / "flag"


def test_download_cache_and_warm_hit(server: LocalServer, tmp_path: Path) -> None:
    spec, root = make_spec(server.url), tmp_path / "cache"
    seen = []
    folder = resolve_weights("tiny-test", cache_dir=root, registry={"tiny-test": spec},
                             progress=lambda *a: seen.append(a))
    assert folder == root / "tiny-test" / "v1"
    assert (folder / "unet" / "model.safetensors").read_bytes() == UNET
    assert seen[-1] == ("tiny-test", len(UNET) + len(CONFIG), len(UNET) + len(CONFIG))
    count = len(server.requests)
    # A warm cache means zero network calls, online or offline.
    assert resolve_weights("tiny-test", cache_dir=root, registry={"tiny-test": spec}) == folder
    assert resolve_weights("tiny-test", cache_dir=root, offline=True, registry={"tiny-test": spec}) == folder
    assert len(server.requests) == count
    (row,) = list_weights(root, registry={"tiny-test": spec})
    assert row["cached"] and row["path"] == str(folder) and row["size"] == len(UNET) + len(CONFIG)


def test_checksum_mismatch_leaves_cache_empty(server: LocalServer, tmp_path: Path) -> None:
    spec, root = make_spec(server.url, unet=b"expected other bytes" * 100), tmp_path / "cache"
    with pytest.raises(ChecksumMismatchError) as info:
        resolve_weights("tiny-test", cache_dir=root, registry={"tiny-test": spec})
    assert server.url in str(info.value)
    assert not root.exists() or _files(root) == []


def test_verify_repairs_corrupted_file(server: LocalServer, tmp_path: Path) -> None:
    spec, root = make_spec(server.url), tmp_path / "cache"
    registry = {"tiny-test": spec}
    folder = resolve_weights("tiny-test", cache_dir=root, registry=registry)
    target = folder / "unet" / "model.safetensors"
    target.write_bytes(b"\0" * len(UNET))  # same size: only a full sha256 catches it
    assert resolve_weights("tiny-test", cache_dir=root, registry=registry) == folder  # size check passes
    before = len(server.requests)
    status = {r["path"]: r["status"] for r in verify_weights("tiny-test", root, registry=registry)}
    assert status == {"unet/model.safetensors": "repaired", "digseg_config.json": "ok"}
    assert target.read_bytes() == UNET and len(server.requests) == before + 1
    assert all(r["status"] == "ok" for r in verify_weights("tiny-test", root, registry=registry))


def test_verify_offline_removes_but_does_not_fetch(server: LocalServer, tmp_path: Path) -> None:
    spec, root = make_spec(server.url), tmp_path / "cache"
    registry = {"tiny-test": spec}
    folder = resolve_weights("tiny-test", cache_dir=root, registry=registry)
    (folder / "digseg_config.json").write_bytes(b"{}")
    before = len(server.requests)
    rows = verify_weights("tiny-test", root, offline=True, registry=registry)
    assert {r["path"]: r["status"] for r in rows}["digseg_config.json"] == "removed"
    assert len(server.requests) == before
    rows = verify_weights("tiny-test", root, repair=False, registry=registry)
    assert {r["path"]: r["status"] for r in rows}["digseg_config.json"] == "missing"


def test_offline_miss_is_fast_and_says_how_to_fetch(server: LocalServer, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIGSEG_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        resolve_weights("tiny-test", cache_dir=tmp_path / "c", registry={"tiny-test": make_spec(server.url)})
    assert time.monotonic() - start < 1.0
    assert "digseg weights download tiny-test" in str(info.value) and server.requests == []
    with pytest.raises(WeightsUnavailableError, match="digseg weights download someone/model"):
        resolve_weights("someone/model", offline=True)


def test_user_folder_is_returned_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = tmp_path / "sd2"  # even when it shadows a registry name
    (mine / "unet").mkdir(parents=True)
    (mine / "unet" / "model.safetensors").write_bytes(b"fine-tuned")
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in mine.rglob("*") if p.is_file()}
    monkeypatch.chdir(tmp_path)
    assert resolve_weights(str(mine), cache_dir=tmp_path / "c") == mine
    assert resolve_weights("sd2", cache_dir=tmp_path / "c", offline=True) == mine
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in mine.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "c").exists()
    with pytest.raises(UsageError):
        remove_weights(str(mine), tmp_path / "c")
    assert mine.exists()


def test_unknown_name_suggests_closest() -> None:
    with pytest.raises(WeightsUnavailableError, match="Did you mean 'sd2'"):
        resolve_weights("sd21", offline=True)
    with pytest.raises(WeightsUnavailableError, match="no such file or folder"):
        resolve_weights("./runs/missing", offline=True)


def test_hub_snapshot_offline_and_verify(tmp_path: Path) -> None:
    hub = tmp_path / "hf-hub" / "models--someone--model"
    data = {"model_index.json": b"{}", "unet/diffusion_pytorch_model.safetensors": os.urandom(5000)}
    snap = hub / "snapshots" / ("a" * 40)
    for rel, content in data.items():
        name = hashlib.sha256(content).hexdigest() if rel.endswith("safetensors") else \
            hashlib.sha1(f"blob {len(content)}\0".encode() + content).hexdigest()
        (hub / "blobs").mkdir(parents=True, exist_ok=True)
        (hub / "blobs" / name).write_bytes(content)
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        (snap / rel).symlink_to(hub / "blobs" / name)
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("a" * 40)
    assert resolve_weights("someone/model", offline=True) == snap
    assert resolve_weights("someone/model@" + "a" * 40, offline=True) == snap
    assert {r["status"] for r in verify_weights("someone/model", offline=True)} == {"ok"}
    (snap / "unet/diffusion_pytorch_model.safetensors").resolve().write_bytes(b"bad")
    rows = {r["path"]: r["status"] for r in verify_weights("someone/model", repair=False, offline=True)}
    assert rows["unet/diffusion_pytorch_model.safetensors"] == "corrupt"
    with pytest.raises(UsageError, match="hf cache rm"):
        remove_weights("someone/model")


def test_remove_only_own_cache_entries(server: LocalServer, tmp_path: Path, monkeypatch) -> None:
    spec, root = make_spec(server.url), tmp_path / "cache"
    registry = {"tiny-test": spec, "demo": REGISTRY["demo"], "sd2": REGISTRY["sd2"]}
    resolve_weights("tiny-test", cache_dir=root, registry=registry)
    assert remove_weights("tiny-test", root, dry_run=True, registry=registry) == [root / "tiny-test"]
    assert remove_weights("tiny-test", root, registry=registry) == [root / "tiny-test"]
    assert not (root / "tiny-test").exists()
    assert remove_weights("tiny-test", root, registry=registry) == []
    for name in ("demo", "sd2", "../cache", "../../etc"):
        with pytest.raises((UsageError, WeightsUnavailableError)):
            remove_weights(name, root, registry=registry)


def test_bundled_verify_uses_sha256sums(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "demo"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "w.safetensors").write_bytes(b"weights")
    (folder / "digseg_config.json").write_bytes(b"{}")
    (folder / "SHA256SUMS").write_text(f"{hashlib.sha256(b'weights').hexdigest()}  unet/w.safetensors\n")
    monkeypatch.setattr(weights, "bundled_dir", lambda name: folder)
    assert resolve_weights("demo", offline=True) == folder
    rows = {r["path"]: r["status"] for r in verify_weights("demo", offline=True)}
    assert rows == {"unet/w.safetensors": "ok", "digseg_config.json": "unchecked"}
    monkeypatch.setattr(weights, "bundled_dir", lambda name: None)
    with pytest.raises(WeightsUnavailableError, match="not part of this installation"):
        resolve_weights("demo")


def test_weights_sha256_is_stable(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, order in ((a, ["x/1", "y"]), (b, ["y", "x/1"])):
        for rel in order:
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(rel.encode())
    (b / ".cache").mkdir()
    (b / ".cache" / "junk").write_bytes(b"ignored")
    (b / "z.part").write_bytes(b"ignored")
    assert weights_sha256(a) == weights_sha256(b)
    (b / "y").write_bytes(b"changed")
    assert weights_sha256(a) != weights_sha256(b)
    assert len(weights_sha256(a)) == 64


def test_hub_download_calls_snapshot_download_pinned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        snap = tmp_path / "snap"
        (snap / "unet").mkdir(parents=True, exist_ok=True)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    spec = REGISTRY["sd2"]
    assert resolve_weights("sd2") == tmp_path / "snap"
    ((repo_id, kwargs),) = calls
    assert repo_id == "stabilityai/stable-diffusion-2" and kwargs["revision"] == spec.revision
    assert "unet/*.safetensors" in kwargs["allow_patterns"] and "*fp16*" in kwargs["ignore_patterns"]
    assert kwargs.get("cache_dir") is None  # HF_HOME / HF_HUB_CACHE apply
    with pytest.raises(WeightsUnavailableError, match="digseg weights download sd15"):
        resolve_weights("sd15", offline=True)
    assert len(calls) == 1  # offline: no Hub call at all
