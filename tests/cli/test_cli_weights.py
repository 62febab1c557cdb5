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


# ---------------------------------------------------- rm and verify delete only what digseg wrote
def _home_like(root: Path) -> list[Path]:
    """DIGSEG_CACHE_DIR=$HOME: a user's folders and files, no digseg entry at all."""
    (root / "Documents").mkdir(parents=True)
    (root / "Documents" / "thesis.tex").write_text("years of work")
    (root / "notes.txt").write_text("mine")
    return [root / "Documents" / "thesis.tex", root / "notes.txt"]


def _entry_beside_user_files(root: Path) -> list[Path]:
    """A real digseg entry, and a file of the user's next to it in the same cache folder."""
    assert run("download", "tiny-test").exit_code == 0
    (root / "photos").mkdir()
    (root / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    return [root / "photos" / "cat.jpg", root / "tiny-test" / "v1" / "unet" / "model.safetensors"]


def _unmarked_user_folder_named_like_an_entry(root: Path) -> list[Path]:
    """A folder called tiny-test that digseg never wrote (no marker; its files are not the entry's)."""
    (root / "tiny-test" / "v1").mkdir(parents=True)
    (root / "tiny-test" / "v1" / "diary.txt").write_text("private")
    return [root / "tiny-test" / "v1" / "diary.txt"]


def _marker_copied_from_another_entry(root: Path) -> list[Path]:
    """A marker is proof for the entry it names only."""
    assert run("download", "tiny-test").exit_code == 0
    (root / "Documents").mkdir()
    (root / "Documents" / "cv.pdf").write_bytes(b"%PDF")
    (root / "Documents" / ".digseg-entry.json").write_bytes((root / "tiny-test" / ".digseg-entry.json").read_bytes())
    return [root / "Documents" / "cv.pdf"]


def _entry_is_a_link_to_user_files(root: Path) -> list[Path]:
    outside = root.parent / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    root.mkdir()
    (root / "tiny-test").symlink_to(outside, target_is_directory=True)
    return [outside / "keep.txt"]


def _legacy_entry_with_a_changed_file(root: Path) -> list[Path]:
    """An entry of an older digseg (no marker) whose weights differ from the registry's: not adopted."""
    assert run("download", "tiny-test").exit_code == 0
    (root / "tiny-test" / ".digseg-entry.json").unlink()
    (root / "tiny-test" / "v1" / "digseg_config.json").write_text('{"mine": true}')
    return [root / "tiny-test" / "v1" / "digseg_config.json"]


HOSTILE_CACHES = [
    # (what the cache folder holds, command, exit code, message fragment)
    (_home_like, ["rm", "Documents", "--yes"], 2, "digseg did not write (Documents, notes.txt)"),
    (_home_like, ["rm", "tiny-test", "--yes"], 2, "digseg deletes nothing in it"),
    (_entry_beside_user_files, ["rm", "tiny-test", "--yes"], 2, "did not write (photos)"),
    (_entry_beside_user_files, ["verify", "tiny-test"], 2, "point --cache-dir / DIGSEG_CACHE_DIR"),
    (_unmarked_user_folder_named_like_an_entry, ["rm", "tiny-test", "--yes"], 2, "did not write (tiny-test)"),
    (_unmarked_user_folder_named_like_an_entry, ["download", "tiny-test"], 2, "remove it by hand"),
    (_marker_copied_from_another_entry, ["rm", "Documents", "--yes"], 2, "did not write (Documents)"),
    (_entry_is_a_link_to_user_files, ["rm", "tiny-test", "--yes"], 2, "did not write (tiny-test)"),
    (_legacy_entry_with_a_changed_file, ["verify", "tiny-test"], 2, "did not write (tiny-test)"),
    (_legacy_entry_with_a_changed_file, ["download", "tiny-test"], 2, "not written by digseg"),
]


@pytest.mark.parametrize(
    ("setup", "args", "code", "fragment"), HOSTILE_CACHES, ids=lambda v: getattr(v, "__name__", None)
)
def test_rm_and_verify_touch_only_digseg_entries(env, setup, args, code, fragment) -> None:
    _, root = env
    precious = {path: path.read_bytes() for path in setup(root)}
    result = run(*args)
    assert result.exit_code == code, result.output
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.output
    assert {path: path.read_bytes() for path in precious} == precious  # nothing deleted, nothing rewritten


def test_an_older_digseg_entry_with_the_registry_files_is_adopted(env) -> None:
    """Caches from before the marker: an entry whose every file has the registry's sha256 becomes digseg's."""
    _, root = env
    assert run("download", "tiny-test").exit_code == 0
    marker = root / "tiny-test" / ".digseg-entry.json"
    marker.unlink()
    assert run("verify", "tiny-test", "--no-repair").exit_code == 0 and not marker.exists()  # reading adopts nothing
    (root / "tiny-test" / "v1" / "unet" / "model.safetensors.part").write_bytes(b"half")  # an old cut-off download
    result = run("rm", "tiny-test", "--yes")
    assert result.exit_code == 0, result.output
    assert not (root / "tiny-test").exists()
