"""Distil a checkpoint's VAE mask decoder into a `FastMaskDecoder`, check its accuracy, save a copy.

Steps: (1) load the checkpoint; (2) build a pool of mask latents on synthetic scenes (never the
validation seed): the model's own latents for a present and a random (often absent) prompt per scene,
plus the encoded ground-truth mask of a present class; targets are `DigsegModel.decode_probs` of each
latent (the VAE decoder is the teacher, never the ground truth); (3) fit the small decoder with
binary cross-entropy on the soft targets; (4) score mIoU on the `synth` validation split with each
decoder and time both decoders; (5) write a copy of the checkpoint with `fast_decoder/` and the result in
its config's `evaluation["fast_decoder"]` (`passed` when mIoU changes by at most `tolerance` points, which
is what `decoder="auto"` reads). It knows nothing of the command line.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from digseg_cli.core import diffusion, transforms
from digseg_cli.core.fast_decoder import FastMaskDecoder
from digseg_cli.errors import UsageError
from digseg_cli.train.settings import refuse_broken

log = logging.getLogger("digseg")
POOL_SEED = 2_000_029  # synthetic scenes for distillation: neither the training data nor the synth val split
Progress = Callable[[dict], None]


@dataclass(frozen=True)
class DecoderTrainSettings:
    """`digseg decoder train` options, one to one."""

    weights: str
    out: Path
    steps: int = 800
    batch_size: int = 8
    lr: float = 2e-3
    width: int = 32
    blocks: int = 2
    pool: int = 192  # synthetic scenes in the distillation pool (3 latents each)
    resolution: int | None = None  # scene size (default: the model's processing resolution)
    val_limit: int | None = None  # synth validation images to score (default: all)
    tolerance: float = 0.5  # mIoU points
    seed: int = 0
    overwrite: bool = False


@dataclass
class DecoderTrainResult:
    out: Path
    steps: int
    loss: float
    params: int
    evaluation: dict


def check_inputs(s: DecoderTrainSettings) -> None:
    """Refuse, before any work, settings no distillation could use: a `UsageError` (exit 2) naming the option
    as `digseg decoder train` spells it. Pure; `train_fast_decoder` calls it."""
    rules = [
        (s.steps >= 1, "--steps", "at least 1", s.steps),
        (s.batch_size >= 1, "--batch-size", "at least 1", s.batch_size),
        (s.pool >= 1, "--pool", "at least 1", s.pool),
        (s.lr > 0, "--lr", "a positive number", s.lr),
        (s.width >= 1, "--width", "at least 1", s.width),
        (s.blocks >= 0, "--blocks", "0 or more", s.blocks),
        (s.resolution is None or s.resolution >= 1, "--resolution", "a positive number of pixels", s.resolution),
        (s.val_limit is None or s.val_limit >= 1, "--val-limit", "at least 1", s.val_limit),
        (s.tolerance >= 0, "--tolerance", "0 or more (mIoU points)", s.tolerance),
    ]
    refuse_broken(rules)


def train_fast_decoder(s: DecoderTrainSettings, progress: Progress | None = None) -> DecoderTrainResult:
    from digseg_cli.inference.pipeline import load_pipeline

    emit = progress or (lambda event: None)
    check_inputs(s)
    if Path(s.out).exists() and not s.overwrite:
        raise UsageError(f"{s.out} already exists: pass --overwrite or choose another --out")
    # 1. Load the teacher (CPU, fp32).
    pipe = load_pipeline(s.weights)
    model = pipe.model
    resolution = s.resolution or pipe.config.default_resolution
    # 2. Pool of mask latents `[N,4,h,w]` and the VAE decoder's probabilities `[N,H,W]` for them.
    latents = _latent_pool(pipe, s.pool, resolution, s.seed, emit)
    targets = torch.cat([model.decode_probs(z) for z in latents.split(16)])  # [N,H,W] in [0,1]
    # 3. Fit the fast decoder.
    torch.manual_seed(s.seed)
    decoder = FastMaskDecoder(model.latent_channels, model.vae_scale_factor, width=s.width, blocks=s.blocks)
    loss = _fit(decoder, latents, targets, s, emit)
    model.fast_decoder = decoder.requires_grad_(False).eval()
    pipe.memory_format = pipe.memory_format  # the new decoder in the layout the others run in, timed as users run it
    # 4. Accuracy (mIoU on the synth validation split, each decoder) and decode speed.
    evaluation = {
        "teacher": "vae decoder",
        "distillation": {"steps": s.steps, "pool_latents": len(latents), "resolution": resolution, "final_bce": loss},
    }
    evaluation.update(_compare(pipe, s.val_limit, s.tolerance, emit))
    evaluation.update(_time_decoders(model, latents[: min(8, len(latents))]))
    # 5. A copy of the checkpoint with fast_decoder/ and the result in its config. The U-Net and VAE are
    # unchanged, so the checkpoint's other scores stay true, except those measured with a fast decoder:
    # that was another one.
    kept = {
        k: v
        for k, v in pipe.config.evaluation.items()
        if k != "fast_decoder" and not (isinstance(v, dict) and v.get("decoder") == "fast")
    }
    pipe.config.evaluation = {**kept, "fast_decoder": evaluation}
    pipe.save_pretrained(s.out, overwrite=s.overwrite)
    params = sum(p.numel() for p in decoder.parameters())
    return DecoderTrainResult(Path(s.out), s.steps, loss, params, evaluation)


@torch.no_grad()
def _latent_pool(pipe, n_scenes: int, resolution: int, seed: int, emit: Progress) -> torch.Tensor:
    """Per scene: the model's latents for a present and a random class prompt, and an encoded true mask."""
    from digseg_cli.data.synth import SYNTH_CLASSES, generate_scene

    model, cfg = pipe.model, pipe.config
    names = {c["id"]: [c["name"], *c.get("synonyms", [])] for c in SYNTH_CLASSES["classes"]}
    generator = torch.Generator("cpu").manual_seed(seed)
    out = []
    for i in range(n_scenes):
        rng = np.random.default_rng([POOL_SEED, seed, i])
        image, mask = generate_scene(rng, size=max(16, resolution))
        present = [k for k in names if (mask == k).any()] or list(names)
        chosen = [int(rng.choice(present)), int(rng.choice(list(names)))]
        texts = [pipe.format_prompt(str(rng.choice(names[k]))) for k in chosen]
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1  # [1,3,S,S] in [-1,1]
        x, _ = transforms.pad_to_multiple(x, model.size_multiple)
        z_img = model.encode_image(x)  # [1,4,h,w]
        emb, pooled = pipe.encode_prompts(texts)  # [2,L,D], [2,D]
        z_b = z_img.expand(2, -1, -1, -1)  # [2,4,h,w]

        def denoise(z_t, t, z_b=z_b, emb=emb, pooled=pooled):  # this scene's inputs (bound now, not at call)
            return model(z_b, z_t, t, emb, pooled)

        if cfg.objective == "one-step":
            clean = diffusion.sample_one_step(denoise, z_b.shape, pipe.scheduler, pipe.device, pipe.dtype)
        else:
            noise = torch.randn(z_b.shape, generator=generator).to(pipe.device, pipe.dtype)
            clean = diffusion.sample_ddim(denoise, noise, pipe.scheduler, cfg.default_steps)
        m = torch.from_numpy(mask == chosen[0]).float()[None, None]  # [1,1,S,S] in {0,1}
        m, _ = transforms.pad_to_multiple(m, model.size_multiple)
        out += [clean.float(), model.encode_mask(m).float()]  # [2,4,h,w], [1,4,h,w]
        emit({"event": "pool", "done": i + 1, "total": n_scenes})
    return torch.cat(out)  # [3·n,4,h,w]


def _fit(decoder: FastMaskDecoder, latents, targets, s: DecoderTrainSettings, emit: Progress) -> float:
    """AdamW with a cosine decay to 0 over `steps` (diffusers' `get_scheduler`, no warm-up); BCE between the
    decoder's logits and the teacher's probabilities."""
    from diffusers.optimization import get_scheduler

    opt = torch.optim.AdamW(decoder.parameters(), lr=s.lr, weight_decay=1e-4)
    sched = get_scheduler("cosine", opt, num_warmup_steps=0, num_training_steps=s.steps)
    g = torch.Generator().manual_seed(s.seed)
    decoder.train()
    recent: list[float] = []
    for step in range(1, s.steps + 1):
        idx = torch.randint(0, len(latents), (min(s.batch_size, len(latents)),), generator=g)
        logits = decoder.logits(latents[idx])[:, 0]  # [b,H,W]
        loss = F.binary_cross_entropy_with_logits(logits, targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        recent = (recent + [loss.item()])[-50:]
        emit({"event": "step", "step": step, "max_steps": s.steps, "loss": statistics.fmean(recent)})
    decoder.eval()
    return statistics.fmean(recent)


def _compare(pipe, limit: int | None, tolerance: float, emit: Progress) -> dict:
    """mIoU (points, 0–100) on the synth validation split with the VAE decoder and with the fast one."""
    from digseg_cli.data.benchmarks import catalog as D
    from digseg_cli.evaluate.scoring import evaluate, protocol_kwargs
    from digseg_cli.inference.seeds import image_seed

    spec = D.get_spec("synth")
    data = D.open_dataset(spec)
    scores = {}
    for decoder in ("vae", "fast"):

        def predict(image, prompts, name, decoder=decoder):
            seed = image_seed(0, name)  # paired noise for both decoders (eval's per-image seed)
            return pipe(image, prompts, seed=seed, decoder=decoder).probs  # [K,H,W]

        def tick(done, total, stem, decoder=decoder):
            emit({"event": "eval", "decoder": decoder, "done": done, "total": total})

        result = evaluate(
            data, spec.class_names or (), predict, limit=limit, progress=tick, worst_k=0, **protocol_kwargs(spec)
        )
        scores[decoder] = 100 * float(result.metrics["metrics"]["miou"])
        images = result.metrics["num_images"]
    change = scores["fast"] - scores["vae"]
    return {
        "dataset": "synth",
        "split": data.split,
        "images": images,
        "miou_vae": round(scores["vae"], 2),
        "miou_fast": round(scores["fast"], 2),
        "miou_change_points": round(change, 2),
        "tolerance_points": tolerance,
        "passed": bool(abs(change) <= tolerance),
    }


@torch.no_grad()
def _time_decoders(model, latents: torch.Tensor, repeats: int = 3) -> dict:
    """Seconds to decode `latents` `[b,4,h,w]` with each decoder (median of `repeats`, after a warm-up)."""
    times = {}
    for name, fn in (("vae", model.decode_probs), ("fast", model.decode_probs_fast)):
        fn(latents)
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(latents)
            runs.append(time.perf_counter() - t0)
        times[name] = statistics.median(runs)
    return {
        "decode_batch": len(latents),
        "decode_seconds_vae": round(times["vae"], 5),
        "decode_seconds_fast": round(times["fast"], 5),
        "decode_speedup": round(times["vae"] / times["fast"], 1),
    }
