"""`train()`: fine-tune DiGSeg on a folder of image/mask pairs (DESIGN §1.5), on one process or many.

One function, written as numbered steps, runs on CPU, one GPU, or under `accelerate launch` across GPUs
and nodes (Accelerate handles the process group, mixed precision and gradient accumulation). Every random
choice is derived from (seed, step) or (seed, epoch, index), so a run resumed from `last/` continues
exactly where the uninterrupted run would be. The loop reports through a progress callback and logging;
it knows nothing of the terminal.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from digseg_cli.train import state as train_state
from digseg_cli.models.checkpoint import LoadedModel, save_checkpoint
from digseg_cli.core import diffusion
from digseg_cli.core.metrics import confusion_matrix, iou_per_class, miou
from digseg_cli.core.model import vae_scale_factor
from digseg_cli.inference.device import emulated_bf16_note, leave_process_group
from digseg_cli.errors import InterruptedRunError, UsageError

log = logging.getLogger("digseg")


@dataclass
class TrainSettings:
    """Every knob of a run; written to `<out>/config.json` and into the checkpoint's `training` record."""

    data: Path
    out: Path
    base: str = "stabilityai/stable-diffusion-2"  # SD base (folder / Hub id) or compact config name
    init: str | None = None  # start from these weights (checkpoint, registry name) instead of a fresh base
    val: Path | None = None
    val_split: float = 0.1
    class_name: str | None = None
    objective: str = "one-step"
    resolution: int | None = None  # default: the model's processing resolution
    batch_size: int = 4
    effective_batch: int | None = None  # gradient accumulation up to this many samples per step
    lr: float = 3e-5
    weight_decay: float = 1e-2
    warmup_steps: int = 100
    lr_schedule: str = "cosine"
    max_steps: int | None = None
    epochs: int | None = None
    time_limit: float | None = None  # seconds of wall clock
    val_every: int = 500
    save_every: int = 500
    log_every: int = 10
    val_limit: int | None = 64
    ema: float = 0.0  # EMA decay, 0 = off
    precision: str = "auto"
    gradient_checkpointing: bool = False
    absent_prob: float = 0.3
    prompt_template: str = "{name}"
    noise_strength: float = 0.0  # multi-resolution noise for the `diffusion` objective
    decoded_loss: float = 0.0  # `one-step`: weight of the loss on the VAE-decoded mask (E2E-FT)
    foreground_weight: float = 1.0  # weight of latent pixels that cover the target (1 = plain latent MSE)
    vae_steps: int = 0  # compact bases: stage-1 autoencoder steps before the U-Net trains
    vae_lr: float = 1e-3
    seed: int = 0
    workers: int = 0
    deterministic: bool = False
    resume: Path | None = None
    cpu: bool = False

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


@dataclass
class TrainResult:
    out: Path
    step: int
    best_miou: float | None
    last: Path
    best: Path | None
    stopped_by: str  # "max_steps" | "time" | "epochs" | "signal"
    history: list[dict] = field(default_factory=list)
    is_main_process: bool = True


def batch_loss(model, batch: dict, scheduler, *, objective: str, generator=None, noise_strength: float = 0.0,
               decoded_weight: float = 0.0, foreground_weight: float = 1.0):
    """Loss of one batch: frozen-VAE latents of image and target, prompt through the text encoder, then
    the objective's latent MSE (`core.diffusion.training_loss`), plus for `one-step` an optional loss on
    the mask decoded by the frozen VAE decoder (gradients flow through it, its weights stay fixed).

    `foreground_weight` > 1 weighs the latent pixels that the target touches that much more than the rest:
    a road or a house covers a few percent of the latent, so with plain MSE the empty background dominates
    the loss and small classes learn last."""
    with torch.no_grad():
        z_img = model.encode_image(batch["pixel_values"]).float()  # [B,4,h,w]
        z_mask = model.encode_mask(batch["target"]).float()  # [B,4,h,w]
    emb, pooled = model.encode_prompt(batch["input_ids"])  # [B,L,D], [B,D]

    def denoise(z_t, t):
        return model(z_img, z_t, t, emb, pooled)

    weight = None
    if foreground_weight != 1.0:
        f = model.vae_scale_factor
        covered = F.max_pool2d(batch["target"].float(), kernel_size=f, stride=f)  # [B,1,R,R] -> [B,1,h,w]
        weight = 1.0 + (foreground_weight - 1.0) * covered

    def decoded_loss(clean: torch.Tensor) -> torch.Tensor:
        return decoded_weight * decoded_mask_loss(model, clean, batch["target"])

    return diffusion.training_loss(denoise, z_mask, scheduler, objective=objective, generator=generator,
                                   noise_strength=noise_strength, clean_loss=decoded_loss if decoded_weight else None,
                                   weight=weight)


def decoded_mask_loss(model, clean: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE of the decoded map against `2m−1` plus soft Dice on its probabilities (small classes count)."""
    decoded = model.vae.decode(clean.to(model.vae.dtype) / model.vae.config.scaling_factor).sample  # [B,3,H,W]
    s = decoded.float().mean(dim=1, keepdim=True)  # [B,1,H,W], about [-1,1]
    probs = ((s + 1) / 2).clamp(0, 1)
    overlap = (probs * target).sum(dim=(1, 2, 3))
    dice = 1 - (2 * overlap + 1) / (probs.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) + 1)  # [B]
    return F.mse_loss(s, 2 * target - 1) + dice.mean()


class _LossModule(torch.nn.Module):
    """Puts the whole loss inside `forward`, so DDP sees (and all-reduces) every trainable parameter."""

    def __init__(self, model, scheduler, objective, noise_strength, decoded_weight, foreground_weight=1.0):
        super().__init__()
        self.model, self.scheduler, self.objective = model, scheduler, objective
        self.noise_strength, self.decoded_weight, self.foreground_weight = noise_strength, decoded_weight, foreground_weight

    def forward(self, batch, generator=None):
        return batch_loss(self.model, batch, self.scheduler, objective=self.objective, generator=generator,
                          noise_strength=self.noise_strength, decoded_weight=self.decoded_weight,
                          foreground_weight=self.foreground_weight)


def _step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed((seed * 1_000_003 + step * 997 + micro) % (2**63))


def train(settings: TrainSettings, progress: Callable[[dict], None] | None = None) -> TrainResult:
    """Run (or resume) a training run; returns where its checkpoints are. See the module docstring.

    Under several processes it closes the process group when the run ends (one training per process)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    from digseg_cli.data import folders as data_lib
    from digseg_cli.inference.pipeline import load_model
    from digseg_cli.train.samples import SegmentationTrainDataset

    s = settings
    emit = progress or (lambda event: None)
    # 1. Check the data (the same check as `digseg data check`) and split it.
    classes, train_pairs, val_pairs = _prepare_data(s, data_lib)
    # 2. Processes, precision, accumulation (Accelerate).
    per_step = s.effective_batch or s.batch_size
    accelerator = Accelerator(cpu=s.cpu, mixed_precision=_mixed_precision(s.precision),
                              gradient_accumulation_steps=1)
    accum = max(1, math.ceil(per_step / (s.batch_size * accelerator.num_processes)))
    if not accelerator.is_main_process:  # one process reports; the others train quietly
        emit = lambda event: None  # noqa: E731
    if accelerator.mixed_precision == "bf16" and (note := emulated_bf16_note(accelerator.device)):
        emit({"event": "note", "text": note})
    set_seed(s.seed)
    if s.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    out = Path(s.out)
    resume_from = Path(s.resume) if s.resume else None
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        train_state.write_json_atomic(out / "config.json", {**s.to_dict(), "classes": classes.to_json()})
    # 3. Model: a checkpoint to resume or start from, else a fresh DiGSeg from the base.
    overrides = {"objective": s.objective, "prompt_template": s.prompt_template,
                 "classes": [{"id": c.id, "name": c.name, "synonyms": list(c.synonyms)} for c in classes]}
    source = str(resume_from) if resume_from else (s.init or s.base)
    loaded: LoadedModel = load_model(source, config_overrides=overrides)
    cfg = loaded.config
    if resume_from is None and s.init:
        cfg.objective, cfg.prompt_template, cfg.classes = s.objective, s.prompt_template, overrides["classes"]
    compact = cfg.base_model.startswith("compact:")
    resolution = s.resolution or cfg.default_resolution
    model = loaded.model
    scheduler = diffusion.make_scheduler(loaded.scheduler_config)
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise UsageError(f"unsupported prediction type {scheduler.config.prediction_type!r}")
    state = train_state.load_state(resume_from) if resume_from else None
    dataset = SegmentationTrainDataset(train_pairs, classes, resolution, seed=s.seed, absent_prob=s.absent_prob,
                                       prompt_template=s.prompt_template)
    tokenize = _tokenizer_fn(loaded.tokenizer)
    # 4. Stage 1 for compact bases trained from scratch: the VAE as an autoencoder of images and masks.
    if compact and s.vae_steps and state is None and s.init is None:
        _train_vae(model.vae, dataset, s, accelerator, emit)
        _calibrate_latent_scale(model.vae, dataset, accelerator.device)
    # 5. Freeze the VAE (and the text encoder of SD bases); the U-Net and text pathway train.
    model.vae.requires_grad_(False).eval()
    model.text_encoder.requires_grad_(compact)
    if s.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    # Frozen parts run in the low-precision dtype (only cast when it differs: diffusers warns on casts).
    model.vae.to(accelerator.device, **({"dtype": weight_dtype} if weight_dtype != torch.float32 else {}))
    if not compact:
        model.text_encoder.to(accelerator.device, weight_dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=s.lr, weight_decay=s.weight_decay)
    steps_per_epoch = max(1, len(dataset) // (s.batch_size * accelerator.num_processes * accum))
    max_steps = s.max_steps or (s.epochs * steps_per_epoch if s.epochs else None)
    if max_steps is None and s.time_limit is None:
        raise UsageError("give at least one of --max-steps, --epochs or --time")
    lr_sched = get_scheduler(s.lr_schedule, optimizer, num_warmup_steps=s.warmup_steps,
                             num_training_steps=max_steps or 10**9)
    ema = None
    if s.ema > 0:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(trainable, decay=s.ema)
    loss_module = _LossModule(model, scheduler, s.objective, s.noise_strength, s.decoded_loss, s.foreground_weight)
    loss_module, optimizer = accelerator.prepare(loss_module, optimizer)
    if ema is not None:
        ema.to(accelerator.device)
    # 6. Resume: weights came with the checkpoint; restore optimizer, schedule, EMA, position and RNG.
    step, epoch, batch_in_epoch, best, elapsed_before = 0, 0, 0, None, 0.0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        lr_sched.load_state_dict(state["lr_scheduler"])
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        best, elapsed_before = state.get("best_miou"), state.get("elapsed_s", 0.0)
        train_state.set_rng_state(state["rng"])
        log.info("resumed from %s at step %d", resume_from, step)
    metrics = train_state.MetricsLog(out, truncate_after_step=step) if accelerator.is_main_process else None
    history: list[dict] = []
    # 7. The loop: accumulate `accum` micro-batches per optimizer step; validate and save on schedule.
    rank, world = accelerator.process_index, accelerator.num_processes
    t0, stopped_by, window = time.monotonic(), None, []
    model.train()
    model.vae.eval()

    def save(kind: str, miou_value=None) -> Path:
        return _save(kind, out, loaded, accelerator, optimizer, lr_sched, ema, s, step, epoch, batch_in_epoch,
                     best, elapsed_before + time.monotonic() - t0, resolution, miou_value)

    with train_state.StopSignals() as signals:
        while max_steps is None or step < max_steps:
            order = np.random.default_rng([s.seed, epoch]).permutation(len(dataset))
            dataset.set_epoch(epoch)
            per_batch = s.batch_size * world
            n_batches = len(order) // per_batch
            if n_batches == 0:
                raise UsageError(f"batch size {per_batch} is larger than the {len(order)} training images")
            while batch_in_epoch + accum <= n_batches and (max_steps is None or step < max_steps):
                t_step = time.monotonic()
                optimizer.zero_grad(set_to_none=True)
                loss_sum = 0.0
                for micro in range(accum):
                    lo = (batch_in_epoch + micro) * per_batch
                    idx = order[lo + rank * s.batch_size: lo + (rank + 1) * s.batch_size]
                    batch = _collate([dataset[int(i)] for i in idx], tokenize, accelerator.device)
                    with accelerator.autocast():
                        loss = loss_module(batch, _step_generator(s.seed, step, micro * world + rank)) / accum
                    accelerator.backward(loss)
                    loss_sum += float(loss.detach())
                accelerator.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                lr_sched.step()
                if ema is not None:
                    ema.step(trainable)
                step += 1
                batch_in_epoch += accum
                window.append(time.monotonic() - t_step)
                loss_value = float(accelerator.reduce(torch.tensor(loss_sum, device=accelerator.device), "mean"))
                record = {"step": step, "epoch": epoch, "loss": loss_value, "lr": lr_sched.get_last_lr()[0],
                          "it_per_s": len(window[-20:]) / max(sum(window[-20:]), 1e-9),
                          "elapsed_s": elapsed_before + time.monotonic() - t0}
                emit({"event": "step", "max_steps": max_steps, **record})
                stopped_by = _stop_reason(accelerator, signals, s, elapsed_before + time.monotonic() - t0, step,
                                          max_steps, epoch, batch_in_epoch + accum > n_batches)
                # Validate on schedule, and once more at the end of the run (not after a signal: exit fast).
                val_now = bool(val_pairs) and stopped_by != "signal" and (
                    bool(s.val_every and step % s.val_every == 0) or stopped_by is not None)
                if val_now:
                    record["val_miou"], record["val_iou"] = _validate(model, loaded, ema, trainable, val_pairs,
                                                                      classes, resolution, s, accelerator)
                    emit({"event": "val", **record})
                    if best is None or record["val_miou"] > best:
                        best = record["val_miou"]
                        save("best", best)
                if metrics and (step % s.log_every == 0 or val_now or stopped_by):
                    metrics.write(record)
                    history.append(record)
                if s.save_every and step % s.save_every == 0 and not stopped_by:
                    save("last")
                if stopped_by:
                    break
            if stopped_by or (max_steps is not None and step >= max_steps):
                break
            epoch, batch_in_epoch = epoch + 1, 0
    # 8. The last checkpoint (with the trainer state), and a check that every process agrees on it.
    stopped_by = stopped_by or "max_steps"
    last = save("last")
    _check_ranks_agree(model, accelerator)
    leave_process_group()
    if stopped_by == "signal":
        raise InterruptedRunError(f"interrupted by {signals.requested or 'a signal'} at step {step}: checkpoint written to {last}; "
                                  f"continue with `digseg train --out {out} --resume`")
    best_path = out / "best" if (out / "best").exists() else None
    return TrainResult(out, step, best, last, best_path, stopped_by, history, accelerator.is_main_process)


def _stop_reason(accelerator, signals, s: TrainSettings, elapsed: float, step: int, max_steps, epoch: int,
                 epoch_done: bool) -> str | None:
    """Why the run stops after this step, decided alike on every process (one tiny all-reduce)."""
    flags = torch.tensor([signals.requested is not None, bool(s.time_limit and elapsed >= s.time_limit)],
                         dtype=torch.float32, device=accelerator.device)
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, "sum")
    if flags[0] > 0:
        return "signal"
    if flags[1] > 0:
        return "time"
    if max_steps is not None and step >= max_steps:
        return "max_steps"
    if epoch_done and s.epochs and max_steps is None and epoch + 1 >= s.epochs:
        return "epochs"
    return None


def _check_ranks_agree(model, accelerator) -> None:
    """Every process must end with the same weights; a cheap exact digest per tensor proves it."""
    if accelerator.num_processes == 1:
        return
    with torch.no_grad():
        digest = torch.stack([p.detach().double().sum() + (p.detach().double() ** 2).sum()
                              for p in model.parameters()]).to(accelerator.device)  # [P]
    gathered = accelerator.gather(digest[None])  # [world,P]
    if not bool((gathered == gathered[0]).all()):
        raise RuntimeError("training processes ended with different weights: the run is not synchronised")
    if accelerator.is_main_process:
        log.info("all %d processes hold identical weights", accelerator.num_processes)


def _prepare_data(s: TrainSettings, data_lib):
    from digseg_cli.data.check import check_folder
    from digseg_cli.errors import DatasetError

    report = check_folder(s.data, class_name=s.class_name)
    if not report.ok:
        shown = "; ".join(report.problems[:5]) + (f" (and {len(report.problems) - 5} more)" if len(report.problems) > 5 else "")
        raise DatasetError(f"{s.data} failed the data check: {shown}. Run `digseg data check {s.data}` for the full report")
    classes = data_lib.read_classes(s.data, class_name=s.class_name)
    pairs = data_lib.find_pairs(s.data)
    if s.val:
        val_report = check_folder(s.val, class_name=s.class_name)
        if not val_report.ok:
            raise DatasetError(f"{s.val} failed the data check: {val_report.problems[0]}")
        return classes, pairs, data_lib.find_pairs(s.val)
    train_pairs, val_pairs = data_lib.split_pairs(pairs, s.val_split, s.seed)
    return classes, train_pairs, val_pairs


def _mixed_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else (
            "fp16" if torch.cuda.is_available() else "no")
    mapping = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}
    if precision not in mapping:
        raise UsageError(f"unknown precision {precision!r}: use auto, fp32, fp16 or bf16")
    return mapping[precision]


def _tokenizer_fn(tokenizer):
    def tokenize(texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids  # [B,L]

    return tokenize


def _collate(samples: list[dict], tokenize, device) -> dict:
    return {
        "pixel_values": torch.stack([x["pixel_values"] for x in samples]).to(device),  # [B,3,R,R]
        "target": torch.stack([x["target"] for x in samples]).to(device),  # [B,1,R,R]
        "input_ids": tokenize([x["prompt"] for x in samples]).to(device),  # [B,L]
    }


def _train_vae(vae, dataset, s: TrainSettings, accelerator, emit) -> None:
    """Stage 1 of a compact base (DESIGN §2): train its VAE to reconstruct images and 3-channel masks."""
    vae.train().requires_grad_(True).to(accelerator.device)
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr)
    rng = np.random.default_rng([s.seed, 10**6])
    f = vae_scale_factor(vae.config.block_out_channels)
    for step in range(1, s.vae_steps + 1):
        idx = rng.choice(len(dataset), size=min(s.batch_size, len(dataset)), replace=False)
        samples = [dataset[int(i)] for i in idx]
        images = torch.stack([x["pixel_values"] for x in samples]).to(accelerator.device)  # [B,3,R,R]
        masks = torch.stack([x["target"] for x in samples]).to(accelerator.device) * 2 - 1  # [B,1,R,R] in [-1,1]
        x = torch.cat([images, masks.expand(-1, 3, -1, -1)])  # [2B,3,R,R]
        # A fully convolutional VAE learns the same from small crops (8 latent pixels a side, or a quarter
        # of the image) at a fraction of the cost: measured 4× more steps per second than half-size crops.
        c = min(x.shape[-1], max(x.shape[-1] // 4, 8 * f))
        top, left = (int(v) for v in rng.integers(0, x.shape[-1] - c + 1, size=2))
        x = x[..., top:top + c, left:left + c]  # [2B,3,c,c]
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample(generator=None)).sample  # [2B,3,c,c]
        b = len(images)
        # Masks are grey (R = G = B) and easy: with equal weight they pull the decoder towards grey and the
        # image latents lost their colour (red roofs and green fields came back beige). So masks weigh half,
        # and the images' chroma (each pixel minus its grey level) gets a loss of its own.
        chroma_recon = recon[:b] - recon[:b].mean(dim=1, keepdim=True)  # [B,3,c,c]
        chroma_image = x[:b] - x[:b].mean(dim=1, keepdim=True)
        loss = (F.mse_loss(recon[:b], x[:b]) + 4 * F.mse_loss(chroma_recon, chroma_image)
                + 0.5 * F.mse_loss(recon[b:], x[b:]) + 1e-6 * dist.kl().mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        emit({"event": "vae_step", "step": step, "max_steps": s.vae_steps, "loss": float(loss.detach())})
    vae.eval()


@torch.no_grad()
def _calibrate_latent_scale(vae, dataset, device, n: int = 64) -> None:
    """Set the VAE's `scaling_factor` so image and mask latents have unit variance, as Stable Diffusion's
    0.18215 does for its VAE; a from-scratch VAE keeps the U-Net's inputs and targets at the scale it
    was designed for (measured: unscaled, a mask moved the latent by 0.08 and the latent loss barely saw it)."""
    samples = [dataset[i] for i in range(min(n, len(dataset)))]
    images = torch.stack([x["pixel_values"] for x in samples]).to(device)  # [n,3,R,R]
    masks = torch.stack([x["target"] for x in samples]).to(device) * 2 - 1  # [n,1,R,R]
    latents = torch.cat([vae.encode(images).latent_dist.mean, vae.encode(masks.expand(-1, 3, -1, -1)).latent_dist.mean])
    factor = float(1.0 / latents.float().std().clamp_min(1e-6))
    vae.register_to_config(scaling_factor=factor)
    log.info("VAE latent scaling factor set to %.4f", factor)


@torch.no_grad()
def _validate(model, loaded, ema, trainable, val_pairs, classes, resolution, s, accelerator):
    """mIoU on the validation pairs (all classes plus background, detectron2 rule), sharded over processes."""
    from digseg_cli.data.folders import load_eval_pairs
    from digseg_cli.inference.pipeline import DigsegPipeline

    if ema is not None:
        ema.store(trainable)
        ema.copy_to(trainable)
    model.eval()
    try:
        pipe = DigsegPipeline(loaded, accelerator.device, torch.float32, prepare=False)
        prompts = [[c.name] for c in classes]
        ids = torch.tensor([classes.background, *[c.id for c in classes]])
        num = int(ids.max()) + 1
        cm = torch.zeros((num, num), dtype=torch.int64)
        pairs = list(val_pairs)[: s.val_limit] if s.val_limit else list(val_pairs)
        for i, sample in enumerate(load_eval_pairs(pairs, classes)):
            if i % accelerator.num_processes != accelerator.process_index:
                continue
            out = pipe(sample.image, prompts, resolution=resolution, seed=s.seed)
            pred = ids[out.labels]  # prompt index → class id
            cm += confusion_matrix(pred, torch.from_numpy(sample.label.astype(np.int64)), num, classes.ignore_index)
        cm = accelerator.reduce(cm.to(accelerator.device), "sum").cpu()
        iou = iou_per_class(cm)
        names = {classes.background: "background", **{c.id: c.name for c in classes}}
        # Classes absent from the validation split have no IoU: None (JSON null), not NaN.
        per_class = {names[int(k)]: (None if torch.isnan(iou[int(k)]) else float(iou[int(k)])) for k in ids}
        return miou(cm[ids][:, ids]), per_class
    finally:
        if ema is not None:
            ema.restore(trainable)
        model.train()
        model.vae.eval()


def _save(kind, out, loaded, accelerator, optimizer, lr_sched, ema, s, step, epoch, batch_in_epoch, best, elapsed,
          resolution, miou_value) -> Path:
    """Write `last/` (with trainer state) or `best/` (EMA weights when EMA is on) atomically."""
    folder = out / kind
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return folder
    cfg = loaded.config
    cfg.default_resolution = resolution
    cfg.training = {"settings": s.to_dict(), "step": step, "epoch": epoch}
    if miou_value is not None:
        cfg.evaluation = {**cfg.evaluation, "val_miou": miou_value, "val_step": step}
    trainable = [p for p in loaded.model.parameters() if p.requires_grad]
    if kind == "best" and ema is not None:
        ema.store(trainable)
        ema.copy_to(trainable)
    try:
        save_checkpoint(folder, loaded, overwrite=True, extra=None if kind == "best" else lambda tmp: train_state.save_state(
            tmp / train_state.STATE_FILE,
            {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_sched.state_dict(), "step": step, "epoch": epoch,
             "batch_in_epoch": batch_in_epoch, "best_miou": best, "elapsed_s": elapsed, "rng": train_state.rng_state(),
             **({"ema": ema.state_dict()} if ema is not None else {})},
        ))
    finally:
        if kind == "best" and ema is not None:
            ema.restore(trainable)
    return folder
