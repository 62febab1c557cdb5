"""The weights chain: registry entries served by a local HTTP server, the cache, verify, rm, offline misses."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from digseg_cli.errors import ChecksumMismatchError, UsageError, WeightsUnavailableError
from digseg_cli.weights import store as weights
from digseg_cli.weights.cache import list_weights, remove_weights, verify_weights
from digseg_cli.weights.registry import REGISTRY, FileSpec, WeightsSpec
from digseg_cli.weights.store import cache_dir, resolve_weights, weights_sha256

try:
    from test_download import LocalServer, guard_network
except ImportError:  # pragma: no cover - tests run as a package
    from tests.weights.test_download import LocalServer, guard_network

UNET = os.urandom(300_000)
CONFIG = b'{"format_version": 1}'
FILES = {"/w/unet/model.safetensors": UNET, "/w/digseg_config.json": CONFIG}


def make_spec(url: str, name: str = "tiny-test", unet: bytes = UNET) -> WeightsSpec:
    return WeightsSpec(
        name=name,
        description="test weights",
        source="url",
        base_url=f"{url}/w",
        revision="v1",
        files=(
            FileSpec("unet/model.safetensors", hashlib.sha256(unet).hexdigest(), len(unet)),
            FileSpec("digseg_config.json", hashlib.sha256(CONFIG).hexdigest(), len(CONFIG)),
        ),
        licence="test-licence",
        classes=("road", "tree"),
    )


COMMIT = "c0ffee" * 6 + "c0de"


def hub_files(repo_id: str, commit: str, files: dict[str, bytes]) -> tuple[dict[str, bytes], dict[str, dict]]:
    """What the Hugging Face Hub answers for one repo at one commit: (path → body, path → headers) for
    ``LocalServer``. Blob ids: sha256 for ``*.safetensors`` (LFS files), git blob sha1 for the rest."""

    def blob_id(rel: str, body: bytes) -> str:
        return (
            hashlib.sha256(body).hexdigest()
            if rel.endswith(".safetensors")
            else hashlib.sha1(f"blob {len(body)}\0".encode() + body).hexdigest()
        )

    tree = [
        {
            "type": "file",
            "oid": blob_id("", body),
            "size": len(body),
            "path": rel,
            **(
                {"lfs": {"oid": blob_id(rel, body), "size": len(body), "pointerSize": 134}}
                if rel.endswith(".safetensors")
                else {}
            ),
        }
        for rel, body in files.items()
    ]
    info = {"id": repo_id, "sha": commit, "siblings": [{"rfilename": rel} for rel in files]}
    bodies = {
        f"/api/models/{repo_id}/revision/main": json.dumps(info).encode(),
        f"/api/models/{repo_id}/tree/{commit}": json.dumps(tree).encode(),
    }
    headers = {}
    for rel, body in files.items():
        bodies[f"/{repo_id}/resolve/{commit}/{rel}"] = body
        headers[f"/{repo_id}/resolve/{commit}/{rel}"] = {"X-Repo-Commit": commit, "ETag": f'"{blob_id(rel, body)}"'}
    return bodies, headers


@contextlib.contextmanager
def local_hub(monkeypatch: pytest.MonkeyPatch, repo_id: str, files: dict[str, bytes], *, commit: str = COMMIT):
    """A Hugging Face Hub on 127.0.0.1 serving one repo, with huggingface_hub pointed at it and online."""
    bodies, headers = hub_files(repo_id, commit, files)
    with LocalServer(bodies, max_requests=200) as srv:
        srv.headers.update(headers)
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", srv.url)
        monkeypatch.setattr(
            "huggingface_hub.constants.HUGGINGFACE_CO_URL_TEMPLATE",
            srv.url + "/{repo_id}/resolve/{revision}/{filename}",
        )
        yield srv


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
    folder = resolve_weights(
        "tiny-test", cache_dir=root, registry={"tiny-test": spec}, progress=lambda *a: seen.append(a)
    )
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


def test_offline_miss_is_fast_and_says_how_to_fetch(
    server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
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


def test_hub_snapshot_offline_and_verify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fetched by huggingface_hub itself from a Hub on 127.0.0.1; then found offline, verified and repaired."""
    weights_file = "unet/diffusion_pytorch_model.safetensors"
    files = {
        "model_index.json": b'{"unet": ["diffusers", "UNet2DConditionModel"]}',
        weights_file: os.urandom(5000),
        "unet/config.json": b"{}",
    }
    with local_hub(monkeypatch, "someone/model", files) as srv:
        snap = weights.download_weights("someone/model")
        assert snap.parent.name == "snapshots" and (snap / weights_file).read_bytes() == files[weights_file]
        fetched = len(srv.requests)
        assert resolve_weights("someone/model", offline=True) == snap
        assert resolve_weights("someone/model@" + COMMIT, offline=True) == snap
        assert resolve_weights("someone/model") == snap  # a complete snapshot: no Hub call
        assert len(srv.requests) == fetched
        assert {r["path"]: r["status"] for r in verify_weights("someone/model", offline=True)} == dict.fromkeys(
            ["model_index.json", "unet/config.json", weights_file], "ok"
        )
        (snap / weights_file).resolve().write_bytes(b"bad")
        rows = {r["path"]: r["status"] for r in verify_weights("someone/model", repair=False, offline=True)}
        assert rows[weights_file] == "corrupt"
        rows = {r["path"]: r["status"] for r in verify_weights("someone/model", offline=True)}
        assert rows[weights_file] == "removed" and not (snap / weights_file).exists()
        with pytest.raises(WeightsUnavailableError, match="digseg weights download someone/model"):
            resolve_weights("someone/model", offline=True)  # a snapshot with a file missing is not served
        assert len(srv.requests) == fetched
        with pytest.raises(WeightsUnavailableError, match="digseg weights download someone/model"):
            verify_weights("someone/model")  # nothing complete to verify: the message says how to fetch it
        assert weights.download_weights("someone/model") == snap and len(srv.requests) > fetched
        (snap / weights_file).resolve().write_bytes(b"bad")
        rows = {r["path"]: r["status"] for r in verify_weights("someone/model")}  # online: removed and fetched
        assert rows[weights_file] == "repaired" and (snap / weights_file).read_bytes() == files[weights_file]
        with pytest.raises(UsageError, match="hf cache rm"):
            remove_weights("someone/model")


def test_verify_of_a_damaged_hub_entry_says_how_to_fix(tmp_path: Path) -> None:
    """A cache entry as an older huggingface_hub leaves it (no file listing), with a blob deleted by hand."""
    repo = tmp_path / "hf-hub" / "models--someone--model"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    snap = repo / "snapshots" / COMMIT
    (snap / "unet").mkdir(parents=True)
    for rel, blob in (("model_index.json", "a" * 40), ("unet/config.json", "b" * 40)):
        (snap / rel).symlink_to(repo / "blobs" / blob)
    (repo / "blobs" / ("a" * 40)).write_bytes(b"{}")  # unet/config.json's blob is missing: a broken link
    with pytest.raises(WeightsUnavailableError, match="cannot read the cache entry.*digseg weights download"):
        verify_weights("someone/model", offline=True)


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


def test_hub_download_is_pinned_and_takes_only_safetensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = REGISTRY["sd2"]
    files = {
        "model_index.json": b"{}",
        "unet/config.json": b"{}",
        "unet/diffusion_pytorch_model.safetensors": b"w",
        "unet/diffusion_pytorch_model.bin": b"pickle",
        "unet/diffusion_pytorch_model.fp16.safetensors": b"h",
        "safety_checker/model.safetensors": b"s",
        "tokenizer/vocab.json": b"{}",
    }
    with local_hub(monkeypatch, spec.repo_id, files, commit=spec.revision) as srv:
        snap = resolve_weights("sd2")
        assert snap == tmp_path / "hf-hub" / f"models--{spec.repo_id.replace('/', '--')}" / "snapshots" / spec.revision
        assert _files(snap) == [
            "model_index.json",
            "tokenizer/vocab.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
        ]  # HF_HUB_CACHE applies
        assert not any("/revision/" in path for path, _ in srv.requests)  # pinned: no branch look-up
        (snap / "tokenizer/vocab.json").unlink()  # a cut-off download: huggingface_hub's file listing tells
        with pytest.raises(WeightsUnavailableError, match="digseg weights download sd2"):
            resolve_weights("sd2", offline=True)
        assert resolve_weights("sd2") == snap and (snap / "tokenizer/vocab.json").is_file()  # fetched again
        before = len(srv.requests)
        with pytest.raises(WeightsUnavailableError, match="digseg weights download sd15"):
            resolve_weights("sd15", offline=True)
        assert len(srv.requests) == before  # offline: no Hub call at all
