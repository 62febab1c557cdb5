"""Fixtures of the fast-part tests (`test_fast_decoder.py`, `test_fast_encoder.py`)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture()
def tiny_with(tmp_path):
    """`tiny_with("fast_decoder", ...)`: a pipeline on the compact `tiny` model with these fast parts, randomly
    initialised at width 8, and the checkpoint it saved (`tmp_path / "ckpt"`)."""
    from digseg_cli.core.fast_decoder import FastMaskDecoder
    from digseg_cli.core.fast_encoder import FastImageEncoder
    from digseg_cli.inference.pipeline import DigsegPipeline, load_model

    kinds = {"fast_decoder": FastMaskDecoder, "fast_encoder": FastImageEncoder}

    def make(*parts: str):
        loaded = load_model("tiny")
        m = loaded.model
        torch.manual_seed(1)
        for part in parts:
            setattr(m, part, kinds[part](m.latent_channels, m.vae_scale_factor, width=8))
        pipe = DigsegPipeline(loaded)
        return pipe, pipe.save_pretrained(tmp_path / "ckpt")

    return make
