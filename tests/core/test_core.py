"""Invariants of the DiGSeg core (issue: foundation): conv_in widening, identity at init, samplers, loss,
checkpoints, determinism and batching, and the core's layering."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from digseg_cli.core import diffusion
from digseg_cli.core.model import expand_conv_in
from digseg_cli.inference.pipeline import DigsegPipeline, load_pipeline
from digseg_cli.models.checkpoint import assemble, build_compact, build_from_sd_base, load_checkpoint
from digseg_cli.models.config import DigsegConfig


def _image(h=40, w=48, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_expand_conv_in_reproduces_base_conv():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        norm_num_groups=4,
        cross_attention_dim=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    torch.nn.init.normal_(unet.conv_in.bias)  # a non-zero bias must survive the widening too
    base = copy.deepcopy(unet.conv_in)
    expand_conv_in(unet, 8)
    z = torch.randn(2, 4, 16, 16)
    assert unet.conv_in.in_channels == 8 and unet.config.in_channels == 8
    torch.testing.assert_close(unet.conv_in(torch.cat([z, z], 1)), base(z), atol=1e-5, rtol=0)


@pytest.mark.parametrize("source", ["compact", "sd"])
def test_fresh_model_equals_base_unet(source, tiny_sd_base):
    """Zero-initialised pathway + copy-and-halve conv_in: DiGSeg on [z, z] is the base U-Net on z."""
    from diffusers import UNet2DConditionModel

    if source == "compact":
        from digseg_cli.models.compact import build_components

        # The reference is the compact config's own 4-channel U-Net, copied before DiGSeg widens it: nothing of
        # the widened conv goes into the reference.
        unet, vae, text_encoder, tokenizer, sched = build_components("tiny", seed=3)
        base = copy.deepcopy(unet)
        torch.nn.init.normal_(base.conv_in.bias)  # a non-zero bias must come through the widening unchanged
        unet.conv_in.bias.data.copy_(base.conv_in.bias)
        loaded = assemble(unet, vae, text_encoder, tokenizer, sched, DigsegConfig(base_model="compact:tiny"))
        assert loaded.model.unet.conv_in.in_channels == 8
    else:
        base = UNet2DConditionModel.from_pretrained(tiny_sd_base, subfolder="unet")
        loaded = build_from_sd_base(tiny_sd_base)
    model = loaded.model.eval()
    # The pathway starts at zero; perturb nothing else.
    z = torch.randn(2, 4, 8, 8)
    t = torch.tensor([999, 10])
    ids = loaded.tokenizer(
        ["road", "tree"], padding="max_length", max_length=loaded.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        emb, pooled = model.encode_prompt(ids)
        ours = model(z, z, t, emb, pooled)
        ref = base.eval()(z, t, encoder_hidden_states=emb).sample
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_trained_pathway_changes_output():
    """Guard against a pathway that never reaches the U-Net (the identity test above would still pass)."""
    loaded = build_compact("tiny")
    model = loaded.model.eval()
    z = torch.randn(1, 4, 8, 8)
    ids = loaded.tokenizer(["road"], padding="max_length", max_length=32, return_tensors="pt").input_ids
    with torch.no_grad():
        emb, pooled = model.encode_prompt(ids)
        before = model(z, z, torch.tensor([999]), emb, pooled)
        for mlp in model.text_pathway.mlps:
            torch.nn.init.normal_(mlp[-1].weight, std=0.1)
        after = model(z, z, torch.tensor([999]), emb, pooled)
    assert (before - after).abs().max() > 1e-3


def _record_timesteps(pipe: DigsegPipeline) -> list[int]:
    seen: list[int] = []

    def hook(module, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        seen.extend(torch.as_tensor(t).reshape(-1).tolist())

    pipe.model.unet.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_one_step_inference_and_one_step_trailing_ddim_call_unet_at_T_minus_1():
    pipe = DigsegPipeline(build_compact("tiny"))
    seen = _record_timesteps(pipe)
    pipe(_image(), ["road"])
    T = pipe.scheduler.config.num_train_timesteps
    assert seen and set(seen) == {T - 1}

    ddim = DigsegPipeline(build_compact("tiny", objective="diffusion"))
    seen = _record_timesteps(ddim)
    ddim(_image(), ["road"], steps=1)
    assert set(seen) == {T - 1}
    seen.clear()
    ddim(_image(), ["road"], steps=4)
    assert seen[0] == T - 1 and len(set(seen)) == 4


def test_sample_ddim_rejects_out_of_range_steps():
    sched = diffusion.make_scheduler(build_compact("tiny").scheduler_config)
    with pytest.raises(ValueError, match="between 1 and 50"):
        diffusion.sample_ddim(lambda z, t: z, torch.zeros(1, 4, 4, 4), sched, 51)


def test_one_step_model_refuses_more_steps():
    from digseg_cli.errors import UsageError

    pipe = DigsegPipeline(build_compact("tiny"))
    with pytest.raises(UsageError, match="one-step"):
        pipe(_image(), ["road"], steps=4)


def test_save_load_gives_identical_probabilities(tmp_path):
    pipe = load_pipeline("tiny")
    image = _image()
    before = pipe(image, ["road", "tree"])
    pipe.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted(
        ["digseg_config.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "text_pathway"]
    )
    assert not list((tmp_path / "ckpt").rglob("*.bin")) and not list((tmp_path / "ckpt").rglob("*.pt"))
    after = load_pipeline(tmp_path / "ckpt")(image, ["road", "tree"])
    assert torch.equal(before.probs, after.probs) and torch.equal(before.labels, after.labels)


def test_load_checks_keys_strictly(tmp_path):
    from safetensors.torch import load_file, save_file

    from digseg_cli.errors import CheckpointError

    load_pipeline("tiny").save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "text_pathway" / "model.safetensors"
    state = load_file(str(path))
    state.pop(next(iter(state)))
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="missing keys"):
        load_checkpoint(tmp_path / "ckpt")


def test_same_seed_same_output_and_batch_equals_single():
    pipe = DigsegPipeline(build_compact("tiny", objective="diffusion", default_steps=3))
    image = _image()
    a = pipe(image, ["road", "tree", "water"], seed=7)
    b = pipe(image, ["road", "tree", "water"], seed=7)
    c = pipe(image, ["road", "tree", "water"], seed=8)
    assert torch.equal(a.probs, b.probs)
    assert not torch.equal(a.probs, c.probs)
    singles = torch.cat([pipe(image, [p], seed=7).probs for p in ["road", "tree", "water"]])
    torch.testing.assert_close(a.probs, singles, atol=1e-5, rtol=0)
    pipe.batch_size = 1
    torch.testing.assert_close(pipe(image, ["road", "tree", "water"], seed=7).probs, a.probs, atol=1e-5, rtol=0)


def _overflowing(part: str):
    """The tiny model with one convolution scaled up so that its activations overflow fp16 (max 65504) and
    not fp32; the weights themselves still fit fp16 (else the fp16 copy would hold inf for good)."""
    loaded = build_compact("tiny")
    conv, scale = {"vae": (loaded.model.vae.decoder.conv_in, 3e4), "unet": (loaded.model.unet.conv_out, 2e5)}[part]
    with torch.no_grad():
        conv.weight.mul_(scale)
    assert conv.weight.abs().max() < 65504
    return loaded


@pytest.mark.parametrize(("part", "fallbacks"), [("vae", 1), ("unet", 2)])
def test_fp16_overflow_runs_again_with_the_vae_then_the_model_in_fp32(part, fallbacks):
    """A real overflow (fp16 on the CPU): NaN probabilities are never returned; the VAE goes to fp32 first,
    then, if that is not enough, the whole model. The result is the fp32 one up to the fp16 rounding the
    weights keep (and, after a VAE fallback, the fp16 U-Net): 2e-3 at most here, within fp16's own 1e-2."""
    image = _image()
    reference = DigsegPipeline(_overflowing(part), "cpu", torch.float32)(image, ["road", "tree"])
    pipe = DigsegPipeline(_overflowing(part), "cpu", torch.float16)
    out = pipe(image, ["road", "tree"])
    assert torch.isfinite(out.probs).all()
    torch.testing.assert_close(out.probs, reference.probs, atol=1e-2, rtol=0)
    assert len(pipe.notes) == fallbacks and "float16" in pipe.notes[0]  # so fp16 did overflow
    assert pipe.model.vae.dtype == torch.float32
    assert pipe.model.unet.dtype == (torch.float16 if part == "vae" else torch.float32)
    pipe.notes.clear()
    pipe(image, ["road", "tree"])  # sticky: the next image does not overflow again
    assert pipe.notes == []


def test_overflow_note_names_the_vaes_own_precision_when_it_differs_from_the_pipelines():
    """A trainer validates in fp32 with its frozen VAE in the training precision (prepare=False)."""
    loaded = _overflowing("vae")
    loaded.model.vae.to(torch.float16)
    pipe = DigsegPipeline(loaded, "cpu", torch.float32, prepare=False)
    assert torch.isfinite(pipe(_image(), ["road"]).probs).all()
    assert pipe.notes == ["the VAE gave non-finite values in float16; it runs in float32 from now on"]


def test_non_finite_probabilities_in_fp32_are_a_checkpoint_error():
    from digseg_cli.errors import CheckpointError

    loaded = build_compact("tiny")
    with torch.no_grad():
        loaded.model.unet.conv_out.bias.fill_(float("nan"))
    with pytest.raises(CheckpointError, match="non-finite probabilities in float32"):
        DigsegPipeline(loaded, "cpu", torch.float32)(_image(), ["road"])


@pytest.mark.parametrize("objective", ["one-step", "diffusion"])
def test_tiles_batched_into_one_call_equal_tiles_one_at_a_time(objective):
    pipe = DigsegPipeline(build_compact("tiny", objective=objective, default_steps=1 if objective == "one-step" else 2))
    image = _image(40, 56)  # 16 px tiles, 25 % overlap: 3 × 5 windows, the last ones shifted back
    prompts, call = ["road", "tree", "water"], dict(tile=16, ensemble=2, seed=3)
    pipe.batch_size = 16  # 15 (tile, prompt) pairs per call: 5 tiles of 3 prompts
    assert pipe._tiles_per_call(16, 16, len(prompts)) == 5
    batched = pipe(image, prompts, **call).probs
    pipe.batch_size = 1  # one tile and one prompt per call
    torch.testing.assert_close(pipe(image, prompts, **call).probs, batched, atol=1e-5, rtol=0)
    pipe.batch_size = 2  # one tile per call, its prompts split 2 + 1
    torch.testing.assert_close(pipe(image, prompts, **call).probs, batched, atol=1e-5, rtol=0)


def test_output_shapes_ranges_labels_and_ensemble():
    pipe = load_pipeline("tiny")
    image = _image(37, 53)
    out = pipe(image, ["road", ["tree", "forest"]], ensemble=4, threshold=0.0)
    assert out.probs.shape == (2, 37, 53) and out.labels.shape == (37, 53) and out.masks.shape == (2, 37, 53)
    assert out.probs.min() >= 0 and out.probs.max() <= 1
    # threshold 0: every pixel gets the argmax class (1-based)
    torch.testing.assert_close(out.labels, out.probs.argmax(0) + 1)
    none = pipe(image, ["road"], threshold=1.0)
    assert (none.labels == (none.probs[0] >= 1.0).long()).all()


def test_processing_resolution_and_padding():
    from digseg_cli.core import transforms

    assert transforms.processing_size(300, 200, 64) == (64, 43)
    x, pad = transforms.pad_to_multiple(torch.zeros(1, 3, 43, 30), 8)
    assert x.shape[-2:] == (48, 32) and pad == (5, 2)
    assert transforms.unpad(x, pad).shape[-2:] == (43, 30)
    k = torch.arange(12.0).reshape(1, 3, 4)
    for i in range(8):
        assert torch.equal(transforms.dihedral_inverse(transforms.dihedral(k, i), i), k)


def test_sd_base_folder_loads_offline_and_runs(tiny_sd_base, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = load_pipeline(tiny_sd_base)
    assert pipe.config.prediction_type == "epsilon"
    assert pipe.model.unet.config.in_channels == 8
    out = pipe(_image(), ["road"], resolution=32)
    assert out.probs.shape == (1, 40, 48)
    pipe.save_pretrained(tmp_path / "from-sd")
    again = load_pipeline(tmp_path / "from-sd")
    assert again.config.base_model == str(tiny_sd_base)
    assert torch.equal(again(_image(), ["road"], resolution=32).probs, out.probs)


@pytest.mark.parametrize("objective", ["one-step", "diffusion"])
def test_training_on_one_batch_lowers_loss_5x(objective):
    from digseg_cli.train.loss import batch_loss

    torch.manual_seed(0)
    loaded = build_compact("tiny", objective=objective)
    model = loaded.model
    model.vae.requires_grad_(False)
    sched = diffusion.make_scheduler(loaded.scheduler_config)
    r = 32
    target = torch.zeros(4, 1, r, r)
    target[0, :, 8:24, 8:24] = 1
    target[1, :, :, 12:20] = 1
    target[2, :, 20:, :] = 1
    batch = {
        "pixel_values": torch.rand(4, 3, r, r) * 2 - 1,
        "target": target,
        "input_ids": loaded.tokenizer(
            ["building", "road", "water", "tree"], padding="max_length", max_length=32, return_tensors="pt"
        ).input_ids,
    }
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3)
    losses = []
    for step in range(100):  # measured: 50x (one-step) and 19x (diffusion) lower by step 100
        gen = torch.Generator().manual_seed(step % 4)  # a fixed batch: the same few noise draws repeat
        loss = batch_loss(model, batch, sched, objective=objective, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last * 5 <= first, (first, last)


@pytest.mark.parametrize("objective", ["one-step", "diffusion"])
def test_loss_weight_of_ones_is_plain_mse_and_a_weight_moves_the_loss_towards_its_pixels(objective):
    torch.manual_seed(0)
    sched = diffusion.make_scheduler(build_compact("tiny").scheduler_config)
    z_mask = torch.randn(2, 4, 8, 8)
    pred = torch.randn(2, 4, 8, 8)
    pred[:, :, :4] = 0  # the top half's prediction differs in kind from the bottom half's
    denoise = lambda z_t, t: pred  # noqa: E731

    def loss(weight=None):
        return diffusion.training_loss(
            denoise, z_mask, sched, objective=objective, weight=weight, generator=torch.Generator().manual_seed(1)
        )

    assert torch.allclose(loss(torch.ones(2, 1, 8, 8)), loss())
    top = torch.ones(2, 1, 8, 8)
    top[:, :, :4] = 5
    bottom = torch.ones(2, 1, 8, 8)
    bottom[:, :, 4:] = 5
    # the same weights scaled give the same loss (normalised by their mean) ...
    assert torch.allclose(loss(top), loss(top * 3))
    # ... and weighting one half moves the loss towards that half's own error, by exactly its share:
    # with halves of equal size, weight 5 on one half gives (5·e_that + e_other) / 6.
    only_top, only_bottom = (top == 5).float(), (bottom == 5).float()
    e_top, e_bottom, plain = float(loss(only_top)), float(loss(only_bottom)), float(loss())
    assert e_top != pytest.approx(e_bottom)  # the zeroed top half has an error of its own
    assert plain == pytest.approx((e_top + e_bottom) / 2)
    assert float(loss(top)) == pytest.approx((5 * e_top + e_bottom) / 6)
    assert float(loss(bottom)) == pytest.approx((e_top + 5 * e_bottom) / 6)
    assert min(e_top, plain) < float(loss(top)) < max(e_top, plain)  # between the plain loss and the top's


def test_core_imports_no_io_or_cli_libraries():
    forbidden = {"typer", "rich", "PIL", "cv2", "click", "digseg_cli.cli"}
    core = Path(__file__).resolve().parents[2] / "digseg_cli" / "core"
    for path in sorted(core.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top not in forbidden and name not in forbidden, f"{path.name} imports {name}"
                assert not name.startswith("digseg_cli.") or name.startswith("digseg_cli.core"), (
                    f"{path.name} imports {name}: the core must not import the library layer"
                )
