"""Shared fixtures: tiny models and a tiny Stable-Diffusion-format base folder, all built offline."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIGSEG_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Test models are tiny: one torch thread is as fast, and it keeps parallel jobs on a 2-core box from
# oversubscribing the CPU (measured: 4 s vs 0.04 s per tiny image under load).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _own_cores_per_worker() -> None:
    """Under `-n N` each xdist worker (and every process it starts) runs on its own share of the cores.
    Otherwise the multi-process tests of one worker (DDP pairs, loader workers, subprocess runs) take cores
    from the long learning test on the other, which then ran 560 s instead of its 423 s alone and set the
    suite's wall time."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= count:
        os.sched_setaffinity(0, cores[int(worker.removeprefix("gw")) % count :: count])


_own_cores_per_worker()


def pytest_collection_modifyitems(config, items):
    """Slow tests first: under `-n 2 --dist worksteal` (README's test command) the longest one then runs on one
    core while the other core takes every other test, instead of starting last and running alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's real cache folders."""
    root = tmp_path_factory.getbasetemp() / "digseg-cache"
    monkeypatch.setenv("DIGSEG_CACHE_DIR", str(root / "weights"))
    monkeypatch.setenv("DIGSEG_DATA_ROOT", str(root / "datasets"))
    monkeypatch.setenv("HF_HOME", str(root / "hf"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (tiny models; bit-exact comparisons are made on one thread)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def both_cores():
    """Two torch threads for one long single-process test (the CI machine has 2 cores; others use 1)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_sd_base(tmp_path_factory):
    """A tiny SD-format base folder written with diffusers' own `save_pretrained` (epsilon prediction)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from digseg_cli.models.compact import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        prediction_type="epsilon",
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = tmp_path_factory.mktemp("sd") / "tiny-sd"
    pipe.save_pretrained(folder)
    return folder
