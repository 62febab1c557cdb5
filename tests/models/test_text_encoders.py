"""The pretrained sentence encoder in the compact family: frozen, cached, recorded by name and sha256 in a
checkpoint (never copied), and semantically what all-MiniLM-L6-v2 is."""

from __future__ import annotations

import json

import pytest
import torch

from digseg_cli.errors import CheckpointError
from digseg_cli.models.checkpoint import build_compact, load_checkpoint, save_checkpoint
from digseg_cli.weights.registry import REGISTRY


@pytest.fixture(scope="module")
def tiny_minilm():
    return build_compact("tiny-minilm")


def embed(loaded, texts):
    ids = loaded.tokenizer(texts, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    return loaded.model.encode_prompt(ids.input_ids)  # ([B,N,D], [B,E])


def test_words_never_trained_on_land_nearest_the_class_they_mean(tiny_minilm):
    names = ["road", "tree", "building", "water", "field"]
    _, classes = embed(tiny_minilm, names)
    _, words = embed(tiny_minilm, ["motorway", "woodland", "rooftop", "reservoir", "pasture"])
    nearest = (words @ classes.T).argmax(dim=1).tolist()
    assert [names[i] for i in nearest] == names
    assert torch.allclose(classes.norm(dim=1), torch.ones(5))


def test_only_the_adapter_trains_and_the_encoder_stays_in_eval_mode(tiny_minilm):
    text = tiny_minilm.model.text_encoder
    text.requires_grad_(True).train()
    assert not text.encoder.training and all(not p.requires_grad for p in text.encoder.parameters())
    assert all(p.requires_grad for p in text.adapter.parameters())
    context, pooled = embed(tiny_minilm, ["road", "a road"])
    assert context.shape == (2, 4, 32) and pooled.shape == (2, 384) and not pooled.requires_grad
    again = embed(tiny_minilm, ["road"])[1]  # padding or batch neighbours never change an embedding
    assert torch.equal(again[0], pooled[0])
    text.eval()


def test_a_checkpoint_records_the_encoder_by_name_and_sha256_and_loads_the_same_model(tiny_minilm, tmp_path):
    with torch.no_grad():
        tiny_minilm.model.text_encoder.adapter[-1].weight.normal_()  # a trained adapter, not zeros
    folder = save_checkpoint(tmp_path / "ck", tiny_minilm)
    record = json.loads((folder / "text_encoder" / "config.json").read_text())
    assert record["weights"] == "minilm-l6-v2"
    assert record["sha256"] == {f.path: f.sha256 for f in REGISTRY["minilm-l6-v2"].files}
    saved = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert saved < 5_000_000 and not (folder / "tokenizer").exists()  # no copy of the 90 MB encoder
    loaded = load_checkpoint(folder)
    for a, b in zip(embed(tiny_minilm, ["lane", "pond"]), embed(loaded, ["lane", "pond"]), strict=True):
        assert torch.equal(a, b)
    record["sha256"]["model.safetensors"] = "0" * 64
    (folder / "text_encoder" / "config.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r"other files than this digseg records .*model.safetensors"):
        load_checkpoint(folder)


def test_segment_flags_a_prompt_far_from_every_word_the_model_trained_on(tiny_minilm):
    from digseg_cli.data.synth import SYNTH_CLASSES
    from digseg_cli.inference.pipeline import DigsegPipeline

    tiny_minilm.config.classes = SYNTH_CLASSES["classes"]
    tiny_minilm.config.unrelated_words = ["piano", "spoon"]
    pipe = DigsegPipeline(tiny_minilm)
    assert pipe.check_prompt("motorway") == [] and pipe.check_prompt("violin") == []  # near highway, piano
    (warning,) = pipe.check_prompt("quantum chromodynamics")
    assert warning.startswith("prompt 'quantum chromodynamics' is far from every word the model trained on")
    assert "known words are at 0.45 or more" in warning and warning.count(" 0.") >= 3  # nearest words, scored


def test_the_sentence_encoder_stands_in_for_a_transformers_text_encoder_in_a_diffusers_pipeline(tiny_minilm):
    """diffusers' Marigold, built from these parts (benchmarks/run.py's row (b)), asks the text encoder where it
    is and reads its output by position, as of a CLIPTextModel."""
    from diffusers import DDIMScheduler, MarigoldDepthPipeline

    text, model = tiny_minilm.model.text_encoder, tiny_minilm.model
    assert (text.device, text.dtype) == (torch.device("cpu"), torch.float32)
    ids = tiny_minilm.tokenizer(["road"], padding="max_length", max_length=8, return_tensors="pt").input_ids
    output = text(ids)
    assert output[0] is output.last_hidden_state and output[0].shape[:2] == (1, text.context_tokens)
    marigold = MarigoldDepthPipeline(
        unet=model.unet,
        vae=model.vae,
        scheduler=DDIMScheduler(),
        text_encoder=text,
        tokenizer=tiny_minilm.tokenizer,
        prediction_type="depth",
    )
    marigold.set_progress_bar_config(disable=True)
    depth = marigold(torch.zeros(1, 3, 32, 32), num_inference_steps=1, processing_resolution=32, output_type="pt")
    assert depth.prediction.shape[-2:] == (32, 32) and torch.isfinite(depth.prediction).all()
