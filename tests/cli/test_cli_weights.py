"""`digseg weights …` through Typer's CliRunner, against a registry entry served on 127.0.0.1."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from digseg_cli.cli.weights import register
from digseg_cli.weights import registry

try:
    from test_download import LocalServer, guard_network
    from test_weights import CONFIG, FILES, UNET, make_spec
except ImportError:  # pragma: no cover - tests run as a package
    from tests.weights.test_download import LocalServer, guard_network
    from tests.weights.test_weights import CONFIG, FILES, UNET, make_spec

app = typer.Typer()


@app.callback()
def _root() -> None:
    """Only the weights group, so these tests do not depend on other command modules."""


register(app)
runner = CliRunner()


@pytest.fixture()
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    guard_network(monkeypatch)
    for var in ("DIGSEG_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DIGSEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    with LocalServer(FILES) as server:
        monkeypatch.setitem(registry.REGISTRY, "tiny-test", make_spec(server.url))
        yield server, tmp_path / "cache"


def run(*args: str, input: str | None = None):
    return runner.invoke(app, ["weights", *args], input=input)


def test_offline_miss_exits_5_fast(env) -> None:
    server, _ = env
    start = time.monotonic()
    result = run("download", "tiny-test", "--offline")
    assert time.monotonic() - start < 1.0
    assert result.exit_code == 5, result.output
    assert "digseg weights download tiny-test" in result.stderr and server.requests == []
    result = run("path", "tiny-test")
    assert result.exit_code == 5 and "digseg weights download tiny-test" in result.stderr
    result = runner.invoke(app, ["weights", "download", "tiny-test"], env={"DIGSEG_OFFLINE": "1"})
    assert result.exit_code == 5 and server.requests == []


def test_download_path_list_info(env) -> None:
    _, root = env
    result = run("download", "tiny-test")
    assert result.exit_code == 0, result.stderr
    folder = root / "tiny-test" / "v1"
    assert result.stdout.strip() == str(folder)
    assert (folder / "unet" / "model.safetensors").read_bytes() == UNET
    assert (folder / "digseg_config.json").read_bytes() == CONFIG
    assert run("path", "tiny-test").stdout.strip() == str(folder)
    assert run("path").stdout.strip() == str(root)
    rows = {r["name"]: r for r in json.loads(run("list", "--json").stdout)["weights"]}
    assert rows["tiny-test"]["cached"] and not rows["sd2"]["cached"] and {"demo", "sd15"} <= set(rows)
    assert "tiny-test" in run("list").stderr
    info = json.loads(run("info", "tiny-test", "--json").stdout)
    assert info["licence"] == "test-licence" and info["classes"] == ["road", "tree"]
    result = run("info", "tiny-tset")
    assert result.exit_code == 5 and "Did you mean 'tiny-test'" in result.stderr


def test_verify_repairs_then_offline_reports(env) -> None:
    _, root = env
    assert run("download", "tiny-test").exit_code == 0
    target = root / "tiny-test" / "v1" / "unet" / "model.safetensors"
    target.write_bytes(b"\1" * len(UNET))
    result = run("verify", "tiny-test", "--json")
    assert result.exit_code == 0, result.stderr
    statuses = {r["path"]: r["status"] for r in json.loads(result.stdout)["weights"]["tiny-test"]}
    assert statuses["unet/model.safetensors"] == "repaired" and target.read_bytes() == UNET
    target.write_bytes(b"\2" * len(UNET))
    result = run("verify", "--offline")  # every cached entry
    assert result.exit_code == 5 and "removed" in result.stderr
    assert not target.exists()


def test_rm_asks_and_refuses_others(env) -> None:
    _, root = env
    assert run("download", "tiny-test").exit_code == 0
    result = run("rm", "tiny-test", input="n\n")
    assert result.exit_code == 1 and (root / "tiny-test").exists()
    result = run("rm", "tiny-test", "--yes")
    assert result.exit_code == 0 and not (root / "tiny-test").exists()
    assert run("rm", "tiny-test", "--yes").exit_code == 0  # nothing left: fine
    assert run("rm", "demo", "--yes").exit_code == 2
    assert run("rm", "sd2", "--yes").exit_code == 2
