"""SD bases load from safetensors only: a pickled `.bin` is refused (exit 5, one line) before anything reads it."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from digseg_cli.cli.app import app
from digseg_cli.errors import EXIT_WEIGHTS, CheckpointError
from digseg_cli.models.loader import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Payload:
    """Unpickling this creates `path`: proof that something read the pickle."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _pickled_only(base: Path, tmp_path: Path, component: str, weights: str) -> tuple[Path, Path]:
    """A copy of `base` whose `component` holds only a malicious pickle named `weights`; (folder, sentinel)."""
    folder, sentinel = tmp_path / "base", tmp_path / "pwned"
    shutil.copytree(base, folder)
    for path in (folder / component).glob("*.safetensors"):
        path.unlink()
    (folder / component / weights).write_bytes(pickle.dumps(_Payload(sentinel)))
    return folder, sentinel


BIN_ONLY = [
    # (component, pickled file left, message fragment)
    ("unet", "diffusion_pytorch_model.bin", "only diffusion_pytorch_model.bin and no .safetensors"),
    ("vae", "diffusion_pytorch_model.bin", "vae has only diffusion_pytorch_model.bin"),
    ("text_encoder", "pytorch_model.bin", "text_encoder has only pytorch_model.bin"),
    ("unet", "model.ckpt", "digseg loads no pickled weights"),
    ("vae", "README.md", "vae has no weights and no .safetensors"),
]


@pytest.mark.parametrize(("component", "weights", "fragment"), BIN_ONLY)
def test_a_pickled_base_is_refused_unread(tiny_sd_base, tmp_path, component, weights, fragment) -> None:
    folder, sentinel = _pickled_only(tiny_sd_base, tmp_path, component, weights)
    with pytest.raises(CheckpointError, match="safe_serialization=True") as info:
        load_model(folder)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert info.value.exit_code == EXIT_WEIGHTS and not sentinel.exists()


def test_segment_with_a_pickled_base_exits_5_in_one_line(tiny_sd_base, tmp_path) -> None:
    folder, sentinel = _pickled_only(tiny_sd_base, tmp_path, "unet", "diffusion_pytorch_model.bin")
    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    result = CliRunner().invoke(
        app,
        [
            "segment",
            str(image),
            "--prompt",
            "road",
            "--weights",
            str(folder),
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 5, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "no .safetensors" in result.stderr
    assert "Traceback" not in result.output and not sentinel.exists()


def test_a_safetensors_base_still_loads(tiny_sd_base) -> None:
    loaded = load_model(tiny_sd_base)
    assert loaded.config.base_model == str(tiny_sd_base)
