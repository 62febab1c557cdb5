"""`digseg doctor`: its JSON parses and says what this machine has; a needed check that fails sets the exit code
and names itself; the Hub probe is tried against a server on 127.0.0.1; nothing is created."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from digseg_cli.cli.app import app
from digseg_cli.doctor import checks
from digseg_cli.doctor.checks import FAIL, NOTE, OK, Check

try:
    from test_download import LocalServer, guard_network
except ImportError:  # pragma: no cover - tests run as a package
    from tests.weights.test_download import LocalServer, guard_network

runner = CliRunner()
SECTIONS = {"versions", "devices", "caches", "network", "model", "output", "extras"}


@pytest.fixture()
def offline(monkeypatch: pytest.MonkeyPatch):
    guard_network(monkeypatch)
    monkeypatch.setenv("DIGSEG_OFFLINE", "1")


def _doctor(*args: str) -> tuple[int, dict]:
    result = runner.invoke(app, ["doctor", "--json", *args])
    return result.exit_code, json.loads(result.stdout)


def _row(record: dict, section: str, name: str) -> dict:
    return next(r for r in record["checks"] if r["section"] == section and r["name"] == name)


def test_doctor_json_describes_this_machine_and_the_demo_segments(offline, tmp_path: Path) -> None:
    out = tmp_path / "not-yet" / "out"
    code, record = _doctor("--out", str(out), "--device", "cpu")
    assert code == 0 and record["schema"] == "digseg.doctor/1" and record["exit_code"] == 0
    assert {r["section"] for r in record["checks"]} >= SECTIONS
    assert all(r["status"] in (OK, NOTE) for r in record["checks"]), [
        r for r in record["checks"] if r["status"] == FAIL
    ]
    assert _row(record, "versions", "torch")["status"] == OK
    assert _row(record, "devices", "--device cpu")["detail"] == "cpu"
    assert _row(record, "devices", "--precision auto")["detail"].startswith("fp32")
    assert "offline (DIGSEG_OFFLINE=1" in _row(record, "network", "digseg")["detail"]
    assert "not probed" in _row(record, "network", "hub")["detail"]
    model = _row(record, "model", "--weights demo")["detail"]
    accuracy = float(model.rsplit("pixel accuracy ", 1)[1])
    assert accuracy > 0.8, model  # the demo on a scene of the kind it was trained on
    assert "writable" in _row(record, "output", "--out")["detail"]
    assert {r["name"] for r in record["checks"] if r["section"] == "extras"} >= {"geo", "coco"}
    assert not (tmp_path / "not-yet").exists()  # probed in the existing parent, nothing made


def test_a_missing_device_or_model_or_output_folder_is_its_exit_code(offline, tmp_path: Path) -> None:
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("not a folder")
    cases = [
        (["--device", "cuda:7"] if not _has_cuda(8) else ["--device", "mps"], 4, "devices"),
        (["--weights", str(tmp_path / "no-such-checkpoint")], 5, "model"),
        (["--out", str(in_the_way / "out")], 2, "output"),
    ]
    for args, expected, section in cases:
        code, record = _doctor(*args)
        failed = [r for r in record["checks"] if r["status"] == FAIL]
        assert code == expected == record["exit_code"], (args, failed)
        assert failed[0]["section"] == section and failed[0]["exit_code"] == expected
    result = runner.invoke(app, ["doctor", "--out", str(in_the_way / "out")])
    assert result.exit_code == 2 and "error: output --out" in result.stderr and "exit code 2" in result.stderr


def _has_cuda(count: int) -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() >= count


def test_exit_code_is_the_first_needed_failure() -> None:
    rows = [
        Check("a", "x", NOTE, "worth knowing", "do this"),
        Check("b", "y", FAIL, "an extra is missing"),  # not needed: no exit code
        Check("c", "z", FAIL, "no device", "", 4),
        Check("d", "w", FAIL, "no weights", "", 5),
    ]
    assert checks.exit_code(rows) == 4
    assert checks.exit_code(rows[:2]) == 0


def test_the_hub_probe_reaches_a_local_endpoint_and_reports_a_dead_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    guard_network(monkeypatch)
    for var in ("DIGSEG_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var)
    with LocalServer({}) as server:  # any HTTP answer, a 404 too, means the Hub is there
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        digseg, hub = checks.check_network(offline=False)
        assert digseg.status == OK and "online" in digseg.detail
        assert hub.status == OK and "reachable" in hub.detail and server.requests
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{sock.getsockname()[1]}")
    digseg, hub = checks.check_network(offline=False)
    assert hub.status == NOTE and "not reachable" in hub.detail and "--offline" in hub.fix
    assert checks.check_network(offline=True)[1].detail.endswith("not probed (offline)")


def test_folder_size_counts_files_once_and_not_links(tmp_path: Path) -> None:
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "a").write_bytes(b"x" * 1000)
    (tmp_path / "snapshot").mkdir()
    (tmp_path / "snapshot" / "a").symlink_to(tmp_path / "blobs" / "a")
    assert checks.folder_size(tmp_path) == (1, 1000)
