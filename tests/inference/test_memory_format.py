"""The pipeline's layout (issue 21): channels_last by default, the same fp32 probabilities as contiguous."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from digseg_cli.core.fast_decoder import FastMaskDecoder
from digseg_cli.core.fast_encoder import FastImageEncoder
from digseg_cli.errors import UsageError
from digseg_cli.inference.pipeline import DigsegPipeline
from digseg_cli.models.loader import load_model

IMAGE = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)  # [64,64,3] uint8


def _conv_weights(pipe: DigsegPipeline) -> list[torch.Tensor]:
    """The first conv of the U-Net, of the VAE encoder and decoder, and of the fast decoder and encoder."""
    m = pipe.model
    return [
        m.unet.conv_in.weight,
        m.vae.encoder.conv_in.weight,
        m.vae.decoder.conv_in.weight,
        m.fast_decoder.stem.weight,
        m.fast_encoder.downs[0].weight,
    ]


def _pipeline(**options) -> DigsegPipeline:
    loaded = load_model("tiny")
    torch.manual_seed(1)
    m = loaded.model
    m.fast_decoder = FastMaskDecoder(m.latent_channels, m.vae_scale_factor, width=8)
    m.fast_encoder = FastImageEncoder(m.latent_channels, m.vae_scale_factor, width=8)
    return DigsegPipeline(loaded, **options)


@pytest.fixture(scope="module")
def pipe(one_torch_thread):
    return _pipeline()


def test_the_default_is_channels_last_and_contiguous_can_be_asked_for(pipe):
    assert pipe.memory_format == "channels_last"
    assert all(
        w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in _conv_weights(pipe)
    )
    other = _pipeline(memory_format="contiguous")
    assert other.memory_format == "contiguous" and all(w.is_contiguous() for w in _conv_weights(other))
    with pytest.raises(UsageError, match="memory_format"):
        other.memory_format = "nhwc"


@pytest.mark.parametrize("parts", [{"decoder": "vae"}, {"decoder": "fast"}, {"encoder": "fast"}])
def test_channels_last_gives_the_contiguous_probabilities_within_1e_4(pipe, parts):
    try:
        nhwc = pipe(IMAGE, ["road", "tree"], tile=None, **parts)
        pipe.memory_format = "contiguous"
        plain = pipe(IMAGE, ["road", "tree"], tile=None, **parts)
    finally:
        pipe.memory_format = "channels_last"
    assert nhwc.probs.is_contiguous() and nhwc.probs.dtype == torch.float32
    assert (nhwc.probs - plain.probs).abs().max().item() <= 1e-4


def test_the_model_hands_back_ordinary_tensors(pipe):
    m = pipe.model
    with torch.no_grad():
        latent = m.encode_image(torch.zeros(2, 3, 32, 32))  # [2,4,h,w]
        assert latent.is_contiguous() and m.encode_image_fast(torch.zeros(2, 3, 32, 32)).is_contiguous()
        assert m.decode_probs(latent).is_contiguous() and m.decode_probs_fast(latent).is_contiguous()  # [2,32,32]


def test_a_trainers_pipeline_keeps_its_model_as_it_is():
    loaded = load_model("tiny")
    DigsegPipeline(loaded, prepare=False)
    assert loaded.model.unet.conv_in.weight.is_contiguous() and loaded.model.unet.training
