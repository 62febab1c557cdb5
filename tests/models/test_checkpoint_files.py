"""A saved checkpoint's files follow the user's umask, like every other file digseg writes (issue 17's rule):
safetensors' own writer leaves its files 0600."""

from __future__ import annotations

import os

from digseg_cli import files
from digseg_cli.models.checkpoint import build_compact, save_checkpoint


def test_every_file_and_folder_of_a_saved_checkpoint_follows_the_umask(tmp_path, monkeypatch):
    loaded = build_compact("tiny")
    old = os.umask(0o027)
    monkeypatch.setattr(files, "_umask", None)  # read again under the umask set here
    try:
        folder = save_checkpoint(tmp_path / "ck", loaded)
    finally:
        os.umask(old)
    paths = [folder, *folder.rglob("*")]
    weights = [p for p in paths if p.suffix == ".safetensors"]
    assert len(weights) >= 3  # the U-Net, the VAE and the text pathway at least
    assert {oct(p.stat().st_mode & 0o777) for p in paths if p.is_file()} == {"0o640"}
    assert {oct(p.stat().st_mode & 0o777) for p in paths if p.is_dir()} == {"0o750"}
