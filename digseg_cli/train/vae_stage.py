"""Stage 1 of a compact base trained from scratch (DESIGN §2): its VAE as an autoencoder of images and masks.

One job: fit the VAE to reconstruct training images and 3-channel masks, then set its latent
`scaling_factor` so the U-Net sees unit-variance latents. It reads samples from the training dataset
(`digseg_cli.train.samples`) and reports through the loop's progress callback. A SIGINT/SIGTERM (the run's
`inference.stopping.StopSignals`) stops it after the step it is in; `run_vae_stage` then writes the model as it
stands to `last/` through `train.state` and ends the run with exit 130. The U-Net stage, the optimizer of
stage 2 and its resumable checkpoints belong to `digseg_cli.train.loop`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from digseg_cli.core.model import vae_scale_factor
from digseg_cli.errors import InterruptedRunError
from digseg_cli.inference.device import leave_process_group
from digseg_cli.train import state as train_state
from digseg_cli.train.optim import adamw

log = logging.getLogger("digseg")
# AdamW at its full rate from the first step sometimes (seeds 2 and 3 of 0-4, 64 px synth scenes) left the
# fresh VAE with latents that no longer told green fields from bare ground (their mean latents 0.05 and 0.3
# standard deviations apart, against 1.75 for seeds 0 and 1), and the U-Net could not learn `field`
# (validation mIoU 0.38 instead of 0.55). A linear warm-up over the first 100 steps gave seed 2 a
# separation of 2.0 and a field reconstruction error like seed 0's.
VAE_WARMUP_STEPS = 100
VAE_WEIGHT_DECAY = 1e-2  # AdamW's default, on the kernels only (`train.optim.adamw`)


def run_vae_stage(s, loaded, dataset, *, accelerator, emit, signals) -> None:
    """Stage 1 of run settings `s` on `loaded`'s VAE: fit it, then calibrate its latent scale. After a signal
    the model as it stands (latent scale calibrated, so `--init` can start the U-Net stage from it) is
    written to `<out>/last/` without a trainer state (no U-Net step to resume) and `InterruptedRunError`
    (exit 130) says how to go on."""
    done = train_vae(
        loaded.model.vae,
        dataset,
        steps=s.vae_steps,
        batch_size=s.batch_size,
        lr=s.vae_lr,
        seed=s.seed,
        device=accelerator.device,
        emit=emit,
        stop=lambda: signals.requested is not None,
    )
    calibrate_latent_scale(loaded.model.vae, dataset, accelerator.device)
    if signals.requested is None:
        return
    training = {"settings": s.to_dict(), "step": 0, "epoch": 0, "vae_steps_done": done}
    last = train_state.save_run_checkpoint(
        Path(s.out) / "last",
        loaded,
        accelerator=accelerator,
        training=training,
        position=train_state.Position(),
        elapsed=0.0,
    )
    leave_process_group()
    raise InterruptedRunError(
        f"interrupted by {signals.requested} in the VAE stage after {done} of {s.vae_steps} VAE steps: the model "
        f"as it stands written to {last} (not resumable: no U-Net step was taken); start the U-Net stage from "
        f"it with `digseg train --init {last} --out NEW_FOLDER ...`, or run again with --overwrite"
    )


def train_vae(vae, dataset, *, steps: int, batch_size: int, lr: float, seed: int, device, emit, stop=None) -> int:
    """Train `vae` for `steps` AdamW steps (`train.optim.adamw`; linear warm-up over `VAE_WARMUP_STEPS`,
    then `lr`; diffusers' `get_scheduler`) on random crops of images and masks (the masks weigh half).
    `stop()`, asked after each step, ends it early; returns the steps taken."""
    from diffusers.optimization import get_scheduler

    vae.train().requires_grad_(True).to(device)
    opt = adamw(list(vae.parameters()), lr=lr, weight_decay=VAE_WEIGHT_DECAY)
    sched = get_scheduler("constant_with_warmup", opt, num_warmup_steps=min(VAE_WARMUP_STEPS, steps))
    rng = np.random.default_rng([seed, 10**6])
    f = vae_scale_factor(vae.config.block_out_channels)
    step = 0
    for step in range(1, steps + 1):
        idx = rng.choice(len(dataset), size=min(batch_size, len(dataset)), replace=False)
        samples = [dataset[int(i)] for i in idx]
        images = torch.stack([x["pixel_values"] for x in samples]).to(device)  # [B,3,R,R]
        masks = torch.stack([x["target"] for x in samples]).to(device) * 2 - 1  # [B,1,R,R] in [-1,1]
        x = torch.cat([images, masks.expand(-1, 3, -1, -1)])  # [2B,3,R,R]
        # A fully convolutional VAE learns the same from small crops (8 latent pixels a side, or a quarter
        # of the image) at a fraction of the cost: measured 4× more steps per second than half-size crops.
        c = min(x.shape[-1], max(x.shape[-1] // 4, 8 * f))
        top, left = (int(v) for v in rng.integers(0, x.shape[-1] - c + 1, size=2))
        x = x[..., top : top + c, left : left + c]  # [2B,3,c,c]
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample(generator=None)).sample  # [2B,3,c,c]
        b = len(images)
        # Masks are grey (R = G = B) and easy: with equal weight they pull the decoder towards grey and the
        # image latents lost their colour (red roofs and green fields came back beige). So masks weigh half,
        # and the images' chroma (each pixel minus its grey level) gets a loss of its own.
        chroma_recon = recon[:b] - recon[:b].mean(dim=1, keepdim=True)  # [B,3,c,c]
        chroma_image = x[:b] - x[:b].mean(dim=1, keepdim=True)
        loss = (
            F.mse_loss(recon[:b], x[:b])
            + 4 * F.mse_loss(chroma_recon, chroma_image)
            + 0.5 * F.mse_loss(recon[b:], x[b:])
            + 1e-6 * dist.kl().mean()
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        emit({"event": "vae_step", "step": step, "max_steps": steps, "loss": float(loss.detach())})
        if stop is not None and stop():
            break
    vae.eval()
    return step


@torch.no_grad()
def calibrate_latent_scale(vae, dataset, device, n: int = 64) -> None:
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
